"""Issue 13, fault scenario 10: soak. Mixed load for a long time while agents connect and
disconnect (stopped, killed, cut off by a proxy) → the control plane's memory and open file
descriptors stay flat, and no task is left unfinished.

Not part of the default run: it is skipped unless ``OPSPLANE_SOAK=1``. Run it with::

    OPSPLANE_SOAK=1 OPSPLANE_SOAK_MINUTES=30 .venv/bin/pytest tests/faults/test_soak.py -m soak -s

``OPSPLANE_SOAK_MINUTES`` (default 30) sets the duration; the figures are printed at the end
(docs/reliability.md records the last ones).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.agents import FaultFleet, end_process, fault_fleet, rss_and_fds, sleep_until
from tests.faults.proxy import TcpProxy, running_proxy

MINUTES = float(os.environ.get("OPSPLANE_SOAK_MINUTES", "30"))
TERMINAL_TASKS = {"succeeded", "failed", "canceled", "timed_out"}
# Steady churn, gentle on a shared machine: a task a second, an agent event every 15 s.
TASK_EVERY = 1.0
CHURN_EVERY = 15.0
SAMPLE_EVERY = 10.0
AGENTS = ("soak-1", "soak-2", "soak-3")
PROXIED = "soak-proxied"

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("OPSPLANE_SOAK") != "1", reason="set OPSPLANE_SOAK=1"),
    pytest.mark.timeout(int(MINUTES * 60) + 600),
]

COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("echo hello", {}),
    ("for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done", {}),
    ("echo to stderr >&2; exit 3", {}),
    ("sleep 30", {"timeout": 1}),
    ("head -c 200000 /dev/zero | tr '\\0' 'y' | fold -w 100", {}),
    ("sleep 2; echo done", {"retries": {"max_attempts": 2, "on": ["lost"]}}),
]


def test_mixed_load_with_agents_coming_and_going_keeps_memory_and_fds_flat(
    tmp_path: Path,
) -> None:
    rng = random.Random(int(os.environ.get("OPSPLANE_SOAK_SEED", "13")))
    env = {"OPSPLANE_LOST_GRACE": "5"}
    with fault_fleet(tmp_path, env) as fleet, running_proxy("127.0.0.1", fleet.grpc_port) as proxy:
        for name in AGENTS:
            fleet.start_agent(name, "soak")
        fleet.start_agent(PROXIED, "soak", server=proxy.address)
        fleet.wait_online(*AGENTS, PROXIED, timeout=60)
        assert fleet.server is not None
        pid = fleet.server.pid
        tasks: list[str] = []
        samples: list[tuple[float, int, int]] = []
        churn: dict[str, int] = {}
        refused: dict[str, int] = {}
        started = time.monotonic()
        end = started + MINUTES * 60
        next_task = next_churn = next_sample = started
        down: dict[str, tuple[float, str]] = {}  # agent → when it comes back, and how it left
        with fleet.client() as client:
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_sample:
                    rss, fds = rss_and_fds(pid)
                    samples.append((now - started, rss, fds))
                    next_sample += SAMPLE_EVERY
                if now >= next_task:
                    task_id = _create(client, rng)
                    if task_id.startswith("!"):
                        refused[task_id[1:]] = refused.get(task_id[1:], 0) + 1
                    else:
                        tasks.append(task_id)
                    next_task += TASK_EVERY
                if now >= next_churn:
                    event = _churn(fleet, proxy, rng, down)
                    churn[event] = churn.get(event, 0) + 1
                    next_churn += CHURN_EVERY
                _bring_back(fleet, proxy, down, now)
                sleep_until(min(next_task, next_churn, next_sample, end))
        _bring_back(fleet, proxy, down, float("inf"))
        stuck = _unfinished(fleet, tasks, timeout=180)
        rss, fds = rss_and_fds(pid)
        samples.append((time.monotonic() - started, rss, fds))

    report = _figures(samples)
    print(
        f"\nsoak {MINUTES:g} min: {len(tasks)} tasks (not created: {refused or 'none'}), "
        f"agent events {churn}, "
        f"stuck {len(stuck)}; control plane RSS {report['rss_warm'] / 2**20:.1f} MiB after "
        f"warm-up → {report['rss_end'] / 2**20:.1f} MiB at the end "
        f"(growth {report['rss_growth'] / 2**20:+.1f} MiB), open fds {report['fds_warm']} → "
        f"{report['fds_end']} (max {report['fds_max']})"
    )
    assert not stuck, f"tasks never finished: {stuck[:10]}"
    # Flat: what the second quarter of the run used, the last quarter still uses (caches fill
    # during the first quarter).
    assert report["rss_growth"] < 48 * 2**20, samples
    assert report["fds_end"] <= report["fds_warm"] + 16, samples


def _create(client: httpx.Client, rng: random.Random) -> str:
    """A new task's id, or why none was created (an HTTP status or error name)."""
    command, extra = rng.choice(COMMANDS)
    targets: dict[str, Any] = (
        {"groups": ["soak"]} if rng.random() < 0.3 else {"hosts": [rng.choice([*AGENTS, PROXIED])]}
    )
    body = {"command": command, "targets": targets, **extra}
    try:
        response = client.post("/api/v1/tasks", json=body)
    except httpx.HTTPError as e:
        return f"!{type(e).__name__}"
    return str(response.json()["id"]) if response.status_code == 201 else f"!{response.status_code}"


def _churn(
    fleet: FaultFleet, proxy: TcpProxy, rng: random.Random, down: dict[str, tuple[float, str]]
) -> str:
    """One agent event: stopped, killed, frozen, or (the proxied one) cut off."""
    candidates = [name for name in (*AGENTS, PROXIED) if name not in down]
    if not candidates:
        return "none"
    name = rng.choice(candidates)
    back = time.monotonic() + rng.uniform(2, 10)
    if name == PROXIED:
        kind = rng.choice(["cut", "pause"])
        proxy.cut(rst=True, refuse=True) if kind == "cut" else proxy.pause()
    else:
        kind = rng.choice(["sigterm", "sigkill", "sigstop"])
        process = fleet.agents[name]
        if kind == "sigstop":
            os.kill(process.pid, signal.SIGSTOP)
        else:
            process.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    down[name] = (back, kind)
    return kind


def _bring_back(
    fleet: FaultFleet, proxy: TcpProxy, down: dict[str, tuple[float, str]], now: float
) -> None:
    for name, (back, kind) in list(down.items()):
        if back > now:
            continue
        del down[name]
        if name == PROXIED:
            proxy.resume()
        elif kind == "sigstop":
            os.kill(fleet.agents[name].pid, signal.SIGCONT)
        else:
            end_process(fleet.agents.pop(name))  # waits for a SIGTERM to be done with
            fleet.start_agent(name, "soak")


def _unfinished(fleet: FaultFleet, tasks: list[str], timeout: float) -> list[str]:
    """Tasks not finished within ``timeout`` (bounded: polled until then)."""
    waiting = set(tasks)
    deadline = time.monotonic() + timeout
    with fleet.client() as client:
        while waiting and time.monotonic() < deadline:
            for task_id in list(waiting):
                response = client.get(f"/api/v1/tasks/{task_id}")
                if response.status_code == 200 and response.json()["status"] in TERMINAL_TASKS:
                    waiting.discard(task_id)
            if waiting:
                time.sleep(2)
    return sorted(waiting)


def _figures(samples: list[tuple[float, int, int]]) -> dict[str, int]:
    quarter = max(1, len(samples) // 4)
    warm = samples[quarter : 2 * quarter] or samples
    last = samples[-quarter:]
    median: Callable[[list[int]], float] = statistics.median
    rss_warm = int(median([s[1] for s in warm]))
    rss_end = int(median([s[1] for s in last]))
    return {
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "rss_growth": rss_end - rss_warm,
        "fds_warm": int(median([s[2] for s in warm])),
        "fds_end": int(median([s[2] for s in last])),
        "fds_max": max(s[2] for s in samples),
    }
