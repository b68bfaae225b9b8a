"""What pacing costs: one task over N simulated hosts that answer at once, run unpaced, with
``max_concurrency``, with a canary, with the global ``max_running_runs`` limit, and with
retries (every first attempt fails). The in-process engine on SQLite (or ``--database-url``),
the in-memory link standing in for agents, so the figures are the engine's own: scheduling,
state changes, ingest. Prints seconds to the task's end, runs per second and the ratio to the
unpaced run.

    python bench/pacing.py [--hosts 1000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.transport.base import CommandEnvelope, RunFinished, RunStarted
from opsplane.transport.memory import MemoryLink


class AnsweringLink(MemoryLink):
    """Every host starts and ends the run it receives at once; ``fail_first`` makes attempt 1
    fail (to exercise retries)."""

    fail_first = False

    async def send_command(self, hostname: str, command: CommandEnvelope) -> None:
        await super().send_command(hostname, command)
        asyncio.get_running_loop().create_task(self._answer(hostname, command))

    async def _answer(self, hostname: str, command: CommandEnvelope) -> None:
        assert self.events is not None
        now = datetime.now(UTC)
        failed = self.fail_first and command.attempt == 1
        await self.events.report(RunStarted(hostname, command.run_id, now))
        await self.events.report(
            RunFinished(
                hostname=hostname, run_id=command.run_id,
                status="failed" if failed else "succeeded", exit_code=1 if failed else 0,
                stdout="", stderr="", truncated=False, error=None, started_at=now,
                finished_at=now, duration_ms=0,
            )
        )  # fmt: skip


async def _measure(
    hosts: int, database_url: str | None, policy: TaskPolicy | None, **settings: Any
) -> float:
    with tempfile.TemporaryDirectory() as data_dir:
        extra = {"database_url": database_url} if database_url else {}
        link = AnsweringLink()
        link.fail_first = bool(policy and policy.retries)
        engine = make_engine(
            load_settings(data_dir=Path(data_dir), heartbeat_interval=0.1, **extra, **settings),
            [link],
        )
        await engine.start()
        try:
            names = [f"h-{i:05d}" for i in range(hosts)]
            for name in names:
                await link.connect(name, ["bench"])
            started = time.perf_counter()
            task = await engine.tasks.create_task(
                TaskRequest(command="true", targets=Targets(groups=("bench",)), policy=policy)
            )
            async with asyncio.timeout(600):
                done = await engine.wait_task(task.id)
            elapsed = time.perf_counter() - started
            assert done.status == "succeeded", done.status
            return elapsed
        finally:
            await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    cases: list[tuple[str, Callable[[], TaskPolicy | None], dict[str, Any]]] = [
        ("unpaced", lambda: None, {}),
        ("max_concurrency 50", lambda: TaskPolicy.parse(max_concurrency=50), {}),
        ("max_concurrency 10%", lambda: TaskPolicy.parse(max_concurrency="10%"), {}),
        (
            "canary 10, then 25%",
            lambda: TaskPolicy.parse(rollout={"canary": 10, "then": "25%"}),
            {},
        ),
        ("max_running_runs 50", lambda: None, {"max_running_runs": 50}),
        ("retries (attempt 1 fails)", lambda: TaskPolicy.parse(retries={"max_attempts": 2}), {}),
    ]
    print(f"one task, {args.hosts} simulated hosts answering at once, "
          f"{args.database_url or 'SQLite'}")  # fmt: skip
    print(f"{'case':<28} {'seconds':>8} {'runs/s':>8} {'vs unpaced':>11}")
    baseline = None
    for name, policy, settings in cases:
        seconds = asyncio.run(_measure(args.hosts, args.database_url, policy(), **settings))
        runs = args.hosts * (2 if "retries" in name else 1)
        baseline = baseline or seconds
        print(f"{name:<28} {seconds:>8.2f} {runs / seconds:>8.0f} {seconds / baseline:>10.2f}x")


if __name__ == "__main__":
    main()
