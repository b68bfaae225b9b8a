"""Issue 13, fault scenario 3: an agent killed with SIGKILL after it executed a command but
before its result was acknowledged, then restarted, does not execute the command again; the
result it spooled is sent again and stored once.

Two windows are covered: after the result was spooled (the control plane is out of reach, so
no acknowledgement can come), and between the command's end and the spool write (the command
itself kills the agent as its last act). A side-effect file on the host, to which the command
appends a marker of its own, shows how many times it ran.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import rabbitmq
from tests.e2e.fleet import wait_for
from tests.faults.agents import (
    FaultFleet,
    agent_behind_proxy,
    fault_fleet,
    lines_of,
    wait_run_status,
)
from tests.faults.proxy import TcpProxy, running_proxy
from tests.rabbitmq import PrivateVhost

# Restarts, not timers, must decide how the runs end.
PATIENT = {"OPSPLANE_LOST_GRACE": "120"}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FaultFleet]:
    with fault_fleet(tmp_path, PATIENT) as the_fleet:
        yield the_fleet


def _kill(fleet: FaultFleet, name: str) -> None:
    process = fleet.agents.pop(name)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=20) == -signal.SIGKILL


def _result_spooled(fleet: FaultFleet, name: str, run_id: str) -> bool:
    record = fleet.spool_record(name, run_id)
    return record is not None and record.get("state") == "finished"


def _kill_with_a_result_unacknowledged(
    fleet: FaultFleet, proxy: TcpProxy, name: str, restart: Callable[[], object]
) -> None:
    marker = uuid.uuid4().hex
    effects = fleet.work_dir(name) / "side-effects"
    task = fleet.create_task(f"sleep 1; echo {marker} >> side-effects; echo done", hosts=[name])
    run = wait_run_status(fleet, task["id"], name, {"running"}, timeout=20)
    proxy.pause()  # the result cannot reach the control plane, nor its ack the agent
    wait_for(lambda: _result_spooled(fleet, name, run["id"]), 20, "the result to be spooled")
    _kill(fleet, name)
    proxy.resume()
    started = time.monotonic()
    restart()
    done = fleet.wait_task_done(task["id"], timeout=60)
    recovered = time.monotonic() - started
    stored = fleet.runs(task["id"])[name]
    assert (done["status"], stored["status"], stored["stdout"]) == (
        "succeeded",
        "succeeded",
        "done\n",
    ), stored
    ran = lines_of(effects).count(marker)
    results = fleet.results_stored(task["id"], run["id"])
    wait_for(lambda: fleet.spool_done(name, run["id"]), 20, "the agent to record the ack")
    print(f"\n{name}: executed {ran}x, result stored {results}x, "
          f"task done {recovered:.1f}s after the restart")  # fmt: skip
    assert ran == 1
    assert results == 1
    assert fleet.spool_record(name, run["id"]) is None


def test_agent_killed_before_the_ack_sends_its_spooled_result_again_and_never_reruns(
    fleet: FaultFleet,
) -> None:
    with agent_behind_proxy(fleet, "kill-grpc") as proxy:
        _kill_with_a_result_unacknowledged(
            fleet, proxy, "kill-grpc", lambda: fleet.start_agent("kill-grpc", server=proxy.address)
        )


def test_agent_killed_between_the_commands_end_and_the_spool_write_never_reruns(
    fleet: FaultFleet,
) -> None:
    name = "kill-window"
    fleet.start_agent(name)
    fleet.wait_online(name, timeout=60)
    marker = uuid.uuid4().hex
    effects = fleet.work_dir(name) / "side-effects"
    # The command's parent is the agent: it dies right after the side effect, before it can
    # learn that the command ended, let alone spool a result.
    task = fleet.create_task(f"echo {marker} >> side-effects; kill -9 $PPID", hosts=[name])
    agent = fleet.agents.pop(name)
    assert agent.wait(timeout=30) == -signal.SIGKILL
    run = fleet.runs(task["id"])[name]
    fleet.start_agent(name)
    done = fleet.wait_task_done(task["id"], timeout=60)
    stored = fleet.runs(task["id"])[name]
    assert (done["status"], stored["status"]) == ("failed", "lost"), stored
    time.sleep(1.5)  # a re-execution would have had time to show
    assert lines_of(effects).count(marker) == 1
    assert (fleet.spool_done(name, run["id"]) or {}).get("state") == "abandoned"


# -- RabbitMQ -------------------------------------------------------------------------------


@pytest.mark.service("rabbitmq")
def test_rabbitmq_agent_killed_before_the_confirm_sends_its_result_again_and_never_reruns(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    with (
        fault_fleet(tmp_path, {**PATIENT, "OPSPLANE_AMQP_URL": vhost.url}) as fleet,
        running_proxy(rabbitmq.HOST, rabbitmq.PORT) as proxy,
    ):
        proxied = vhost.url_at(proxy.port)
        name = "kill-amqp"
        fleet.start_amqp_agent(name, proxied)
        fleet.wait_online(name, timeout=30)
        _kill_with_a_result_unacknowledged(
            fleet, proxy, name, lambda: fleet.start_amqp_agent(name, proxied)
        )
