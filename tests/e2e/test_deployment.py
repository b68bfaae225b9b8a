"""The reference deployment (docs/deployment.md, issue 17): two ``opsplane server`` instances on
one PostgreSQL database and one RabbitMQ vhost, HAProxy in front (TCP for gRPC, HTTP for the
API and SSE), real processes on loopback ports chosen at run time.

Real agents split between the instances through HAProxy (and one with ``--server A,B``) run a
task submitted to one instance, and its live stream is read through HAProxy. Then 100 simulated
agents (bench/swarm, the real gRPC protocol) through HAProxy: one instance is killed with
``kill -9`` in the middle of a fan-out; every run ends, no command is executed twice (counted
by the agents, in a file), the agents come back on the survivor. The takeover time and the
fan-out time with two instances and with one are printed (docs/deployment.md has them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.swarm.cli import Worker, _sum_stats, parser, start_workers, stop_workers
from tests.e2e.deployment import (
    TERMINAL_RUNS,
    TERMINAL_TASKS,
    admin,
    database,
    deployment,
    online_by_pid,
    until,
)
from tests.e2e.fleet import child_env
from tests.integration.databases import throwaway_database
from tests.rabbitmq import PrivateVhost, private_vhost

pytestmark = [
    pytest.mark.service("haproxy"),
    pytest.mark.service("postgresql"),
    pytest.mark.service("rabbitmq"),
    pytest.mark.service("rabbitmqctl"),
]

SWARM = 100
STUCK = "every run ended but the task is still running"


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-deployment") as the_vhost:
        yield the_vhost


@pytest.fixture
async def database_url(tmp_path: Path) -> AsyncIterator[str]:
    async with throwaway_database("postgresql", tmp_path, migrated=True) as url:
        yield url


@contextlib.contextmanager
def real_agents(
    root: Path, servers: dict[str, str]
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """``opsplane agent`` processes, each dialing its ``servers`` entry."""
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for index, (name, server) in enumerate(servers.items()):
            (root / "work" / name).mkdir(parents=True, exist_ok=True)
            # How long this host's command sleeps (``sleep $(cat delay)``): results 0.7 s apart,
            # so that no two instances settle the task at once (see _task_status_after_runs).
            (root / "work" / name / "delay").write_text(f"{0.5 + 0.7 * index:.1f}\n")
            with (root / f"agent-{name}.log").open("ab") as log:
                agents[name] = subprocess.Popen(
                    [
                        sys.executable, "-m", "opsplane", "agent", "--server", server,
                        "--name", name, "--state-dir", str(root / "agents" / name),
                        "--group", "web",
                    ],
                    cwd=root / "work" / name, stdout=log, stderr=subprocess.STDOUT,
                    env=child_env(),
                )  # fmt: skip
        yield agents
    finally:
        for process in agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in agents.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def _task_done(client: httpx.AsyncClient, task_id: str, within: float) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        task = (await client.get(f"/api/v1/tasks/{task_id}")).json()
        return task if task["status"] in TERMINAL_TASKS else None

    try:
        return await until(ended, within, f"task {task_id} to end", every=0.2)
    except AssertionError as e:
        # Which runs did not end, and where: what a report of the failure needs.
        runs = await _runs(client, task_id)
        stuck = Counter((r["status"], r["error"]) for r in runs if r["status"] not in TERMINAL_RUNS)
        raise AssertionError(f"{e}; runs not ended: {dict(stuck)}") from e


async def _runs_ended(client: httpx.AsyncClient, task_id: str, within: float) -> dict[str, int]:
    """Until every run of the task is terminal; the runs by status."""

    async def ended() -> dict[str, int] | None:
        page = (await client.get(f"/api/v1/tasks/{task_id}/runs", params={"size": "1"})).json()
        summary: dict[str, int] = page["summary"]
        return summary if summary and set(summary) <= TERMINAL_RUNS else None

    return await until(ended, within, f"the runs of task {task_id} to end", every=0.2)


async def _task_status_after_runs(client: httpx.AsyncClient, task_id: str, stuck: list[str]) -> str:
    """The task's status once its runs have ended, given a few seconds to follow them: with two
    instances ingesting its results at once, the monitor's recount ends it (docs/deployment.md,
    "Defects found"). A task that does not end is added to ``stuck`` and fails the test."""
    try:
        task = await _task_done(client, task_id, 10)
    except AssertionError as e:
        stuck.append(task_id)
        raise AssertionError(f"{STUCK} (task {task_id})") from e
    return str(task["status"])


async def _runs(client: httpx.AsyncClient, task_id: str) -> list[dict[str, Any]]:
    """Every run of the task (pages followed, bounded)."""
    runs: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        params = {"size": "1000", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/api/v1/tasks/{task_id}/runs", params=params)).json()
        runs += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return runs
    raise AssertionError("more run pages than expected")


async def _sse(client: httpx.AsyncClient, task_id: str, within: float) -> list[dict[str, Any]]:
    """The task's SSE stream read to its end: (id, event, data) of every event."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with asyncio.timeout(within):
        async with client.stream(
            "GET", f"/api/v1/tasks/{task_id}/events", headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line:
                    if "event" in current:
                        events.append(current)
                    current = {}
                    continue
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return events


@pytest.mark.serial
@pytest.mark.timeout(400)
async def test_real_agents_split_by_haproxy_run_a_task_of_either_instance_and_stream_it(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    async with (
        deployment(tmp_path, database_url, vhost.url) as ([a, b], proxy),
        database(database_url) as query,
    ):
        # Three agents through HAProxy, two with the instances' list (each dials the first
        # entry first): whatever HAProxy's checks say on a loaded machine, both instances hold
        # agents.
        servers = {f"web-{i}": proxy.grpc for i in range(1, 4)}
        servers["web-4"] = f"{a.grpc},{b.grpc}"
        servers["web-5"] = f"{b.grpc},{a.grpc}"
        with real_agents(tmp_path, servers):

            async def split() -> dict[int, int] | None:
                held = await online_by_pid(query, "web-")
                return held if sum(held.values()) == len(servers) else None

            held = await until(split, 90, "the agents online")
            assert set(held) == {a.pid(), b.pid()}, held

            async with admin(a.url) as on_a, admin(proxy.url) as through_proxy:
                # Submitted to A directly: the agents B holds get their commands through
                # RabbitMQ, signed by A with the shared key.
                response = await on_a.post(
                    "/api/v1/tasks",
                    json={
                        "command": "sleep $(cat delay); echo ran",
                        "targets": {"groups": ["web"]},
                    },
                )
                assert response.status_code == 201, response.text
                task = response.json()
                # Read through HAProxy: whichever instance serves it relays the other's events.
                events = await _sse(through_proxy, task["id"], 60)
                done = await _task_done(through_proxy, task["id"], 60)
                assert done["status"] == "succeeded", done
                runs = await _runs(through_proxy, task["id"])
                assert sorted(r["host"] for r in runs) == sorted(servers)
                assert {r["status"] for r in runs} == {"succeeded"}
                ids = [int(e["id"]) for e in events if "id" in e and e["event"] != "ping"]
                assert ids == sorted(ids) and len(ids) == len(set(ids)), ids
                ended = [e for e in events if e["event"] == "task"]
                assert ended and json.loads(ended[-1]["data"])["status"] == "succeeded"
                # Every run's end was streamed, those of A's agents and of B's alike.
                streamed = {
                    json.loads(e["data"]).get("host")
                    for e in events
                    if e["event"] == "run" and json.loads(e["data"]).get("status") == "succeeded"
                }
                assert streamed == set(servers), events


def _swarm_args(record: Path) -> Any:
    args = parser().parse_args(
        ["--agents", str(SWARM), "--procs", "2", "--mode", "execute", "--prefix", "swarm",
         "--group", "swarm", "--record", str(record)]
    )  # fmt: skip
    return args


async def _fan_out(
    client: httpx.AsyncClient, command: str, within: float, stuck: list[str]
) -> tuple[dict[str, int], float]:
    """POST ``command`` to the swarm; its runs by status, and the seconds until all ended."""
    started = time.monotonic()
    response = await client.post(
        "/api/v1/tasks",
        json={"command": command, "targets": {"groups": ["swarm"]}, "timeout": 30},
    )
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    summary = await _runs_ended(client, task_id, within)
    elapsed = time.monotonic() - started
    await _task_status_after_runs(client, task_id, stuck)
    return summary, elapsed


@pytest.mark.serial
@pytest.mark.timeout(500)
async def test_kill_9_of_one_instance_mid_fan_out_every_run_ends_none_twice(
    tmp_path: Path, database_url: str, vhost: PrivateVhost
) -> None:
    record = tmp_path / "executed.txt"
    workers: list[Worker] = []
    figures: dict[str, Any] = {}
    stuck: list[str] = []
    async with (
        deployment(tmp_path, database_url, vhost.url) as ([a, b], proxy),
        database(database_url) as query,
    ):
        try:
            workers = await start_workers(_swarm_args(record), proxy.grpc)
            for worker in workers:
                assert worker.process.stdin is not None
                worker.process.stdin.write(b"go\n")
                await worker.process.stdin.drain()

            async def all_online() -> dict[int, int] | None:
                held = await online_by_pid(query, "swarm-")
                return held if sum(held.values()) == SWARM else None

            held = await until(all_online, 120, f"{SWARM} agents online", every=0.25)
            # HAProxy split them between the two instances.
            assert set(held) == {a.pid(), b.pid()}, held
            figures["split"] = sorted(held.values())

            async with admin(proxy.url) as client, admin(b.url) as on_b:
                # Fan-out time with two instances (the task posted through HAProxy).
                summary, figures["fan_out_two_s"] = await _fan_out(client, "true", 90, stuck)
                assert summary == {"succeeded": SWARM}, summary

                # The fan-out killed in its middle: posted to A, which is killed once the
                # agents have received part of the commands (each sleeps 3 s).
                before = len(_lines(record))
                async with admin(a.url) as on_a:
                    response = await on_a.post(
                        "/api/v1/tasks",
                        json={"command": "sleep 3", "targets": {"groups": ["swarm"]},
                              "timeout": 30},
                    )  # fmt: skip
                assert response.status_code == 201, response.text
                doomed = response.json()["id"]

                async def some_received() -> bool:
                    return len(_lines(record)) >= before + SWARM // 4

                await until(some_received, 60, "a quarter of the commands received", every=0.02)
                a.kill()
                killed = time.monotonic()

                async def on_b_only() -> bool:
                    return await online_by_pid(query, "swarm-") == {b.pid(): SWARM}

                await until(on_b_only, 120, f"the {SWARM} agents online on B", every=0.1)
                figures["takeover_s"] = time.monotonic() - killed

                # Every run of the killed fan-out ends (B reads the database).
                await _runs_ended(on_b, doomed, 120)
                figures["killed_fan_out_task"] = await _task_status_after_runs(on_b, doomed, stuck)
                runs = await _runs(on_b, doomed)
                assert len({r["host"] for r in runs}) == SWARM
                statuses = Counter(r["status"] for r in runs)
                figures["killed_fan_out"] = dict(statuses)
                figures["killed_fan_out_errors"] = dict(
                    Counter(f"{r['status']}: {r['error']}" for r in runs if r["error"])
                )
                assert set(statuses) <= TERMINAL_RUNS, statuses

                # Fan-out time with one instance (the survivor; HAProxy marked A down).
                summary, figures["fan_out_one_s"] = await _fan_out(client, "true", 90, stuck)
                assert summary == {"succeeded": SWARM}, summary

                # Counted on the agents' side: no command executed twice, and every run the
                # control plane calls succeeded was executed.
                executed = Counter(line.split()[1] for line in _lines(record))
                twice = {run: n for run, n in executed.items() if n > 1}
                assert not twice, twice
                ran = {r["id"] for r in runs if r["status"] == "succeeded"}
                assert ran <= set(executed), ran - set(executed)
                figures["doomed_executed"] = sum(1 for r in runs if r["id"] in executed)
                figures["tasks_stuck_running"] = len(stuck)
                swarm = _sum_stats(workers)
                figures["swarm"] = {k: swarm.get(k) for k in ("dials", "welcomes", "errors")}
        finally:
            await stop_workers(workers)
    figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
    print("deployment figures:", json.dumps(figures))


def _lines(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []
