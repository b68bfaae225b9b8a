"""Query functions over the tables. They take a session and never commit: the engine owns
transactions. Longer than the house's 500 lines: every query of the engine is here so that a
statement's cost can be reviewed in one place; security's are in security_queries.py, the
templates' in template_queries.py, and the next split is by table (hosts, runs, events)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Table,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from opsplane.domain.paging import PageOf, PageRequest
from opsplane.store import bulk
from opsplane.store.json_lists import json_list_contains
from opsplane.store.paging import Keyset, keyset_page
from opsplane.store.tables import (
    HeartbeatRow,
    HostRow,
    RunRow,
    SshSequenceRow,
    TaskEventRow,
    TaskRow,
    without_nul,
)
from opsplane.store.timemath import plus_seconds


async def get_task(
    session: AsyncSession, task_id: str, *, for_update: bool = False
) -> TaskRow | None:
    stmt = select(TaskRow).where(TaskRow.id == task_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_task_by_idempotency_key(session: AsyncSession, key: str) -> TaskRow | None:
    stmt = select(TaskRow).where(TaskRow.idempotency_key == key)
    return (await session.execute(stmt)).scalar_one_or_none()


TASKS = Keyset("tasks", (TaskRow.created_at, TaskRow.id), (datetime, str), descending=True)


async def list_tasks(
    session: AsyncSession, *, status: str | None, name: str | None, page: PageRequest
) -> PageOf[TaskRow]:
    """Tasks, newest first."""
    stmt = select(TaskRow)
    if status:
        stmt = stmt.where(TaskRow.status == status)
    if name:
        # Case-insensitive on every backend, as SQLite's LIKE is (PostgreSQL's is not).
        stmt = stmt.where(TaskRow.name.icontains(name, autoescape=True))
    return await keyset_page(session, stmt, TASKS, page, lambda t: (t.created_at, t.id))


async def tasks_named(
    session: AsyncSession,
    prefix: str,
    *,
    terminal: Iterable[str],
    ended_after: datetime,
    limit: int,
) -> list[TaskRow]:
    """Tasks whose name starts with ``prefix``, unfinished or ended after ``ended_after``,
    oldest first."""
    stmt = (
        select(TaskRow)
        .where(
            TaskRow.name.startswith(prefix, autoescape=True),
            or_(TaskRow.status.not_in(list(terminal)), TaskRow.finished_at >= ended_after),
        )
        .order_by(TaskRow.created_at, TaskRow.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def all_runs_of_task(session: AsyncSession, task_id: str) -> list[RunRow]:
    """Every run of a task, output included: for the engine's own use (cancel, the compat
    façades' small tasks), never for an API list."""
    stmt = select(RunRow).where(RunRow.task_id == task_id).order_by(RunRow.host, RunRow.attempt)
    return list((await session.execute(stmt)).scalars())


# The kept output (up to 2 x 64 KiB a stream) is read only when asked for; touching it on a
# row read without it raises rather than loading it one row at a time.
_WITHOUT_OUTPUT = (defer(RunRow.stdout, raiseload=True), defer(RunRow.stderr, raiseload=True))
RUNS_OF_TASK = Keyset("runs", (RunRow.host, RunRow.attempt), (str, int))


async def runs_of_task(
    session: AsyncSession,
    task_id: str,
    page: PageRequest,
    *,
    status: str | None = None,
    output: bool = False,
) -> PageOf[RunRow]:
    """A task's runs by host and attempt (index on task_id, host, attempt). Without
    ``output`` the rows' stdout and stderr are not read (deferred: touching them on a detached
    row raises, so a caller cannot read them by mistake)."""
    stmt = select(RunRow).where(RunRow.task_id == task_id)
    if status:
        stmt = stmt.where(RunRow.status == status)
    if not output:
        stmt = stmt.options(*_WITHOUT_OUTPUT)
    return await keyset_page(session, stmt, RUNS_OF_TASK, page, lambda r: (r.host, r.attempt))


async def run_status_summary(session: AsyncSession, task_id: str) -> dict[str, int]:
    """Runs of a task by status, every attempt counted (one GROUP BY on the task's index)."""
    stmt = (
        select(RunRow.status, func.count()).where(RunRow.task_id == task_id).group_by(RunRow.status)
    )
    return {status: int(n) for status, n in await session.execute(stmt)}


async def runs_by_id(session: AsyncSession, run_ids: Iterable[str]) -> dict[str, RunRow]:
    ids = list(set(run_ids))
    if not ids:
        return {}
    rows = (await session.execute(select(RunRow).where(RunRow.id.in_(ids)))).scalars()
    return {row.id: row for row in rows}


async def latest_runs_of(
    session: AsyncSession, task_hosts: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], RunRow]:
    """The latest attempt of each (task id, host) pair's run."""
    pairs = list(set(task_hosts))
    found: dict[tuple[str, str], RunRow] = {}
    if not pairs:
        return found
    # One statement per task with its hosts in an expanding IN: the same shape whatever the
    # batch (an OR of pairs was a statement shape per batch size, each kept by SQLAlchemy's
    # compiled cache; store/bulk.py), and no row-value IN, which not every backend plans well.
    hosts_of: dict[str, list[str]] = {}
    for task_id, host in pairs:
        hosts_of.setdefault(task_id, []).append(host)
    for task_id, hosts in hosts_of.items():
        for start in range(0, len(hosts), _IN_CHUNK):
            chunk = hosts[start : start + _IN_CHUNK]
            stmt = select(RunRow).where(RunRow.task_id == task_id, RunRow.host.in_(chunk))
            for run in (await session.execute(stmt)).scalars():
                key = (run.task_id, run.host)
                if key not in found or run.attempt > found[key].attempt:
                    found[key] = run
    return found


async def runs_in_status(
    session: AsyncSession,
    statuses: Iterable[str],
    *,
    host: str | None = None,
    hosts: Sequence[str] | None = None,
    task_id: str | None = None,
    limit: int | None = None,
) -> list[RunRow]:
    stmt = select(RunRow).where(RunRow.status.in_(list(statuses)))
    if host is not None:
        stmt = stmt.where(RunRow.host == host)
    if hosts is not None:
        stmt = stmt.where(RunRow.host.in_(list(hosts)))
    if task_id is not None:
        stmt = stmt.where(RunRow.task_id == task_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list((await session.execute(stmt)).scalars())


async def running_tasks_with_every_run_ended(
    session: AsyncSession, open_statuses: Iterable[str], *, limit: int
) -> list[str]:
    """Ids of tasks still ``running`` none of whose runs is in ``open_statuses``: tasks whose
    last runs ended in two transactions at once (two instances), each counting the other's
    run as still open, so that neither ended the task."""
    open_run = (
        select(RunRow.id)
        .where(RunRow.task_id == TaskRow.id, RunRow.status.in_(list(open_statuses)))
        .exists()
    )
    stmt = select(TaskRow.id).where(TaskRow.status == "running", ~open_run).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def runs_dispatched_before(
    session: AsyncSession,
    before: datetime,
    *,
    limit: int,
    exclude_links: Sequence[str] = (),
    exclude_unversioned_links: Sequence[str] = (),
) -> list[RunRow]:
    """Runs sent to a host before ``before`` that the host has not reported starting, except
    those of hosts reached by ``exclude_links``, and of hosts on ``exclude_unversioned_links``
    whose agent gave no version (seed-002 agents, which never report a start)."""
    stmt = select(RunRow).where(RunRow.status == "dispatched", RunRow.dispatched_at < before)
    if exclude_links:
        held = select(HostRow.name).where(HostRow.link.in_(list(exclude_links)))
        stmt = stmt.where(RunRow.host.not_in(held))
    if exclude_unversioned_links:
        silent = select(HostRow.name).where(
            HostRow.link.in_(list(exclude_unversioned_links)), HostRow.agent_version.is_(None)
        )
        stmt = stmt.where(RunRow.host.not_in(silent))
    stmt = stmt.limit(limit)
    return list((await session.execute(stmt)).scalars())


class OverdueRun(NamedTuple):
    run: RunRow
    timeout: int


async def runs_past_timeout(
    session: AsyncSession,
    now: datetime,
    grace: float,
    *,
    limit: int,
    exclude_unstarted_links: Sequence[str] = (),
) -> list[OverdueRun]:
    """Runs in flight whose command should have ended by ``now``: their task's ``timeout``
    plus ``grace`` has passed since they started, or since their dispatch for a run its host
    never reported starting (a seed-002 agent sends no ``started``). A start the host dates
    before the dispatch (its clock behind) counts from the dispatch. Runs still waiting on
    ``exclude_unstarted_links`` (which hold them for a slot before starting) are left out."""
    clock = case(
        (RunRow.started_at > RunRow.dispatched_at, RunRow.started_at),
        else_=RunRow.dispatched_at,
    )
    deadline = plus_seconds(clock, TaskRow.timeout + literal(grace))
    stmt = (
        select(RunRow, TaskRow.timeout)
        .join(TaskRow, TaskRow.id == RunRow.task_id)
        .where(RunRow.status.in_(("dispatched", "running")), deadline < now)
    )
    if exclude_unstarted_links:
        held = select(HostRow.name).where(HostRow.link.in_(list(exclude_unstarted_links)))
        stmt = stmt.where(or_(RunRow.status == "running", RunRow.host.not_in(held)))
    stmt = stmt.limit(limit)
    return [OverdueRun(run, timeout) for run, timeout in await session.execute(stmt)]


async def runs_on_links(
    session: AsyncSession,
    statuses: Iterable[str],
    links: Sequence[str],
    *,
    limit: int,
    dispatched_before: datetime | None = None,
) -> list[RunRow]:
    """Runs in ``statuses`` on hosts reached by one of ``links`` (and dispatched before
    ``dispatched_before``, when given)."""
    hosts = select(HostRow.name).where(HostRow.link.in_(list(links)))
    stmt = select(RunRow).where(RunRow.status.in_(list(statuses)), RunRow.host.in_(hosts))
    if dispatched_before is not None:
        stmt = stmt.where(
            or_(RunRow.dispatched_at.is_(None), RunRow.dispatched_at < dispatched_before)
        )
    stmt = stmt.order_by(RunRow.id).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def run_status_counts(
    session: AsyncSession, task_ids: Iterable[str]
) -> dict[str, dict[str, int]]:
    ids = list(set(task_ids))
    counts: dict[str, dict[str, int]] = {task_id: {} for task_id in ids}
    if not ids:
        return counts
    stmt = (
        select(RunRow.task_id, RunRow.status, func.count())
        .where(RunRow.task_id.in_(ids), RunRow.superseded.is_(False))
        .group_by(RunRow.task_id, RunRow.status)
    )
    for task_id, status, count in await session.execute(stmt):
        counts[task_id][status] = count
    return counts


async def tasks_by_id(session: AsyncSession, task_ids: Iterable[str]) -> dict[str, TaskRow]:
    ids = list(set(task_ids))
    if not ids:
        return {}
    rows = (await session.execute(select(TaskRow).where(TaskRow.id.in_(ids)))).scalars()
    return {row.id: row for row in rows}


async def get_host(session: AsyncSession, name: str) -> HostRow | None:
    return await session.get(HostRow, name)


async def hosts_by_name(session: AsyncSession, names: Iterable[str]) -> dict[str, HostRow]:
    wanted = list(set(names))
    if not wanted:
        return {}
    rows = (await session.execute(select(HostRow).where(HostRow.name.in_(wanted)))).scalars()
    return {row.name: row for row in rows}


async def known_host_names(session: AsyncSession, names: Iterable[str]) -> set[str]:
    """Those of ``names`` that are hosts, in chunks that every backend accepts."""
    wanted = sorted(set(names))
    known: set[str] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        stmt = select(HostRow.name).where(HostRow.name.in_(wanted[start : start + _IN_CHUNK]))
        known.update((await session.execute(stmt)).scalars())
    return known


# Names per ``IN (...)``: well under every backend's limit of bound parameters.
_IN_CHUNK = 1000


async def host_status_counts(
    session: AsyncSession, *, exclude_link: str | None = None, include_adhoc: bool = True
) -> dict[str, int]:
    stmt = select(HostRow.status, func.count()).group_by(HostRow.status)
    if exclude_link:
        stmt = stmt.where(HostRow.link != exclude_link)
    if not include_adhoc:
        stmt = stmt.where(HostRow.adhoc == false())
    return {status: count for status, count in await session.execute(stmt)}


async def count_tasks(session: AsyncSession, status: str) -> int:
    stmt = select(func.count()).select_from(TaskRow).where(TaskRow.status == status)
    return int((await session.execute(stmt)).scalar_one())


async def hosts_of_link(session: AsyncSession, link: str) -> list[HostRow]:
    return list((await session.execute(select(HostRow).where(HostRow.link == link))).scalars())


async def hosts_with_ssh(session: AsyncSession) -> list[HostRow]:
    """Hosts with SSH access, of any link, by name."""
    # Filtered here: ``ssh`` may hold a JSON null, which SQL's IS NULL does not see.
    stmt = select(HostRow).order_by(HostRow.name)
    return [host for host in (await session.execute(stmt)).scalars() if host.ssh]


async def heartbeat_history(
    session: AsyncSession, host: str, since: datetime, limit: int
) -> list[HeartbeatRow]:
    stmt = (
        select(HeartbeatRow)
        .where(HeartbeatRow.host == host, HeartbeatRow.at >= since)
        .order_by(HeartbeatRow.at)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


RUNS_OF_HOST = Keyset("host-runs", (RunRow.id,), (str,), descending=True)


async def runs_of_host(
    session: AsyncSession, host: str, page: PageRequest, *, output: bool = False
) -> PageOf[tuple[RunRow, TaskRow]]:
    """A host's runs, newest first (ids are time-ordered; index on host, id), each with its
    task; their output only with ``output`` (as ``runs_of_task``)."""
    stmt = (
        select(RunRow, TaskRow)
        .join(TaskRow, TaskRow.id == RunRow.task_id)
        .where(RunRow.host == host)
    )
    if not output:
        stmt = stmt.options(*_WITHOUT_OUTPUT)
    return await keyset_page(
        session, stmt, RUNS_OF_HOST, page, lambda pair: (pair[0].id,), scalars=False
    )


async def all_hosts(session: AsyncSession) -> list[HostRow]:
    return list((await session.execute(select(HostRow).order_by(HostRow.name))).scalars())


HOSTS = Keyset("hosts", (HostRow.name,), (str,))


async def list_hosts(
    session: AsyncSession,
    page: PageRequest,
    *,
    status: str | None = None,
    group: str | None = None,
    name: str | None = None,
    exclude_link: str | None = None,
    include_adhoc: bool = True,
) -> PageOf[HostRow]:
    """Hosts by name, filtered in SQL: by status (index on status, name), by group (a JSON
    list: json_lists), by name prefix (the primary key)."""
    stmt = select(HostRow)
    if exclude_link:
        stmt = stmt.where(HostRow.link != exclude_link)
    if not include_adhoc:
        stmt = stmt.where(HostRow.adhoc == false())
    if status:
        stmt = stmt.where(HostRow.status == status)
    # A NUL (refused by PostgreSQL in any string) can be in no stored name: U+FFFD instead,
    # as every stored string has it.
    if group:
        stmt = stmt.where(json_list_contains(HostRow.groups, without_nul(group)))
    if name:
        stmt = stmt.where(HostRow.name.startswith(without_nul(name), autoescape=True))
    return await keyset_page(session, stmt, HOSTS, page, lambda h: (h.name,))


async def stale_online_hosts(
    session: AsyncSession,
    seen_before: datetime,
    *,
    exclude_links: Sequence[str] = (),
    limit: int | None = None,
    instance: str | None = None,
) -> list[HostRow]:
    """Online hosts last seen before ``seen_before``: the hosts that crossed the silence limit
    since they were last marked (index on status and last_seen_at). With ``instance``, not the
    hosts whose stream another instance holds: that one judges them."""
    stmt = select(HostRow).where(HostRow.status == "online", HostRow.last_seen_at < seen_before)
    if instance is not None:
        stmt = stmt.where(or_(HostRow.instance.is_(None), HostRow.instance == instance))
    if exclude_links:
        stmt = stmt.where(HostRow.link.not_in(list(exclude_links)))
    if limit is not None:
        stmt = stmt.limit(limit)
    return list((await session.execute(stmt)).scalars())


def _gone_since(seen_before: datetime) -> Any:
    """Hosts not online and not heard from since ``seen_before`` (or never)."""
    return and_(
        HostRow.status != "online",
        or_(HostRow.last_seen_at < seen_before, HostRow.last_seen_at.is_(None)),
    )


async def runs_on_hosts_gone_since(
    session: AsyncSession, seen_before: datetime, statuses: Iterable[str], *, limit: int
) -> list[RunRow]:
    """Runs in ``statuses`` on hosts gone since ``seen_before``: one join, driven by the runs,
    so its cost follows the runs in flight, not the number of hosts ever seen."""
    stmt = (
        select(RunRow)
        .join(HostRow, HostRow.name == RunRow.host)
        .where(RunRow.status.in_(list(statuses)), _gone_since(seen_before))
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def hosts_gone_since(
    session: AsyncSession, seen_before: datetime, *, exclude_links: Sequence[str], limit: int
) -> list[str]:
    """Names of hosts gone since ``seen_before`` with no run waiting or in flight: what a host
    retention pass may forget."""
    busy = (
        select(RunRow.id)
        .where(
            RunRow.host == HostRow.name,
            RunRow.status.in_(("pending", "delayed", "dispatched", "running")),
        )
        .exists()
    )
    stmt = (
        select(HostRow.name)
        .where(
            _gone_since(seen_before),
            or_(HostRow.last_seen_at.is_not(None), HostRow.created_at < seen_before),
            HostRow.link.not_in(list(exclude_links)),
            ~busy,
        )
        .order_by(HostRow.name)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def delete_hosts(session: AsyncSession, names: Sequence[str]) -> None:
    """Hosts and their heartbeat history (runs keep the host's name as history)."""
    if names:
        await session.execute(delete(HeartbeatRow).where(HeartbeatRow.host.in_(list(names))))
        await session.execute(delete(HostRow).where(HostRow.name.in_(list(names))))


async def busy_runs_of_host(session: AsyncSession, host: str) -> int:
    """Runs of ``host`` waiting to be sent or in flight."""
    stmt = (
        select(func.count())
        .select_from(RunRow)
        .where(
            RunRow.host == host,
            RunRow.status.in_(("pending", "delayed", "dispatched", "running")),
        )
    )
    return int((await session.execute(stmt)).scalar_one())


async def runs_in_flight_on_host(session: AsyncSession, host: str) -> int:
    """Runs sent to ``host`` and not yet ended."""
    stmt = (
        select(func.count())
        .select_from(RunRow)
        .where(RunRow.host == host, RunRow.status.in_(("dispatched", "running")))
    )
    return int((await session.execute(stmt)).scalar_one())


async def prunable_event_ids(
    session: AsyncSession, ended_before: datetime, limit: int
) -> list[int]:
    """Ids of events of tasks that ended before ``ended_before``, oldest first."""
    stmt = (
        select(TaskEventRow.id)
        .join(TaskRow, TaskRow.id == TaskEventRow.task_id)
        .where(TaskEventRow.created_at < ended_before, TaskRow.finished_at < ended_before)
        .order_by(TaskEventRow.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def delete_events(session: AsyncSession, ids: Sequence[int]) -> None:
    if ids:
        await session.execute(delete(TaskEventRow).where(TaskEventRow.id.in_(list(ids))))


async def mark_all_hosts(
    session: AsyncSession, status: str, *, link: str, alive: Iterable[str] | None = None
) -> None:
    """Set the status of every host of ``link``; with ``alive``, only of those whose stream
    no instance of ``alive`` holds, and they are held by none after."""
    stmt = update(HostRow).where(HostRow.link == link)
    if alive is None:
        await session.execute(stmt.values(status=status))
        return
    orphan = or_(HostRow.instance.is_(None), HostRow.instance.not_in(list(alive)))
    await session.execute(stmt.where(orphan).values(status=status, instance=None))


async def release_hosts(session: AsyncSession, instance: str) -> None:
    """The hosts whose streams ``instance`` held are offline and held by none."""
    await session.execute(
        update(HostRow).where(HostRow.instance == instance).values(status="offline", instance=None)
    )


async def host_instances(session: AsyncSession, *, link: str) -> set[str]:
    """The instances holding streams of ``link``'s hosts, as the store says."""
    stmt = select(HostRow.instance).where(HostRow.link == link, HostRow.instance.is_not(None))
    return {name for name in (await session.execute(stmt.distinct())).scalars() if name}


async def insert_runs(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert runs (column values by name, the same names in every row) in one batched
    statement, without ORM objects."""
    if rows:
        await session.execute(insert(RunRow), list(rows))


# Ids per ``IN (...)`` list: well under every backend's limit of bound parameters.
_IDS_PER_STATEMENT = 2000


async def update_runs(
    session: AsyncSession, run_ids: Sequence[str], values: dict[str, Any]
) -> None:
    """Set the same ``values`` on the runs ``run_ids``: one UPDATE per 2,000 ids. Objects of
    these runs in the session are not refreshed (the caller updates them)."""
    for start in range(0, len(run_ids), _IDS_PER_STATEMENT):
        chunk = run_ids[start : start + _IDS_PER_STATEMENT]
        await session.execute(
            update(RunRow).where(RunRow.id.in_(chunk)).values(**values),
            execution_options={"synchronize_session": False},
        )


async def insert_events(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert task events (``task_id``, ``run_id``, ``kind``, ``data``, ``created_at``) in one
    batched statement; returns their ids in the order of ``rows``."""
    if not rows:
        return []
    stmt = insert(TaskEventRow)
    if session.get_bind().dialect.name == "sqlite":
        # SQLAlchemy cannot prove the order of SQLite's RETURNING rows and would fall back to
        # one INSERT per row. SQLite has one writer and inserts a VALUES list in order, so the
        # ids of one batch ascend in the order of ``rows``: sorting them restores it.
        result = await session.execute(stmt.returning(TaskEventRow.id), list(rows))
        return sorted(result.scalars())
    result = await session.execute(
        stmt.returning(TaskEventRow.id, sort_by_parameter_order=True), list(rows)
    )
    return list(result.scalars())


async def events_after(
    session: AsyncSession, task_id: str, after_id: int, limit: int
) -> list[TaskEventRow]:
    stmt = (
        select(TaskEventRow)
        .where(TaskEventRow.task_id == task_id, TaskEventRow.id > after_id)
        .order_by(TaskEventRow.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


# Core, not ORM: one executemany with no per-row object or identity-map work.
_HOSTS = cast(Table, HostRow.__table__)
_HEARTBEATS = cast(Table, HeartbeatRow.__table__)


async def record_heartbeats(
    session: AsyncSession, hosts: list[dict[str, Any]], history: list[dict[str, Any]]
) -> None:
    """Write hosts' latest heartbeats, one statement for all of them (per ``bulk.CHUNK``):
    each of ``hosts`` holds ``name`` (the host), ``last_seen_at`` and the four figures; such a
    host is online. ``history`` holds the ``HeartbeatRow`` values to keep (one multi-row
    INSERT)."""
    online = {"status": "online"}
    for statement, parameters in bulk.update_statements(_HOSTS, "name", hosts, online):
        await session.execute(statement, parameters)
    if history:
        await session.execute(insert(_HEARTBEATS), history)


async def bulk_update_hosts(session: AsyncSession, values: list[dict[str, Any]]) -> None:
    """UPDATE by name, one statement per batch of rows changing the same columns."""
    for statement, parameters in bulk.update_statements(_HOSTS, "name", values):
        await session.execute(statement, parameters)


async def insert_hosts(session: AsyncSession, values: list[dict[str, Any]]) -> None:
    """Bulk INSERT of new host rows (one executemany); every dict has the same keys."""
    if values:
        await session.execute(insert(HostRow), values)


async def mark_hosts(
    session: AsyncSession,
    names: Sequence[str],
    status: str,
    *,
    link: str,
    last_seen_at: datetime | None = None,
    released_by: str | None = None,
) -> None:
    """Set the status (and ``last_seen_at`` if given) of the named hosts that belong to
    ``link`` (in chunks). With ``released_by``: only hosts whose stream that instance held (or
    nobody), and they are held by none after (a host that moved to another instance stays)."""
    values: dict[str, Any] = {"status": status}
    if last_seen_at is not None:
        values["last_seen_at"] = last_seen_at
    held: Any = true()
    if released_by is not None:
        values["instance"] = None
        held = or_(HostRow.instance.is_(None), HostRow.instance == released_by)
    for start in range(0, len(names), 500):
        chunk = list(names[start : start + 500])
        await session.execute(
            update(HostRow)
            .where(HostRow.name.in_(chunk), HostRow.link == link, held)
            .values(**values)
        )


async def runs_of_hosts_in_status(
    session: AsyncSession, statuses: Iterable[str], hosts: Sequence[str]
) -> list[RunRow]:
    """The runs of ``hosts`` in ``statuses`` (one query per 500 hosts)."""
    runs: list[RunRow] = []
    for start in range(0, len(hosts), 500):
        runs += await runs_in_status(session, statuses, hosts=list(hosts[start : start + 500]))
    return runs


async def host_links(session: AsyncSession) -> dict[str, str]:
    """Every host's name → link (the host registry's in-memory view is loaded from it)."""
    return {name: link for name, link in await session.execute(select(HostRow.name, HostRow.link))}


# Metrics, alerts and the seed-003 façade ------------------------------------------------


async def host_counts_by_link(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Hosts per (status, link): one GROUP BY, cheap at any fleet size."""
    stmt = select(HostRow.status, HostRow.link, func.count()).group_by(HostRow.status, HostRow.link)
    return {(status, link): count for status, link, count in await session.execute(stmt)}


async def online_last_seen(
    session: AsyncSession, links: Sequence[str]
) -> list[tuple[str, datetime]]:
    """(link, last_seen_at) of every online host on ``links``: one narrow column per host."""
    stmt = select(HostRow.link, HostRow.last_seen_at).where(
        HostRow.status == "online",
        HostRow.link.in_(list(links)),
        HostRow.last_seen_at.is_not(None),
    )
    return [(link, seen) for link, seen in await session.execute(stmt) if seen is not None]


async def links_of_hosts(session: AsyncSession, names: Iterable[str]) -> dict[str, str]:
    """Host name → link, for the hosts that exist, in chunks that every backend accepts."""
    wanted = sorted(set(names))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        stmt = select(HostRow.name, HostRow.link).where(HostRow.name.in_(chunk))
        found.update({name: link for name, link in await session.execute(stmt)})
    return found


async def host_routes(
    session: AsyncSession, names: Iterable[str]
) -> dict[str, tuple[str, str | None]]:
    """Host name → (link, instance holding its stream), for the hosts that exist."""
    wanted = sorted(set(names))
    found: dict[str, tuple[str, str | None]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        stmt = select(HostRow.name, HostRow.link, HostRow.instance).where(HostRow.name.in_(chunk))
        found.update(
            {name: (link, instance) for name, link, instance in await session.execute(stmt)}
        )
    return found


class RunOutcome(NamedTuple):
    host: str
    attempt: int
    status: str
    exit_code: int | None
    error: str | None


async def run_outcomes(session: AsyncSession, task_id: str) -> list[RunOutcome]:
    """How each run of a task ended, without its output (what an alert needs)."""
    stmt = select(RunRow.host, RunRow.attempt, RunRow.status, RunRow.exit_code, RunRow.error).where(
        RunRow.task_id == task_id
    )
    return [RunOutcome(*row) for row in await session.execute(stmt)]


class RunLog(NamedTuple):
    id: str
    status: str
    log_path: str | None


async def run_logs(session: AsyncSession, task_id: str) -> list[RunLog]:
    """A task's runs by host, then attempt (the order of a task's run list), with where their
    output is archived: what a log reader needs, without the output itself."""
    stmt = (
        select(RunRow.id, RunRow.status, RunRow.log_path)
        .where(RunRow.task_id == task_id)
        .order_by(RunRow.host, RunRow.attempt)
    )
    return [RunLog(*row) for row in await session.execute(stmt)]


# Scheduling (engine.scheduler) -------------------------------------------------------------

_IN_FLIGHT = ("dispatched", "running")


def _waiting(now: datetime) -> Any:
    """Runs ready to be considered: pending, or delayed for a host that is back; not a
    superseded attempt; past any retry backoff."""
    host_back = or_(HostRow.status.is_(None), HostRow.status != "offline")
    return and_(
        or_(RunRow.status == "pending", and_(RunRow.status == "delayed", host_back)),
        RunRow.superseded.is_(False),
        or_(RunRow.not_before.is_(None), RunRow.not_before <= now),
    )


async def tasks_with_waiting_runs(
    session: AsyncSession, now: datetime, *, task_id: str | None = None, limit: int
) -> list[TaskRow]:
    """Running tasks with runs ready to be sent, in the order they should go: higher priority
    first, then the order they were created."""
    waiting = (
        select(RunRow.id)
        .outerjoin(HostRow, HostRow.name == RunRow.host)
        .where(RunRow.task_id == TaskRow.id, _waiting(now))
        .exists()
    )
    stmt = (
        select(TaskRow)
        .where(TaskRow.status == "running", waiting)
        .order_by(TaskRow.priority.desc(), TaskRow.created_at, TaskRow.id)
        .limit(limit)
    )
    if task_id is not None:
        stmt = stmt.where(TaskRow.id == task_id)
    return list((await session.execute(stmt)).scalars())


async def waiting_runs(
    session: AsyncSession, task_id: str, now: datetime, *, limit: int, claim: bool = False
) -> list[RunRow]:
    """A task's runs ready to be sent: canary wave first, first attempts before retries, then
    by host name. Not by run id: a run's id is derived from its task, host and attempt
    (``domain.ids.run_id_for``), so id order is hash order, and a paced rollout would visit
    hosts at random.

    With ``claim``, the runs are locked until the caller's transaction ends, skipping those
    another transaction holds (``FOR UPDATE SKIP LOCKED``, docs/instances.md): two
    schedulers on one database never both send a run. A second, locking statement on the
    runs alone, which rereads their status as last committed: locking the outer-joined host
    rows would stall heartbeats (MariaDB has no ``FOR UPDATE OF``)."""
    stmt = (
        select(RunRow)
        .outerjoin(HostRow, HostRow.name == RunRow.host)
        .where(RunRow.task_id == task_id, _waiting(now))
        .order_by(RunRow.wave, RunRow.attempt, RunRow.host)
        .limit(limit)
    )
    if not claim or session.get_bind().dialect.name == "sqlite":
        return list((await session.execute(stmt)).scalars())
    ids = list((await session.execute(stmt.with_only_columns(RunRow.id))).scalars())
    claimed: list[RunRow] = []
    for start in range(0, len(ids), _IDS_PER_STATEMENT):
        locking = (
            select(RunRow)
            .where(
                RunRow.id.in_(ids[start : start + _IDS_PER_STATEMENT]),
                RunRow.status.in_(("pending", "delayed")),
                RunRow.superseded.is_(False),
            )
            .with_for_update(skip_locked=True)
            .execution_options(populate_existing=True)
        )
        claimed += (await session.execute(locking)).scalars()
    claimed.sort(key=lambda run: (run.wave, run.attempt, run.host))
    return claimed


async def begin_claims(session: AsyncSession) -> None:
    """Before claiming waiting runs: on SQLite, take the database's write lock now. Its driver
    begins a transaction only at the first write, so the reads before it take no lock and
    two processes on one file could both read a run as waiting and both send it; once the
    lock is held, nobody else writes until this transaction ends, and what it reads is
    current. Server databases claim rows instead (``waiting_runs(claim=True)``)."""
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(text("UPDATE leases SET name = name WHERE 1 = 0"))


async def lock_tasks(session: AsyncSession, task_ids: Sequence[str]) -> set[str]:
    """Lock the rows of ``task_ids`` until the caller's transaction ends, skipping those
    another transaction holds; the ids locked (all of them on SQLite, which has one writer)."""
    if not task_ids or session.get_bind().dialect.name == "sqlite":
        return set(task_ids)
    stmt = (
        select(TaskRow.id).where(TaskRow.id.in_(list(task_ids))).with_for_update(skip_locked=True)
    )
    return set((await session.execute(stmt)).scalars())


async def in_flight_total(session: AsyncSession) -> int:
    stmt = select(func.count()).select_from(RunRow).where(RunRow.status.in_(_IN_FLIGHT))
    return int((await session.execute(stmt)).scalar_one())


async def in_flight_by_host(session: AsyncSession, hosts: Iterable[str]) -> dict[str, int]:
    names = list(set(hosts))
    if not names:
        return {}
    stmt = (
        select(RunRow.host, func.count())
        .where(RunRow.status.in_(_IN_FLIGHT), RunRow.host.in_(names))
        .group_by(RunRow.host)
    )
    return {host: int(n) for host, n in (await session.execute(stmt)).all()}


async def wave_status_counts(
    session: AsyncSession, task_ids: Iterable[str]
) -> dict[tuple[str, int], dict[str, int]]:
    """Latest attempts counted by (task, wave) and status."""
    ids = list(set(task_ids))
    counts: dict[tuple[str, int], dict[str, int]] = {}
    if not ids:
        return counts
    stmt = (
        select(RunRow.task_id, RunRow.wave, RunRow.status, func.count())
        .where(RunRow.task_id.in_(ids), RunRow.superseded.is_(False))
        .group_by(RunRow.task_id, RunRow.wave, RunRow.status)
    )
    for task_id, wave, status, n in (await session.execute(stmt)).all():
        counts.setdefault((task_id, wave), {})[status] = int(n)
    return counts


async def delayed_runs_past_delivery(
    session: AsyncSession, now: datetime, *, limit: int
) -> list[RunRow]:
    stmt = (
        select(RunRow)
        .join(TaskRow, TaskRow.id == RunRow.task_id)
        .where(RunRow.status == "delayed", TaskRow.deliver_by < now)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def tasks_past_deadline(session: AsyncSession, now: datetime, *, limit: int) -> list[TaskRow]:
    stmt = (
        select(TaskRow)
        .where(
            TaskRow.status == "running",
            TaskRow.deadline_at < now,
            # A task stopped by max_errors or its canary still has runs on hosts: the
            # deadline ends those too.
            or_(TaskRow.stop_reason.is_(None), TaskRow.stop_reason != "deadline"),
        )
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def latest_runs_in(
    session: AsyncSession, task_ids: Iterable[str], statuses: Iterable[str]
) -> list[RunRow]:
    """Latest attempts of these tasks in these statuses."""
    ids = list(set(task_ids))
    if not ids:
        return []
    stmt = select(RunRow).where(
        RunRow.task_id.in_(ids), RunRow.status.in_(list(statuses)), RunRow.superseded.is_(False)
    )
    return list((await session.execute(stmt)).scalars())


async def waiting_run_counts(session: AsyncSession) -> dict[str, int]:
    """Runs of running tasks not yet sent, by status (pending, delayed)."""
    stmt = (
        select(RunRow.status, func.count())
        .join(TaskRow, TaskRow.id == RunRow.task_id)
        .where(RunRow.status.in_(("pending", "delayed")), TaskRow.status == "running")
        .group_by(RunRow.status)
    )
    return {status: int(n) for status, n in (await session.execute(stmt)).all()}


async def open_ssh_sequences(session: AsyncSession, limit: int = 10_000) -> list[SshSequenceRow]:
    """Seed-000 command sequences not yet done, oldest first."""
    stmt = (
        select(SshSequenceRow)
        .where(SshSequenceRow.done.is_(False))
        .order_by(SshSequenceRow.created_at)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def end_ssh_sequence(session: AsyncSession, sequence_id: str, error: str | None) -> None:
    """Mark a sequence done; ``error`` says why its remaining commands will never run."""
    await session.execute(
        update(SshSequenceRow)
        .where(SshSequenceRow.id == sequence_id)
        .values(done=True, error=error)
    )
