"""Notifications per template (issue 20) through the alert webhooks: on success, on a change
of outcome from the previous launch; failures as for every task."""

from __future__ import annotations

import asyncio
from pathlib import Path

from opsplane.domain.targeting import Targets
from opsplane.domain.templates import TemplateSpec
from opsplane.engine.core import Engine
from opsplane.security.roles import Principal, Role
from tests.integration.reports import report_result
from tests.integration.test_metrics_alerts import (
    Webhook,
    _finished,
    _settings,
    running_app,
    webhook_server,
)

ADMIN = Principal(name="admin", role=Role.ADMIN)


async def _launch(engine: Engine, template: str, status: str) -> str:
    task = await engine.templates.launch(template, {}, principal=ADMIN)
    for run in await engine.tasks.list_runs(task.id):
        code = 0 if status == "succeeded" else 1
        await report_result(engine, _finished(run.host, run.id, status, code))
    async with asyncio.timeout(10):
        await engine.wait_task(task.id)
    return task.id


async def test_a_template_notifies_on_success_and_on_a_change_of_outcome(tmp_path: Path) -> None:
    with webhook_server(Webhook()) as hook:
        settings = _settings(tmp_path, alert_webhooks=[hook.url])
        async with running_app(settings) as (_app, engine, _link):
            targets = Targets(hosts=("db-1",))
            for name, notify in (("watched", ("success", "change")), ("quiet", ())):
                spec = TemplateSpec(name=name, command="true", targets=targets, notify=notify)
                await engine.templates.create(spec, by="admin")
            ok = await _launch(engine, "watched", "succeeded")
            broke = await _launch(engine, "watched", "failed")
            still = await _launch(engine, "watched", "failed")
            await _launch(engine, "quiet", "succeeded")  # no notify, no failure: silent
            quiet_failed = await _launch(engine, "quiet", "failed")
            bodies = await asyncio.to_thread(hook.wait_for, 4)
            await asyncio.sleep(0.3)
    got = [(b["task_id"], b["notify_reason"], b["status"]) for b in hook.bodies]
    assert sorted(got) == sorted(
        [
            (ok, "success", "succeeded"),
            (broke, "change", "failed"),
            (still, "failure", "failed"),
            (quiet_failed, "failure", "failed"),
        ]
    )
    assert all(b["template"]["name"] in ("watched", "quiet") for b in bodies)
