"""SSH workers (seed 000's API/worker split, docs/ssh.md "SSH workers").

With ``ssh_workers: true`` the control plane's ``SshLink`` executes nothing: it publishes each
run as a persistent message (publisher confirms) to the durable queue ``ssh.work`` through the
default exchange, and cancels to the durable fanout exchange ``ssh.cancel``. ``opsplane worker``
processes consume ``ssh.work`` with manual acks (prefetch = concurrency), execute with
``SshExecutor`` through an in-process ``SshLink`` and report on ``sys_result_exchange`` with the
JSON of docs/amqp.md; the control plane's ``AmqpLink`` ingests those reports. A work message is
acked only once its final result is confirmed by the broker, so a killed worker's work is
redelivered (at least once: a run may execute twice; the second result changes nothing).

A work message carries the target as the link knows it, in-memory secrets included (password,
private key text, passphrase): they travel through the broker. Prefer key files readable by the
workers. Secrets never appear in logs (``SshEndpoint`` hides them from ``repr``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from opsplane.domain.errors import ConfigError, ConnectionLost, InvalidInput, NotConnected
from opsplane.transport.amqp import messages as m
from opsplane.transport.amqp.link import PUBLISH_TIMEOUT, mask_url
from opsplane.transport.amqp.queues import QueueType, durable_queue
from opsplane.transport.base import (
    AgentHello,
    AgentKey,
    CommandEnvelope,
    HostReport,
    RunFinished,
    RunOutput,
    RunStarted,
    UploadSpec,
)
from opsplane.transport.ssh.endpoints import SshEndpoint, SshTarget
from opsplane.transport.ssh.executor import SshExecutor
from opsplane.transport.ssh.link import SshLink

log = logging.getLogger(__name__)

WORK_QUEUE = "ssh.work"
CANCEL_EXCHANGE = "ssh.cancel"
_AMQP_FAILURES = (
    TimeoutError,
    OSError,
    RuntimeError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
)
_REMEMBERED_CANCELS = 10_000


# -- messages ------------------------------------------------------------------------------


def _endpoint_dict(endpoint: SshEndpoint) -> dict[str, Any]:
    return {k: v for k, v in asdict(endpoint).items() if v is not None}


def work_body(hostname: str, target: SshTarget, command: CommandEnvelope) -> dict[str, Any]:
    """A run as published to ``ssh.work``: the envelope and how to reach the host."""
    return {
        "type": "command",
        "hostname": hostname,
        "task_id": command.task_id,
        "run_id": command.run_id,
        "attempt": command.attempt,
        "command": command.command,
        "timeout": command.timeout,
        "env": dict(command.env),
        "user": command.user,
        "deliver_by": command.deliver_by or 0,
        "argv": list(command.argv) if command.argv is not None else None,
        "handler": command.handler,
        "args": list(command.args),
        "cwd": command.cwd,
        "upload": asdict(command.upload) if command.upload is not None else None,
        "target": {
            "endpoint": _endpoint_dict(target.endpoint),
            "bastions": [_endpoint_dict(hop) for hop in target.bastions],
        },
        "timestamp": time.time(),
    }


def _endpoint_from(value: Any) -> SshEndpoint:
    if not isinstance(value, dict):
        raise InvalidInput("an SSH endpoint must be an object")
    return SshEndpoint(**value)


def parse_work(body: Mapping[str, Any]) -> tuple[str, SshTarget, CommandEnvelope]:
    """``work_body`` back: host name, target, envelope. Raises ``InvalidInput``."""
    try:
        hostname = str(body["hostname"])
        target_spec = body["target"]
        target = SshTarget(
            hostname,
            _endpoint_from(target_spec["endpoint"]),
            tuple(_endpoint_from(hop) for hop in target_spec.get("bastions") or ()),
        )
        upload = body.get("upload")
        argv = body.get("argv")
        envelope = CommandEnvelope(
            task_id=str(body["task_id"]),
            run_id=str(body["run_id"]),
            attempt=int(body.get("attempt") or 1),
            command=str(body.get("command") or ""),
            timeout=int(body.get("timeout") or 0),
            env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
            user=str(body.get("user") or ""),
            deliver_by=float(body.get("deliver_by") or 0) or None,
            argv=tuple(str(a) for a in argv) if argv is not None else None,
            handler=body.get("handler"),
            args=tuple(str(a) for a in body.get("args") or ()),
            cwd=body.get("cwd"),
            upload=UploadSpec(**upload) if upload else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidInput(f"malformed SSH work message: {type(e).__name__}: {e}") from e
    return hostname, target, envelope


def _ts(at: datetime | None) -> float:
    return at.timestamp() if at is not None else 0.0


def report_body(report: HostReport) -> dict[str, Any] | None:
    """A run report as the JSON of docs/amqp.md (``None`` for other reports)."""
    common: dict[str, Any]
    if isinstance(report, RunStarted | RunOutput | RunFinished):
        common = {
            "hostname": report.hostname,
            "task_id": report.task_id,
            "run_id": report.run_id,
            "attempt": report.attempt,
            "timestamp": time.time(),
        }
    else:
        return None
    if isinstance(report, RunStarted):
        return {"type": "started", **common, "started_at": _ts(report.started_at)}
    if isinstance(report, RunOutput):
        return {
            "type": "output",
            **common,
            "stream": report.stream,
            "seq": report.seq,
            "data": report.data.decode("utf-8", errors="replace"),
        }
    return {
        "type": "result",
        **common,
        "status": report.status,
        "exit_code": report.exit_code,
        "stdout": report.stdout,
        "stderr": report.stderr,
        "truncated": report.truncated,
        "error": report.error or "",
        "started_at": _ts(report.started_at),
        "finished_at": _ts(report.finished_at),
        "duration_ms": report.duration_ms,
    }


def _message(body: Mapping[str, Any], message_id: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
    )


# -- the control plane's side --------------------------------------------------------------


class WorkQueue:
    """Publishes runs to ``ssh.work`` and cancels to ``ssh.cancel`` (control plane side)."""

    def __init__(self, url: str, queue_type: QueueType = "classic") -> None:
        self._url = url
        # Of ssh.work when this side creates it (transport/amqp/queues.py).
        self._queue_type: QueueType = queue_type
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._cancels: AbstractExchange | None = None

    async def start(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(self._url, timeout=10)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as e:
            raise ConfigError(f"cannot reach RabbitMQ at {mask_url(self._url)}: {e}") from e
        self._channel = await self._connection.channel(publisher_confirms=True)
        await durable_queue(self._connection, self._channel, WORK_QUEUE, self._queue_type)
        self._cancels = await self._channel.declare_exchange(
            CANCEL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        log.info("SSH work goes to the workers through %s", mask_url(self._url))

    async def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = self._channel = self._cancels = None

    async def publish_work(
        self, hostname: str, target: SshTarget, command: CommandEnvelope
    ) -> None:
        if self._channel is None:
            raise NotConnected("the SSH work queue is not started")
        message = _message(work_body(hostname, target, command), command.run_id)
        try:
            await self._channel.default_exchange.publish(
                message, routing_key=WORK_QUEUE, timeout=PUBLISH_TIMEOUT
            )
        except _AMQP_FAILURES as e:
            raise ConnectionLost(f"publishing SSH work for {hostname} failed: {e!r}") from e

    async def publish_cancel(self, hostname: str, task_id: str, run_id: str, reason: str) -> None:
        if self._cancels is None:
            raise NotConnected("the SSH work queue is not started")
        body = {**m.cancel_body(task_id, run_id, reason, time.time()), "hostname": hostname}
        try:
            await self._cancels.publish(_message(body), routing_key="", timeout=PUBLISH_TIMEOUT)
        except _AMQP_FAILURES as e:
            raise ConnectionLost(f"publishing the cancel of {run_id} failed: {e!r}") from e


# -- the worker ----------------------------------------------------------------------------


class SshWorker:
    """``opsplane worker``: executes ``ssh.work`` runs and reports on ``sys_result_exchange``."""

    def __init__(self, url: str, executor: SshExecutor, *, concurrency: int = 10) -> None:
        if concurrency < 1:
            raise ConfigError("worker concurrency must be at least 1")
        self._url = url
        self._concurrency = concurrency
        self._link = SshLink(executor)
        self._connection: AbstractRobustConnection | None = None
        self._results: AbstractExchange | None = None
        self._pending: dict[str, AbstractIncomingMessage] = {}
        self._canceled: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(self._url, timeout=10)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as e:
            raise ConfigError(f"cannot reach RabbitMQ at {mask_url(self._url)}: {e}") from e
        await self._link.start(self)
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self._concurrency)
        self._results = await channel.declare_exchange(
            m.RESULT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        cancels = await channel.declare_exchange(
            CANCEL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        cancel_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await cancel_queue.bind(cancels)
        await cancel_queue.consume(self._on_cancel, no_ack=True)
        # Whatever type the control plane (or the operator) created it with.
        work = await durable_queue(self._connection, channel, WORK_QUEUE)
        await work.consume(self._on_work)
        log.info(
            "SSH worker consuming %s at %s (concurrency %d)",
            WORK_QUEUE,
            mask_url(self._url),
            self._concurrency,
        )

    async def stop(self) -> None:
        """Kill runs in progress; their unacked work goes back to the queue."""
        await self._link.stop()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        self._results = None

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    # -- consuming -----------------------------------------------------------------------

    async def _on_work(self, message: AbstractIncomingMessage) -> None:
        try:
            hostname, target, envelope = parse_work(m.decode(message.body))
        except InvalidInput as e:
            log.warning("dropped a malformed SSH work message: %s", e)
            await message.reject(requeue=False)
            return
        run_id = envelope.run_id
        if run_id in self._pending:
            # The same run already executing here (a redelivery): its result acks the latest.
            self._pending[run_id] = message
            return
        self._pending[run_id] = message
        if run_id in self._canceled:
            await self.report(
                self._link._finished(
                    hostname, envelope, status="canceled", error="canceled before it started"
                )
            )
            return
        self._link.upsert_target(target)
        try:
            await self._link.send_command(hostname, envelope)
        except Exception:
            self._pending.pop(run_id, None)
            log.exception("SSH run %s on %s could not start", run_id, hostname)
            await message.nack(requeue=True)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            body = m.decode(message.body)
            run_id = str(body["run_id"])
            hostname = str(body.get("hostname") or "")
            task_id = str(body.get("task_id") or "")
            reason = str(body.get("reason") or "canceled")
        except (InvalidInput, KeyError) as e:
            log.warning("dropped a malformed SSH cancel: %s", e)
            return
        self._canceled[run_id] = None
        while len(self._canceled) > _REMEMBERED_CANCELS:
            self._canceled.popitem(last=False)
        with contextlib.suppress(NotConnected):
            await self._link.send_cancel(hostname, task_id, run_id, reason)

    # -- LinkEvents of the in-process link: reports go to the broker -----------------------

    def host_connecting(self, hello: AgentHello) -> asyncio.Future[None]:  # pragma: no cover
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def host_connected(self, hello: AgentHello) -> None:  # pragma: no cover
        pass

    async def host_disconnected(self, hostname: str, link: str) -> None:  # pragma: no cover
        pass

    # SSH hosts have no agent, so no enrollment: the worker's reports are the control plane's.
    def agent_refusal(
        self, hostname: str, public_key: str, groups: Iterable[str]
    ) -> str | None:  # pragma: no cover
        return None

    def agent_key(self, hostname: str) -> AgentKey | None:  # pragma: no cover
        return None

    def message_refused(self, link: str, reason: str) -> None:  # pragma: no cover
        log.warning("refused a message on %s: %s", link, reason)

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        body = report_body(report)
        if body is None or self._results is None:
            return done
        run_id = body["run_id"]
        final = isinstance(report, RunFinished)
        try:
            await self._results.publish(
                _message(body, run_id),
                routing_key=f"{m.RESULT_KEY_PREFIX}{report.hostname}",
                timeout=PUBLISH_TIMEOUT,
            )
        except _AMQP_FAILURES as e:
            log.warning("report of SSH run %s not published: %r", run_id, e)
            if final:
                message = self._pending.pop(run_id, None)
                if message is not None:
                    with contextlib.suppress(*_AMQP_FAILURES):
                        await message.nack(requeue=True)
            return done
        if final:
            message = self._pending.pop(run_id, None)
            if message is not None:
                try:
                    await message.ack()
                except _AMQP_FAILURES as e:
                    # The channel is gone: the broker redelivers; the duplicate is harmless.
                    log.info("ack of SSH run %s failed (%r); it may run again", run_id, e)
        return done
