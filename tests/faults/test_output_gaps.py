"""Issue 13, defect 8: output printed while the agent's connection is down, or stalled, is
archived whole and once. The agent keeps a run's output on disk and re-sends after a reconnect
what may not have arrived; the control plane places chunks by ``seq`` and drops re-sent ones.

The agent reaches its control plane (gRPC) or RabbitMQ through a TCP proxy that the test cuts
(RST, then refusing connections) or pauses (no FIN: bytes are held back) while the command
prints. The archived log must then be byte-identical to what the command printed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rabbitmq
from tests.e2e.fleet import wait_for
from tests.faults.agents import FaultFleet, agent_behind_proxy, fault_fleet, wait_run_status
from tests.faults.proxy import running_proxy
from tests.rabbitmq import PrivateVhost

# The agent's connection is cut for several seconds: its runs must outlive that.
PATIENT = {"OPSPLANE_LOST_GRACE": "120"}


def printing(marker: str, lines: int, width: int, pause: float) -> tuple[str, bytes]:
    """A command printing ``lines`` numbered lines, one every ``pause`` seconds, and what it
    prints, byte for byte."""
    filler = "x" * width
    command = (
        f'i=1; while [ $i -le {lines} ]; do echo "{marker} $i {filler}"; '
        f"i=$((i+1)); sleep {pause}; done"
    )
    expected = b"".join(f"{marker} {i} {filler}\n".encode() for i in range(1, lines + 1))
    return command, expected


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FaultFleet]:
    with fault_fleet(tmp_path, PATIENT) as the_fleet:
        yield the_fleet


def _start_and_wait_for_output(fleet: FaultFleet, host: str, command: str) -> str:
    task = fleet.create_task(command, hosts=[host])
    run = wait_run_status(fleet, task["id"], host, {"running"}, timeout=20)
    wait_for(lambda: fleet.run_log(run["id"]), 20, "the first lines to be archived")
    return str(task["id"])


def _check_whole(fleet: FaultFleet, task_id: str, host: str, expected: bytes, since: float) -> None:
    done = fleet.wait_task_done(task_id, timeout=90)
    recovered = time.monotonic() - since
    run = fleet.runs(task_id)[host]
    assert (done["status"], run["status"]) == ("succeeded", "succeeded"), run
    archived = fleet.run_log(run["id"])
    lost = max(0, expected.count(b"\n") - archived.count(b"\n"))
    print(f"\n{host}: lost lines: {lost}, archived {len(archived)} of {len(expected)} bytes, "
          f"task done {recovered:.1f}s after the connection came back")  # fmt: skip
    assert archived == expected


def test_output_printed_while_the_grpc_connection_is_cut_is_archived_whole(
    fleet: FaultFleet,
) -> None:
    with agent_behind_proxy(fleet, "gap-grpc") as proxy:
        marker = uuid.uuid4().hex[:8]
        command, expected = printing(marker, lines=60, width=100, pause=0.1)
        task_id = _start_and_wait_for_output(fleet, "gap-grpc", command)
        proxy.cut(rst=True, refuse=True)
        time.sleep(2.5)  # the command goes on printing while nobody listens
        proxy.resume()
        _check_whole(fleet, task_id, "gap-grpc", expected, time.monotonic())
        assert proxy.connections_made >= 2  # the agent did reconnect


def test_output_held_back_by_a_stalled_grpc_connection_is_archived_whole(
    fleet: FaultFleet,
) -> None:
    # Stalled longer than the 5 s after which the agent used to give output up. (Lines stay
    # short: long lines are slow to redact, issue 13 defect 1, which is not this test's point.)
    with agent_behind_proxy(fleet, "gap-stall") as proxy:
        marker = uuid.uuid4().hex[:8]
        command, expected = printing(marker, lines=100, width=200, pause=0.08)
        task_id = _start_and_wait_for_output(fleet, "gap-stall", command)
        proxy.pause()
        time.sleep(6)
        proxy.resume()
        _check_whole(fleet, task_id, "gap-stall", expected, time.monotonic())


def test_a_chunk_sent_twice_is_archived_once(fleet: FaultFleet) -> None:
    """A connection cut right after output went out: the agent cannot know whether it
    arrived and sends it again; the archive still holds every line once."""
    with agent_behind_proxy(fleet, "gap-twice") as proxy:
        marker = uuid.uuid4().hex[:8]
        command, expected = printing(marker, lines=40, width=50, pause=0.1)
        task_id = _start_and_wait_for_output(fleet, "gap-twice", command)
        # Short cuts with FIN: the stream ends cleanly, what was written before is delivered.
        for _ in range(3):
            time.sleep(0.7)
            proxy.cut(rst=False, refuse=False)
        _check_whole(fleet, task_id, "gap-twice", expected, time.monotonic())


# -- RabbitMQ -------------------------------------------------------------------------------


@pytest.mark.service("rabbitmq")
def test_output_printed_while_the_rabbitmq_connection_is_cut_is_archived_whole(
    tmp_path: Path, vhost: PrivateVhost
) -> None:
    with (
        fault_fleet(tmp_path, {**PATIENT, "OPSPLANE_AMQP_URL": vhost.url}) as fleet,
        running_proxy(rabbitmq.HOST, rabbitmq.PORT) as proxy,
    ):
        fleet.start_amqp_agent("gap-amqp", vhost.url_at(proxy.port))
        fleet.wait_online("gap-amqp", timeout=30)
        marker = uuid.uuid4().hex[:8]
        command, expected = printing(marker, lines=60, width=100, pause=0.1)
        task_id = _start_and_wait_for_output(fleet, "gap-amqp", command)
        proxy.cut(rst=True, refuse=True)
        time.sleep(2.5)
        proxy.resume()
        _check_whole(fleet, task_id, "gap-amqp", expected, time.monotonic())
