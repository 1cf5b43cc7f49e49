"""Where checkpoints are stored: a local folder or an S3 prefix, behind one interface.

A ``CheckpointTarget`` is a flat store of objects named by keys, '/'-separated relative
paths (``step-000100/values/table0/zarr.json``). It offers what a checkpoint writer and
reader need: bytes, files and whole folders in and out, a recursive listing with sizes,
deletion by prefix, and a preflight (``check_writable``) that a run calls before it
trains, so a missing bucket or missing credentials fail at once rather than at the first
save an hour later.

Targets are picklable: they travel to the Ray actors that write their own parts of a
checkpoint. ``S3Target`` therefore creates its boto3 client lazily, on first use in each
process, and never holds credentials itself (boto3's standard chain finds them).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

from memdist.errors import CheckpointError, ConfigError

READ_CHUNK_BYTES = 2**20
# Names of half-written files; a crash can leave them behind, and no listing shows them.
_TMP_MARK = ".memdist-tmp-"
_PROBE_KEY = ".memdist-write-check"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """``key`` with surrounding '/' removed, after checking it is a plain relative path."""
    if not isinstance(key, str):
        raise CheckpointError(f"checkpoint key {key!r} must be a str")
    stripped = key.strip("/")
    if not stripped:
        if allow_empty:
            return ""
        raise CheckpointError(f"checkpoint key {key!r} must not be empty")
    parts = stripped.split("/")
    if "\\" in stripped or any(p in ("", ".", "..") or _TMP_MARK in p for p in parts):
        raise CheckpointError(
            f"checkpoint key {key!r} must be a relative '/'-separated path without empty, "
            f"'.' or '..' parts"
        )
    return stripped


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix and key else prefix or key


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """Every file under ``local_dir`` as (relative '/'-separated key, path), sorted."""
    if not local_dir.is_dir():
        raise CheckpointError(f"local folder {str(local_dir)!r} does not exist")
    files = []
    for dirpath, _dirnames, filenames in os.walk(local_dir):
        for name in filenames:
            if _TMP_MARK in name:
                continue
            path = Path(dirpath) / name
            files.append((path.relative_to(local_dir).as_posix(), path))
    return sorted(files)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex}")


def _run_all(jobs: Iterable[Callable[[], object]], workers: int) -> None:
    """Run ``jobs`` on ``workers`` threads; the first failure cancels the rest and is raised."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f in done and (exc := f.exception()) is not None:
                raise exc


class CheckpointTarget(ABC):
    """A folder-like store of objects under '/'-separated keys (a local folder, an S3 prefix).

    ``list``, ``get_tree`` and ``delete_prefix`` treat a prefix as a folder: ``"a/b"``
    means the keys under ``a/b/``, and ``""`` means every key of the target. Keys that
    ``list`` returns are relative to the target, not to the prefix. Every failure to
    reach or use the store raises ``CheckpointError`` naming the URI and the key.
    """

    #: How many objects callers may read or write at once (threads) for good throughput.
    parallelism: int = 1

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where the target points: a local path or ``s3://bucket/prefix``."""

    def uri_of(self, key: str) -> str:
        """The URI of one object of this target."""
        return _join(self.uri.rstrip("/"), _check_key(key, allow_empty=True))

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there (never half-written)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object under ``key`` (for small objects: manifests, trainer state)."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The object under ``key`` in chunks, streamed (for checksums of large objects)."""

    @abstractmethod
    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Store the local file under ``key`` (multipart for large files on S3)."""

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Write the object under ``key`` to ``local_path`` (through a temporary name)."""

    @abstractmethod
    def put_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Store every file under ``local_dir`` at ``key_prefix/<relative path>``; the keys."""

    @abstractmethod
    def get_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Write every object under ``key_prefix`` to ``local_dir/<relative path>``; the keys."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        """Every (key, size in bytes) under ``prefix``, recursively, sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object under ``key`` (nothing happens if there is none)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (nothing happens if there is none)."""

    @abstractmethod
    def child(self, sub_prefix: str) -> CheckpointTarget:
        """The same store under ``<this target>/<sub_prefix>``."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise ``CheckpointError`` now if objects cannot be written here (run before training)."""


class FolderTarget(CheckpointTarget):
    """A local (or network-mounted) folder; objects are files, written then renamed."""

    parallelism = 4

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"FolderTarget({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FolderTarget) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        key = _check_key(key, allow_empty=allow_empty)
        return self.root / key if key else self.root

    def _missing(self, key: str) -> CheckpointError:
        return CheckpointError(f"checkpoint object {key!r} is missing at {self.uri_of(key)!r}")

    def _write_atomic(self, path: Path, write: Callable[[Path], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(path)
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def iter_bytes(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(chunk_bytes):
                    yield block

        return chunks()

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        path, src = self._path(key), Path(local_path)
        if not src.is_file():
            raise CheckpointError(f"local file {str(src)!r} to store as {key!r} does not exist")
        if path.exists() and path.samefile(src):
            return
        self._write_atomic(path, lambda tmp: shutil.copyfile(src, tmp))

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        path, dst = self._path(key), Path(local_path)
        if not path.is_file():
            raise self._missing(key)
        if dst.exists() and dst.samefile(path):
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        dest, src = self._path(key_prefix, allow_empty=True), Path(local_dir)
        files = _local_files(src)
        prefix = _check_key(key_prefix, allow_empty=True)
        keys = [_join(prefix, rel) for rel, _ in files]
        if dest.exists() and dest.samefile(src):  # already written in place
            return keys
        _run_all(
            [partial(self.put_file, k, p) for k, (_, p) in zip(keys, files, strict=True)],
            self.parallelism,
        )
        return keys

    def get_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        src, dst = self._path(key_prefix, allow_empty=True), Path(local_dir)
        prefix = _check_key(key_prefix, allow_empty=True)
        keys = [k for k, _ in self.list(prefix)]
        if dst.exists() and src.exists() and dst.samefile(src):
            return keys
        offset = len(prefix) + 1 if prefix else 0
        _run_all([partial(self.get_file, k, dst / k[offset:]) for k in keys], self.parallelism)
        return keys

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        base = self._path(prefix, allow_empty=True)
        if not base.is_dir():
            return []
        return [
            (_join(_check_key(prefix, allow_empty=True), rel), path.stat().st_size)
            for rel, path in _local_files(base)
        ]

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        base = self._path(prefix, allow_empty=True)
        if not base.is_dir():
            return
        if base == self.root:
            for entry in base.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        else:
            shutil.rmtree(base)

    def child(self, sub_prefix: str) -> FolderTarget:
        return FolderTarget(self._path(sub_prefix))

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.put_bytes(_PROBE_KEY, b"ok")
            (self.root / _PROBE_KEY).unlink()
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint folder {self.uri!r} is not writable: {exc.strerror or exc}"
            ) from exc


class S3Target(CheckpointTarget):
    """Objects under ``s3://bucket/prefix``, through boto3.

    Credentials come from boto3's standard chain (environment, shared files and profiles,
    container or instance role); the target never takes or holds them. ``endpoint_url``
    points at an S3-compatible store (path-style addressing is used there). Requests are
    retried ``max_attempts`` times in total with botocore's standard mode, with
    ``connect_timeout`` and ``read_timeout`` seconds each, so an unreachable store fails
    in bounded time. Files above ``multipart_threshold`` bytes move in parallel parts of
    ``multipart_chunksize`` bytes (S3 needs at least 5 MiB per part); whole folders move
    on ``max_workers`` threads.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 * 2**20,
        multipart_chunksize: int = 16 * 2**20,
        max_workers: int = 8,
    ) -> None:
        if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket):
            raise ConfigError(
                f"S3 bucket name {bucket!r} is not valid: 3 to 63 lowercase letters, digits, "
                f"'.' or '-', starting and ending with a letter or digit"
            )
        if max_attempts < 1 or max_workers < 1:
            raise ConfigError(
                f"S3 max_attempts ({max_attempts}) and max_workers ({max_workers}) must be >= 1"
            )
        self.bucket = bucket
        self.prefix = _check_key(prefix, allow_empty=True)
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_workers = self.parallelism = max_workers
        self._client: Any = None
        self._lock = threading.Lock()

    # -- pickling: the client and its lock stay in the process that made them --------------
    def _options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "max_attempts": self.max_attempts,
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "multipart_threshold": self.multipart_threshold,
            "multipart_chunksize": self.multipart_chunksize,
            "max_workers": self.max_workers,
        }

    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, **self._options()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        bucket, prefix = state.pop("bucket"), state.pop("prefix")
        self.__init__(bucket, prefix, **state)  # type: ignore[misc]

    def __repr__(self) -> str:
        extra = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Target({self.uri!r}{extra})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Target) and other.__getstate__() == self.__getstate__()

    def __hash__(self) -> int:
        return hash((self.bucket, self.prefix, self.endpoint_url))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """This process's boto3 S3 client (thread-safe once made)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    config = Config(
                        retries={"max_attempts": self.max_attempts, "mode": "standard"},
                        connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout,
                        # put_tree runs max_workers files of up to max_workers parts each
                        max_pool_connections=max(10, self.max_workers**2),
                        s3={"addressing_style": "path"} if self.endpoint_url else None,
                    )
                    self._client = boto3.session.Session().client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=config,
                    )
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_workers,
        )

    def _key(self, key: str, *, allow_empty: bool = False) -> str:
        return _join(self.prefix, _check_key(key, allow_empty=allow_empty))

    def _error(self, exc: BaseException, action: str, key: str | None = None) -> CheckpointError:
        """``exc`` from boto3 as a CheckpointError naming the URI, the key and the cause."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.uri_of(key) if key else self.uri
        what = f"{action} {where!r}"
        code = ""
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
        elif type(exc).__name__ == "S3UploadFailedError":  # boto3 wraps the ClientError as text
            match = re.search(r"\((\w+)\)", str(exc))
            code = match.group(1) if match else ""
        if isinstance(exc, NoCredentialsError | PartialCredentialsError) or code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
        ):
            msg = (
                f"cannot {what}: no valid AWS credentials ({code or type(exc).__name__}); "
                f"provide them through the environment, a shared credentials profile or an "
                f"instance role"
            )
        elif code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
            msg = f"cannot {what}: bucket {self.bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            msg = f"cannot {what}: checkpoint object {key!r} is missing"
        elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            msg = f"cannot {what}: access denied to bucket {self.bucket!r} ({code})"
        elif isinstance(exc, ConnectionError | HTTPClientError):  # refused, timed out, cut
            endpoint = self.endpoint_url or "the AWS S3 endpoint"
            msg = (
                f"cannot {what}: {endpoint} did not answer after {self.max_attempts} attempts "
                f"({type(exc).__name__}: {exc})"
            )
        else:
            msg = f"cannot {what}: {type(exc).__name__}: {exc}"
        return CheckpointError(msg)

    def _call(self, action: str, key: str | None, fn: Callable[[], Any]) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._error(exc, action, key) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._call(
            "write",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        return self._call(
            "read",
            key,
            lambda: self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read(),
        )

    def iter_bytes(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        full = self._key(key)
        body = self._call(
            "read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
        )

        def chunks() -> Iterator[bytes]:
            try:
                it = body.iter_chunks(chunk_bytes)
                while True:
                    block = self._call("read", key, lambda: next(it, None))
                    if block is None:
                        return
                    yield block
            finally:
                body.close()

        return chunks()

    def put_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        full, src = self._key(key), Path(local_path)
        if not src.is_file():
            raise CheckpointError(f"local file {str(src)!r} to store as {key!r} does not exist")
        self._call(
            "write",
            key,
            lambda: self.client.upload_file(
                str(src), self.bucket, full, Config=self._transfer_config()
            ),
        )

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        full, dst = self._key(key), Path(local_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        try:
            self._call(
                "read",
                key,
                lambda: self.client.download_file(
                    self.bucket, full, str(tmp), Config=self._transfer_config()
                ),
            )
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def put_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        prefix = _check_key(key_prefix, allow_empty=True)
        files = [(_join(prefix, rel), path) for rel, path in _local_files(Path(local_dir))]
        _run_all([partial(self.put_file, k, p) for k, p in files], self.max_workers)
        return [k for k, _ in files]

    def get_tree(self, key_prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        prefix = _check_key(key_prefix, allow_empty=True)
        keys = [k for k, _ in self.list(prefix)]
        offset, dst = (len(prefix) + 1 if prefix else 0), Path(local_dir)
        _run_all([partial(self.get_file, k, dst / k[offset:]) for k in keys], self.max_workers)
        return keys

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        full = self._key(prefix, allow_empty=True)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages() -> list[tuple[str, int]]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
                for obj in page.get("Contents", []):
                    found.append((obj["Key"][strip:], int(obj["Size"])))
            return found

        found = self._call("list", prefix or None, pages)
        return sorted(
            (k, size) for k, size in found if k and _TMP_MARK not in k and not k.endswith("/")
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                    return False
                raise
            return True

        return self._call("look up", key, head)

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k, _ in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            response = self._call(
                "delete under",
                prefix or None,
                partial(self._delete_batch, batch),
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise CheckpointError(
                    f"cannot delete {len(errors)} objects under {self.uri_of(prefix)!r}, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def _delete_batch(self, batch: Sequence[dict[str, str]]) -> Any:
        return self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )

    def child(self, sub_prefix: str) -> S3Target:
        return S3Target(self.bucket, self._key(sub_prefix), **self._options())

    def check_writable(self) -> None:
        self._call("reach", None, lambda: self.client.head_bucket(Bucket=self.bucket))
        self.put_bytes(_PROBE_KEY, b"ok")
        self.delete(_PROBE_KEY)


def open_target(
    uri: str, *, endpoint_url: str | None = None, max_attempts: int | None = None
) -> CheckpointTarget:
    """The target for ``s3://bucket[/prefix]`` or a local path (``file://`` is accepted).
    ``max_attempts`` (S3 only; None: ``S3Target``'s default) bounds each request's tries."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"checkpoint URI {uri!r} must be a non-empty str")
    uri = uri.strip()
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    if scheme is None:
        if endpoint_url is not None:
            raise ConfigError(
                f"endpoint_url {endpoint_url!r} applies only to s3:// URIs, not to {uri!r}"
            )
        return FolderTarget(uri)
    name = scheme.group(1).lower()
    rest = uri[scheme.end() :]
    if name == "file":
        return FolderTarget(rest)
    if name != "s3":
        raise ConfigError(
            f"checkpoint URI {uri!r} has unsupported scheme {name + '://'!r}: use s3://bucket/"
            f"prefix or a local path"
        )
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"checkpoint URI {uri!r} names no bucket: use s3://bucket/prefix")
    try:
        prefix = _check_key(prefix, allow_empty=True)
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint URI {uri!r} has a bad prefix: {exc}") from None
    try:
        if max_attempts is None:
            return S3Target(bucket, prefix, endpoint_url=endpoint_url)
        return S3Target(bucket, prefix, endpoint_url=endpoint_url, max_attempts=max_attempts)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint URI {uri!r}: {exc}") from None
