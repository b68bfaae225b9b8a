"""The agent's side of a file push (docs/filepush.md): check a signed manifest's paths against
the allowed roots, ask for the chunks of the files that differ, check each against the
manifest, and replace each file atomically.

The manifest arrived inside a signed command, so its hashes are the control plane's word;
a chunk is accepted only if its SHA-256 is the one the manifest names for that place.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import hashlib
import logging
import os
import posixpath
import pwd
import re
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from opsplane.transport.grpc import opsplane_pb2 as pb

logger = logging.getLogger(__name__)

# Chunks asked for and not yet written, per run: the agent's memory bound (1 MiB each).
WINDOW: Final = 8
# A chunk not answered in this long (a stream broke, the agent reconnected) is asked again.
CHUNK_TIMEOUT: Final = 10.0
CHUNK_ATTEMPTS: Final = 6
# A ``.part`` file untouched this long is swept when the agent starts (docs/filepush.md).
PART_MAX_AGE: Final = 24 * 3600.0
# The sweep looks at no more than this many directory entries per root (a huge tree must
# not hold the start up); what it misses is swept at a later start.
SWEEP_MAX_ENTRIES: Final = 200_000
# Temporary files of ours: ``.NAME.<16 hex of the file's SHA-256>.part`` (resumable), or
# ``.NAME.<run id>.part`` (a second writer of the same content at once).
_PART = re.compile(
    r"\..+\.(?:[0-9a-f]{16}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.part"
)

# Sends a ChunkRequest; False when no link is up at the moment.
SendRequest = Callable[[pb.ChunkRequest], Awaitable[bool]]


class UploadRefused(Exception):
    """The upload (or one file of it) may not be written where it asks."""


class ChunkRefused(Exception):
    """A chunk that is not the one the manifest names, or that never came."""


class _AskAgain(Exception):
    """The stream a chunk was asked on is gone: ask on the new one."""


@dataclass
class PushResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None

    @property
    def stdout(self) -> str:
        lines = [*self.written, *(f"unchanged {path}" for path in self.unchanged)]
        return "".join(f"{line}\n" for line in lines)

    @property
    def stderr(self) -> str:
        return "".join(f"{path}: {why}\n" for path, why in self.failed)

    def summary(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.failed:
            total = len(self.failed) + len(self.written) + len(self.unchanged)
            return f"{len(self.failed)} of {total} files failed"
        return None


def allowed_root(destination: str, roots: Sequence[Path]) -> Path:
    """The configured root ``destination`` lies under; UploadRefused if none, or if the
    path is not absolute or has a ``..`` component."""
    if not roots:
        raise UploadRefused("this agent accepts no uploads (no --upload-root configured)")
    if not destination.startswith("/") or "\0" in destination:
        raise UploadRefused(f"the destination must be an absolute path: {destination!r}")
    if ".." in destination.split("/"):
        raise UploadRefused(f"the destination may not contain '..': {destination}")
    path = Path(posixpath.normpath(destination))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if path == real_root or real_root in path.parents:
            return real_root
        if path == root or root in path.parents:
            return real_root
    allowed = ", ".join(str(root) for root in roots)
    raise UploadRefused(f"{destination} is outside the allowed upload roots ({allowed})")


def check_inside(path: Path, root: Path) -> None:
    """UploadRefused unless ``path``'s existing part, symlinks resolved, stays under ``root``:
    no write through a link that leads out of it."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise UploadRefused(f"{path} leads outside the upload root {root} (a symbolic link)")


def _relative_ok(relative: str) -> bool:
    parts = relative.split("/")
    return bool(relative) and not relative.startswith("/") and ".." not in parts and "" not in parts


class FileReceiver:
    """Chunks asked for by the agent's runs, and the answers as they come."""

    def __init__(
        self, roots: Sequence[Path], send: SendRequest, *, euid: int | None = None
    ) -> None:
        self._roots = list(roots)
        self._send = send
        # Whose account writes the files: only root may give them to another owner.
        self._euid = os.geteuid() if euid is None else euid
        # Chunks found already written in a ``.part`` file, not asked again (tests read it).
        self.chunks_reused = 0
        self._waiting: dict[tuple[str, str], asyncio.Future[bytes]] = {}

    def reconnected(self) -> None:
        """A new stream: every chunk still awaited is asked again at once (its request or
        its answer went with the old stream), rather than after its timeout."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(_AskAgain())

    def on_chunk(self, chunk: pb.FileChunk) -> None:
        future = self._waiting.get((chunk.run_id, chunk.hash))
        if future is None or future.done():
            return  # not asked for (any more): never kept
        if chunk.error:
            future.set_exception(ChunkRefused(f"the control plane: {chunk.error}"))
        elif hashlib.sha256(chunk.data).hexdigest() != chunk.hash:
            future.set_exception(ChunkRefused(f"chunk {chunk.hash[:12]} does not match its hash"))
        else:
            future.set_result(chunk.data)

    async def push(self, run_id: str, task_id: str, manifest: pb.FileManifest) -> PushResult:
        result = PushResult()
        try:
            root = allowed_root(manifest.root, self._roots)
        except UploadRefused as e:
            result.error = str(e)
            result.failed = [(manifest.root, str(e))]
            return result
        try:
            owner = self._ownership(manifest.owner, manifest.group)
        except UploadRefused as e:
            result.error = str(e)
            result.failed = [(manifest.root, str(e))]
            return result
        destination_root = Path(posixpath.normpath(manifest.root))
        for problem in manifest.problems:
            relative, _, why = problem.partition(": ")
            result.failed.append((posixpath.join(manifest.root, relative), why))
        if manifest.single_file:
            targets = [(self._single_destination(manifest), manifest.files[0])]
        else:
            targets = []
            broken = self._make_directories(destination_root, manifest.directories, root)
            for entry in manifest.files:
                path = destination_root / entry.path
                if not _relative_ok(entry.path):
                    result.failed.append((str(path), "not a plain relative path"))
                    continue
                if broken is not None:
                    result.failed.append((str(path), broken))
                    continue
                targets.append((path, entry))
        for path, entry in targets:
            try:
                changed = await self._write_file(
                    run_id, task_id, path, entry, root, manifest, owner
                )
            except (UploadRefused, ChunkRefused) as e:
                result.failed.append((str(path), str(e)))
            except OSError as e:
                result.failed.append((str(path), e.strerror or str(e)))
            else:
                (result.written if changed else result.unchanged).append(str(path))
        return result

    def _ownership(self, owner: str, group: str) -> tuple[int, int]:
        """The ids the manifest's owner and group name here (-1: leave as written), checked
        before anything is written; UploadRefused if unknown, or if this agent's account may
        not give files to them (only root may give a file away; others may only pick one of
        their own groups)."""
        uid = gid = -1
        try:
            if owner:
                uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise UploadRefused(f"no user {owner!r} on this host") from None
        try:
            if group:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UploadRefused(f"no group {group!r} on this host") from None
        if self._euid != 0:
            label = ":".join(part for part in (owner, group) if part)
            if uid not in (-1, self._euid) or (
                gid != -1 and gid != os.getegid() and gid not in os.getgroups()
            ):
                raise UploadRefused(
                    f"this agent runs as uid {self._euid}, not root: it may not give files "
                    f"to {label}"
                )
        return uid, gid

    @staticmethod
    def _single_destination(manifest: pb.FileManifest) -> Path:
        path = Path(posixpath.normpath(manifest.root))
        if manifest.root.endswith("/") or (path.is_dir() and not path.is_symlink()):
            return path / manifest.files[0].path
        return path

    @staticmethod
    def _make_directories(base: Path, directories: Sequence[str], root: Path) -> str | None:
        """Create ``base`` and the tree's directories; why not, if they cannot be."""
        try:
            base.mkdir(parents=True, exist_ok=True)
            check_inside(base, root)
            for relative in directories:
                if not _relative_ok(relative):
                    return f"directory {relative!r} is not a plain relative path"
                path = base / relative
                path.mkdir(exist_ok=True)
                check_inside(path, root)
        except UploadRefused as e:
            return str(e)
        except OSError as e:
            return f"cannot create directory: {e.strerror or e}"
        return None

    async def _write_file(
        self,
        run_id: str,
        task_id: str,
        path: Path,
        entry: pb.ManifestFile,
        root: Path,
        manifest: pb.FileManifest,
        owner: tuple[int, int] = (-1, -1),
    ) -> bool:
        """Write one file; False when it was already there, byte for byte."""
        if path.name in ("", ".", ".."):
            raise UploadRefused("not a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        check_inside(path.parent, root)
        mode = entry.mode & 0o7777
        if await asyncio.to_thread(_same_content, path, entry.size, entry.sha256):
            _set_owner(path, owner)
            os.chmod(path, mode)
            return False
        temporary, descriptor = await asyncio.to_thread(
            _open_part, path.parent, path.name, entry.sha256, run_id
        )
        try:
            have = await asyncio.to_thread(_written_chunks, descriptor, entry, manifest.chunk_size)
            self.chunks_reused += len(have)
            await self._fill(run_id, task_id, descriptor, entry, manifest.chunk_size, have)
            os.fsync(descriptor)
        except asyncio.CancelledError:
            # The agent is stopping: the part stays, and the next push of this content
            # (a retry, a new task) goes on from the chunks it holds.
            os.close(descriptor)
            raise
        except BaseException:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        try:
            if not await asyncio.to_thread(_same_content, temporary, entry.size, entry.sha256):
                raise ChunkRefused("the file's SHA-256 does not match the manifest")
            # chown before chmod: a chown clears the set-user/group-ID bits a mode may carry.
            _set_owner(descriptor, owner)
            os.fchmod(descriptor, mode)
            # A rename replaces a symlink at the destination; it never writes through it.
            # Still locked: no other writer takes this part for its own meanwhile.
            os.rename(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        finally:
            os.close(descriptor)
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return True

    async def _fill(
        self,
        run_id: str,
        task_id: str,
        descriptor: int,
        entry: pb.ManifestFile,
        size: int,
        have: frozenset[int] = frozenset(),
    ) -> None:
        """Ask for the file's chunks but those at the indices in ``have``, ``WINDOW`` at a
        time, writing each at its offset."""
        slots = asyncio.Semaphore(WINDOW)
        fetched: dict[str, asyncio.Task[bytes]] = {}

        async def place(index: int, digest: str) -> None:
            async with slots:
                task = fetched.get(digest)
                if task is None:
                    task = fetched[digest] = asyncio.ensure_future(
                        self._fetch(run_id, task_id, digest)
                    )
                data = await task
                # A done task holds its chunk: forget it, or the whole file stays in memory
                # (a chunk repeated later is then asked again, which is rare and cheap).
                if fetched.get(digest) is task:
                    del fetched[digest]
                await asyncio.to_thread(os.pwrite, descriptor, data, index * size)
                del data, task

        pending = [
            asyncio.ensure_future(place(i, d)) for i, d in enumerate(entry.chunks) if i not in have
        ]
        try:
            await asyncio.gather(*pending)
        finally:
            for task in [*pending, *fetched.values()]:
                task.cancel()
            # Done chunks are dropped: memory stays at the window.
            fetched.clear()

    async def _fetch(self, run_id: str, task_id: str, digest: str) -> bytes:
        """One chunk, asked again after a timeout (resume after a reconnect)."""
        key = (run_id, digest)
        request = pb.ChunkRequest(run_id=run_id, task_id=task_id, hashes=[digest])
        try:
            for _ in range(CHUNK_ATTEMPTS):
                future = self._waiting[key] = asyncio.get_running_loop().create_future()
                if not await self._send(request):
                    await asyncio.sleep(min(CHUNK_TIMEOUT, 1.0))
                    continue
                with contextlib.suppress(TimeoutError, _AskAgain):
                    return await asyncio.wait_for(asyncio.shield(future), CHUNK_TIMEOUT)
        finally:
            self._waiting.pop(key, None)
        raise ChunkRefused(f"chunk {digest[:12]} never came")


def _open_part(directory: Path, name: str, digest: str, run_id: str) -> tuple[Path, int]:
    """The temporary file for ``name``'s new content, open and locked: named by the content,
    so a push interrupted by an agent restart finds what it had written; a second writer of
    the same content at the same moment gets one named by its run instead."""
    shared = directory / f".{name[:150]}.{digest[:16]}.part"
    for _ in range(3):
        descriptor = _open_private(shared)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            break
        # Locked, but maybe the inode a finished writer has just renamed into place.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(shared, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino:
                return shared, descriptor
        os.close(descriptor)
    own = directory / f".{name[:150]}.{run_id}.part"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(own)
    return own, _open_private(own)


def _open_private(path: Path) -> int:
    """``path`` opened for reading and writing, created if need be: never through a link,
    and only a plain file of this account's with no other name (else made anew)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, 0o600)
    info = os.fstat(descriptor)
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid():
        return descriptor
    os.close(descriptor)
    os.unlink(path)
    return os.open(path, flags | os.O_EXCL, 0o600)


def _written_chunks(descriptor: int, entry: pb.ManifestFile, chunk_size: int) -> frozenset[int]:
    """The indices of the chunks a ``.part`` file already holds, each checked against its
    hash in the (signed) manifest: what an earlier, interrupted writer got to."""
    size = os.fstat(descriptor).st_size
    if size > entry.size:
        os.ftruncate(descriptor, entry.size)
        size = entry.size
    have = set()
    for index, digest in enumerate(entry.chunks):
        offset = index * chunk_size
        length = min(chunk_size, entry.size - offset)
        if offset + length > size:
            break
        if hashlib.sha256(os.pread(descriptor, length, offset)).hexdigest() == digest:
            have.add(index)
    return frozenset(have)


def sweep_parts(
    roots: Sequence[Path], max_age: float = PART_MAX_AGE, now: float | None = None
) -> list[Path]:
    """Delete our ``.part`` files under ``roots`` untouched for ``max_age`` seconds (those an
    agent killed mid-transfer left, and nothing resumed): the ones removed. A part some
    writer holds (locked) stays, however old."""
    cutoff = (time.time() if now is None else now) - max_age
    removed: list[Path] = []
    for root in roots:
        seen = 0
        for directory, subdirectories, names in os.walk(root):
            seen += len(subdirectories) + len(names)
            for name in names:
                if _PART.fullmatch(name) is None:
                    continue
                path = Path(directory) / name
                with contextlib.suppress(OSError):
                    if _sweep_one(path, cutoff):
                        removed.append(path)
            if seen > SWEEP_MAX_ENTRIES:
                break
    return removed


def _sweep_one(path: Path, cutoff: float) -> bool:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_mtime > cutoff:
        return False
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(descriptor)


def _same_content(path: Path, size: int, digest: str) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly these bytes."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    whole = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(1024 * 1024):
            whole.update(data)
    return whole.hexdigest() == digest


def _set_owner(target: Path | int, owner: tuple[int, int]) -> None:
    """``target``: a path (never followed if a link) or an open descriptor."""
    if owner == (-1, -1):
        return
    if isinstance(target, int):
        os.fchown(target, *owner)
    else:
        os.chown(target, *owner, follow_symlinks=False)
