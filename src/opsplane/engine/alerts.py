"""Failure alerts (seed 003): when a task ends ``failed`` or ``timed_out``, every configured
webhook receives a JSON message (docs/alerts.md) — opsplane's own shape, or Slack's or
DingTalk's. A task launched from a template whose ``notify`` names ``success`` is also
alerted when it succeeds, and one naming ``change`` when its outcome differs from the
template's previous launch (docs/templates.md).

Alerting never slows the engine down: the hub listener only queues the task id (a bounded
queue; when it is full the alert is dropped and logged), and one background worker builds the
message and delivers it, retrying a failed delivery with exponential backoff a bounded number of
times. A delivery that still fails is logged and counted, never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.engine.background import Supervised
from opsplane.engine.changes import TaskEvent, counts_view
from opsplane.engine.hub import RecentIds
from opsplane.store import queries, template_queries
from opsplane.store.tables import TaskRow

log = logging.getLogger(__name__)

AlertFormat = Literal["json", "slack", "dingtalk"]
ALERTING_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT})
# Ends a template's notify may ask about (a canceled launch says nothing of the template).
TEMPLATE_STATUSES = ALERTING_STATUSES | {TaskStatus.SUCCEEDED}
# Hosts listed in one message; the total is always given.
MAX_HOSTS = 20
_MAX_ERROR = 500
_RETRY_STATUSES = frozenset({408, 425, 429})


def _safe_url(url: str) -> str:
    """A webhook URL fit for a log line: Slack and DingTalk URLs carry their secret in the path
    or the query, so only the scheme and host are shown."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


def _line_error(outcome: queries.RunOutcome) -> str:
    if outcome.error:
        error = outcome.error
    elif outcome.exit_code is not None:
        error = f"exit code {outcome.exit_code}"
    else:
        error = outcome.status
    return error if len(error) <= _MAX_ERROR else error[: _MAX_ERROR - 1] + "…"


def format_message(payload: dict[str, Any], fmt: AlertFormat) -> dict[str, Any]:
    """The body POSTed to a webhook in ``fmt``: the payload itself, or its text for chat."""
    if fmt == "slack":
        return {"text": payload["text"]}
    if fmt == "dingtalk":
        return {"msgtype": "text", "text": {"content": payload["text"]}}
    return payload


class AlertSender:
    """Queues failed tasks from the hub and delivers alerts in the background.

    ``start()`` begins the worker (and listening, if any webhook is configured); ``stop()``
    gives queued alerts a bounded time, then stops.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        webhooks: Sequence[str],
        *,
        fmt: AlertFormat = "json",
        base_url: str,
        attempts: int = 3,
        backoff: float = 1.0,
        timeout: float = 10.0,
        queue_size: int = 1000,
        on_result: Callable[[str], None] | None = None,
        holds: Callable[[], bool] = lambda: True,
        takeover_window: float = 60.0,
    ) -> None:
        """``holds()`` says whether this instance holds the ``alerts`` lease: several instances
        on one database observe every task's end (a cluster listener), and only the holder
        delivers. The others keep the ends of the last ``takeover_window`` seconds, so that
        the instance taking the lease over from a dead holder sends what it may have missed
        (at least once: the dead holder may have sent some of them)."""
        self._holds = holds
        self._window = takeover_window
        self._backlog: deque[tuple[float, str]] = deque(maxlen=queue_size)
        self.webhooks = tuple(webhooks)
        self._sessions = sessions
        self._fmt = fmt
        self._base_url = base_url.rstrip("/")
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._on_result = on_result or (lambda _result: None)
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._seen = RecentIds()
        self._client: httpx.AsyncClient | None = None
        self.loop = Supervised("alerts", self._loop)

    async def start(self) -> None:
        if not self.webhooks or self.loop.running:
            return
        self._client = httpx.AsyncClient(timeout=self._timeout)
        self.loop.start()

    async def stop(self, drain_seconds: float = 5.0) -> None:
        if not self.loop.running:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_seconds)
        await self.loop.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def observe(self, events: list[TaskEvent]) -> None:
        """Hub listener: queue each task that just ended failed or timed out (once)."""
        if not self.loop.running:
            return
        for event in events:
            if event.kind != "task":
                continue
            status = event.data.get("status")
            if status not in ALERTING_STATUSES and not (
                event.data.get("template") and status in TEMPLATE_STATUSES
            ):
                continue
            if not self._holds():
                self._backlog.append((time.monotonic(), event.task_id))
                continue
            self._take_backlog()
            self._enqueue(event.task_id)

    def _enqueue(self, task_id: str) -> None:
        if not self._seen.first_time(task_id):
            return
        try:
            self._queue.put_nowait(task_id)
        except asyncio.QueueFull:
            log.error("alert for task %s dropped: %d alerts queued", task_id,
                      self._queue.qsize())  # fmt: skip
            self._on_result("dropped")

    def _take_backlog(self) -> None:
        """Just took the lease over: queue the ends seen lately, while another held it."""
        since = time.monotonic() - self._window
        while self._backlog:
            seen, task_id = self._backlog.popleft()
            if seen >= since:
                self._enqueue(task_id)

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(1.0):
                    task_id = await self._queue.get()
            except TimeoutError:
                if self._backlog and self._holds():
                    self._take_backlog()
                continue
            try:
                payload = await self.message(task_id)
                if payload.get("notify_reason") is None:
                    continue
                body = format_message(payload, self._fmt)
                await asyncio.gather(*(self._deliver(url, task_id, body) for url in self.webhooks))
            except Exception:
                log.exception("alert for task %s could not be built", task_id)
                self._on_result("failed")
            finally:
                self._queue.task_done()

    async def message(self, task_id: str) -> dict[str, Any]:
        """The alert payload of a task (docs/alerts.md)."""
        async with self._sessions() as session:
            task = await queries.get_task(session, task_id)
            if task is None:
                raise LookupError(f"task {task_id} is gone")
            outcomes = await queries.run_outcomes(session, task_id)
            reason = await _notify_reason(session, task)
        # The task's result is the last attempt on each host.
        last: dict[str, queries.RunOutcome] = {}
        for outcome in outcomes:
            if outcome.host not in last or outcome.attempt > last[outcome.host].attempt:
                last[outcome.host] = outcome
        failed = sorted(
            (o for o in last.values() if o.status != RunStatus.SUCCEEDED), key=lambda o: o.host
        )
        hosts = [
            {
                "host": o.host,
                "status": o.status,
                "exit_code": o.exit_code,
                "error": _line_error(o),
                "attempt": o.attempt,
            }
            for o in failed[:MAX_HOSTS]
        ]
        url = f"{self._base_url}/#/tasks/{task_id}"
        status = str(task.status)
        lines = [
            f'opsplane: task "{task.name}" {status.replace("_", " ")}: '
            f"{len(failed)} of {task.total} hosts did not succeed (by {task.created_by})"
        ]
        lines += [f"{h['host']}: {h['status']} ({h['error']})" for h in hosts]
        if len(failed) > len(hosts):
            lines.append(f"… and {len(failed) - len(hosts)} more")
        lines.append(url)
        template = (
            {"name": task.template, "version": task.template_version} if task.template else None
        )
        return {
            "event": f"task_{status}",
            # Why this message: failure (every task), or a template's success or change.
            "notify_reason": reason,
            "template": template,
            "task_id": task.id,
            "name": task.name,
            "kind": task.kind,
            "status": status,
            "created_by": task.created_by,
            "created_at": task.created_at.isoformat(),
            "finished_at": task.finished_at.isoformat() if task.finished_at else None,
            "counts": counts_view(task.counts or {}, task.total),
            "failed_hosts": hosts,
            "failed_hosts_total": len(failed),
            "url": url,
            "text": "\n".join(lines),
        }

    async def _deliver(self, url: str, task_id: str, body: dict[str, Any]) -> None:
        assert self._client is not None
        problem = ""
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.post(url, json=body)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.is_success:
                    self._on_result("sent")
                    return
                problem = f"HTTP {response.status_code}"
                # Other client errors mean the request itself is wrong: repeating cannot help.
                if response.is_client_error and response.status_code not in _RETRY_STATUSES:
                    break
            if attempt < self._attempts:
                delay = self._backoff * 2 ** (attempt - 1)
                log.warning("alert for task %s to %s failed (%s); retrying in %.1fs",
                            task_id, _safe_url(url), problem, delay)  # fmt: skip
                await asyncio.sleep(delay)
        log.error("alert for task %s not delivered to %s after %d attempt(s): %s",
                  task_id, _safe_url(url), attempt, problem)  # fmt: skip
        self._on_result("failed")


async def _notify_reason(session: AsyncSession, task: TaskRow) -> str | None:
    """Why ``task``'s end is alerted (None: it is not). Failures always are; a template's
    launch also on success (``notify: [success]``) or on a change of outcome from the
    template's previous launch (``notify: [change]``)."""
    failed = task.status in ALERTING_STATUSES
    if task.template is None or task.template_version is None:
        return "failure" if failed else None
    version = await template_queries.get_version(session, task.template, task.template_version)
    notify = set((version.definition.get("notify") if version else None) or ())
    if "change" in notify:
        before = await template_queries.previous_outcome(session, task)
        if before is not None and (before in ALERTING_STATUSES) != failed:
            return "change"
    if failed:
        return "failure"
    if "success" in notify and task.status == TaskStatus.SUCCEEDED:
        return "success"
    return None
