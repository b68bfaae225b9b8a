# ruff: noqa: RUF001  (the multiplication sign is the issue's sign for a ratio)
"""Issue 15's budget table as data: each row's figure key, the budget and how it is judged.

A row passes when every bound it has holds: ``limit`` on opsplane's value (``at_least`` flips
it), ``ratio`` on opsplane's value divided by the peer's, and any extra condition a provider
reports as ``conditions_met`` (zero give-ups, none left out, growth under 5 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    key: str
    figure: str
    budget: str  # as the issue words it
    limit: float | None = None
    ratio: float | None = None
    at_least: bool = False  # a floor (throughput), not a ceiling
    peer_from: str | None = None  # the peer's value is another row's (a floor measured apart)


BUDGETS: tuple[Budget, ...] = (
    Budget("connect.10k", "10,000 simulated gRPC agents started at once → all online (s)",
           "≤ 30 s, zero give-ups", limit=30),
    Budget("broadcast.grpc.10k", "broadcast `true` to 10,000 gRPC agents, POST → all runs "
           "terminal and committed, SQLite (s)", "≤ 5 s and ≤ 2 × bare grpc.aio round trip",
           limit=5, ratio=2, peer_from="floor.grpc.broadcast"),
    Budget("broadcast.amqp.10k", "the same over RabbitMQ with MariaDB (s)", "≤ 8 s", limit=8),
    Budget("latency.p50", "one trivial command on one agent, submit → result committed, p50 (ms)",
           "≤ 20 ms", limit=20),
    Budget("latency.p99", "the same, p99 (ms)", "≤ 100 ms", limit=100),
    Budget("throughput", "sustained throughput, small tasks over 100 agents for 30 s (runs/s)",
           "≥ 2,000 runs/s", limit=2000, at_least=True),
    Budget("cpu.idle.10k", "control-plane CPU with 10,000 idle agents (% of one core)",
           "≤ 20 %", limit=20),
    Budget("memory.10k", "control-plane memory with 10,000 gRPC agents (MiB)",
           "≤ 1.25 × the bare server", ratio=1.25, peer_from="floor.grpc.memory"),
    Budget("memory.soak", "control-plane memory growth over a 10-minute soak, broadcasts every "
           "10 s (%)", "< 5 %", limit=5),
    Budget("restart.10k", "control plane restarted with 10,000 agents connected → all online (s)",
           "≤ 30 s, none left out", limit=30),
    Budget("reads.hosts", "`GET /api/v1/hosts?size=100` at 10,000 hosts (ms)", "≤ 50 ms",
           limit=50),
    Budget("reads.fleet_view", "the page's fleet view at 10,000 hosts (ms)", "≤ 50 ms", limit=50),
    Budget("agent.rss", "agent memory, idle (MiB RSS) vs a salt-minion",
           "≤ 45 MiB and ≤ 0.4 × salt-minion", limit=45, ratio=0.4, peer_from="agent.rss.k10"),
    Budget("agents.online.100", "100 agent processes started at once → all online (s)",
           "≤ 10 s", limit=10),
    Budget("ssh.vs_asyncssh", "`hostname` on 100 sshd targets through one bastion via "
           "/api/ssh/task, cold, vs bare asyncssh (s)", "≤ 1.5 × asyncssh", ratio=1.5),
    Budget("ssh.vs_pssh", "the same vs parallel-ssh (s)", "≤ 0.5 × parallel-ssh", ratio=0.5),
    Budget("live.p99", "live output: agent writes a line → SSE client receives it, p99 (ms)",
           "≤ 250 ms", limit=250),
    Budget("salt.api.k10", "`cmd.run 'echo ok'`, K=10, time to last return: HTTP API vs "
           "LocalClient (s)", "≤ 0.1 × Salt", ratio=0.1),
    Budget("salt.api.k50", "the same, K=50 (s)", "≤ 0.1 × Salt", ratio=0.1),
    Budget("salt.cli.k10", "the same through each CLI, whole process, K=10 (s)",
           "≤ 0.25 × `salt '*' cmd.run`", ratio=0.25),
    Budget("salt.cli.k50", "the same through each CLI, K=50 (s)", "≤ 0.25 × `salt '*' cmd.run`",
           ratio=0.25),
    # Side figures: measured in the same run, no budget of their own.
    Budget("agent.rss.k10", "idle RSS, 10 agents vs 10 salt-minions started together (MiB)", "—"),
    Budget("agent.rss.k50", "idle RSS, 50 agents vs 50 salt-minions started together (MiB)", "—"),
    Budget("agents.online.k10", "10 agent processes vs 10 salt-minions started at once → all "
           "online (s)", "— (100 in ≤ 10 s)"),
    Budget("agents.online.k50", "the same, 50 (s)", "— (100 in ≤ 10 s)"),
    Budget("floor.grpc.memory", "bare grpc.aio server holding 10,000 streams (MiB)", "— (floor)"),
    Budget("floor.grpc.broadcast", "bare grpc.aio broadcast round trip, 10,000 streams (s)",
           "— (floor)"),
    Budget("floor.amqp.roundtrip", "bare aio-pika request/reply round trip, p50 (ms)",
           "— (floor)"),
)  # fmt: skip


# A figure measured on the way by another provider, used when the owner's script is absent:
# the Salt side by side starts 10 agents and 10 salt-minions together and reads their RSS.
STAND_INS = {"agent.rss": "agent.rss.k10"}


def judge(budget: Budget, figure: dict[str, Any], peer_value: float | None) -> dict[str, Any]:
    """The row: ratio (when both values are there) and ``result``: pass, MISS or —."""
    value = figure.get("value")
    ratio = value / peer_value if value is not None and peer_value else None
    checks: list[bool] = []
    if budget.limit is not None and value is not None:
        checks.append(value >= budget.limit if budget.at_least else value <= budget.limit)
    if budget.ratio is not None:
        checks.append(ratio is not None and ratio <= budget.ratio)
    if "conditions_met" in figure:
        checks.append(bool(figure["conditions_met"]))
    no_budget = budget.limit is None and budget.ratio is None
    result = "—" if value is None or no_budget else "pass" if all(checks) else "MISS"
    return {"ratio": ratio, "result": result}
