"""Fault scenario 5 (issue 13): the delivery deadline passed while the agent was away.

Guarantee: the command never runs on that host, and its run ends ``undeliverable`` (not an
execution error). Checked on both agent links with real processes, and at the agent itself for
a command that reaches it after its deadline (however it was held up on the way)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet, wait_for
from tests.integration.test_amqp_agent import control_plane, make_config, new_run_id, running
from tests.rabbitmq import PrivateVhost, rabbitmqctl

DEADLINE = 3


def _away_past_the_deadline(fleet: Fleet, host: str, restart: tuple[str, ...]) -> None:
    """Stop the host's agent, give it a task with a short delivery deadline, wait past the
    deadline, bring the agent back: the command must not run."""
    fleet.stop_agent(host)
    fleet.wait_offline(host, timeout=20)
    body = {
        "command": "echo ran >> side-effects",
        "targets": {"hosts": [host]},
        "delivery_deadline": DEADLINE,
    }
    with fleet.client() as client:
        answer = client.post("/api/v1/tasks", json=body)
        assert answer.status_code == 201, answer.text
        task_id = answer.json()["id"]
        run = next(iter(fleet.runs(task_id).values()))
        assert run["status"] in ("pending", "delayed"), run
        done = fleet.wait_task_done(task_id, timeout=DEADLINE + 20)
    fleet.start_agent(host, "dd", extra_args=restart)
    fleet.wait_online(host, timeout=30)
    time.sleep(2)  # room for a wrongly late delivery to run
    run = next(iter(fleet.runs(task_id).values()))
    assert (done["status"], run["status"]) == ("failed", "undeliverable"), run
    assert "deadline" in (run["error"] or ""), run
    assert not (fleet.root / "work" / host / "side-effects").exists()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    the_fleet = Fleet(tmp_path)
    try:
        yield the_fleet
    finally:
        the_fleet.stop()


@pytest.mark.timeout(180)
def test_a_grpc_agent_away_past_the_delivery_deadline_never_runs_the_command(
    fleet: Fleet,
) -> None:
    fleet.start_server()
    fleet.start_agent("dd-grpc", "dd")
    fleet.wait_online("dd-grpc")
    _away_past_the_deadline(fleet, "dd-grpc", [])


@pytest.mark.service("rabbitmq")
@pytest.mark.service("rabbitmqctl")
@pytest.mark.timeout(180)
def test_a_rabbitmq_agent_away_past_the_delivery_deadline_never_runs_the_command(
    fleet: Fleet, vhost: PrivateVhost
) -> None:
    fleet.start_server("--amqp-url", vhost.url)
    args = fleet.amqp_agent_args(vhost.url)
    fleet.start_agent("dd-mq", "dd", extra_args=args)
    fleet.wait_online("dd-mq")
    queue = "cmd.node.dd-mq"

    def queues() -> list[str]:
        listing = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", vhost.name, "name")
        return listing.split()

    assert queue in queues()
    _away_past_the_deadline(fleet, "dd-mq", args)
    # While the agent was away its queue (exclusive, auto-delete) did not exist: nothing could
    # wait in RabbitMQ for its return; it has one again now.
    wait_for(lambda: queue in queues(), 10, "the agent's queue")


@pytest.mark.service("rabbitmq")
async def test_a_command_reaching_the_agent_after_its_delivery_deadline_is_not_run(
    tmp_path: Path,
) -> None:
    async with control_plane() as cp, running(make_config(tmp_path, cp)):
        await cp.wait_for_hello()
        late = new_run_id()
        marker = tmp_path / "ran"
        # Signed and fresh, but held up past its delivery deadline on the way.
        body = cp.command(f"touch {marker}", late, deliver_by=time.time() - 1)
        await cp.publish(f"cmd.node.{cp.host}", body)
        result = await cp.wait_for("result", late)
        await asyncio.sleep(0.5)
    assert result["status"] == "undeliverable" and not marker.exists(), result
