"""/metrics scraped and parsed with prometheus-client's own parser after real tasks ran, and
failure alerts received by a real HTTP server on loopback (with a retry after a 500)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from prometheus_client.parser import text_string_to_metric_families

from opsplane.api.deps import require_principal
from opsplane.app_factory import create_app, make_engine
from opsplane.config import Settings, load_settings
from opsplane.domain.policy import TaskPolicy
from opsplane.domain.states import TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.core import Engine
from opsplane.transport.base import HeartbeatReport, RunFinished, RunStarted
from opsplane.transport.local import LocalLink
from opsplane.transport.memory import MemoryLink
from tests.integration.reports import report_result

LOCAL = "control-plane"


# A webhook receiver: a real HTTP server on loopback, in a thread ---------------------------


class Webhook:
    """Records every POST; answers with the next status of ``statuses`` (then 200), after
    ``delay`` seconds."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.delay = delay
        self.bodies: list[Any] = []
        self.received = threading.Event()
        self.url = ""

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count:
            assert time.monotonic() < deadline, f"{len(self.bodies)} of {count} webhook calls"
            time.sleep(0.05)
        return self.bodies


@contextmanager
def webhook_server(hook: Webhook) -> Iterator[Webhook]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hook.bodies.append(json.loads(body))
            time.sleep(hook.delay)
            status = hook.statuses.pop(0) if hook.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A secret-looking path, like Slack's and DingTalk's webhook URLs.
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T0KEN-SECRET"
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# An app on the in-memory link (three agents) and the local link (real processes) -----------


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return load_settings(data_dir=tmp_path, heartbeat_interval=30.0, alert_backoff=0.1, **extra)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[FastAPI, Engine, MemoryLink]]:
    link = MemoryLink()
    engine = make_engine(settings, [link, LocalLink(LOCAL)])
    app = create_app(settings, engine)
    async with app.router.lifespan_context(app):
        await link.connect("web-1", ["web"])
        await link.connect("web-2", ["web"])
        await link.connect("db-1", ["db"])
        yield app, engine, link


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _finished(
    host: str, run_id: str, status: str, exit_code: int | None, error: str = ""
) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname=host, run_id=run_id, status=status, exit_code=exit_code, stdout="", stderr="",
        truncated=False, error=error or None, started_at=now, finished_at=now, duration_ms=250,
    )  # fmt: skip


async def _run_on_memory_hosts(
    engine: Engine, results: dict[str, tuple[str, int | None]], **targets: Any
) -> str:
    """A task on memory-link hosts; each host starts, then ends as ``results`` says."""
    task = await engine.tasks.create_task(TaskRequest(command="deploy", targets=Targets(**targets)))
    for run in await engine.tasks.list_runs(task.id):
        await (await engine.report(RunStarted(run.host, run.id, datetime.now(UTC))))
        status, code = results[run.host]
        error = "timed out after 5s" if code is None else f"exit code {code}: disk full"
        error = "" if code == 0 else error
        await report_result(engine, _finished(run.host, run.id, status, code, error))
    async with asyncio.timeout(10):
        await engine.wait_task(task.id)
    return task.id


async def _scrape(app: FastAPI) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics, by sample name and sorted labels."""
    async with _client(app) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


# Metrics --------------------------------------------------------------------------------


async def test_metrics_count_what_ran(tmp_path: Path) -> None:
    with webhook_server(Webhook()) as hook:
        settings = _settings(tmp_path, alert_webhooks=[hook.url])
        async with running_app(settings) as (app, engine, _link):
            before = await _scrape(app)
            assert before["opsplane_tasks_finished_total"][(("status", "failed"),)] == 0
            failed = await _run_on_memory_hosts(
                engine, {"web-1": ("succeeded", 0), "web-2": ("failed", 1)}, groups=("web",)
            )
            await _run_on_memory_hosts(engine, {"db-1": ("succeeded", 0)}, hosts=("db-1",))
            local = await engine.tasks.create_task(
                TaskRequest(
                    command="true", targets=Targets(hosts=(LOCAL,)), kind="script",
                    spec=ExecSpec(argv=("true",)),
                )
            )  # fmt: skip
            async with asyncio.timeout(15):
                assert (await engine.wait_task(local.id)).status == TaskStatus.SUCCEEDED
            await (await engine.report(HeartbeatReport("web-1", datetime.now(UTC))))
            hook.wait_for(1)
            metrics = await _scrape(app)

    tasks = metrics["opsplane_tasks_finished_total"]
    assert tasks[(("status", "failed"),)] == 1
    assert tasks[(("status", "succeeded"),)] == 2
    assert tasks[(("status", "canceled"),)] == 0
    runs = metrics["opsplane_runs_finished_total"]
    assert runs[(("link", "grpc"), ("status", "succeeded"))] == 2
    assert runs[(("link", "grpc"), ("status", "failed"))] == 1
    assert runs[(("link", "local"), ("status", "succeeded"))] == 1
    assert runs[(("link", "grpc"), ("status", "lost"))] == 0
    # Every run reported a duration and a start after its dispatch.
    assert metrics["opsplane_run_duration_seconds_count"][()] == 4
    assert metrics["opsplane_run_duration_seconds_sum"][()] >= 0.75
    assert metrics["opsplane_run_start_latency_seconds_count"][()] == 4
    hosts = metrics["opsplane_hosts"]
    assert hosts[(("link", "grpc"), ("status", "online"))] == 3
    assert hosts[(("link", "grpc"), ("status", "offline"))] == 0
    assert not any(dict(labels).get("link") == "local" for labels in hosts)
    ages = metrics["opsplane_heartbeat_age_seconds"]
    assert 0 <= ages[(("link", "grpc"), ("quantile", "1"))] < 30
    assert 0 <= ages[(("link", "grpc"), ("quantile", "0.5"))] < 30
    assert metrics["opsplane_heartbeat_age_seconds_count"][(("link", "grpc"),)] == 3
    batches = metrics["opsplane_ingest_batch_size_count"][()]
    assert batches >= 1 and metrics["opsplane_ingest_batch_size_sum"][()] >= 7
    assert metrics["opsplane_ingest_queue_depth"][()] == 0
    assert metrics["opsplane_alerts_sent_total"][(("result", "sent"),)] == 1
    assert metrics["opsplane_alerts_sent_total"][(("result", "failed"),)] == 0
    assert hook.bodies[0]["task_id"] == failed


async def test_runs_waiting_for_capacity_are_a_gauge(tmp_path: Path) -> None:
    async with running_app(_settings(tmp_path)) as (app, engine, _link):
        paced = TaskPolicy.parse(max_concurrency=1)
        await engine.tasks.create_task(
            TaskRequest(command="true", targets=Targets(groups=("web",)), policy=paced)
        )
        metrics = await _scrape(app)
    waiting = metrics["opsplane_runs_waiting"]
    assert waiting[(("status", "pending"),)] == 1
    assert waiting[(("status", "delayed"),)] == 0


async def test_two_apps_in_one_process_keep_their_own_counters(tmp_path: Path) -> None:
    async with running_app(_settings(tmp_path / "a")) as (app_a, engine_a, _):
        await _run_on_memory_hosts(engine_a, {"db-1": ("succeeded", 0)}, hosts=("db-1",))
        async with running_app(_settings(tmp_path / "b")) as (app_b, _, _):
            a, b = await _scrape(app_a), await _scrape(app_b)
    assert a["opsplane_tasks_finished_total"][(("status", "succeeded"),)] == 1
    assert b["opsplane_tasks_finished_total"][(("status", "succeeded"),)] == 0


async def _refuse() -> None:
    raise HTTPException(status_code=401, detail="refused by the test")


@pytest.mark.parametrize("public", [True, False])
async def test_metrics_are_public_unless_configured_otherwise(tmp_path: Path, public: bool) -> None:
    app = create_app(_settings(tmp_path, metrics_public=public))
    app.dependency_overrides[require_principal] = _refuse
    async with app.router.lifespan_context(app), _client(app) as client:
        response = await client.get("/metrics")
    assert response.status_code == (200 if public else 401)


# Alerts ---------------------------------------------------------------------------------


async def test_a_failed_task_is_alerted_and_a_500_is_retried(tmp_path: Path) -> None:
    with webhook_server(Webhook(statuses=[500])) as hook:
        async with running_app(_settings(tmp_path, alert_webhooks=[hook.url])) as (app, engine, _):
            task_id = await _run_on_memory_hosts(
                engine, {"web-1": ("failed", 2), "web-2": ("timed_out", None)}, groups=("web",)
            )
            first, retried = await asyncio.to_thread(hook.wait_for, 2)
            metrics = await _scrape(app)
    assert first == retried
    assert retried["event"] == "task_failed" and retried["task_id"] == task_id
    assert retried["status"] == "failed" and retried["name"] == "deploy"
    assert retried["created_by"] == "anonymous" and retried["kind"] == "command"
    assert retried["counts"]["total"] == 2 and retried["counts"]["failed"] == 1
    assert retried["counts"]["timed_out"] == 1
    assert retried["failed_hosts_total"] == 2
    assert retried["failed_hosts"] == [
        {"host": "web-1", "status": "failed", "exit_code": 2, "error": "exit code 2: disk full",
         "attempt": 1},
        {"host": "web-2", "status": "timed_out", "exit_code": None, "error": "timed out after 5s",
         "attempt": 1},
    ]  # fmt: skip
    assert retried["url"] == f"http://127.0.0.1:8000/#/tasks/{task_id}"
    assert "web-1: failed (exit code 2: disk full)" in retried["text"]
    assert metrics["opsplane_alerts_sent_total"][(("result", "sent"),)] == 1


@pytest.mark.parametrize("fmt", ["slack", "dingtalk"])
async def test_chat_formats(tmp_path: Path, fmt: str) -> None:
    with webhook_server(Webhook()) as hook:
        settings = _settings(
            tmp_path, alert_format=fmt, public_url="https://ops.example.com/",
            alert_webhooks=[hook.url],
        )  # fmt: skip
        async with running_app(settings) as (_app, engine, _):
            task_id = await _run_on_memory_hosts(engine, {"db-1": ("failed", 1)}, hosts=("db-1",))
            (body,) = await asyncio.to_thread(hook.wait_for, 1)
    if fmt == "slack":
        assert set(body) == {"text"}
        text = body["text"]
    else:
        assert body["msgtype"] == "text" and set(body["text"]) == {"content"}
        text = body["text"]["content"]
    assert text.startswith('opsplane: task "deploy" failed: 1 of 1 hosts did not succeed')
    assert text.endswith(f"https://ops.example.com/#/tasks/{task_id}")


async def test_an_undeliverable_alert_is_logged_and_counted_after_bounded_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with webhook_server(Webhook(statuses=[500, 502, 503, 200])) as hook:
        settings = _settings(tmp_path, alert_attempts=3, alert_webhooks=[hook.url])
        async with running_app(settings) as (app, engine, _):
            with caplog.at_level(logging.WARNING, logger="opsplane.engine.alerts"):
                await _run_on_memory_hosts(engine, {"db-1": ("failed", 1)}, hosts=("db-1",))
                await asyncio.to_thread(hook.wait_for, 3)
                deadline = time.monotonic() + 10
                while (await _scrape(app))["opsplane_alerts_sent_total"][
                    (("result", "failed"),)
                ] != 1:
                    assert time.monotonic() < deadline, "the final failure was not counted"
                    await asyncio.sleep(0.05)
    assert len(hook.bodies) == 3  # attempts are bounded: the 4th answer (200) never asked
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "after 3 attempt(s): HTTP 503" in errors[0].getMessage()
    # The webhook's secret path never reaches the log.
    assert "T0KEN-SECRET" not in caplog.text and "http://127.0.0.1" in caplog.text


async def test_a_slow_webhook_never_slows_the_engine(tmp_path: Path) -> None:
    with webhook_server(Webhook(delay=3.0)) as hook:
        settings = _settings(tmp_path, alert_webhooks=[hook.url])
        async with running_app(settings) as (_app, engine, _):
            began = time.monotonic()
            for _ in range(3):
                await _run_on_memory_hosts(engine, {"db-1": ("failed", 1)}, hosts=("db-1",))
            assert time.monotonic() - began < 2.0
            await asyncio.to_thread(hook.wait_for, 1)


async def test_succeeded_and_canceled_tasks_are_not_alerted(tmp_path: Path) -> None:
    with webhook_server(Webhook()) as hook:
        settings = _settings(tmp_path, alert_webhooks=[hook.url])
        async with running_app(settings) as (app, engine, _):
            await _run_on_memory_hosts(engine, {"db-1": ("succeeded", 0)}, hosts=("db-1",))
            pending = await engine.tasks.create_task(
                TaskRequest(command="x", targets=Targets(hosts=("db-1",)), start=False)
            )
            await engine.tasks.cancel_task(pending.id)
            failed = await _run_on_memory_hosts(engine, {"db-1": ("failed", 1)}, hosts=("db-1",))
            (body,) = await asyncio.to_thread(hook.wait_for, 1)
            await asyncio.sleep(0.3)
            metrics = await _scrape(app)
    assert body["task_id"] == failed and len(hook.bodies) == 1
    assert metrics["opsplane_tasks_finished_total"][(("status", "canceled"),)] == 1
