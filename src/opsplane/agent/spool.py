"""The agent's durable memory of runs: a restart never runs a command twice or loses a result.

Layout under ``state_dir``::

    lock                 held (flock) by the one agent using this directory
    runs/<run_id>.json   accepted (maybe running) or finished with its result, not yet stored
                         by the control plane
    done/<run_id>.json   small marker: the control plane stored the result, or the run was
                         abandoned; keeps the id "seen" until pruned

Every write goes to a temporary file that is fsynced and then renamed into place, and the
directory is fsynced after, so a crash leaves either the old record or the new one. A run is
recorded as accepted *before* it is executed: after a crash an accepted run is not started
again, it is reported by the control plane as lost instead (at most once beats at least once
for commands with side effects).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from opsplane.domain.errors import ConfigError, InvalidInput

logger = logging.getLogger(__name__)

# Random names tried for a temporary file before giving up (a clash is a 2⁻⁶⁴ event).
_TEMPORARY_ATTEMPTS: Final = 8

_RUN_ID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
MIN_RETENTION: Final = timedelta(days=1)

ACCEPTED: Final = "accepted"
FINISHED: Final = "finished"
ACKNOWLEDGED: Final = "acknowledged"
ABANDONED: Final = "abandoned"


def check_run_id(run_id: str) -> str:
    """Return the file-name key of ``run_id``, or raise InvalidInput if it is not a UUID.

    Run ids arrive in messages and become file names; only the canonical UUID form is let
    through, so no message can choose a path.
    """
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise InvalidInput(f"not a run id: {run_id!r}")
    return run_id.lower()


@dataclass(frozen=True)
class InterruptedRun:
    """A run that was accepted but never finished: the agent died while it ran."""

    run_id: str
    task_id: str
    pid: int | None
    create_time: float | None
    accepted_at: float | None


class Spool:
    """Per-agent run records in ``state_dir``; see the module docstring for the layout.

    Calls are synchronous and short (a few small files and fsyncs). One agent process uses a
    directory at a time: call :meth:`lock` before relying on it.
    """

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir)
        self._runs = self._dir / "runs"
        self._done = self._dir / "done"
        self._lock_fd: int | None = None
        for directory in (self._dir, self._runs, self._done):
            # Results may hold secrets printed by commands: private to the agent's user.
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The state directory."""
        return self._dir

    # -- ownership -----------------------------------------------------------------------

    def lock(self) -> None:
        """Claim the directory for this process, or raise ConfigError if another agent has it.

        Also finishes what a crash may have left half done: temporary files are removed and a
        run that has both a record and a done marker keeps only the marker.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"another agent is using {self._dir}") from exc
            raise
        self._lock_fd = fd
        for directory in (self._runs, self._done):
            for tmp in directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        for record in self._runs.glob("*.json"):
            if (self._done / record.name).exists():
                record.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Release the directory (also released when the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the life of a run ---------------------------------------------------------------

    def seen(self, run_id: str) -> bool:
        """Whether ``run_id`` was ever accepted here (and not pruned since)."""
        key = check_run_id(run_id)
        return (self._runs / f"{key}.json").exists() or (self._done / f"{key}.json").exists()

    def accept(self, run_id: str, task_id: str, meta: Mapping[str, Any]) -> bool:
        """Durably record ``run_id`` as accepted; False if it was seen before (do not run it)."""
        key = check_run_id(run_id)
        if self.seen(run_id):
            return False
        record = {
            "run_id": run_id,
            "task_id": task_id,
            "state": ACCEPTED,
            "accepted_at": time.time(),
            "meta": dict(meta),
            "pid": None,
            "create_time": None,
        }
        return self._write(self._runs / f"{key}.json", record, exclusive=True)

    def record_pid(self, run_id: str, pid: int, create_time: float | None) -> None:
        """Remember the process of a running run, so a restarted agent can kill what is left."""
        path = self._runs / f"{check_run_id(run_id)}.json"
        record = self._read(path)
        if record is None or record.get("state") != ACCEPTED:
            logger.warning("pid for run %s which is not running here; not recorded", run_id)
            return
        record["pid"] = pid
        record["create_time"] = create_time
        self._write(path, record)

    def finish(self, run_id: str, result: Mapping[str, Any]) -> None:
        """Durably keep the final result of ``run_id`` until the control plane acknowledges it."""
        key = check_run_id(run_id)
        if (self._done / f"{key}.json").exists():
            logger.warning("result for run %s which is already done; dropped", run_id)
            return
        path = self._runs / f"{key}.json"
        record = self._read(path) or {"run_id": run_id, "task_id": result.get("task_id", "")}
        record["state"] = FINISHED
        record["finished_at"] = time.time()
        record["result"] = dict(result)
        self._write(path, record)

    def pending_result(self, run_id: str) -> dict[str, Any] | None:
        """The spooled result of ``run_id`` if it finished and was not acknowledged yet."""
        record = self._read(self._runs / f"{check_run_id(run_id)}.json")
        if record is None or record.get("state") != FINISHED:
            return None
        result = record.get("result")
        return dict(result) if isinstance(result, dict) else None

    def pending_results(self) -> list[dict[str, Any]]:
        """Every finished result the control plane has not acknowledged, oldest first."""
        found: list[tuple[float, dict[str, Any]]] = []
        for _, record in self._records():
            result = record.get("result")
            if record.get("state") == FINISHED and isinstance(result, dict):
                found.append((float(record.get("finished_at") or 0.0), result))
        found.sort(key=lambda item: item[0])
        return [result for _, result in found]

    def acknowledge(self, run_id: str) -> bool:
        """The control plane stored the result: forget it but remember the id.

        Returns False when there was no spooled result for ``run_id``.
        """
        key = check_run_id(run_id)
        path = self._runs / f"{key}.json"
        record = self._read(path)
        if record is None or record.get("state") != FINISHED:
            return False
        self._retire(key, run_id, ACKNOWLEDGED)
        return True

    def interrupted(self) -> list[InterruptedRun]:
        """Runs accepted but never finished, i.e. a previous agent died while they ran.

        Meaningful at start-up, before this agent accepts anything itself.
        """
        runs: list[InterruptedRun] = []
        for path, record in self._records(include_unreadable=True):
            if record.get("state") not in (ACCEPTED, None):
                continue
            pid = record.get("pid")
            create_time = record.get("create_time")
            accepted_at = record.get("accepted_at")
            runs.append(
                InterruptedRun(
                    run_id=str(record.get("run_id") or path.stem),
                    task_id=str(record.get("task_id") or ""),
                    pid=pid if isinstance(pid, int) else None,
                    create_time=float(create_time)
                    if isinstance(create_time, int | float)
                    else None,
                    accepted_at=float(accepted_at)
                    if isinstance(accepted_at, int | float)
                    else None,
                )
            )
        return runs

    def mark_abandoned(self, run_id: str) -> None:
        """Give up on an interrupted run: no result will ever be reported for it."""
        key = check_run_id(run_id)
        self._retire(key, run_id, ABANDONED)

    def recently_acknowledged(self, within: timedelta) -> list[str]:
        """Runs whose result was acknowledged less than ``within`` ago.

        On RabbitMQ the acknowledgement is the broker's publisher confirm, which comes before
        the control plane has consumed (and stored) the result, so for a while such a run is
        still "finished, result on its way" from the control plane's point of view.
        """
        return self._retired_since(ACKNOWLEDGED, within)

    def recently_abandoned(self, within: timedelta) -> list[str]:
        """Runs abandoned (interrupted by a crash) less than ``within`` ago."""
        return self._retired_since(ABANDONED, within)

    def prune(self, older_than: timedelta) -> int:
        """Forget done runs older than ``older_than`` (at least a day); returns how many."""
        horizon = time.time() - max(older_than, MIN_RETENTION).total_seconds()
        removed = 0
        for marker in self._done.glob("*.json"):
            try:
                if marker.stat().st_mtime < horizon:
                    marker.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- files ---------------------------------------------------------------------------

    def _retired_since(self, state: str, within: timedelta) -> list[str]:
        """Run ids of done markers in ``state`` written less than ``within`` ago, oldest first.

        The marker's mtime is when it was written (as for :meth:`prune`); only markers recent
        enough are opened, so a week of done runs costs one stat each.
        """
        horizon = time.time() - within.total_seconds()
        found: list[tuple[float, str]] = []
        with os.scandir(self._done) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # pruned meanwhile
                if mtime < horizon:
                    continue
                marker = self._read(Path(entry.path))
                if marker is not None and marker.get("state") == state:
                    found.append((mtime, str(marker.get("run_id") or entry.name[:-5])))
        found.sort()
        return [run_id for _, run_id in found]

    def _retire(self, key: str, run_id: str, state: str) -> None:
        # Marker first, record second: a crash in between leaves both, which lock() tidies,
        # never neither, which would make the id unseen.
        marker = {"run_id": run_id, "state": state, "at": time.time()}
        self._write(self._done / f"{key}.json", marker)
        (self._runs / f"{key}.json").unlink(missing_ok=True)
        _fsync_dir(self._runs)

    def _records(
        self, *, include_unreadable: bool = False
    ) -> Iterator[tuple[Path, dict[str, Any]]]:
        for path in sorted(self._runs.glob("*.json")):
            record = self._read(path)
            if record is not None:
                yield path, record
            elif include_unreadable and path.exists():
                # A record we cannot read still means "accepted": treating it as interrupted
                # gets it abandoned instead of ever run again.
                yield path, {"run_id": path.stem}

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("unreadable spool record %s: %s", path, exc)
            return None
        if not isinstance(data, dict):
            logger.warning("unreadable spool record %s: not an object", path)
            return None
        return data

    def _write(self, path: Path, record: Mapping[str, Any], *, exclusive: bool = False) -> bool:
        """Atomically put ``record`` at ``path``; with ``exclusive``, only if nothing is there."""
        data = json.dumps(record, separators=(",", ":")).encode()
        fd, tmp = _create_temporary(path.parent)
        try:
            with os.fdopen(fd, "wb") as tmp_file:
                tmp_file.write(data)
                tmp_file.flush()
                os.fsync(tmp_file.fileno())
            if exclusive:
                try:
                    # A hard link fails if the name exists, unlike a rename.
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    # No hard links here; the directory lock and the caller's seen() check
                    # already exclude a competitor, so a rename is as good.
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)


def _create_temporary(directory: Path) -> tuple[int, Path]:
    """A new empty file in ``directory``, open for writing, readable by the owner only: what
    ``tempfile.mkstemp`` does, without the import (tempfile loads shutil and its compression
    modules, close to 1 MiB of an idle agent's memory)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(_TEMPORARY_ATTEMPTS):
        path = directory / f".{os.urandom(8).hex()}.tmp"
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)
