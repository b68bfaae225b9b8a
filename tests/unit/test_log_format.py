"""JSON log lines carry the task, run and host they concern (``--log-format json``)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from opsplane.cli.logs import JsonFormatter
from opsplane.logcontext import ContextFilter, about_run


def _logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test-json-{time.monotonic_ns()}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_lines_inside_about_run_carry_its_ids_and_others_do_not() -> None:
    logger, out = _logger()
    with about_run(task_id="t-1", host="web-1"):
        with about_run(run_id="r-1"):
            logger.info("sent %s", "it")
        logger.warning("task-level")
    logger.info("no context")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        with about_run(run_id="r-2"):
            logger.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    first, second, third, fourth = lines
    assert (first["message"], first["task_id"], first["run_id"], first["host"]) == (
        "sent it",
        "t-1",
        "r-1",
        "web-1",
    )
    assert second["task_id"] == "t-1" and "run_id" not in second
    assert not {"task_id", "run_id", "host"} & set(third) and third["level"] == "INFO"
    assert fourth["run_id"] == "r-2" and "RuntimeError: boom" in fourth["exception"]


def test_an_explicit_extra_wins_over_the_context() -> None:
    logger, out = _logger()
    with about_run(run_id="outer"):
        logger.info("x", extra={"run_id": "mine"})
    assert json.loads(out.getvalue())["run_id"] == "mine"


def test_the_agent_logs_json_lines_with_the_flag(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "opsplane", "agent", "--server", "127.0.0.1:1", "--name", "j"]
    args += ["--state-dir", str(tmp_path), "--log-format", "json"]
    env = {**os.environ, "OPSPLANE_AGENT_STATE_DIR": str(tmp_path)}
    with subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env) as agent:
        try:
            assert agent.stderr is not None
            line = agent.stderr.readline()  # its first line: it cannot reach port 1
        finally:
            agent.terminate()
            agent.wait(30)
    record = json.loads(line)
    assert record["level"] in {"INFO", "WARNING"} and record["logger"].startswith("opsplane")
