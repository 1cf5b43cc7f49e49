"""The checkpoint manifest: written last, it is what makes a folder of objects a checkpoint.

A checkpoint is a prefix ``step-000123/`` of a checkpoint target holding the tables'
zarr groups, the backbone's DeepSpeed checkpoint and the trainer state. When every
object is durable, ``write_manifest`` stores ``manifest.json`` with the step, the
resolved config, the caller's metadata (plans, shapes, dtypes) and each object's size
and SHA-256, read back from the target so the checksums describe what was stored. No
manifest means no checkpoint: ``list_checkpoints`` reports such a prefix as incomplete
and ``latest_complete`` skips it.

A reader calls ``verify_or_raise`` before deserialising anything: it checks that every
object the manifest names is there with its size and checksum (extra objects are fine).
To verify what will be deserialised rather than the remote copy, download the tree
first and verify a ``FolderTarget`` of the local copy.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from memdist.errors import CheckpointError, ConfigError
from memdist.storage.targets import READ_CHUNK_BYTES, CheckpointTarget

MANIFEST_KEY = "manifest.json"
FORMAT = "memdist-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_prefix(step: int) -> str:
    """The prefix of the checkpoint of ``step`` inside a checkpoint folder: ``step-000123``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"checkpoint step {step!r} must be an int >= 0")
    return f"step-{step:06d}"


@dataclass(kw_only=True, slots=True)
class Manifest:
    """What ``manifest.json`` says: the objects of one checkpoint and how to read them."""

    step: int
    config: dict[str, Any]
    meta: dict[str, Any]
    objects: dict[str, dict[str, Any]]  # key -> {"size": int, "sha256": hex str}
    created: str = ""
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(int(o["size"]) for o in self.objects.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "step": self.step,
            "created": self.created,
            "config": self.config,
            "meta": self.meta,
            "objects": dict(sorted(self.objects.items())),
        }
        try:
            return json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"manifest of step {self.step} cannot be written as JSON (config and meta must "
                f"hold only dicts, lists, str, finite numbers, bools and None): {exc}"
            ) from exc


@dataclass(kw_only=True, slots=True, frozen=True)
class CheckpointInfo:
    """One ``step-NNNNNN/`` prefix of a checkpoint folder, as a listing shows it."""

    step: int
    key: str  # the prefix inside the checkpoint folder, e.g. "step-000123"
    uri: str
    complete: bool  # its manifest is there
    total_bytes: int
    objects: int = 0  # how many objects, the manifest included


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = READ_CHUNK_BYTES) -> str:
    """The SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _checksum(target: CheckpointTarget, key: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for block in target.iter_bytes(key):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def _checksums(target: CheckpointTarget, keys: list[str]) -> dict[str, tuple[int, str]]:
    workers = max(1, min(target.parallelism, len(keys)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(keys, pool.map(lambda k: _checksum(target, k), keys), strict=True))


def checksum_tree(target: CheckpointTarget, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{key: {"size", "sha256"}}`` of every object under ``prefix`` except the manifest,
    streamed back from the target (so it describes what is durable there)."""
    keys = [k for k, _ in target.list(prefix) if k != MANIFEST_KEY]
    return {k: {"size": size, "sha256": sha} for k, (size, sha) in _checksums(target, keys).items()}


def write_manifest(
    target: CheckpointTarget,
    step: int,
    config: dict[str, Any],
    meta: dict[str, Any],
    objects: dict[str, dict[str, Any]],
) -> Manifest:
    """Store ``manifest.json`` in ``target`` (the checkpoint's own prefix). Call it last,
    when every object in ``objects`` (from ``checksum_tree``) is durable."""
    step_prefix(step)  # checks the step
    for key, obj in objects.items():
        if set(obj) != {"size", "sha256"}:
            raise CheckpointError(
                f"manifest entry {key!r} is {obj!r}: it must hold exactly 'size' and 'sha256'"
            )
    if MANIFEST_KEY in objects:
        raise CheckpointError(f"the manifest cannot list itself ({MANIFEST_KEY!r})")
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = Manifest(step=step, config=config, meta=meta, objects=dict(objects), created=created)
    target.put_bytes(MANIFEST_KEY, manifest.to_json())
    return manifest


def seal(
    target: CheckpointTarget, step: int, config: dict[str, Any], meta: dict[str, Any]
) -> Manifest:
    """Checksum every object of the checkpoint in ``target`` and write its manifest."""
    return write_manifest(target, step, config, meta, checksum_tree(target))


def read_manifest(target: CheckpointTarget) -> Manifest:
    """The manifest of the checkpoint in ``target``; CheckpointError if absent or malformed."""
    where = target.uri_of(MANIFEST_KEY)
    if not target.exists(MANIFEST_KEY):
        raise CheckpointError(
            f"{target.uri!r} is not a complete checkpoint: {MANIFEST_KEY!r} is missing"
        )
    try:
        doc = json.loads(target.get_bytes(MANIFEST_KEY))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"manifest {where!r} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{where!r} is not a {FORMAT} manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"manifest {where!r} has format version {doc.get('version')!r}; this memdist "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        objects = {
            str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])}
            for k, v in doc["objects"].items()
        }
        return Manifest(
            step=int(doc["step"]),
            config=dict(doc["config"]),
            meta=dict(doc["meta"]),
            objects=objects,
            created=str(doc.get("created", "")),
            version=int(doc["version"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"manifest {where!r} is malformed: {exc!r}") from exc


def verify(target: CheckpointTarget, manifest: Manifest) -> list[str]:
    """Problems with the objects ``manifest`` names in ``target``, each naming the object:
    missing, wrong size, wrong checksum. Objects the manifest does not name are ignored."""
    sizes = dict(target.list())
    problems, to_hash = [], []
    for key, obj in sorted(manifest.objects.items()):
        if key not in sizes:
            problems.append(f"{target.uri_of(key)!r} is missing")
        elif sizes[key] != obj["size"]:
            problems.append(
                f"{target.uri_of(key)!r} has {sizes[key]} bytes, the manifest says {obj['size']}"
            )
        else:
            to_hash.append(key)
    for key, (size, sha) in _checksums(target, to_hash).items():
        expected = manifest.objects[key]
        if size != expected["size"]:
            problems.append(
                f"{target.uri_of(key)!r} has {size} bytes, the manifest says {expected['size']}"
            )
        elif sha != expected["sha256"]:
            problems.append(
                f"{target.uri_of(key)!r} has SHA-256 {sha}, the manifest says {expected['sha256']}"
            )
    return sorted(problems)


def verify_or_raise(target: CheckpointTarget, manifest: Manifest | None = None) -> Manifest:
    """The checkpoint's manifest, after checking every object it names (call before
    deserialising anything); CheckpointError listing the problems otherwise."""
    manifest = read_manifest(target) if manifest is None else manifest
    problems = verify(target, manifest)
    if problems:
        shown = "; ".join(problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"checkpoint {target.uri!r} (step {manifest.step}) is corrupt: {shown}{more}"
        )
    return manifest


def list_checkpoints(root: CheckpointTarget) -> list[CheckpointInfo]:
    """Every ``step-NNNNNN/`` prefix of the checkpoint folder ``root``, oldest step first."""
    found: dict[str, dict[str, Any]] = {}
    for key, size in root.list():
        head, _, rest = key.partition("/")
        match = _STEP_RE.match(head)
        if match is None or not rest:
            continue
        entry = found.setdefault(
            head, {"step": int(match.group(1)), "bytes": 0, "objects": 0, "manifest": False}
        )
        entry["bytes"] += size
        entry["objects"] += 1
        entry["manifest"] |= rest == MANIFEST_KEY
    infos = [
        CheckpointInfo(
            step=e["step"],
            key=head,
            uri=root.uri_of(head),
            complete=e["manifest"],
            total_bytes=e["bytes"],
            objects=e["objects"],
        )
        for head, e in found.items()
    ]
    return sorted(infos, key=lambda i: (i.step, i.key))


def latest_complete(root: CheckpointTarget) -> CheckpointInfo | None:
    """The newest checkpoint in ``root`` that has a manifest, or None."""
    complete = [i for i in list_checkpoints(root) if i.complete]
    return complete[-1] if complete else None


def folder_of(
    target: CheckpointTarget, *, endpoint_url: str | None = None, max_attempts: int | None = None
) -> CheckpointTarget:
    """The checkpoint folder holding the checkpoint ``target`` (its parent prefix)."""
    from memdist.storage.targets import open_target

    parent = target.uri.rstrip("/").rpartition("/")[0]
    return open_target(parent, endpoint_url=endpoint_url, max_attempts=max_attempts)


def chain(target: CheckpointTarget, manifest: Manifest | None = None, *,
          folder: CheckpointTarget | None = None) -> list[tuple[CheckpointTarget, Manifest]]:  # fmt: skip
    """The checkpoints an incremental checkpoint builds on, oldest (the full one) first,
    ending with ``target`` itself; each must be complete. ``folder`` holds them (by default
    the parent prefix of ``target``)."""
    manifest = read_manifest(target) if manifest is None else manifest
    links = [(target, manifest)]
    while (parent := manifest.meta.get("parent")) is not None:
        folder = folder_of(target) if folder is None else folder
        target = folder.child(str(parent))
        try:
            manifest = read_manifest(target)
        except CheckpointError as exc:
            raise CheckpointError(
                f"checkpoint of step {links[-1][1].step} is incremental on {parent!r}, "
                f"which cannot be read: {exc}"
            ) from exc
        if manifest.step >= links[-1][1].step:
            raise CheckpointError(
                f"checkpoint {parent!r} (step {manifest.step}) cannot be the base of step "
                f"{links[-1][1].step}: a chain runs back in steps"
            )
        links.append((target, manifest))
    return links[::-1]


def prune(root: CheckpointTarget, keep: int) -> list[CheckpointInfo]:
    """Delete all but the newest ``keep`` complete checkpoints (and those they build on,
    when incremental), and incomplete ones older than the newest complete one (abandoned
    saves); never the newest complete one, nor an incomplete one newer than it (a save
    may be in progress). Returns what was deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"checkpoints to keep ({keep!r}) must be an int >= 1")
    infos = list_checkpoints(root)
    complete = [i for i in infos if i.complete]
    if not complete:
        return []
    kept = {i.key for i in complete[-keep:]}
    for info in complete[-keep:]:
        parent = read_manifest(root.child(info.key)).meta.get("parent")
        while parent is not None and parent not in kept:
            kept.add(parent)
            parent = read_manifest(root.child(parent)).meta.get("parent")
    newest = complete[-1].step
    doomed = [i for i in infos if i.key not in kept and (i.complete or i.step < newest)]
    for info in doomed:
        # The manifest goes first, so a crash mid-delete leaves an incomplete checkpoint.
        if info.complete:
            root.delete(f"{info.key}/{MANIFEST_KEY}")
        root.delete_prefix(info.key)
    return doomed
