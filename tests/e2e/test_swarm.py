"""The swarm keeps working (issue 15): 100 simulated agents against a real control plane (a
subprocess on SQLite) over each link all get online, and a broadcast of ``true`` to them
completes with every run terminal, none lost, none run twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.swarm.cli import parser, run, table
from tests.rabbitmq import PrivateVhost, private_vhost

AGENTS = 100


@pytest.fixture(scope="module")
def vhost() -> Iterator[PrivateVhost]:
    # The broker is shared: the swarm's 100 queues and the control plane's live in a vhost of
    # this module's own.
    with private_vhost("opsplane-swarm") as the_vhost:
        yield the_vhost


def _assert_one_broadcast_of_everyone(report: dict[str, object]) -> None:
    connect = report["connect"]
    assert isinstance(connect, dict)
    assert connect["online"] == AGENTS, table(report)
    assert connect["all_online_s"] is not None, table(report)
    assert connect["give_ups"] == 0, table(report)
    [broadcast] = report["broadcasts"]  # type: ignore[misc]
    assert broadcast["status"] == "succeeded", table(report)
    assert broadcast["succeeded"] == broadcast["runs"] == AGENTS, table(report)


async def test_a_swarm_of_100_grpc_agents_gets_online_and_runs_a_broadcast() -> None:
    args = parser().parse_args(
        ["--agents", str(AGENTS), "--procs", "1", "--online-timeout", "60",
         "--broadcast-timeout", "60"]
    )  # fmt: skip
    report = await run(args)
    _assert_one_broadcast_of_everyone(report)
    assert report["swarm"]["results"] == AGENTS, report["swarm"]


@pytest.mark.service("rabbitmq")
@pytest.mark.service("rabbitmqctl")
async def test_a_swarm_of_100_rabbitmq_agents_on_two_connections_runs_a_broadcast(
    vhost: PrivateVhost,
) -> None:
    args = parser().parse_args(
        ["--link", "amqp", "--amqp-url", vhost.url, "--agents", str(AGENTS), "--procs", "1",
         "--amqp-connections", "2", "--online-timeout", "60", "--broadcast-timeout", "60"]
    )  # fmt: skip
    report = await run(args)
    _assert_one_broadcast_of_everyone(report)
    swarm = report["swarm"]
    # Every agent got the one fan-out message once, checked its signature against the control
    # plane's key, and reported once: nothing refused, lost or duplicated.
    assert swarm["commands"] == swarm["results"] == AGENTS, swarm
    assert (swarm["duplicates"], swarm["refused"], swarm["unconfirmed"]) == (0, 0, 0), swarm
    # Multiplexed: the 100 agents shared the worker's two connections.
    assert swarm["dials"] == AGENTS, swarm
