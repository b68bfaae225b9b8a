"""Fault scenario 1 (issue 13): RabbitMQ connections forcibly closed with 500 runs in flight.

Guarantee: every run reaches a terminal state within a bounded time; no command runs twice
(each appends its own token to a side-effect file on its host); each result is stored once.
Real control plane, real agents, real broker (in a private vhost: see tests/rabbitmq.py)."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.fleet import Fleet, wait_for
from tests.rabbitmq import PrivateVhost

pytestmark = [pytest.mark.service("rabbitmq"), pytest.mark.service("rabbitmqctl")]

AGENTS = 5
TASKS = 100  # one run per agent each: 500 runs
TERMINAL_RUN = {"succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"}
TERMINAL_TASK = {"succeeded", "failed", "canceled", "timed_out"}
RECOVERY_BOUND = 90.0
# Blocks (no CPU) while the test holds the lock exclusively.
HOLD = "flock -s ../hold true"


@pytest.fixture
def fleet(tmp_path: Path, vhost: PrivateVhost) -> Iterator[Fleet]:
    # Agents reconnect with backoff after the cut: their runs must not be given up as lost
    # while they do.
    the_fleet = Fleet(tmp_path, server_env={"OPSPLANE_LOST_GRACE": "60"})
    try:
        the_fleet.start_server("--amqp-url", vhost.url)
        for i in range(AGENTS):
            the_fleet.start_amqp_agent(f"mq-{i}", vhost.url, "faults")
        the_fleet.wait_online(*(f"mq-{i}" for i in range(AGENTS)), timeout=60)
        yield the_fleet
    finally:
        the_fleet.stop()


def _create(client: httpx.Client, command: str) -> str:
    body = {"command": command, "targets": {"groups": ["faults"]}, "timeout": 60}
    answer = client.post("/api/v1/tasks", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _runs(client: httpx.Client, task_id: str) -> list[dict[str, object]]:
    return list(client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"])


@pytest.mark.timeout(300)
def test_connections_closed_with_500_runs_in_flight_lose_and_repeat_nothing(
    fleet: Fleet, vhost: PrivateVhost
) -> None:
    tag = uuid.uuid4().hex[:8]
    tokens = [f"{tag}-{i:03d}" for i in range(TASKS)]
    hold = (fleet.root / "work" / "hold").open("w")
    fcntl.flock(hold, fcntl.LOCK_EX)
    with hold, fleet.client() as client:
        created_at = time.monotonic()
        tasks = {
            # Each run records itself, then holds until released: all 500 are in flight at
            # the cut, whatever the time their creation took.
            _create(client, f"echo {token} >> side-effects; {HOLD}; echo {token}"): token
            for token in tokens
        }

        def all_running() -> bool:
            return all(
                client.get(f"/api/v1/tasks/{t}").json()["counts"]["running"] == AGENTS
                for t in (next(iter(tasks)), list(tasks)[-1])
            )

        wait_for(all_running, 60, "every run to be running")
        # The fault: every connection of this test's vhost (control plane and agents) closed
        # by the broker at once, with the runs in flight.
        names = sorted(name for _pid, name in vhost.connections())
        assert sum(n.startswith("opsplane-control-plane ") for n in names) == 1, names
        assert sum(n.startswith("opsplane-agent mq-") for n in names) == AGENTS, names
        closed = vhost.close_connections("opsplane fault test: connections closed")
        cut_at = time.monotonic()
        print(f"\nfault 1: {TASKS} tasks created and cut after {cut_at - created_at:.1f} s")
        assert closed >= AGENTS + 1, vhost.connections()
        fcntl.flock(hold, fcntl.LOCK_UN)

        def all_ended() -> bool:
            return all(
                client.get(f"/api/v1/tasks/{t}").json()["status"] in TERMINAL_TASK for t in tasks
            )

        wait_for(all_ended, RECOVERY_BOUND, "every task to end after the cut")
        recovered_in = time.monotonic() - cut_at
        runs = [run for task_id in tasks for run in _runs(client, task_id)]

    assert len(runs) == AGENTS * TASKS
    statuses = Counter(str(run["status"]) for run in runs)
    assert set(statuses) <= TERMINAL_RUN, statuses
    # At most once on the host: every token at most once in its host's side-effect file.
    executed: Counter[tuple[str, str]] = Counter()
    for i in range(AGENTS):
        path = fleet.root / "work" / f"mq-{i}" / "side-effects"
        for line in path.read_text().split() if path.exists() else []:
            executed[(f"mq-{i}", line)] += 1
    duplicated = {key: n for key, n in executed.items() if n > 1}
    assert not duplicated, duplicated
    # Every run reported succeeded really ran, exactly once, and said so.
    for run in runs:
        if run["status"] == "succeeded":
            token = next(t for t in tokens if f"{t}\n" == run["stdout"])
            assert executed[(str(run["host"]), token)] == 1
    # Each result stored once: one terminal event per run.
    database = sqlite3.connect(f"file:{fleet.data_dir / 'opsplane.db'}?mode=ro", uri=True)
    try:
        rows = database.execute(
            "SELECT run_id, data FROM task_events WHERE kind = 'run'"
        ).fetchall()
    finally:
        database.close()
    ends = Counter(run_id for run_id, data in rows if json.loads(data)["status"] in TERMINAL_RUN)
    assert max(ends.values()) == 1 and len(ends) == AGENTS * TASKS
    lost = AGENTS * TASKS - statuses["succeeded"]
    print(
        f"\nfault 1: runs {AGENTS * TASKS}, connections closed {closed}, "
        f"statuses {dict(statuses)}, not succeeded (lost): {lost}, duplicated: "
        f"{len(duplicated)}, time to recover: {recovered_in:.1f} s"
    )
    # A run that did not succeed did not run behind our back either: undeliverable means the
    # command never reached its host.
    for run in runs:
        if run["status"] == "undeliverable":
            token = tasks[str(run["task_id"])]
            assert executed[(str(run["host"]), token)] == 0, run
