"""Checkpoint storage: one conformance suite over every target (a local folder, and S3
served by a real moto server on loopback), the manifest and its verification, the
checkpoint listing and pruning, and the preflight and failure modes of S3."""

import hashlib
import logging
import os
import pickle
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from memdist.errors import CheckpointError, ConfigError
from memdist.storage.manifest import (
    MANIFEST_KEY,
    checksum_tree,
    latest_complete,
    list_checkpoints,
    prune,
    read_manifest,
    seal,
    sha256_file,
    step_prefix,
    verify,
    verify_or_raise,
    write_manifest,
)
from memdist.storage.targets import (
    CheckpointTarget,
    FolderTarget,
    S3Target,
    open_target,
)

BUCKET = "memdist-ckpt-test"
SECRET = "sEcReT-value-never-shown-0123456789"
PART = 5 * 2**20  # S3's smallest multipart part; the tests lower the threshold to it
FAST = {"max_attempts": 2, "connect_timeout": 2.0, "read_timeout": 5.0}


def _fake_aws_env(mp: pytest.MonkeyPatch, empty: Path) -> None:
    """Fake credentials, and nothing read from this machine's ~/.aws or an instance role."""
    empty.write_text("")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    mp.setenv("AWS_CONFIG_FILE", str(empty))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _start_moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)


@pytest.fixture(autouse=True, scope="module")
def _aws_env(tmp_path_factory):
    """Fake credentials for every test here (the module's tests start their own servers)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    with pytest.MonkeyPatch.context() as mp:
        _fake_aws_env(mp, tmp_path_factory.mktemp("aws") / "empty")
        yield


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 endpoint (moto's server on an ephemeral loopback port) with one bucket."""
    server, endpoint = _start_moto()
    _create_bucket(endpoint, BUCKET)
    yield endpoint
    server.stop()


def _s3(endpoint: str, prefix: str = "", bucket: str = BUCKET, **kw) -> S3Target:
    opts = {"multipart_threshold": PART, "multipart_chunksize": PART, **FAST, **kw}
    return S3Target(bucket, prefix, endpoint_url=endpoint, **opts)


@pytest.fixture(params=["folder", "s3"])
def target(request, tmp_path) -> CheckpointTarget:
    """An empty target of each kind (S3: a prefix of a new bucket)."""
    if request.param == "folder":
        return FolderTarget(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"  # moto lists slower as a bucket fills up
    _create_bucket(endpoint, bucket)
    return _s3(endpoint, "runs/a", bucket=bucket)


def _make_tree(root: Path) -> dict[str, bytes]:
    """Nested folders, an empty file and one file larger than the multipart threshold."""
    rng = random.Random(0)
    files = {
        "zarr.json": b'{"zarr_format": 3}',
        "values/c/0/0": rng.randbytes(1000),
        "values/c/1/0": rng.randbytes(3000),
        "values/zarr.json": b"{}",
        "opt/deep/er/empty": b"",
        "big.bin": rng.randbytes(PART + 123_456),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


# -- the conformance suite ------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(target):
    target.put_bytes("a/b.txt", b"first")
    assert target.get_bytes("a/b.txt") == b"first"
    target.put_bytes("a/b.txt", b"second, longer")
    assert target.get_bytes("a/b.txt") == b"second, longer"
    target.put_bytes("empty", b"")
    assert target.get_bytes("empty") == b""
    assert b"".join(target.iter_bytes("a/b.txt", chunk_bytes=4)) == b"second, longer"


def test_missing_object_names_key_and_uri(target, tmp_path):
    for call in (
        lambda: target.get_bytes("no/such"),
        lambda: list(target.iter_bytes("no/such")),
        lambda: target.get_file("no/such", tmp_path / "out"),
    ):
        with pytest.raises(CheckpointError, match="no/such") as info:
            call()
        assert target.uri in str(info.value)
    assert not (tmp_path / "out").exists()


def test_file_round_trip_multipart(target, tmp_path):
    data = os.urandom(2 * PART + 1000)
    (tmp_path / "src.bin").write_bytes(data)
    target.put_file("x/big.bin", tmp_path / "src.bin")
    target.get_file("x/big.bin", tmp_path / "dl" / "copy.bin")
    assert (tmp_path / "dl" / "copy.bin").read_bytes() == data
    assert target.list("x") == [("x/big.bin", len(data))]
    assert os.listdir(tmp_path / "dl") == ["copy.bin"]  # no temporary left behind
    if isinstance(target, S3Target):  # a multipart upload's ETag ends in -<parts>
        head = target.client.head_object(Bucket=target.bucket, Key=f"{target.prefix}/x/big.bin")
        assert head["ETag"].strip('"').endswith("-3")


def test_tree_round_trip(target, tmp_path):
    files = _make_tree(tmp_path / "src")
    keys = target.put_tree("ckpt/tree", tmp_path / "src")
    expected = sorted((f"ckpt/tree/{rel}", len(data)) for rel, data in files.items())
    assert sorted(keys) == [k for k, _ in expected]
    assert target.list("ckpt/tree") == expected
    got = target.get_tree("ckpt/tree", tmp_path / "dst")
    assert sorted(got) == sorted(keys)
    for rel, data in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    # An empty prefix means the whole target.
    assert target.get_tree("", tmp_path / "all") == [k for k, _ in expected]
    assert (tmp_path / "all/ckpt/tree/values/c/1/0").read_bytes() == files["values/c/1/0"]


def test_list_exists_delete_prefix(target):
    for key in ("a/x", "a/y/z", "ab/w", "b"):
        target.put_bytes(key, key.encode())
    assert target.list() == [("a/x", 3), ("a/y/z", 5), ("ab/w", 4), ("b", 1)]
    assert target.list("a") == [("a/x", 3), ("a/y/z", 5)]  # a folder, not a string prefix
    assert target.list("a/y/") == [("a/y/z", 5)]
    assert target.list("nothing") == []
    assert target.exists("a/x") and target.exists("b")
    assert not target.exists("a") and not target.exists("a/nope")
    target.delete_prefix("a")
    assert target.list() == [("ab/w", 4), ("b", 1)]
    target.delete_prefix("nothing")
    target.delete("b")
    target.delete("b")  # deleting what is not there is fine
    assert target.list() == [("ab/w", 4)]
    target.delete_prefix("")
    assert target.list() == []


def test_child_prefixes(target):
    child = target.child("step-000001/values")
    assert child.uri == target.uri_of("step-000001/values")
    child.put_bytes("t0/zarr.json", b"{}")
    grandchild = child.child("t0")
    assert grandchild.get_bytes("zarr.json") == b"{}"
    assert child.list() == [("t0/zarr.json", 2)]
    assert target.list() == [("step-000001/values/t0/zarr.json", 2)]
    assert type(child) is type(target)


def test_keys_must_be_relative_paths(target):
    for bad in ("", "a/../b", "../x", "a//b", "./a", "a/./b"):
        with pytest.raises(CheckpointError, match="key"):
            target.put_bytes(bad, b"x")
    assert target.list() == []


def test_pickled_target_works_in_another_process(target, tmp_path):
    target.put_bytes("before", b"1")  # the original has made its client (S3)
    blob = pickle.dumps(target)
    assert SECRET.encode() not in blob
    copy = pickle.loads(blob)
    assert copy == target and copy.uri == target.uri
    copy.put_bytes("from-copy", b"2")
    code = (
        "import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); "
        "t.put_bytes('from-child', t.get_bytes('before') + b'3')"
    )
    subprocess.run([sys.executable, "-c", code], input=blob, check=True, timeout=60)
    assert target.get_bytes("from-child") == b"13"
    assert [k for k, _ in target.list()] == ["before", "from-child", "from-copy"]


def test_preflight_passes_and_leaves_nothing(target):
    target.check_writable()
    assert target.list() == []


# -- the manifest ---------------------------------------------------------------------------


def _write_checkpoint(root: CheckpointTarget, step: int, tmp_path: Path, *, complete=True):
    ckpt = root.child(step_prefix(step))
    src = tmp_path / f"src{step}"
    (src / "values/c").mkdir(parents=True)
    (src / "values/c/0").write_bytes(bytes(range(256)) * 40 + bytes([step % 256]))
    (src / "values/zarr.json").write_text('{"shape": [10, 4]}')
    ckpt.put_tree("table0", src)
    ckpt.put_bytes("trainer.json", b'{"step": %d}' % step)
    if complete:
        seal(ckpt, step, {"model": {"dim": 8}}, {"plan": "rows", "shards": 2})
    return ckpt


def test_manifest_round_trip_and_verify(target, tmp_path):
    ckpt = target.child("step-000007")
    files = _make_tree(tmp_path / "src")
    ckpt.put_tree("values", tmp_path / "src")
    ckpt.put_bytes("trainer.json", b'{"step": 7}')
    objects = checksum_tree(ckpt)
    assert objects["values/big.bin"] == {
        "size": len(files["big.bin"]),
        "sha256": sha256_file(tmp_path / "src/big.bin"),
    }
    assert objects["trainer.json"]["sha256"] == hashlib.sha256(b'{"step": 7}').hexdigest()
    config = {"model": {"dim": 8, "layers": [1, 2]}, "lr": 0.001}
    meta = {"plan": {"kind": "rows", "shards": 3}, "shapes": {"t0": [100, 8]}, "dtype": "f32"}
    written = write_manifest(ckpt, 7, config, meta, objects)
    assert ckpt.exists(MANIFEST_KEY)
    manifest = read_manifest(ckpt)
    assert manifest == written
    assert (manifest.step, manifest.config, manifest.meta) == (7, config, meta)
    assert manifest.total_bytes == sum(len(d) for d in files.values()) + len(b'{"step": 7}')
    assert verify(ckpt, manifest) == []
    ckpt.put_bytes("extra/not-named", b"fine")  # objects the manifest does not name are fine
    assert verify_or_raise(ckpt) == manifest


def test_manifest_must_be_serialisable(target):
    with pytest.raises(CheckpointError, match="JSON"):
        write_manifest(target, 1, {"bad": object()}, {}, {})
    assert not target.exists(MANIFEST_KEY)


def test_missing_or_malformed_manifest(target):
    with pytest.raises(CheckpointError, match="manifest.json"):
        read_manifest(target)
    target.put_bytes(MANIFEST_KEY, b"{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(target)


@pytest.mark.parametrize("fault", ["truncated", "deleted", "modified"])
def test_verify_names_each_fault(target, tmp_path, fault):
    ckpt = _write_checkpoint(target, 3, tmp_path)
    manifest = read_manifest(ckpt)
    victim = "table0/values/c/0"
    data = ckpt.get_bytes(victim)
    if fault == "truncated":
        ckpt.put_bytes(victim, data[:-1])
    elif fault == "deleted":
        ckpt.delete(victim)
    else:
        ckpt.put_bytes(victim, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    problems = verify(ckpt, manifest)
    assert len(problems) == 1 and victim in problems[0]
    assert {"truncated": "bytes", "deleted": "missing", "modified": "SHA-256"}[fault] in problems[0]
    with pytest.raises(CheckpointError, match="corrupt") as info:
        verify_or_raise(ckpt)
    assert victim in str(info.value) and ckpt.uri in str(info.value)


def test_list_checkpoints_needs_a_manifest(target, tmp_path):
    _write_checkpoint(target, 1, tmp_path)
    _write_checkpoint(target, 2, tmp_path, complete=False)
    _write_checkpoint(target, 30, tmp_path)
    target.put_bytes("other/file", b"not a checkpoint")
    target.put_bytes("step-000009", b"a file, not a prefix")
    infos = list_checkpoints(target)
    assert [(i.step, i.key, i.complete) for i in infos] == [
        (1, "step-000001", True),
        (2, "step-000002", False),
        (30, "step-000030", True),
    ]
    sizes = dict(target.list())
    for info in infos:
        assert info.uri == target.uri_of(info.key)
        assert info.total_bytes == sum(s for k, s in sizes.items() if k.startswith(info.key + "/"))
    assert latest_complete(target).step == 30
    assert latest_complete(target.child("empty")) is None


def test_prune_keeps_newest_complete(target, tmp_path):
    for step, complete in [(1, True), (2, True), (3, False), (4, True), (5, False), (6, False)]:
        _write_checkpoint(target, step, tmp_path, complete=complete)
    with pytest.raises(ConfigError, match="keep"):
        prune(target, 0)
    deleted = prune(target, keep=2)
    assert [i.step for i in deleted] == [1, 3]
    assert [(i.step, i.complete) for i in list_checkpoints(target)] == [
        (2, True),
        (4, True),
        (5, False),
        (6, False),
    ]
    prune(target, keep=1)
    assert [(i.step, i.complete) for i in list_checkpoints(target)] == [
        (4, True),
        (5, False),
        (6, False),
    ]
    assert verify_or_raise(target.child("step-000004")).step == 4
    assert prune(target.child("nothing-here"), keep=1) == []


# -- folder specifics ----------------------------------------------------------------------


def test_folder_failed_write_leaves_old_object(tmp_path):
    target = FolderTarget(tmp_path / "store")
    target.put_bytes("k", b"old")
    with pytest.raises(TypeError):
        target.put_bytes("k", object())  # type: ignore[arg-type]  # fails mid-write
    assert target.get_bytes("k") == b"old"
    assert os.listdir(tmp_path / "store") == ["k"]
    # A temporary left by a crash is never listed.
    (tmp_path / "store" / ".k.memdist-tmp-abc").write_bytes(b"half")
    assert target.list() == [("k", 3)]


def test_folder_put_tree_of_its_own_path_is_a_no_op(tmp_path):
    target = FolderTarget(tmp_path / "ckpt")
    own = tmp_path / "ckpt" / "step-000001" / "backbone"
    (own / "global_step1").mkdir(parents=True)
    (own / "global_step1" / "states.pt").write_bytes(b"deepspeed")
    before = (own / "global_step1" / "states.pt").stat().st_mtime_ns
    assert target.put_tree("step-000001/backbone", own) == [
        "step-000001/backbone/global_step1/states.pt"
    ]
    assert target.child("step-000001").put_tree("backbone", own) == [
        "backbone/global_step1/states.pt"
    ]
    assert (own / "global_step1" / "states.pt").stat().st_mtime_ns == before
    assert target.list() == [("step-000001/backbone/global_step1/states.pt", 9)]


def test_folder_preflight_fails_on_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="taken"):
        FolderTarget(tmp_path / "taken").check_writable()


# -- URIs ----------------------------------------------------------------------------------


def test_open_target(tmp_path):
    t = open_target("s3://my-bucket/runs/a/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(t, S3Target)
    assert (t.bucket, t.prefix, t.endpoint_url, t.uri) == (
        "my-bucket",
        "runs/a",
        "http://127.0.0.1:9",
        "s3://my-bucket/runs/a",
    )
    assert open_target("s3://my-bucket").uri == "s3://my-bucket"
    assert open_target("s3://my-bucket").max_attempts == S3Target("my-bucket").max_attempts
    assert open_target("s3://my-bucket/a", max_attempts=2).max_attempts == 2
    local = open_target(str(tmp_path / "ckpt"))
    assert isinstance(local, FolderTarget) and local.root == tmp_path / "ckpt"
    assert open_target(f"file://{tmp_path}") == FolderTarget(tmp_path)
    for bad, rule in [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("gs://bucket/x", "unsupported scheme"),
        ("s3://Bad_Bucket/x", "not valid"),
        ("s3://bucket/a/../b", "bad prefix"),
        ("", "non-empty"),
    ]:
        with pytest.raises(ConfigError, match=rule) as info:
            open_target(bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(ConfigError, match="endpoint_url"):
        open_target(str(tmp_path), endpoint_url="http://127.0.0.1:9")


# -- S3 failure modes ----------------------------------------------------------------------


def _fails_fast(call, match: str) -> CheckpointError:
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=match) as info:
        call()
    assert time.monotonic() - start < 10
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    return info.value


def test_preflight_bucket_does_not_exist(s3_endpoint):
    target = _s3(s3_endpoint, "runs/x", bucket="no-such-bucket-here")
    assert SECRET not in repr(target)
    err = _fails_fast(target.check_writable, "bucket 'no-such-bucket-here' does not exist")
    assert "s3://no-such-bucket-here/runs/x" in str(err)
    _fails_fast(lambda: target.put_bytes("k", b"x"), "no-such-bucket-here")


def test_preflight_without_credentials(s3_endpoint, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    target = _s3(s3_endpoint, "runs/y")
    err = _fails_fast(target.check_writable, "credentials")
    assert target.uri in str(err)


def test_stopped_server_fails_instead_of_hanging(tmp_path):
    server, endpoint = _start_moto()
    try:
        _create_bucket(endpoint, BUCKET)
        target = _s3(endpoint, "runs/z", max_attempts=2, connect_timeout=1.0, read_timeout=2.0)
        target.check_writable()
        for i in range(3):
            target.put_bytes(f"part{i}", b"x" * 1000)
    finally:
        server.stop()
    err = _fails_fast(lambda: target.put_bytes("part3", b"x"), "did not answer after 2 attempts")
    assert "s3://memdist-ckpt-test/runs/z/part3" in str(err)
    _fails_fast(target.list, endpoint)
    assert SECRET not in repr(target)


def test_hung_server_times_out(tmp_path):
    """A server that takes connections but never answers: read timeouts, bounded retries."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes the handshakes; nobody ever answers
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        target = _s3(endpoint, "runs/h", max_attempts=2, connect_timeout=1.0, read_timeout=1.0)
        err = _fails_fast(target.check_writable, "did not answer after 2 attempts")
        assert target.uri in str(err) and "ReadTimeout" in str(err)
