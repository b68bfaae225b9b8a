"""Several control-plane instances on one database (docs/instances.md): a `kill -9`ed
instance's hosts and in-flight runs are taken over; singleton duties run on one instance and
move when it dies; waiting runs are claimed once; an SSE stream sends an event committed out of
id order. Real engines and a real `opsplane server` process on each database backend, a
private RabbitMQ vhost, the real agent."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.api.routers.tasks import _event_stream
from opsplane.app_factory import create_app, make_engine
from opsplane.config import load_settings
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.changes import TaskEvent
from opsplane.engine.core import Engine
from opsplane.store import queries
from opsplane.store.tables import HostRow
from opsplane.transport.amqp.instances import InstanceRouter
from opsplane.transport.base import RunFinished, RunStarted
from opsplane.transport.grpc.server import GrpcLink
from opsplane.transport.memory import MemoryLink
from tests.e2e.fleet import Fleet, child_env, free_port, wait_for
from tests.integration.databases import server_params, throwaway_database
from tests.integration.reports import report_result
from tests.integration.test_metrics_alerts import Webhook, webhook_server
from tests.rabbitmq import PrivateVhost, private_vhost

TTL = 3.0  # instance_lease_ttl of these tests: renewed every second


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-takeover") as the_vhost:
        yield the_vhost


@contextlib.asynccontextmanager
async def _engine(
    tmp_path: Path, name: str, database_url: str, link: Any, **settings: Any
) -> AsyncIterator[Engine]:
    router = settings.pop("router", None)
    config = load_settings(
        data_dir=tmp_path / name,
        database_url=database_url,
        heartbeat_interval=1.0,
        instance_lease_ttl=TTL,
        **settings,
    )
    engine = make_engine(config, [link], router=router)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _eventually(what: str, check: Any, within: float = 30.0) -> float:
    """The monotonic time once ``await check()`` is true (fails after ``within``)."""
    began = time.monotonic()
    while not await check():
        assert time.monotonic() - began < within, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic()


# 1. Takeover after kill -9 -----------------------------------------------------------------


async def test_a_killed_instance_s_hosts_go_offline_and_its_runs_end_lost(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    """B is a real `opsplane server` holding the monitor lease and web-1's stream, with a run
    in flight; `kill -9` B: A takes the monitor lease over, marks web-1 offline (held by none)
    and ends the run lost after lost_grace. The times are printed (docs/instances.md)."""
    (tmp_path / "b").mkdir()
    b = Fleet(
        tmp_path / "b",
        server_env={
            "OPSPLANE_DATABASE_URL": database_url,
            "OPSPLANE_AMQP_URL": vhost.url,
            "OPSPLANE_INSTANCE_LEASE_TTL": str(TTL),
        },
    )
    try:
        await asyncio.to_thread(_start_server, b)
        key = Ed25519PrivateKey.generate()
        link = GrpcLink(f"127.0.0.1:{free_port()}", heartbeat_interval=1.0, signing_key=key)
        async with _engine(
            tmp_path,
            "a",
            database_url,
            link,
            lost_grace=3.0,
            require_enrollment=False,
            router=InstanceRouter(vhost.url),
        ) as a:
            b.start_agent("web-1")
            await asyncio.to_thread(b.wait_online, "web-1")
            task = await asyncio.to_thread(b.create_task, "sleep 60", hosts=["web-1"])
            runs: dict[str, Any] = {}

            async def running() -> bool:
                runs.update(await asyncio.to_thread(b.runs, task["id"]))
                return runs.get("web-1", {}).get("status") == "running"

            await _eventually("the run to start on web-1", running)
            assert not a.duties.holds("monitor")  # B started first: B holds it

            assert b.server is not None
            b.server.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            b.server.wait(10)

            async def released() -> bool:
                async with a.sessions() as session:
                    host = await session.get(HostRow, "web-1", populate_existing=True)
                return host is not None and host.status == "offline" and host.instance is None

            async def lost() -> bool:
                (run,) = await a.tasks.list_runs(task["id"])
                return run.status == RunStatus.LOST

            offline_after = await _eventually("web-1 taken over", released) - killed
            lost_after = await _eventually("the run to end lost", lost) - killed
            assert a.duties.holds("monitor") and a.duties.taken_over
            (run,) = await a.tasks.list_runs(task["id"])
            assert "unreachable" in (run.error or "")
            assert (await a.tasks.get_task(task["id"])).status == TaskStatus.FAILED
    finally:
        b.stop()
    print(
        f"\ntakeover after kill -9 (ttl {TTL}s, lost_grace 3s): hosts offline "
        f"{offline_after:.1f}s, runs lost {lost_after:.1f}s"
    )
    # B's leases expire TTL after its last renewal; A notices within a renewal period.
    assert offline_after <= TTL + TTL / 3 + 2


def _start_server(fleet: Fleet) -> None:
    """``fleet.start_server()`` with a longer wait for readiness (a loaded CI machine), and
    the server's log in the failure."""
    with (fleet.root / "server.log").open("ab") as log:
        fleet.server = subprocess.Popen(
            [
                sys.executable, "-m", "opsplane", "server",
                "--listen", f"127.0.0.1:{fleet.http_port}",
                "--grpc-listen", fleet.grpc,
                "--data-dir", str(fleet.data_dir),
            ],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(**fleet.server_env),
        )  # fmt: skip
    with fleet.client() as client:

        def ready() -> bool:
            assert fleet.server is not None and fleet.server.poll() is None, fleet.server_log()
            with contextlib.suppress(httpx.HTTPError):
                return client.get("/readyz").status_code == 200
            return False

        try:
            wait_for(ready, 90, "the control plane to be ready")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{fleet.server_log()}") from e


# 2. Singleton duties run once ----------------------------------------------------------------


async def test_singleton_duties_run_on_one_instance_and_move_when_it_stops_renewing(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        _engine(tmp_path, "a", database_url, MemoryLink()) as a,
        _engine(tmp_path, "b", database_url, MemoryLink()) as b,
    ):
        holder, other = (a, b) if a.duties.holds("monitor") else (b, a)
        assert holder.duties.holds("monitor") and not other.duties.holds("monitor")
        await asyncio.sleep(3.5)
        assert holder.monitor.run_checks >= 2 and holder.scheduler.expire_passes >= 1
        assert other.monitor.run_checks == 0 and other.scheduler.expire_passes == 0
        assert other.duties.passes["monitor"] == 0

        # As after a kill -9: the holder stops renewing, its leases are left to expire.
        await holder.duties.loop.stop()
        stopped = time.monotonic()

        async def moved() -> bool:
            return other.monitor.run_checks > 0

        took = await _eventually("the monitor duty to move", moved, within=3 * TTL) - stopped
        # The old holder stopped before the new one began (holds() has a margin of a
        # renewal period before the lease's expiry), and does nothing more.
        assert not holder.duties.holds("monitor")
        checks = holder.monitor.run_checks
        await asyncio.sleep(1.0)
        assert holder.monitor.run_checks == checks and other.monitor.run_checks >= 2
        # Expiry (TTL after the last renewal) and a renewal period; slack for a loaded machine.
        assert took <= 2 * TTL + 3
        print(f"\nsingleton duties moved {took:.1f}s after the holder stopped renewing")


async def test_an_alert_is_sent_once_by_the_alerts_lease_holder(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    """Two apps (API, engine, alert sender) on one database: a task that fails on either
    instance is alerted exactly once, by the holder of the alerts lease."""
    with webhook_server(Webhook()) as hook:
        apps = []
        async with contextlib.AsyncExitStack() as stack:
            links: list[MemoryLink] = []
            for name in ("a", "b"):
                settings = load_settings(
                    data_dir=tmp_path / name,
                    database_url=database_url,
                    heartbeat_interval=30.0,
                    instance_lease_ttl=TTL,
                    alert_webhooks=[hook.url],
                    alert_backoff=0.1,
                )
                link = MemoryLink()
                engine = make_engine(settings, [link], router=InstanceRouter(vhost.url))
                app = create_app(settings, engine)
                await stack.enter_async_context(app.router.lifespan_context(app))
                apps.append(engine)
                links.append(link)
            a, b = apps
            holder = a if a.duties.holds("alerts") else b
            assert holder.duties.holds("alerts") != (b if holder is a else a).duties.holds("alerts")
            failed = []
            for engine, link, host in ((a, links[0], "web-a"), (b, links[1], "web-b")):
                await link.connect(host)
                created = await engine.tasks.create_task(
                    TaskRequest(command="deploy", targets=Targets(hosts=(host,)))
                )
                (run,) = await engine.tasks.list_runs(created.id)
                await (await engine.report(RunStarted(host, run.id, datetime.now(UTC))))
                await report_result(engine, _finished(host, run.id, "failed", 1))
                async with asyncio.timeout(10):
                    await engine.wait_task(created.id)
                failed.append(created.id)
            await asyncio.to_thread(hook.wait_for, 2)
            await asyncio.sleep(2.0)  # a second sender would have posted by now
    assert sorted(body["task_id"] for body in hook.bodies) == sorted(failed)


def _finished(host: str, run_id: str, status: str, exit_code: int) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status=status, exit_code=exit_code, stdout="", stderr="",
        truncated=False, error=f"exit code {exit_code}", started_at=now, finished_at=now,
        duration_ms=10,
    )  # fmt: skip


# 3. Dispatch claims --------------------------------------------------------------------------


async def test_two_schedulers_send_each_run_of_a_paced_task_once(
    tmp_path: Path, database_url: str
) -> None:
    """Both instances reach every host (each has a stream to it) and plan at once; runs are
    claimed with SKIP LOCKED (a server database) or by the one writer (SQLite)."""
    hosts = [f"h-{i:02d}" for i in range(40)]
    link_a, link_b = MemoryLink(), MemoryLink()
    async with (
        _engine(tmp_path, "a", database_url, link_a) as a,
        _engine(tmp_path, "b", database_url, link_b) as b,
    ):
        for host in hosts:
            await link_a.connect(host)
            await link_b.connect(host)
        task = await a.tasks.create_task(
            TaskRequest(
                command="deploy",
                targets=Targets(hosts=tuple(hosts)),
                policy=TaskPolicy.parse(max_concurrency=5),
            )
        )
        answered: set[str] = set()
        peak = 0
        async with asyncio.timeout(90):
            while (await a.tasks.get_task(task.id)).status == TaskStatus.RUNNING:
                sent = [
                    (engine, host, command.run_id)
                    for engine, link in ((a, link_a), (b, link_b))
                    for host, memory in link.hosts.items()
                    for command in memory.commands
                ]
                fresh = [item for item in sent if item[2] not in answered]
                peak = max(peak, len(fresh))
                for engine, host, run_id in fresh:
                    answered.add(run_id)
                    await report_result(engine, _finished(host, run_id, "succeeded", 0))
                a.scheduler.wake()
                b.scheduler.wake()
                await asyncio.sleep(0.05)
        sends = Counter(
            command.run_id
            for link in (link_a, link_b)
            for memory in link.hosts.values()
            for command in memory.commands
        )
        by_instance = [
            sum(len(memory.commands) for memory in link.hosts.values()) for link in (link_a, link_b)
        ]
    assert len(sends) == len(hosts)
    assert set(sends.values()) == {1}, [run for run, n in sends.items() if n > 1]
    print(f"\n40 runs, max_concurrency 5: sent by a/b {by_instance}, peak in flight {peak}")


# 4. SSE event ids across writers -------------------------------------------------------------


@pytest.mark.parametrize("backend", server_params())
async def test_an_event_committed_after_a_higher_id_still_reaches_a_live_stream(
    tmp_path: Path, backend: str
) -> None:
    """Two writers: the first takes id N and commits after the second took N+1 and
    committed (dispatch on one instance, a result ingested on another). The live stream
    sent N+1 first; N arrives below it and is sent all the same (without an id, so that the
    client's resume point stays at N+1). SQLite has one writer: ids commit in order there."""
    link = MemoryLink()
    async with (
        throwaway_database(backend, tmp_path, migrated=True) as url,
        _engine(tmp_path, "a", url, link) as a,
    ):
        await link.connect("web-1")
        task = await a.tasks.create_task(
            TaskRequest(command="x", targets=Targets(hosts=("web-1",)), start=False)
        )
        history = await a.tasks.events_after(task.id, 0, 1000)
        stream = _event_stream(a, task.id, history[-1].id if history else 0)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)  # subscribed, history read
        async with a.sessions() as first_writer, a.sessions() as second_writer:
            async with first_writer.begin():
                (low,) = await queries.insert_events(first_writer, [_row(task.id, "low")])
                async with second_writer.begin():
                    (high,) = await queries.insert_events(second_writer, [_row(task.id, "high")])
                a.hub.publish_foreign([_event(high, task.id, "high")])
            a.hub.publish_foreign([_event(low, task.id, "low")])
        assert low < high
        async with asyncio.timeout(10):
            got = [await first, await anext(stream)]
        await stream.aclose()
    assert [g.data for g in got] == ['{"which": "high"}', '{"which": "low"}']
    assert got[0].id == str(high) and got[1].id is None


def _row(task_id: str, which: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "run_id": None,
        "kind": "run",
        "data": {"which": which},
        "created_at": datetime.now(UTC),
    }


def _event(event_id: int, task_id: str, which: str) -> TaskEvent:
    return TaskEvent(event_id, task_id, "run", {"which": which})
