"""Copying a file or a directory tree over SFTP, each file succeeding or failing on its own.

A directory's contents land in the remote path (created with its parents, like ``rsync -r
local/ remote``), every subdirectory created as needed; a directory that cannot be created
fails the files below it. A file lands at the remote path, or inside it when that is an
existing directory or ends with ``/``. Permission bits are copied, times are not.

No symbolic link is ever created on the target, and none is followed there: a link in the tree
to a file inside the uploaded directory is copied as that file; a link that leads outside it,
or to a directory, is refused (a per-file failure), since it may point anywhere (``/etc``, a
parent, a loop). A link found at a destination on the target is replaced by the file, never
written or ``chmod``-ed through (that would change whatever it points to).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import shlex
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncssh

from opsplane.execution import Outcome
from opsplane.transport.ssh.connections import error_reason

# An uploaded file's remote path, and None or why it failed.
FileCallback = Callable[[str, str | None], Awaitable[None]]


@dataclass(frozen=True)
class UploadResult:
    """How an upload ended on one target: remote paths copied, and those that failed why.

    ``error`` is set when the upload as a whole could not proceed (connect failed, local
    path missing, timed out, canceled); files that were not attempted are then listed in
    ``failed`` when known.
    """

    status: Outcome
    uploaded: list[str]
    failed: list[tuple[str, str]]
    error: str | None
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None


@dataclass(frozen=True)
class UploadPlan:
    """What a local path holds: a single file, or directories and files relative to it."""

    single_file: tuple[Path, int] | None
    directories: list[str]
    files: list[tuple[Path, str, int]]  # source, relative path, permission bits
    problems: list[tuple[str, str]]  # relative path → why it is not copied

    def remote_files(self, remote_root: str) -> list[str]:
        if self.single_file is not None:
            return [remote_root]
        return [posixpath.join(remote_root, relative) for _, relative, _ in self.files]


def plan_upload(local: Path) -> UploadPlan:
    info = local.stat()  # follows a symlink given on purpose; raises if missing
    if stat.S_ISREG(info.st_mode):
        return UploadPlan((local, info.st_mode & 0o777), [], [], [])
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(0, "not a regular file or a directory", str(local))
    inside = local.resolve()
    directories: list[str] = []
    files: list[tuple[Path, str, int]] = []
    problems: list[tuple[str, str]] = []
    for root, dirnames, filenames in os.walk(local, followlinks=False):
        dirnames.sort()
        base = Path(root)
        relative_root = base.relative_to(local).as_posix()
        for name in list(dirnames):
            relative = name if relative_root == "." else f"{relative_root}/{name}"
            if (base / name).is_symlink():
                # Not followed: a link may point anywhere, even to a parent (a loop).
                problems.append((relative, "symbolic link to a directory, not followed"))
                dirnames.remove(name)
            else:
                directories.append(relative)
        for name in sorted(filenames):
            relative = name if relative_root == "." else f"{relative_root}/{name}"
            path = base / name
            try:
                if path.is_symlink():
                    path = path.resolve(strict=True)
                    if not path.is_relative_to(inside):
                        problems.append(
                            (relative, "symbolic link to outside the uploaded directory, refused")
                        )
                        continue
                mode = path.stat().st_mode
            except (OSError, RuntimeError) as e:  # RuntimeError: a loop of links
                problems.append((relative, f"cannot read: {getattr(e, 'strerror', None) or e}"))
                continue
            if not stat.S_ISREG(mode):
                problems.append((relative, "not a regular file"))
                continue
            files.append((path, relative, mode & 0o777))
    return UploadPlan(None, directories, files, problems)


@dataclass(frozen=True)
class Ownership:
    """The numeric owner and group every file gets (SFTP v3 carries ids, not names); None
    keeps the file's own."""

    uid: int | None
    gid: int | None
    label: str  # as asked: "owner:group", for messages


async def resolve_ownership(
    conn: asyncssh.SSHClientConnection, owner: str | None, group: str | None
) -> Ownership:
    """The ids of ``owner`` and ``group`` (names or numbers) on the target, looked up there
    (its accounts, not ours); ValueError naming what is unknown."""

    async def lookup(command: str, name: str, what: str) -> int:
        result = await conn.run(command, check=False)
        text = str(result.stdout or "").strip()
        if result.exit_status != 0 or not text.isdigit():
            raise ValueError(f"no {what} {name!r} on the host")
        return int(text)

    uid = gid = None
    if owner:
        uid = (
            int(owner)
            if owner.isdigit()
            else await lookup(f"id -u -- {shlex.quote(owner)}", owner, "user")
        )
    if group:
        gid = (
            int(group)
            if group.isdigit()
            else await lookup(f"getent group -- {shlex.quote(group)} | cut -d: -f3", group, "group")
        )
    return Ownership(uid, gid, f"{owner or ''}:{group or ''}".strip(":"))


async def transfer(
    sftp: asyncssh.SFTPClient,
    plan: UploadPlan,
    remote_root: str,
    report: FileCallback,
    *,
    concurrency: int,
    ownership: Ownership | None = None,
) -> str | None:
    """Create the directories, then copy the files, ``concurrency`` at a time.

    Every file is ``report``-ed once, copied or not; returns an upload-wide error, if any.
    """
    if plan.single_file is not None:
        source, mode = plan.single_file
        destination = remote_root
        if remote_root.endswith("/") or await _isdir(sftp, remote_root):
            destination = posixpath.join(remote_root, source.name)
        parent = posixpath.dirname(destination)
        if parent and not await _isdir(sftp, parent):
            try:
                await sftp.makedirs(parent, exist_ok=True)
            except (asyncssh.SFTPError, OSError) as e:
                reason = f"cannot create directory {parent}: {error_reason(e)}"
                await report(destination, reason)
                return reason
        await report(destination, await _put(sftp, source, mode, destination, ownership))
        return None

    try:
        await sftp.makedirs(remote_root, exist_ok=True)
    except (asyncssh.SFTPError, OSError) as e:
        reason = f"cannot create directory {remote_root}: {error_reason(e)}"
        for _, relative, _ in plan.files:
            await report(posixpath.join(remote_root, relative), reason)
        return reason
    broken: dict[str, str] = {}  # relative directory → why it could not be created
    for relative in plan.directories:  # parents before children
        parent_problem = _under(relative, broken)
        if parent_problem is not None:
            broken[relative] = parent_problem
            continue
        path = posixpath.join(remote_root, relative)
        try:
            await sftp.mkdir(path)
        except (asyncssh.SFTPError, OSError) as e:
            if not await _isdir(sftp, path):
                broken[relative] = f"cannot create directory {path}: {error_reason(e)}"
    for relative, reason in plan.problems:
        await report(posixpath.join(remote_root, relative), reason)
    slots = asyncio.Semaphore(concurrency)

    async def copy(source: Path, relative: str, mode: int) -> None:
        destination = posixpath.join(remote_root, relative)
        problem = _under(posixpath.dirname(relative), broken)
        if problem is not None:
            await report(destination, problem)
            return
        async with slots:
            await report(destination, await _put(sftp, source, mode, destination, ownership))

    async with asyncio.TaskGroup() as group:
        for source, relative, mode in plan.files:
            group.create_task(copy(source, relative, mode))
    return None


def _under(relative: str, broken: Mapping[str, str]) -> str | None:
    """Why ``relative`` (a directory) or one of its parents could not be created, if so."""
    while relative and relative != ".":
        if relative in broken:
            return broken[relative]
        relative = posixpath.dirname(relative)
    return None


async def _isdir(sftp: asyncssh.SFTPClient, path: str) -> bool:
    try:
        return await sftp.isdir(path)
    except (asyncssh.SFTPError, OSError):
        return False


async def _put(
    sftp: asyncssh.SFTPClient,
    source: Path,
    mode: int,
    destination: str,
    ownership: Ownership | None = None,
) -> str | None:
    """Copy one file, set its permission bits (and owner and group); None on success, else
    why not."""
    try:
        await _unlink_if_symlink(sftp, destination)
        # follow_symlinks: a local link (a single file given as one) is sent as its file, never
        # recreated on the target.
        await sftp.put(str(source), destination, follow_symlinks=True)
        if await _is_symlink(sftp, destination):  # put there while we copied
            return "the destination became a symbolic link during the copy; not chmod-ed"
        if ownership is not None:
            problem = await _chown(sftp, destination, ownership)
            if problem is not None:
                return problem
        # After chown: a chown by root clears set-user/group-ID bits the mode may carry.
        await sftp.chmod(destination, mode)
    except (asyncssh.Error, OSError) as e:
        return error_reason(e)
    return None


async def _chown(sftp: asyncssh.SFTPClient, path: str, ownership: Ownership) -> str | None:
    uid, gid = ownership.uid, ownership.gid
    if uid is None or gid is None:
        # SFTP v3 sets both ids or neither: the one not asked for stays what it is.
        attrs = await sftp.lstat(path)
        uid = attrs.uid if uid is None else uid
        gid = attrs.gid if gid is None else gid
    if uid is None or gid is None:
        return "the SFTP server does not report the file's owner; not chown-ed"
    try:
        await sftp.chown(path, uid, gid)
    except asyncssh.SFTPPermissionDenied:
        return (
            f"written, but may not be given to {ownership.label}: the SSH login is not root "
            "(permission denied)"
        )
    return None


async def _is_symlink(sftp: asyncssh.SFTPClient, path: str) -> bool:
    try:
        attrs = await sftp.lstat(path)
    except asyncssh.SFTPNoSuchFile:
        return False
    return attrs.permissions is not None and stat.S_ISLNK(attrs.permissions)


async def _unlink_if_symlink(sftp: asyncssh.SFTPClient, path: str) -> None:
    """A link at the destination is removed (not followed): the file takes its place."""
    if await _is_symlink(sftp, path):
        await sftp.remove(path)
