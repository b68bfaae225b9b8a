"""Task pacing with real agents (issue 7): priority under shared capacity, retries, max_errors,
task deadline, canary rollout, re-runs and delayed delivery."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import processes_with
from tests.e2e.fleet import Fleet, running_fleet, wait_for

# Each agent runs commands in its own working directory (work/<name>), so `basename "$PWD"`
# tells the hosts apart although they share the machine's hostname.
POOL = ["h-1", "h-2", "h-3"]
SPARE = "s-1"  # stopped and restarted by the delivery test only
FAILS_ON_H1 = '[ "$(basename "$PWD")" != h-1 ]'


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    agents = {name: ("pool",) for name in POOL} | {SPARE: ("spare",)}
    with running_fleet(tmp_path_factory.mktemp("pacing"), agents) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    agents = {"c-1": ("capped",), "c-2": ("capped",)}
    server_env = {"OPSPLANE_MAX_RUNNING_RUNS": "1"}
    with running_fleet(tmp_path_factory.mktemp("capped"), agents, server_env) as fleet:
        yield fleet


def post_task(fleet: Fleet, command: str, hosts: list[str], **policy: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"command": command, "targets": {"hosts": hosts}, **policy}
    with fleet.client() as client:
        response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def all_runs(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    """Every attempt of every host, ordered by host then attempt."""
    with fleet.client() as client:
        response = client.get(f"/api/v1/tasks/{task_id}/runs?output=true")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def marker() -> str:
    """A `sleep` argument no other process on the machine has."""
    return f"30.{uuid.uuid4().int % 10**6:06d}"


def test_higher_priority_goes_first_when_capacity_is_short(capped: Fleet) -> None:
    fleet = capped
    # The blocker holds the only slot until the test opens its gate (at most 20 s).
    gate = fleet.root / f"gate-{uuid.uuid4().hex}"
    blocker = post_task(
        fleet, f"for i in $(seq 200); do [ -e {gate} ] && break; sleep 0.1; done", ["c-1"]
    )
    wait_for(lambda: fleet.runs(blocker["id"])["c-1"]["status"] == "running", 15, "blocker runs")
    low_a = post_task(fleet, "echo a", ["c-2"], priority=1)
    low_b = post_task(fleet, "echo b", ["c-1"], priority=1)
    high = post_task(fleet, "echo c", ["c-2"], priority=10)
    assert (low_a["priority"], high["priority"]) == (1, 10)
    try:
        time.sleep(1.2)  # a scheduler tick or more: still nothing else may go
        for task in (low_a, low_b, high):
            assert fleet.task(task["id"])["status"] == "running"
            assert next(iter(fleet.runs(task["id"]).values()))["status"] == "pending"
    finally:
        gate.touch()

    order = [blocker, high, low_a, low_b]
    runs = []
    for task in order:
        assert fleet.wait_task_done(task["id"], timeout=20)["status"] == "succeeded"
        runs.append(next(iter(fleet.runs(task["id"]).values())))
    starts = [at(run["started_at"]) for run in runs]
    assert starts == sorted(starts), [(r["host"], r["started_at"]) for r in runs]
    # One at a time: each was sent only after the one before it had ended.
    for before, after in itertools.pairwise(runs):
        assert at(after["dispatched_at"]) >= at(before["finished_at"]), (before, after)


def test_flaky_command_succeeds_on_its_third_attempt(pool: Fleet) -> None:
    fleet = pool
    counter = fleet.root / f"attempts-{uuid.uuid4().hex}"
    command = (
        f"f={counter}; n=$(cat $f 2>/dev/null || echo 0); n=$((n+1)); echo $n > $f; [ $n -ge 3 ]"
    )
    task = post_task(fleet, command, ["h-2"], retries={"max_attempts": 3, "backoff_seconds": 0})
    done = fleet.wait_task_done(task["id"], timeout=20)
    assert done["status"] == "succeeded"
    assert done["counts"]["succeeded"] == 1 and done["counts"]["total"] == 1
    runs = all_runs(fleet, task["id"])
    assert [(r["attempt"], r["status"], r["superseded"]) for r in runs] == [
        (1, "failed", True),
        (2, "failed", True),
        (3, "succeeded", False),
    ]
    assert len({r["id"] for r in runs}) == 3
    assert counter.read_text() == "3\n"


def test_retries_stop_at_max_attempts(pool: Fleet) -> None:
    fleet = pool
    task = post_task(fleet, "exit 3", ["h-3"], retries={"max_attempts": 2, "backoff_seconds": 0})
    done = fleet.wait_task_done(task["id"], timeout=20)
    assert done["status"] == "failed"
    runs = all_runs(fleet, task["id"])
    assert [(r["attempt"], r["status"], r["superseded"]) for r in runs] == [
        (1, "failed", True),
        (2, "failed", False),
    ]


def test_max_errors_stops_the_rest_of_a_fan_out(pool: Fleet) -> None:
    fleet = pool
    task = post_task(fleet, "exit 1", POOL, max_concurrency=1, max_errors=1)
    done = fleet.wait_task_done(task["id"], timeout=20)
    assert (done["status"], done["stop_reason"]) == ("failed", "max_errors")
    runs = fleet.runs(task["id"])
    statuses = sorted(run["status"] for run in runs.values())
    assert statuses == ["canceled", "canceled", "failed"], runs
    for run in runs.values():
        if run["status"] == "canceled":
            assert run["error"].startswith("max_errors reached"), run
            assert run["dispatched_at"] is None and run["started_at"] is None


def test_task_deadline_ends_in_flight_runs_and_kills_their_processes(pool: Fleet) -> None:
    fleet = pool
    sleep = f"sleep {marker()}"
    started = time.monotonic()
    task = post_task(fleet, sleep, ["h-1", "h-2"], deadline=2)
    assert task["deadline_at"] is not None

    def started_or_ended() -> bool:
        runs = fleet.runs(task["id"]).values()
        return (
            all(r["status"] == "running" for r in runs)
            or fleet.task(task["id"])["status"] != "running"
        )

    wait_for(started_or_ended, 10, "both commands running")
    done = fleet.wait_task_done(task["id"], timeout=15)
    elapsed = time.monotonic() - started
    assert (done["status"], done["stop_reason"]) == ("timed_out", "deadline")
    assert 1.8 <= elapsed < 10, elapsed
    runs = fleet.runs(task["id"])
    assert {h: r["status"] for h, r in runs.items()} == {"h-1": "timed_out", "h-2": "timed_out"}
    assert all("deadline" in (r["error"] or "") for r in runs.values())
    wait_for(lambda: not processes_with(sleep), 10, "the agents to kill the commands")


def test_failed_canary_cancels_the_other_hosts(pool: Fleet) -> None:
    fleet = pool
    task = post_task(fleet, FAILS_ON_H1, POOL, rollout={"canary": 1})
    done = fleet.wait_task_done(task["id"], timeout=20)
    assert (done["status"], done["stop_reason"]) == ("failed", "canary")
    runs = fleet.runs(task["id"])
    assert runs["h-1"]["status"] == "failed"
    for host in ("h-2", "h-3"):
        assert runs[host]["status"] == "canceled"
        assert runs[host]["error"].startswith("canary failed"), runs[host]
        assert runs[host]["dispatched_at"] is None


def test_succeeding_canary_lets_the_rest_run_after_it(pool: Fleet) -> None:
    fleet = pool
    task = post_task(fleet, "true", POOL, rollout={"canary": 1, "then": "50%"})
    done = fleet.wait_task_done(task["id"], timeout=20)
    assert (done["status"], done["stop_reason"]) == ("succeeded", None)
    runs = fleet.runs(task["id"])
    assert {h: r["status"] for h, r in runs.items()} == dict.fromkeys(POOL, "succeeded")
    canary_end = at(runs["h-1"]["finished_at"])
    for host in ("h-2", "h-3"):
        assert at(runs[host]["dispatched_at"]) >= canary_end, runs


def test_rerun_of_failed_hosts_targets_exactly_them(pool: Fleet) -> None:
    fleet = pool
    first = post_task(fleet, FAILS_ON_H1, POOL)
    assert fleet.wait_task_done(first["id"])["status"] == "failed"
    with fleet.client() as client:
        response = client.post(f"/api/v1/tasks/{first['id']}/rerun", json={"only": "failed"})
        assert response.status_code == 201, response.text
        rerun = response.json()
        assert rerun["rerun_of"] == first["id"]
        assert rerun["command"] == first["command"]
        assert rerun["counts"]["total"] == 1
        assert fleet.wait_task_done(rerun["id"])["status"] == "failed"
        assert list(fleet.runs(rerun["id"])) == ["h-1"]
        # Nothing of the first task ended undeliverable: nothing to re-run.
        response = client.post(f"/api/v1/tasks/{first['id']}/rerun", json={"only": "undeliverable"})
        assert response.status_code == 409, response.text
        # "all" takes every host again.
        response = client.post(f"/api/v1/tasks/{first['id']}/rerun", json={"only": "all"})
        assert response.status_code == 201, response.text
        assert sorted(fleet.runs(response.json()["id"])) == POOL
        fleet.wait_task_done(response.json()["id"])


def test_rerun_of_a_task_still_running_is_a_conflict(pool: Fleet) -> None:
    fleet = pool
    sleep = f"sleep {marker()}"
    task = post_task(fleet, sleep, ["h-3"])
    with fleet.client() as client:
        response = client.post(f"/api/v1/tasks/{task['id']}/rerun", json={"only": "all"})
        assert response.status_code == 409, response.text
        assert client.post(f"/api/v1/tasks/{task['id']}/cancel").status_code == 202
    assert fleet.wait_task_done(task["id"])["status"] == "canceled"
    wait_for(lambda: not processes_with(sleep), 10, "the canceled command to end")


def test_runs_for_an_offline_host_wait_until_their_delivery_deadline(pool: Fleet) -> None:
    fleet = pool
    fleet.stop_agent(SPARE)
    fleet.wait_offline(SPARE)
    created = time.monotonic()
    short = post_task(fleet, "echo short", [SPARE], delivery_deadline=1)
    patient = post_task(fleet, "echo back", [SPARE], delivery_deadline=120)

    wait_for(lambda: fleet.runs(patient["id"])[SPARE]["status"] == "delayed", 10, "a delayed run")
    assert SPARE in fleet.runs(patient["id"])[SPARE]["error"]

    done = fleet.wait_task_done(short["id"], timeout=10)
    elapsed = time.monotonic() - created
    run = fleet.runs(short["id"])[SPARE]
    assert (done["status"], run["status"]) == ("failed", "undeliverable")
    assert "delivery deadline" in run["error"]
    assert 0.9 <= elapsed < 10, elapsed
    # The patient run still waits for its host.
    assert fleet.runs(patient["id"])[SPARE]["status"] == "delayed"

    fleet.start_agent(SPARE, "spare")
    done = fleet.wait_task_done(patient["id"], timeout=60)
    run = fleet.runs(patient["id"])[SPARE]
    assert (done["status"], run["status"], run["stdout"]) == ("succeeded", "succeeded", "back\n")
    assert run["error"] is None


def test_deadline_still_applies_after_max_errors_stopped_the_task(pool: Fleet) -> None:
    fleet = pool
    sleep = f"sleep {marker()}"
    command = f'case "$(basename "$PWD")" in h-1) exit 1;; h-2) {sleep};; esac'
    task = post_task(fleet, command, POOL, max_errors=1, deadline=2)
    try:
        wait_for(lambda: fleet.task(task["id"])["stop_reason"], 10, "max_errors to stop it")
        done = fleet.wait_task_done(task["id"], timeout=5)
        # The deadline is what ended it last: the task is timed_out.
        assert (done["status"], done["stop_reason"]) == ("timed_out", "deadline")
        assert fleet.runs(task["id"])["h-2"]["status"] == "timed_out"
    finally:
        with fleet.client() as client:
            client.post(f"/api/v1/tasks/{task['id']}/cancel")
        wait_for(lambda: not processes_with(sleep), 10, "the command to end")
