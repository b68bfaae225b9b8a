"""The swarm keeps working (issue 15): 100 simulated gRPC agents against a real control plane
(a subprocess on SQLite) all get online, and a broadcast to them completes."""

from __future__ import annotations

from bench.swarm.cli import parser, run, table


async def test_a_swarm_of_100_grpc_agents_gets_online_and_runs_a_broadcast() -> None:
    args = parser().parse_args(
        ["--agents", "100", "--procs", "1", "--online-timeout", "60", "--broadcast-timeout", "60"]
    )
    report = await run(args)
    assert report["connect"]["online"] == 100, table(report)
    assert report["connect"]["all_online_s"] is not None, table(report)
    assert report["connect"]["give_ups"] == 0, table(report)
    [broadcast] = report["broadcasts"]
    assert broadcast["status"] == "succeeded", table(report)
    assert broadcast["succeeded"] == broadcast["runs"] == 100, table(report)
