"""The control plane's side of a file push to agents (docs/filepush.md): the manifest of an
upload and the chunks it names, read from disk only when an agent asks for one.

Link-neutral: the gRPC link turns a :class:`Manifest` into its protobuf message; the walk of
the local tree is SFTP's (``plan_upload``), so both links send the same files.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from opsplane.domain.errors import InvalidInput
from opsplane.transport.ssh.uploads import UploadPlan, plan_upload

CHUNK_SIZE: Final = 1024 * 1024
DEFAULT_UPLOAD_MAX_BYTES: Final = 1024 * 1024 * 1024
# Manifests kept for tasks still being pushed: a manifest holds paths and hashes, not data.
_CACHED_TASKS: Final = 16


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative to the destination root; a single file: its base name
    size: int
    mode: int
    sha256: str
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    root: str
    single_file: bool
    files: tuple[ManifestFile, ...]
    directories: tuple[str, ...]
    problems: tuple[str, ...]
    chunk_size: int = CHUNK_SIZE
    # Where each chunk is on the control plane's disk: (source, offset, length).
    locations: dict[str, tuple[Path, int, int]] = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def read_chunk(self, digest: str) -> bytes:
        """The chunk named ``digest``, read now; KeyError if the manifest names no such chunk,
        ValueError if the source changed since the manifest was made."""
        source, offset, length = self.locations[digest]
        with source.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{source} changed since the upload started")
        return data


def planned_bytes(local: Path) -> int:
    """What an upload of ``local`` would send, in bytes (the size limit's measure)."""
    plan = plan_upload(local)
    if plan.single_file is not None:
        return plan.single_file[0].stat().st_size
    return sum(source.stat().st_size for source, _, _ in plan.files)


def check_size(local: Path, limit: int) -> None:
    size = planned_bytes(local)
    if size > limit:
        raise InvalidInput(
            f"the upload is {size} bytes, over the limit of {limit} bytes per task "
            "(setting upload_max_bytes)"
        )


def build_manifest(local: Path, remote: str, chunk_size: int = CHUNK_SIZE) -> Manifest:
    """Hash every file of ``local`` chunk by chunk (blocking: run it in a thread)."""
    plan: UploadPlan = plan_upload(local)
    locations: dict[str, tuple[Path, int, int]] = {}
    if plan.single_file is not None:
        source, mode = plan.single_file
        entries = [_hash_file(source, source.name, mode, chunk_size, locations)]
    else:
        entries = [
            _hash_file(source, relative, mode, chunk_size, locations)
            for source, relative, mode in plan.files
        ]
    return Manifest(
        root=remote,
        single_file=plan.single_file is not None,
        files=tuple(entries),
        directories=tuple(plan.directories),
        problems=tuple(f"{relative}: {why}" for relative, why in plan.problems),
        chunk_size=chunk_size,
        locations=locations,
    )


def _hash_file(
    source: Path,
    relative: str,
    mode: int,
    chunk_size: int,
    locations: dict[str, tuple[Path, int, int]],
) -> ManifestFile:
    whole = hashlib.sha256()
    chunks: list[str] = []
    offset = 0
    with source.open("rb") as handle:
        while data := handle.read(chunk_size):
            whole.update(data)
            digest = hashlib.sha256(data).hexdigest()
            chunks.append(digest)
            # Content-addressed: a chunk met twice is sent (and stored here) once.
            locations.setdefault(digest, (source, offset, len(data)))
            offset += len(data)
    return ManifestFile(relative, offset, mode, whole.hexdigest(), tuple(chunks))


class Manifests:
    """One manifest per task (hashed once, however many hosts it goes to), and which host
    each run was sent to: chunks are served to that host only."""

    def __init__(self) -> None:
        self._by_task: OrderedDict[tuple[str, str, str], Manifest] = OrderedDict()
        self._runs: dict[str, tuple[str, Manifest]] = {}

    def cached(self, task_id: str, local: str, remote: str) -> Manifest | None:
        key = (task_id, local, remote)
        manifest = self._by_task.get(key)
        if manifest is not None:
            self._by_task.move_to_end(key)
        return manifest

    def remember(self, task_id: str, local: str, remote: str, manifest: Manifest) -> None:
        self._by_task[(task_id, local, remote)] = manifest
        while len(self._by_task) > _CACHED_TASKS:
            self._by_task.popitem(last=False)

    def sent(self, run_id: str, hostname: str, manifest: Manifest) -> None:
        self._runs[run_id] = (hostname, manifest)

    def for_run(self, run_id: str, hostname: str) -> Manifest | None:
        entry = self._runs.get(run_id)
        if entry is None or entry[0] != hostname:
            return None
        return entry[1]

    def finished(self, run_id: str) -> None:
        self._runs.pop(run_id, None)
