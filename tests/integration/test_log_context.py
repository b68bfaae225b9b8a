"""The engine's log lines about a run carry its ids as record fields (``--log-format json``
prints them), so an operator finds every line about a run by its id."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.transport.base import RunFinished
from opsplane.transport.memory import MemoryLink


async def test_a_report_on_no_run_is_logged_with_its_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = MemoryLink()
    engine = make_engine(load_settings(data_dir=tmp_path), [link])
    await engine.start()
    try:
        await link.connect("web-1", ["web"])
        now = datetime.now(UTC)
        stray = RunFinished(
            hostname="web-1", run_id="run-x", status="succeeded", exit_code=0, stdout="",
            stderr="", truncated=False, error=None, started_at=now, finished_at=now,
            duration_ms=1, task_id="task-x",
        )  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="opsplane.engine.ingest"):
            await (await engine.report(stray))
    finally:
        await engine.stop()
    (record,) = [r for r in caplog.records if "not its run" in r.getMessage()]
    assert (record.task_id, record.run_id, record.host) == ("task-x", "run-x", "web-1")  # type: ignore[attr-defined]
