"""Prometheus metrics of the engine (seed 001, seed 003, issue 7), served at ``/metrics``.

The engine is observed from outside: task events through the hub (tasks and runs that ended, run
duration, dispatch-to-start latency), batch sizes through an ingest observer, and the fleet from
the database at scrape time (hosts by status and link, heartbeat age). Metrics live in a
registry of their own, built with the app: never the process-global default registry, so two
apps in one process (tests) never share counters.

Counters count what this instance wrote; several instances are summed by Prometheus.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.domain.states import TERMINAL_RUN_STATUSES, TERMINAL_TASK_STATUSES, RunStatus
from opsplane.engine.changes import TaskEvent
from opsplane.engine.core import Engine
from opsplane.engine.hub import RecentIds
from opsplane.store import queries
from opsplane.store.tables import utcnow
from opsplane.transport.base import LOCAL_LINK

log = logging.getLogger(__name__)

# Links without heartbeats: the control plane's own host, and agentless SSH hosts.
_NO_HEARTBEAT_LINKS = frozenset({LOCAL_LINK, "ssh"})
HOST_STATUSES = ("online", "offline", "unknown")
ALERT_RESULTS = ("sent", "failed", "dropped")
# Why an enrollment was refused: a bad token, a bad request, a name taken, anything else.
ENROLL_REFUSALS = ("unauthenticated", "invalid", "conflict", "other")
# Run ids whose dispatch time is remembered for the start latency; beyond this the oldest go
# (a run that never reports is forgotten rather than kept forever).
_MAX_DISPATCHED = 200_000
# Host → link is cached; links almost never change, but the cache is renewed now and then.
_LINK_CACHE_SECONDS = 300.0

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class _FleetSnapshot:
    """What the database said at the last scrape."""

    hosts: dict[tuple[str, str], int] = field(default_factory=dict)
    heartbeat_ages: dict[str, list[float]] = field(default_factory=dict)
    runs_waiting: dict[str, int] = field(default_factory=dict)


class _FleetCollector(Collector):
    """Yields the fleet gauges from the snapshot that ``EngineMetrics.refresh`` took."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "opsplane_messages_refused",
            "Agent messages refused: bad_signature, stale, replay, revoked, refused_agent, "
            "wrong_target, malformed, unexpected; link ingest: unprocessable",
            labels=["link", "reason"],
        )
        for (link, reason), count in sorted(self._metrics.refused.items()):
            refused.add_metric([link, reason], count)
        yield refused
        engine = self._metrics.engine
        restarts = CounterMetricFamily(
            "opsplane_background_loop_restarts",
            "Times a background loop failed and was started again (docs/architecture.md)",
            labels=["loop"],
        )
        down = GaugeMetricFamily(
            "opsplane_background_loop_down", "1 while a background loop is restarting",
            labels=["loop"],
        )  # fmt: skip
        for loop in engine.loops:
            restarts.add_metric([loop.name], loop.restarts)
            down.add_metric([loop.name], 1 if loop.state == "restarting" else 0)
        yield restarts
        yield down
        yield GaugeMetricFamily(
            "opsplane_ingest_paused",
            "1 while ingest waits for the database to come back",
            value=1 if engine.ingest.paused else 0,
        )
        yield CounterMetricFamily(
            "opsplane_archive_write_failures",
            "Appends to the run log archive that failed (their database effect stands)",
            value=engine.ingest.archive_failures,
        )
        snapshot = self._metrics.snapshot
        if snapshot is None:
            return  # the database did not answer: no value beats a stale one
        hosts = GaugeMetricFamily(
            "opsplane_hosts", "Hosts by status and link (agents connected: online)",
            labels=["status", "link"],
        )  # fmt: skip
        for (status, link), count in sorted(snapshot.hosts.items()):
            hosts.add_metric([status, link], count)
        yield hosts
        waiting = GaugeMetricFamily(
            "opsplane_runs_waiting",
            "Runs of running tasks not yet sent: pending (capacity, canary, backoff) or "
            "delayed (host offline)",
            labels=["status"],
        )
        for status in ("pending", "delayed"):
            waiting.add_metric([status], snapshot.runs_waiting.get(status, 0))
        yield waiting
        name = "opsplane_heartbeat_age_seconds"
        ages = Metric(name, "Seconds since the last heartbeat of online hosts, by link", "summary")
        for link, values in sorted(snapshot.heartbeat_ages.items()):
            if values:
                ages.add_sample(name, {"link": link, "quantile": "0.5"}, statistics.median(values))
                ages.add_sample(name, {"link": link, "quantile": "1"}, max(values))
            ages.add_sample(f"{name}_count", {"link": link}, len(values))
            ages.add_sample(f"{name}_sum", {"link": link}, sum(values))
        yield ages


class LoginCounts(Protocol):
    """What ``security.throttle.LoginThrottle`` counts (the engine does not import security)."""

    failures: int
    throttled: int
    delay_seconds: float


class _LoginCollector(Collector):
    def __init__(self, counts: LoginCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        for name, text, value in (
            ("opsplane_login_failures", "Failed web logins (wrong name or password)",
             self._counts.failures),
            ("opsplane_login_throttled", "Login attempts refused with 429 while held",
             self._counts.throttled),
            ("opsplane_login_delay_seconds", "Seconds of login holds imposed after failures",
             self._counts.delay_seconds),
        ):  # fmt: skip
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family


class EngineMetrics:
    """The metrics of one engine in ``registry``. ``refresh()`` before each scrape."""

    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.snapshot: _FleetSnapshot | None = None
        self._engine = engine
        # The engine's count of refused messages, read at each scrape.
        self.refused = engine.refused
        self._fleet_links = sorted(n for n in engine.links if n != LOCAL_LINK)
        self._heartbeat_links = sorted(set(engine.links) - _NO_HEARTBEAT_LINKS)
        self.tasks_finished = Counter(
            "opsplane_tasks_finished", "Tasks that ended, by final status",
            ["status"], registry=registry,
        )  # fmt: skip
        self.runs_finished = Counter(
            "opsplane_runs_finished", "Runs that ended, by final status and link",
            ["status", "link"], registry=registry,
        )  # fmt: skip
        self.run_duration = Histogram(
            "opsplane_run_duration_seconds", "How long runs took on their host",
            buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.start_latency = Histogram(
            "opsplane_run_start_latency_seconds",
            "From a run's dispatch to its host reporting that it started",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ingest_batch = Histogram(
            "opsplane_ingest_batch_size", "Reports written per ingest transaction",
            buckets=_BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.alerts_sent = Counter(
            "opsplane_alerts_sent", "Alert deliveries to webhooks, by result",
            ["result"], registry=registry,
        )  # fmt: skip
        # Anonymous enrollment attempts that failed: counted, never audited under the name
        # the caller chose (docs/security.md).
        self.enrollments_refused = Counter(
            "opsplane_enrollments_refused", "Agent enrollments refused, by reason",
            ["reason"], registry=registry,
        )  # fmt: skip
        queue_depth = Gauge(
            "opsplane_ingest_queue_depth", "Host reports waiting to be written",
            registry=registry,
        )  # fmt: skip
        queue_depth.set_function(lambda: engine.ingest.queue_depth)
        # Every series exists from the start, at zero: a rate() over a series that appears
        # with its first increment misses that increment.
        for task_status in TERMINAL_TASK_STATUSES:
            self.tasks_finished.labels(task_status.value)
        for run_status in TERMINAL_RUN_STATUSES:
            for link in engine.links:
                self.runs_finished.labels(run_status.value, link)
        for result in ALERT_RESULTS:
            self.alerts_sent.labels(result)
        for reason in ENROLL_REFUSALS:
            self.enrollments_refused.labels(reason)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(_FleetCollector(self))

        self._tasks_seen = RecentIds()
        self._dispatched: dict[str, float] = {}
        # Ended runs whose link is looked up at the next scrape: (host, status) → count.
        self._unlinked: Tally[tuple[str, str]] = Tally()
        self._links: dict[str, str] = {}
        self._links_since = time.monotonic()
        engine.hub.add_listener(self.observe)
        engine.ingest.batch_observers.append(self.ingest_batch.observe)

    def watch_logins(self, counts: LoginCounts) -> None:
        """Export the login throttle's counters (docs/security.md)."""
        self.registry.register(_LoginCollector(counts))

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.hub.remove_listener(self.observe)
        if self.ingest_batch.observe in self._engine.ingest.batch_observers:
            self._engine.ingest.batch_observers.remove(self.ingest_batch.observe)

    def alert_result(self, result: str) -> None:
        self.alerts_sent.labels(result).inc()

    def observe(self, events: list[TaskEvent]) -> None:
        """Hub listener: runs inline after each commit, so it only counts and remembers."""
        now = time.monotonic()
        for event in events:
            if event.kind == "task":
                status = event.data.get("status")
                if status in TERMINAL_TASK_STATUSES and self._tasks_seen.first_time(event.task_id):
                    self.tasks_finished.labels(status).inc()
            elif event.kind == "run":
                self._observe_run(event.data, now)

    def _observe_run(self, data: dict[str, object], now: float) -> None:
        run_id, status = str(data.get("run_id")), data.get("status")
        if status == RunStatus.DISPATCHED:
            self._dispatched[run_id] = now
            if len(self._dispatched) > _MAX_DISPATCHED:
                del self._dispatched[next(iter(self._dispatched))]
        elif status == RunStatus.RUNNING:
            dispatched = self._dispatched.pop(run_id, None)
            if dispatched is not None:
                self.start_latency.observe(now - dispatched)
        elif status in TERMINAL_RUN_STATUSES:
            self._dispatched.pop(run_id, None)
            self._unlinked[(str(data.get("host")), str(status))] += 1
            duration_ms = data.get("duration_ms")
            if isinstance(duration_ms, int | float):
                self.run_duration.observe(duration_ms / 1000)

    async def refresh(self) -> None:
        """Read the fleet from the database and label the runs that ended since the last
        scrape with their host's link. A database error leaves the fleet gauges out."""
        try:
            async with self._engine.sessions() as session:
                hosts = await queries.host_counts_by_link(session)
                seen = await queries.online_last_seen(session, self._heartbeat_links)
                waiting = await queries.waiting_run_counts(session)
                await self._label_runs(session)
        except SQLAlchemyError as e:
            log.warning("metrics: the database did not answer: %s", e)
            self.snapshot = None
            return
        snapshot = _FleetSnapshot(runs_waiting=waiting)
        for link in self._fleet_links:
            for status in HOST_STATUSES:
                snapshot.hosts[(status, link)] = 0
        for (status, link), count in hosts.items():
            if link != LOCAL_LINK:
                snapshot.hosts[(status, link)] = count
        now = utcnow()
        snapshot.heartbeat_ages = {link: [] for link in self._heartbeat_links}
        for link, last_seen in seen:
            age = max(0.0, (now - last_seen).total_seconds())
            snapshot.heartbeat_ages.setdefault(link, []).append(age)
        self.snapshot = snapshot

    async def _label_runs(self, session: AsyncSession) -> None:
        if time.monotonic() - self._links_since > _LINK_CACHE_SECONDS:
            self._links, self._links_since = {}, time.monotonic()
        unlinked, self._unlinked = self._unlinked, Tally()
        try:
            missing = {host for host, _ in unlinked} - set(self._links)
            if missing:
                self._links.update(await queries.links_of_hosts(session, missing))
        except BaseException:
            self._unlinked.update(unlinked)  # counted at the next scrape instead
            raise
        for (host, status), count in unlinked.items():
            self.runs_finished.labels(status, self._links.get(host, "unknown")).inc(count)
