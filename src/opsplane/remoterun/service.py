"""RemoteRunService: seed 003's operations — submit a script, show a task in the seed's words,
follow its log — over the engine. Every submission is an ordinary opsplane script task aimed
at the control plane's own host: in the database, in ``/api/v1/tasks``, archived, timed out
and canceled by the engine like any other.

The log follower reads the run's archive file, the one record of its whole output, as it grows
(woken by the task's events). Every line carries a cursor ``<run>:<offset>`` — the run's
position among the task's runs (1, 2, … as they were created) and the byte offset just after
the line in that run's archive — so that a reader can resume exactly where it stopped, whether
the task is still running or long finished. Runs are read one after the other: a seed task has
one host, so its runs (attempts) never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from opsplane.domain.errors import InvalidInput, OpsplaneError
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.records import RunRecord, TaskRecord
from opsplane.domain.states import (
    TERMINAL_RUN_STATUSES,
    TERMINAL_TASK_STATUSES,
    RunStatus,
    TaskStatus,
)
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest, params_env
from opsplane.engine.core import Engine
from opsplane.engine.hub import Subscription
from opsplane.engine.service import BeforeCommit
from opsplane.engine.templates import ScriptRun
from opsplane.remoterun.scripts import SCRIPT_PATH_ENV, ScriptDirs, ScriptPins
from opsplane.store import queries

# The seed's status machine: pending, running, success, failed, timeout. A canceled task is
# "failed" in the seed's words (the seed has no cancel); ``opsplane_status`` says which.
SEED_STATUS: Mapping[str, str] = {
    TaskStatus.PENDING: "pending",
    TaskStatus.RUNNING: "running",
    TaskStatus.SUCCEEDED: "success",
    TaskStatus.FAILED: "failed",
    TaskStatus.TIMED_OUT: "timeout",
    TaskStatus.CANCELED: "failed",
}
API = "remoterun"


def seed_status(task_status: str, last_run_status: str | None) -> str:
    """The seed's word for a task. A seed task has one host: when its run timed out, the task
    (failed, in opsplane's words) is the seed's "timeout"."""
    if task_status == TaskStatus.FAILED and last_run_status == RunStatus.TIMED_OUT:
        return "timeout"
    return SEED_STATUS.get(task_status, task_status)


# Backstop when no event wakes the reader (e.g. the hub dropped it for falling behind).
_POLL = 1.0
# A line longer than this is cut into pieces of this size: a log reader is not a byte pipe.
MAX_LINE = 64 * 1024
_READ = 1024 * 1024
# How long a reader waits for ingest to archive what it has committed.
_ARCHIVE_WAIT = 5.0


class RemoteRunDisabled(OpsplaneError):
    """No script directory is configured: the seed-003 routes cannot run anything."""


@dataclass(frozen=True)
class RemoteRunRequest:
    """The seed's body: ``script_path`` and ``params``, with its optional metadata.
    ``priority`` orders scripts waiting for a worker (setting ``script_workers``); ``retry`` is
    a number of retries or ``{max_attempts, backoff_seconds, on}``."""

    script_path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout: int | None = None
    retry: Any = None


@dataclass(frozen=True)
class LogLine:
    cursor: str
    text: str


@dataclass(frozen=True)
class LogEnd:
    """The task ended and every line was sent; ``status`` in the seed's words."""

    cursor: str
    status: str


def parse_cursor(value: str | None) -> tuple[int, int]:
    """``"<run>:<offset>"`` (a ``Last-Event-ID``) → (run, offset); None → the beginning."""
    if not value:
        return 1, 0
    run, sep, offset = value.partition(":")
    if not sep or not run.isdigit() or not offset.isdigit() or int(run) < 1:
        raise InvalidInput(
            f"Last-Event-ID must be an id this stream sent (<run>:<offset>), got {value!r}"
        )
    return int(run), int(offset)


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").replace("\x00", "\ufffd").removesuffix("\r")


def _read(path: Path, offset: int, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except FileNotFoundError:
        return b""


def _retries(retry: Any) -> dict[str, Any] | None:
    """The seed's free-form retry as a retries policy: a count of retries after the first
    attempt, or the policy object itself."""
    if retry is None or isinstance(retry, dict):
        return retry
    if isinstance(retry, int) and not isinstance(retry, bool) and retry >= 0:
        return {"max_attempts": retry + 1} if retry else None
    raise InvalidInput(
        f"retry must be a number of retries or {{max_attempts, backoff_seconds, on}}, got {retry!r}"
    )


class RemoteRunService:
    def __init__(self, engine: Engine, script_dirs: Sequence[Path], *, poll: float = _POLL) -> None:
        self._engine = engine
        self.scripts = ScriptDirs(script_dirs)
        settings = engine.settings
        self.pins = ScriptPins(settings.data_dir, required=settings.script_pins_required)
        if self.scripts:
            self.pins.load()  # a broken pins file stops the start (ConfigError), not a request
        self._poll = poll

    async def template_script(self, script_path: str) -> ScriptRun:
        """How a job template of kind ``script`` runs ``script_path``: as a submission
        would (argv, no shell; a pinned script from its verified copy)."""
        if not self.scripts:
            raise InvalidInput(
                "kind script needs a script directory: start the server with --script-dir DIR"
            )
        script = self.scripts.resolve(script_path)
        approved = await asyncio.to_thread(self.pins.check, script, script_path)
        env = {SCRIPT_PATH_ENV: str(script)} if approved.sha256 is not None else {}
        return ScriptRun(
            command=str(script),
            argv=(str(approved.path),),
            cwd=str(script.parent),
            env=env,
            sha256=approved.sha256,
        )

    async def submit(
        self,
        request: RemoteRunRequest,
        *,
        created_by: str = "anonymous",
        idempotency_key: str | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> TaskRecord:
        """Create the task: the script as argv (no shell), params as environment variables.
        ``before_commit`` runs in the creating transaction (the API's audit record)."""
        if not self.scripts:
            raise RemoteRunDisabled(
                "no script directory is configured: start the server with --script-dir DIR"
            )
        script = self.scripts.resolve(request.script_path)
        env = params_env(request.params)
        # A pinned script runs from its verified copy: the bytes checked are the bytes run.
        approved = await asyncio.to_thread(self.pins.check, script, request.script_path)
        if approved.sha256 is not None:
            env[SCRIPT_PATH_ENV] = str(script)
        spec = ExecSpec(
            argv=(str(approved.path),),
            env=env,
            cwd=str(script.parent),
            meta={
                "api": API,
                "script_path": request.script_path,
                "params": dict(request.params),
                "priority": request.priority,
                "retry": request.retry,
                "sha256": approved.sha256,
            },
        )
        task = TaskRequest(
            policy=TaskPolicy.parse(priority=request.priority, retries=_retries(request.retry)),
            command=str(script),
            targets=Targets(hosts=(self._engine.settings.local_host,)),
            timeout=request.timeout,
            name=request.script_path[:255],
            created_by=created_by,
            idempotency_key=idempotency_key,
            kind="script",
            spec=spec,
        )
        return await self._engine.tasks.create_task(task, before_commit=before_commit)

    async def view(self, task_id: str) -> dict[str, Any]:
        """A task as the seed's table shows it (plus when it ran and how it ended)."""
        task = await self._engine.tasks.get_task(task_id)
        runs = await self._engine.tasks.list_runs(task_id)
        meta = ExecSpec.from_json(task.spec).meta
        last: RunRecord | None = max(runs, key=lambda r: (r.attempt, r.id)) if runs else None
        moments: list[datetime] = [task.created_at]
        moments += [m for m in (task.started_at, task.finished_at) if m is not None]
        moments += [run.updated_at for run in runs]
        return {
            "id": task.id,
            "script_path": meta.get("script_path", task.command),
            "params": meta.get("params", {}),
            "status": seed_status(task.status, last.status if last is not None else None),
            "priority": meta.get("priority", 0),
            "timeout": task.timeout,
            "retry": meta.get("retry"),
            "created_at": task.created_at.isoformat(),
            "updated_at": max(moments).isoformat(),
            "started_at": task.started_at.isoformat() if task.started_at else None,
            "finished_at": task.finished_at.isoformat() if task.finished_at else None,
            "logs_path": last.log_path if last is not None else None,
            "exit_code": last.exit_code if last is not None else None,
            "error": last.error if last is not None else None,
            "opsplane_status": task.status,
        }

    async def follow(
        self, task_id: str, cursor: tuple[int, int]
    ) -> AsyncIterator[LogLine | LogEnd]:
        """The task's log lines after ``cursor``, live, until the task has ended and every line
        of every run was read; then a ``LogEnd``."""
        await self._engine.tasks.get_task(task_id)  # NotFound before the stream begins
        hub = self._engine.hub
        subscription = hub.subscribe(task_id)
        run_no, offset = cursor
        try:
            while True:
                async with self._engine.sessions() as session:
                    task = await queries.get_task(session, task_id)
                    runs = await queries.run_logs(session, task_id)
                if task is None:
                    return  # deleted while read
                if run_no > len(runs):
                    if task.status in TERMINAL_TASK_STATUSES:
                        last = runs[-1].status if runs else None
                        yield LogEnd(f"{run_no}:0", seed_status(task.status, last))
                        return
                else:
                    run = runs[run_no - 1]
                    ended = run.status in TERMINAL_RUN_STATUSES
                    # Output committed with (or before) the status just read may still be on
                    # its way to the archive.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_ARCHIVE_WAIT):
                            await self._engine.ingest.archived()
                    path = self._path(task_id, run)
                    more = True
                    while more:
                        data = await asyncio.to_thread(_read, path, offset, _READ)
                        more = len(data) == _READ
                        lines, used = _complete_lines(data, final=ended and not more)
                        for line, end in lines:
                            yield LogLine(f"{run_no}:{offset + end}", _text(line))
                        offset += used
                    if ended:
                        run_no, offset = run_no + 1, 0
                        continue
                subscription = await self._wait(subscription, task_id)
        finally:
            hub.unsubscribe(subscription)

    def _path(self, task_id: str, run: queries.RunLog) -> Path:
        if run.log_path:
            return Path(run.log_path)
        return self._engine.archive.legacy_path_for(task_id, run.id)

    async def _wait(self, subscription: Subscription, task_id: str) -> Subscription:
        """Until the task has news (or the poll interval passed); drains what queued up."""
        hub = self._engine.hub
        if subscription.overflowed.is_set():
            hub.unsubscribe(subscription)
            subscription = hub.subscribe(task_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll):
                await subscription.queue.get()
        while not subscription.queue.empty():
            subscription.queue.get_nowait()
        return subscription


def _complete_lines(data: bytes, *, final: bool) -> tuple[list[tuple[bytes, int]], int]:
    """Lines of ``data`` with the offset just after each, and how many bytes they used. The
    incomplete last line stays unread unless ``final`` (the run ended) or it is too long."""
    lines: list[tuple[bytes, int]] = []
    start = 0
    while start < len(data):
        newline = data.find(b"\n", start, start + MAX_LINE + 1)
        if newline >= 0:
            lines.append((data[start:newline], newline + 1))
            start = newline + 1
        elif len(data) - start >= MAX_LINE:
            lines.append((data[start : start + MAX_LINE], start + MAX_LINE))
            start += MAX_LINE
        elif final:
            lines.append((data[start:], len(data)))
            start = len(data)
        else:
            break
    return lines, start
