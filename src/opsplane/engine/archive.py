"""Per-run output archive: the whole output of every run, appended as it arrives.

Paths are ``<logs_dir>/YYYY/MM/DD/<task_id>/<run_id>.log``, the date being the task's creation
date in UTC: one file per run, so the archive can move to object storage run by run (DESIGN §7),
and a day of tasks is one directory to back up or drop. Runs archived before this layout live at
``<logs_dir>/<task_id>/<run_id>.log``; every reader uses the path stored on the run
(``runs.log_path``), so both layouts are read the same way.

Retention (docs/operations.md, *Log archive*): :meth:`LogArchive.prune` drops run logs by age
and by total size; :class:`ArchivePruner` calls it periodically. One run's log is capped at
``max_bytes_per_run`` (setting ``archive_max_bytes_per_run``): a command printing without end
fills the disk no faster than the cap, and the cut is marked in the log itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from opsplane.engine.background import Supervised, run_periodically

log = logging.getLogger(__name__)

#: A file written to within this many seconds may belong to a run still being written: no
#: retention rule deletes it.
LIVE_GRACE = 600.0
#: At most this many files are deleted per pass, so that a first pass over a large backlog does
#: not hold a worker thread for minutes; the rest goes on the following passes.
MAX_REMOVALS_PER_PASS = 10_000

_APPEND_ATTEMPTS = 3


def cap_marker(cap: int) -> bytes:
    """What ends a run log cut at ``cap`` bytes."""
    return f"\n[opsplane: archive capped at {cap} bytes; the rest is not kept]\n".encode()


@dataclass(frozen=True)
class PruneResult:
    """What one :meth:`LogArchive.prune` pass removed."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    #: False when the pass stopped at its removal limit with more left to remove.
    complete: bool = True


@dataclass(frozen=True)
class _Log:
    path: Path
    size: int
    mtime: float


class LogArchive:
    """Run log files under ``logs_dir``, with optional retention.

    ``retention_days`` (0 = keep forever) deletes logs whose last write is older than that;
    ``retention_bytes`` (0 = no cap) then deletes the least recently written logs until the
    archive fits. Neither touches a file written within ``live_grace`` seconds.
    """

    def __init__(
        self,
        logs_dir: Path,
        *,
        retention_days: float = 0,
        retention_bytes: int = 0,
        live_grace: float = LIVE_GRACE,
        max_removals: int = MAX_REMOVALS_PER_PASS,
        max_bytes_per_run: int = 0,
    ) -> None:
        self.logs_dir = logs_dir
        self.max_bytes_per_run = max_bytes_per_run
        self.retention_days = retention_days
        self.retention_bytes = retention_bytes
        self.live_grace = live_grace
        self.max_removals = max_removals

    def path_for(self, task_id: str, run_id: str, created_at: datetime) -> Path:
        """Where a new run's log goes; ``created_at`` is its task's creation time (a naive
        value is taken as UTC). Store the result on the run: readers use the stored path."""
        return self.task_dir(task_id, created_at) / f"{run_id}.log"

    def task_dir(self, task_id: str, created_at: datetime) -> Path:
        """The directory of the logs of a task's runs (``path_for`` without the file name)."""
        day = (
            created_at.replace(tzinfo=UTC) if created_at.tzinfo is None else created_at
        ).astimezone(UTC)
        return self.logs_dir / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}" / task_id

    def legacy_path_for(self, task_id: str, run_id: str) -> Path:
        """The path of the layout before dated directories, for a run without a stored path."""
        return self.logs_dir / task_id / f"{run_id}.log"

    async def append(self, chunks: list[tuple[Path, bytes]]) -> None:
        if chunks:
            await asyncio.to_thread(self._append, chunks)

    def _append(self, chunks: list[tuple[Path, bytes]]) -> None:
        by_path: defaultdict[Path, list[bytes]] = defaultdict(list)
        for path, data in chunks:
            by_path[path].append(data)
        for path, parts in by_path.items():
            data = self._within_cap(path, b"".join(parts))
            if not data:
                continue
            # A prune pass may remove the (then empty) directory between mkdir and open.
            for attempt in range(_APPEND_ATTEMPTS):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with path.open("ab") as handle:
                        handle.write(data)
                    break
                except FileNotFoundError:
                    if attempt == _APPEND_ATTEMPTS - 1:
                        raise

    def _within_cap(self, path: Path, data: bytes) -> bytes:
        """``data``, cut where the run's log reaches the cap (and then marked). The file's
        size is the state: a restarted control plane caps the same way."""
        cap = self.max_bytes_per_run
        if cap <= 0:
            return data
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size > cap:
            return b""  # cut and marked already
        if size + len(data) <= cap:
            return data
        # A log that reached the cap exactly is marked when more comes (size == cap here).
        return data[: cap - size] + cap_marker(cap)

    async def read(self, path: Path) -> bytes:
        def _read() -> bytes:
            return path.read_bytes() if path.is_file() else b""

        return await asyncio.to_thread(_read)

    # Retention ----------------------------------------------------------------------------

    @property
    def retains_all(self) -> bool:
        return self.retention_days <= 0 and self.retention_bytes <= 0

    async def prune(self, now: datetime | None = None) -> PruneResult:
        """Apply the retention settings once (in a worker thread); what was removed.

        A missing archive directory is an empty archive. A file that cannot be removed is
        skipped and left for the next pass."""
        if self.retains_all:
            return PruneResult()
        moment = (now or datetime.now(UTC)).timestamp()
        return await asyncio.to_thread(self._prune, moment)

    def _prune(self, now: float) -> PruneResult:
        protected_after = now - self.live_grace
        budget = self.max_removals
        complete = True
        removed: list[_Log] = []
        kept: list[_Log] = []
        age_cutoff = now - self.retention_days * 86400 if self.retention_days > 0 else None
        for entry in self._run_logs():
            expired = age_cutoff is not None and entry.mtime < min(age_cutoff, protected_after)
            if expired and budget <= 0:
                complete = False
            elif expired and _unlink(entry.path):
                removed.append(entry)
                budget -= 1
                continue
            kept.append(entry)
        if self.retention_bytes > 0:
            total = sum(entry.size for entry in kept)
            for entry in sorted(kept, key=lambda e: e.mtime):
                # Sorted by mtime: once one is live, every later one is live too.
                if total <= self.retention_bytes or entry.mtime >= protected_after:
                    break
                if budget <= 0:
                    complete = False
                    break
                if _unlink(entry.path):
                    removed.append(entry)
                    total -= entry.size
                    budget -= 1
        dirs = self._remove_empty_dirs({entry.path.parent for entry in removed})
        return PruneResult(
            files=len(removed), bytes=sum(e.size for e in removed), dirs=dirs, complete=complete
        )

    def _run_logs(self) -> list[_Log]:
        """Every run log of either layout. Other files, such as the catalog's
        ``<logs_dir>/<name>.log`` (its default directory is this one), are not run logs."""
        logs: list[_Log] = []
        for top, _dirs, files in os.walk(self.logs_dir):
            parts = Path(top).relative_to(self.logs_dir).parts
            if not _is_task_dir(parts):
                continue
            for name in files:
                if not name.endswith(".log"):
                    continue
                path = Path(top, name)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                logs.append(_Log(path, stat.st_size, stat.st_mtime))
        return logs

    def _remove_empty_dirs(self, emptied: set[Path]) -> int:
        """Empty date and task directories (bottom-up), and the parents of removed files."""
        candidates = set(emptied)
        for top, subdirs, files in os.walk(self.logs_dir):
            parts = Path(top).relative_to(self.logs_dir).parts
            if not subdirs and not files and parts and _is_dated(parts):
                candidates.add(Path(top))
        removed = 0
        # Deepest first, so that a day emptied of its task directories goes too.
        for directory in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
            while directory != self.logs_dir and self.logs_dir in directory.parents:
                try:
                    directory.rmdir()
                except OSError:  # not empty (or already gone): its parents are not empty either
                    break
                removed += 1
                directory = directory.parent
        return removed


def _is_dated(parts: tuple[str, ...]) -> bool:
    """``YYYY``, ``YYYY/MM``, ``YYYY/MM/DD`` or below."""
    widths = (4, 2, 2)
    return all(p.isdigit() and len(p) == w for p, w in zip(parts[:3], widths, strict=False))


def _is_task_dir(parts: tuple[str, ...]) -> bool:
    """``YYYY/MM/DD/<task_id>``, or the legacy ``<task_id>`` directly under the archive."""
    if len(parts) == 4:
        return _is_dated(parts)
    return len(parts) == 1 and not _is_dated(parts)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        log.warning("log archive: cannot remove %s: %s", path, e)
        return False
    return True


class ArchivePruner:
    """Prunes the archive every ``interval`` seconds, from ``start()`` to ``stop()``.

    A pass that stopped at its removal limit is followed by another one a second later, until
    the backlog is gone. A filesystem error is logged and retried on the next pass."""

    def __init__(self, archive: LogArchive, *, interval: float = 3600.0) -> None:
        self._archive = archive
        self._interval = interval
        self.loop = Supervised("archive-pruner", self._loop)

    async def start(self) -> None:
        if not self._archive.retains_all:
            self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()

    async def run_once(self) -> PruneResult:
        result = await self._archive.prune()
        if result.files or result.dirs:
            log.info(
                "log archive: removed %d run logs (%d bytes) and %d empty directories%s",
                result.files,
                result.bytes,
                result.dirs,
                "" if result.complete else "; more to remove",
            )
        return result

    async def _loop(self) -> None:
        await run_periodically(
            self._complete_pass,
            interval=self._interval,
            what="log archive pruning",
            log=log,
            retry_on=OSError,
        )

    async def _complete_pass(self) -> bool:
        return (await self.run_once()).complete
