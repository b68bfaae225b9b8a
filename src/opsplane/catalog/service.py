"""CatalogService: seed 004's calls — sync run, async run, query, kill — over the engine.

Every call is an ordinary opsplane script task aimed at the control plane's own host (the local
link): it is in the database, visible in ``/api/v1/tasks``, its output archived, its timeout
and cancel handled by the engine. The session id of an async call is that task's id.

The seed's session table — the sessions that ``/async/query`` lists: running ones, and finished
ones until the retention passes — is a view of those tasks: at start it is rebuilt from the
async calls' tasks (named ``catalog /async/…``) that are unfinished or ended within the
retention, so a restart forgets no session. A session cut short by the restart ends with its
run (``lost``, engine/recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from opsplane.catalog.logfile import RunRecord, TaskLogs
from opsplane.catalog.registry import Catalog, CatalogEntry, ExternalEntry, describe_routes
from opsplane.domain.errors import Conflict, InvalidInput, NotFound, OpsplaneError
from opsplane.domain.records import RunRecord as StoredRun
from opsplane.domain.records import TaskRecord
from opsplane.domain.states import TERMINAL_TASK_STATUSES, RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.engine.hub import Subscription
from opsplane.engine.service import BeforeCommit
from opsplane.remoterun.scripts import VERIFIED_DIR, VerifiedCopies, file_sha256, short_hash
from opsplane.store.tables import utcnow

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 3600.0
# A sync call waits for the run's own timeout plus this: time for the kill grace period and
# for the result to become durable.
SYNC_MARGIN = 15.0
# How long /async/kill waits for the process group to be confirmed gone.
KILL_WAIT = 15.0
# A live output line longer than this is cut: it is a preview, the whole output is archived.
_MAX_LINE = 4096
# Backstop poll of a watched task when no event arrives (the hub may drop a slow subscriber).
_POLL = 1.0
KILLED = "killed by /async/kill"
# A catalog call's task is named after its route: how a restart finds the async sessions.
_TASK_PREFIX = "catalog "


class UnknownRoute(NotFound):
    """No catalog entry has this cluster type and name."""


class UnknownSession(NotFound):
    """No session with this id is known (never started here, or already cleaned up)."""


class CatalogUnavailable(OpsplaneError):
    """The control plane cannot run catalog tasks right now (e.g. its local host is down)."""


@dataclass(frozen=True)
class SyncResult:
    """The seed's sync answer: ``code`` 0 when the run succeeded, else 1; ``data`` the last
    stdout line; ``msg`` the last stderr line (or, when it failed without any, why)."""

    code: int
    data: str
    msg: str


@dataclass(frozen=True)
class SessionView:
    """One entry of ``/async/query``."""

    id: str
    message: str
    error: str
    done: bool
    start_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message": self.message,
            "error": self.error,
            "done": self.done,
            "start_at": self.start_at,
        }


class _LastLine:
    """The last non-blank line of a stream fed in chunks, with bounded memory."""

    def __init__(self) -> None:
        self._partial = ""
        self._last = ""

    def feed(self, text: str) -> None:
        *complete, partial = (self._partial + text).split("\n")
        for line in reversed(complete):
            if line.strip():
                self._last = line.rstrip("\r")[-_MAX_LINE:]
                break
        self._partial = partial[-_MAX_LINE:]

    @property
    def value(self) -> str:
        return self._partial.rstrip("\r") if self._partial.strip() else self._last


@dataclass
class _Session:
    id: str
    entry: CatalogEntry
    route: str
    start_at: datetime
    listed: bool
    stdout: _LastLine = field(default_factory=_LastLine)
    stderr: _LastLine = field(default_factory=_LastLine)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    kill_requested: bool = False
    result: SyncResult | None = None
    error: str = ""
    ended_at: float | None = None  # monotonic, for the retention

    def view(self) -> SessionView:
        done = self.ended.is_set()
        return SessionView(
            id=self.id,
            message=self.result.data if self.result is not None else self.stdout.value,
            error=self.error if done else "",
            done=done,
            start_at=self.start_at.isoformat(),
        )


class CatalogService:
    """Runs catalog entries as script tasks and keeps the seed's session table.

    ``start()`` begins the clean-up of finished sessions older than ``retention`` seconds;
    ``stop()`` ends it and stops watching runs (the engine stops the runs themselves).
    """

    def __init__(
        self,
        engine: Engine,
        catalog: Catalog,
        *,
        logs_dir: Path,
        retention: float = DEFAULT_RETENTION,
        sync_margin: float = SYNC_MARGIN,
        kill_wait: float = KILL_WAIT,
    ) -> None:
        if retention < 0:
            raise ValueError(f"retention must be zero or more seconds, got {retention}")
        self.engine = engine
        self.catalog = catalog
        self.logs = TaskLogs(logs_dir)
        self.retention = retention
        self._sync_margin = sync_margin
        self._kill_wait = kill_wait
        self._sessions: dict[str, _Session] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._cleanup: asyncio.Task[None] | None = None
        # Pinned entries (``sha256``) run from copies verified at each call.
        self._copies = VerifiedCopies(engine.settings.data_dir / VERIFIED_DIR)

    async def start(self) -> None:
        for line in describe_routes(self.catalog.entries):
            log.info("catalog route %s", line)
        await asyncio.to_thread(self._warn_changed_pins)
        await self._restore_sessions()
        self._cleanup = asyncio.create_task(self._cleanup_loop(), name="catalog-cleanup")

    async def stop(self) -> None:
        tasks = [t for t in (self._cleanup, *self._watchers) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._cleanup = None

    # Calls ------------------------------------------------------------------------------

    def entry(self, slug: str, name: str) -> CatalogEntry:
        entry = self.catalog.find(slug, name)
        if entry is None:
            raise UnknownRoute(f"no catalog task {slug}/{name}; GET /list shows the routes")
        return entry

    async def run_sync(
        self,
        entry: CatalogEntry,
        body: Any,
        created_by: str = "anonymous",
        *,
        allowed_groups: frozenset[str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> SyncResult:
        """Run ``entry`` and wait for its end (without blocking the server): the seed's sync
        answer. The wait is bounded by the run's timeout plus a margin."""
        session = await self._launch(
            entry,
            body,
            created_by,
            route=entry.sync_path,
            listed=False,
            allowed_groups=allowed_groups,
            before_commit=before_commit,
        )
        limit = (entry.timeout or self.engine.settings.default_timeout) + self._sync_margin
        try:
            async with asyncio.timeout(limit):
                await session.ended.wait()
        except TimeoutError:
            return SyncResult(
                1, session.stdout.value, f"no result within {limit:g}s (task {session.id})"
            )
        assert session.result is not None
        return session.result

    async def run_async(
        self,
        entry: CatalogEntry,
        body: Any,
        created_by: str = "anonymous",
        *,
        allowed_groups: frozenset[str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> str:
        """Start ``entry`` and return its session id (the opsplane task id) at once."""
        session = await self._launch(
            entry,
            body,
            created_by,
            route=entry.async_path,
            listed=True,
            allowed_groups=allowed_groups,
            before_commit=before_commit,
        )
        return session.id

    def query(self, session_id: str) -> SessionView:
        """One session, or ``UnknownSession``."""
        return self._session(session_id).view()

    def query_all(self) -> list[SessionView]:
        """Every session still in the table, oldest first."""
        return [session.view() for session in self._sessions.values()]

    async def kill(self, session_id: str) -> SessionView:
        """Kill a session's whole process group (or cancel its handler) and return once it is
        done, its error saying it was killed. Killing a finished session changes nothing."""
        session = self._session(session_id)
        if session.ended.is_set():
            return session.view()
        session.kill_requested = True
        with contextlib.suppress(Conflict):  # it ended on its own meanwhile
            await self.engine.tasks.cancel_task(session_id, reason=KILLED)
        try:
            async with asyncio.timeout(self._kill_wait):
                await session.ended.wait()
        except TimeoutError as e:
            raise CatalogUnavailable(
                f"session {session_id} did not confirm the kill within {self._kill_wait:g}s"
            ) from e
        return session.view()

    def prune(self) -> int:
        """Forget finished sessions older than the retention; how many went."""
        now = time.monotonic()
        expired = [
            s.id
            for s in self._sessions.values()
            if s.ended_at is not None and now - s.ended_at >= self.retention
        ]
        for session_id in expired:
            del self._sessions[session_id]
        return len(expired)

    # Internals --------------------------------------------------------------------------

    def _warn_changed_pins(self) -> None:
        """Say at start which pinned scripts would be refused. Not fatal: the other routes
        still work, and each call of a changed one is refused with the reason."""
        for entry in self.catalog.entries:
            if not isinstance(entry, ExternalEntry) or entry.sha256 is None:
                continue
            assert entry.script_file is not None  # checked at load
            try:
                actual = file_sha256(entry.script_file)
            except OSError as e:
                log.warning(
                    "catalog route %s: cannot read %s: %s", entry.sync_path, entry.script_file, e
                )
                continue
            if actual != entry.sha256:
                log.warning(
                    "catalog route %s: %s changed since it was approved (sha256 %s, found %s); "
                    "its calls will be refused",
                    entry.sync_path,
                    entry.script_file,
                    short_hash(entry.sha256),
                    short_hash(actual),
                )

    async def _verified(self, entry: CatalogEntry) -> CatalogEntry:
        """A pinned entry bound to the verified copy of its script (``ScriptChanged`` when
        the file's content is not the pinned one); any other entry as it is."""
        if not isinstance(entry, ExternalEntry) or entry.sha256 is None:
            return entry
        source = entry.script_file
        assert source is not None  # checked at load
        copy = await asyncio.to_thread(
            self._copies.verified,
            source,
            entry.sha256,
            label=f"catalog task {entry.slug}/{entry.name}: script {source}",
            hint="If the change is wanted, put its new sha256 in the catalog and restart.",
        )
        return dataclasses.replace(entry, run_path=copy)

    async def _restore_sessions(self) -> None:
        """Rebuild the session table from the tasks of async calls made before this start."""
        routes = {entry.async_path: entry for entry in self.catalog.entries}
        since = utcnow() - timedelta(seconds=self.retention)
        for task in await self.engine.tasks.tasks_named(
            _TASK_PREFIX + "/async/", ended_after=since
        ):
            entry = routes.get(task.name.removeprefix(_TASK_PREFIX))
            if entry is None or task.id in self._sessions:
                continue  # a route no longer in the catalog
            session = _Session(task.id, entry, entry.async_path, task.created_at.astimezone(), True)
            self._sessions[task.id] = session
            if task.status in TERMINAL_TASK_STATUSES:
                await self._settle_restored(session, task)
            else:
                self._watch_in_background(session)
        if self._sessions:
            log.info("catalog: %d sessions restored from the database", len(self._sessions))

    async def _settle_restored(self, session: _Session, task: TaskRecord) -> None:
        runs = await self.engine.tasks.list_runs(task.id)
        run = runs[0] if runs else None
        # Whether /async/kill asked for it is not kept: a cancel reads as one.
        result, error = _outcome(task.status, run, killed=False)
        self._settle(session, result, error)
        if task.finished_at is not None:
            # The retention counts from the task's end, not from this start.
            age = max(0.0, (utcnow() - task.finished_at).total_seconds())
            session.ended_at = time.monotonic() - age

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no session {session_id!r} (unknown, or already cleaned up)")
        return session

    async def _launch(
        self,
        entry: CatalogEntry,
        body: Any,
        created_by: str,
        *,
        route: str,
        listed: bool,
        allowed_groups: frozenset[str] | None = None,
        before_commit: BeforeCommit | None = None,
    ) -> _Session:
        # A pinned script is checked before anything is created: a refusal runs nothing.
        entry = await self._verified(entry)
        request = TaskRequest(
            command=entry.command_text(body),
            targets=Targets(hosts=(self.engine.settings.local_host,)),
            timeout=entry.timeout,
            name=f"{_TASK_PREFIX}{route}",
            description=f"seed 004 catalog call POST {route}",
            created_by=created_by,
            allowed_groups=allowed_groups,
            kind="script",
            spec=entry.exec_spec(body),
        )
        start_at = datetime.now().astimezone()
        try:
            task = await self.engine.tasks.create_task(request, before_commit=before_commit)
        except InvalidInput as e:
            # The request was built here from a validated entry: what is left is the local
            # host being unavailable, which is the server's problem, not the caller's.
            raise CatalogUnavailable(f"cannot run {route}: {e}") from e
        session = _Session(task.id, entry, route, start_at, listed)
        if listed:
            self._sessions[session.id] = session
        self._watch_in_background(session)
        return session

    def _watch_in_background(self, session: _Session) -> None:
        watcher = asyncio.create_task(self._watch(session), name=f"catalog-session-{session.id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, session: _Session) -> None:
        """Follow the task's live output until it ends, then settle the session."""
        try:
            await self._follow(session)
            task = await self.engine.tasks.get_task(session.id)
            runs = await self.engine.tasks.list_runs(session.id)
        except OpsplaneError:
            log.exception("catalog session %s: could not read its task", session.id)
            why = "the run's result could not be read (see the server log)"
            self._settle(session, SyncResult(1, session.stdout.value, why), why)
            return
        run = runs[0] if runs else None
        result, error = _outcome(task.status, run, killed=session.kill_requested)
        # The record is written before the session ends, so that a caller who got the answer
        # finds the run in the log file.
        if run is not None:
            try:
                await self.logs.append(_record(session, task.command, run, error))
            except OSError:
                log.exception("catalog session %s: could not write its log record", session.id)
        self._settle(session, result, error)

    async def _follow(self, session: _Session) -> None:
        subscription = self.engine.hub.subscribe(session.id)
        try:
            while (await self.engine.tasks.get_task(session.id)).status not in (
                TERMINAL_TASK_STATUSES
            ):
                if subscription.overflowed.is_set():
                    subscription = self.engine.hub.subscribe(session.id)
                await self._take_events(subscription, session)
        finally:
            self.engine.hub.unsubscribe(subscription)

    @staticmethod
    async def _take_events(subscription: Subscription, session: _Session) -> None:
        """Feed output events to the session until a task event (or the backstop poll)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_POLL):
                while True:
                    event = await subscription.queue.get()
                    if event.kind == "task":
                        return
                    if event.kind == "output":
                        stdout = event.data["stream"] == "stdout"
                        (session.stdout if stdout else session.stderr).feed(str(event.data["data"]))

    def _settle(self, session: _Session, result: SyncResult, error: str) -> None:
        session.result = result
        session.error = error
        session.ended_at = time.monotonic()
        session.ended.set()

    async def _cleanup_loop(self) -> None:
        interval = min(max(self.retention / 4, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            if removed := self.prune():
                log.debug("catalog: cleaned up %d finished sessions", removed)


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (the seed's "last line of output")."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line
    return ""


def _outcome(status: str, run: StoredRun | None, *, killed: bool) -> tuple[SyncResult, str]:
    """The sync answer and the query's ``error`` of a finished task."""
    stdout = last_line(run.stdout or "") if run is not None else ""
    stderr = last_line(run.stderr or "") if run is not None else ""
    if status == TaskStatus.SUCCEEDED:
        return SyncResult(0, stdout, stderr), ""
    if run is not None and run.status == RunStatus.CANCELED:
        error = KILLED if killed else "killed: the task was canceled"
    else:
        why = (run.error if run is not None else None) or f"task {status}"
        error = why if not stderr or stderr in why else f"{why}: {stderr}"
    return SyncResult(1, stdout, stderr or error), error


def _record(session: _Session, command: str, run: StoredRun, error: str) -> RunRecord:
    return RunRecord(
        name=session.entry.name,
        session_id=session.id,
        route=f"POST {session.route}",
        command=command,
        status=run.status,
        exit_code=run.exit_code,
        error=error or None,
        stdout=run.stdout or "",
        stderr=run.stderr or "",
        started_at=run.started_at,
        finished_at=run.finished_at or datetime.now().astimezone(),
        duration_ms=run.duration_ms,
        truncated=run.truncated,
        archive=run.log_path,
    )
