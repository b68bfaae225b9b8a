"""What a host's link would do in these tests: report a run's result to the engine."""

from __future__ import annotations

from opsplane.domain.states import TaskStatus
from opsplane.engine.core import Engine
from opsplane.transport.base import RunFinished


async def report_result(engine: Engine, result: RunFinished) -> None:
    """Hand a final result to the engine as a link does; return once it is durable."""
    await (await engine.report(result))


async def task_status(engine: Engine, task_id: str) -> TaskStatus:
    return TaskStatus((await engine.tasks.get_task(task_id)).status)
