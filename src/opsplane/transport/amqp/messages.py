"""JSON messages of the RabbitMQ link ⇄ link-level dataclasses. Pure: no I/O."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from opsplane.domain.errors import InvalidInput
from opsplane.domain.targeting import check_host_name
from opsplane.transport.base import (
    AgentHello,
    CommandEnvelope,
    HeartbeatReport,
    HostReport,
    RunFinished,
    RunOutput,
    RunStarted,
    Stream,
    check_report,
    timestamp,
)

LINK_NAME = "amqp"
CMD_EXCHANGE = "sys_cmd_exchange"
RESULT_EXCHANGE = "sys_result_exchange"
MONITOR_EXCHANGE = "sys_monitor_exchange"
RESULT_QUEUE = "cmd.result"
HEARTBEAT_QUEUE = "monitor.heartbeat"
RESULT_BINDING = "result.#"
HEARTBEAT_KEY = "heartbeat"
RESULT_KEY_PREFIX = "result.node."
# A result or heartbeat body larger than this is refused unread (a result carries the head and
# tail of each stream, 64 KiB each by default).
MAX_BODY_BYTES = 16 * 1024 * 1024
# A hello reconciles only runs dispatched at least this long before it arrived: later ones may
# still sit in the agent's queue (a queue gives no ordering against the monitor exchange).
RECONCILE_MARGIN = timedelta(seconds=5)


def node_key(hostname: str) -> str:
    return f"cmd.node.{hostname}"


def group_key(group: str) -> str:
    return f"cmd.group.{group}"


BROADCAST_KEY = "cmd.all"

# Whom a command is addressed to, inside its signed body: a host's name (unicast, with
# ``run_id``), or ``group:<name>`` / ``all`` (fan-out, without a run id: each receiving host
# derives its own from task id, its name and the attempt, domain/ids.py ``run_id_for``). An
# agent refuses a command not addressed to it, so a captured command cannot be replayed into
# another host's queue. The body of a fan-out does not grow with the number of its targets.
ALL_TARGET = "all"
GROUP_TARGET_PREFIX = "group:"


def group_target(group: str) -> str:
    return GROUP_TARGET_PREFIX + group


def command_body(
    envelope: CommandEnvelope,
    now: float,
    *,
    target: str,
    fanout: bool = False,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A command as published; unicast carries ``run_id``, fan-out none, both the ``target``
    they are addressed to. ``user`` is the account to run as (seed 002), ``submitted_by`` the
    API caller."""
    body: dict[str, Any] = {
        "type": "command",
        "target": target,
        "task_id": envelope.task_id,
        "attempt": envelope.attempt,
        "command": envelope.command,
        "timeout": envelope.timeout,
        "user": envelope.user,
        "submitted_by": envelope.submitted_by,
        "env": dict(envelope.env),
        "timestamp": now,
        "deliver_by": envelope.deliver_by or 0,
    }
    if not fanout:
        body["run_id"] = envelope.run_id
    if manifest is not None:
        # An upload: what to write, every chunk's SHA-256 (docs/filepush.md); signed with
        # the rest of the body.
        body["manifest"] = dict(manifest)
    return body


def chunk_body(
    task_id: str,
    run_id: str | None,
    digest: str,
    data: bytes,
    error: str,
    now: float,
    *,
    target: str,
) -> dict[str, Any]:
    """One chunk of an upload: for the host that asked for it (``cmd.node.{host}``, with its
    ``run_id``), or for the hosts of a fan-out upload (no run id: each derives its own)."""
    body: dict[str, Any] = {
        "type": "file_chunk",
        "target": target,
        "task_id": task_id,
        "hash": digest,
        "data": base64.b64encode(data).decode("ascii"),
        "error": error,
        "timestamp": now,
    }
    if run_id is not None:
        body["run_id"] = run_id
    return body


def cancel_body(
    task_id: str, run_id: str, reason: str, now: float, *, target: str | None = None
) -> dict[str, Any]:
    """A cancel; ``target`` (the host) for those an agent receives and checks."""
    body: dict[str, Any] = {
        "type": "cancel",
        "task_id": task_id,
        "run_id": run_id,
        "reason": reason,
        "timestamp": now,
    }
    if target is not None:
        body["target"] = target
    return body


def decode(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidInput(f"a message of {len(body)} bytes, more than {MAX_BODY_BYTES}")
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"not JSON: {e}") from e
    if not isinstance(message, dict):
        raise InvalidInput("not a JSON object")
    return message


def _text(message: Mapping[str, Any], key: str, default: str = "") -> str:
    value = message.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"{key} must be a string")
    return value


def _number(message: Mapping[str, Any], key: str) -> float | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{key} must be a number")
    return float(value)


def _int(message: Mapping[str, Any], key: str) -> int | None:
    value = _number(message, key)
    return None if value is None else int(value)


def _time(message: Mapping[str, Any], key: str) -> datetime | None:
    value = _number(message, key)
    return timestamp(value) if value is not None else None


def _names(message: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = message.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{key} must be a list of strings")
    return tuple(value)


def hostname_of(message: Mapping[str, Any], routing_key: str) -> str:
    """The reporting host: the message's ``hostname``, else the routing key's node part."""
    name = _text(message, "hostname")
    if not name and routing_key.startswith(RESULT_KEY_PREFIX):
        name = routing_key[len(RESULT_KEY_PREFIX) :]
    if not name:
        raise InvalidInput("no hostname in the message or its routing key")
    return check_host_name(name)


def result_report(message: Mapping[str, Any], routing_key: str) -> HostReport:
    """A message from ``sys_result_exchange`` as a report. No ``type`` means a final result."""
    host = hostname_of(message, routing_key)
    kind = _text(message, "type", "result")
    run_id = _text(message, "run_id") or None
    task_id = _text(message, "task_id") or None
    if run_id is None and task_id is None:
        raise InvalidInput("a result needs run_id or task_id")
    attempt = _int(message, "attempt")
    if kind == "started":
        started = _time(message, "started_at") or datetime.now(UTC)
        return check_report(RunStarted(host, run_id, started, task_id=task_id, attempt=attempt))
    if kind == "output":
        stream: Stream = _text(message, "stream", "stdout") or "stdout"  # type: ignore[assignment]
        data = _text(message, "data").encode()
        seq = _int(message, "seq") or 0
        output = RunOutput(host, run_id, stream, seq, data, task_id=task_id, attempt=attempt)
        return check_report(output)
    if kind != "result":
        raise InvalidInput(f"unknown result type {kind!r}")
    exit_code = _int(message, "exit_code")
    status = _text(message, "status")
    if not status:
        status = "succeeded" if exit_code == 0 else "failed"
    error = _text(message, "error") or (None if status == "succeeded" else f"exit code {exit_code}")
    truncated = message.get("truncated") or False
    if not isinstance(truncated, bool):
        raise InvalidInput("truncated must be true or false")
    result = RunFinished(
        hostname=host,
        run_id=run_id,
        status=status,
        exit_code=exit_code,
        stdout=_text(message, "stdout"),
        stderr=_text(message, "stderr"),
        truncated=truncated,
        error=error,
        started_at=_time(message, "started_at"),
        finished_at=_time(message, "finished_at") or datetime.now(UTC),
        duration_ms=_int(message, "duration_ms"),
        task_id=task_id,
        attempt=attempt,
    )
    return check_report(result)


def seed_shaped(message: Mapping[str, Any]) -> bool:
    """Whether a heartbeat is in seed 002's own shape: without the ``version`` every opsplane
    agent sends. Such an agent's ``cpu_usage`` and ``memory_usage`` are fractions of 1."""
    return "version" not in message


def says_offline(message: Mapping[str, Any]) -> bool:
    """Whether a heartbeat says the host is going away (``"status": "offline"``)."""
    return message.get("status") == "offline"


def _usage(message: Mapping[str, Any], key: str, *, fraction: bool) -> float | None:
    """A usage figure as a percentage. A seed-shaped heartbeat's fractions (0.5) become
    percentages (50.0); a value above 1 in one is taken as a percentage already."""
    value = _number(message, key)
    if value is not None and fraction and 0 <= value <= 1:
        return value * 100
    return value


def heartbeat_report(message: Mapping[str, Any]) -> HeartbeatReport:
    fraction = seed_shaped(message)
    report = HeartbeatReport(
        hostname=hostname_of(message, ""),
        # The control plane's clock decides liveness; an agent's clock may be off.
        at=datetime.now(UTC),
        cpu_usage=_usage(message, "cpu_usage", fraction=fraction),
        memory_usage=_usage(message, "memory_usage", fraction=fraction),
        load=_number(message, "load"),
        disk_usage=_usage(message, "disk_usage", fraction=fraction),
    )
    return check_report(report)


def heartbeat_hello(message: Mapping[str, Any], now: datetime) -> AgentHello:
    """Registration from a heartbeat; with ``hello: true`` it also reconciles runs."""
    labels = message.get("labels") or {}
    if not isinstance(labels, dict):
        raise InvalidInput("labels must be an object")
    is_hello = message.get("hello") is True
    return AgentHello(
        hostname=hostname_of(message, ""),
        link=LINK_NAME,
        version=_text(message, "version"),
        groups=_names(message, "groups"),
        labels={str(k): str(v) for k, v in labels.items()},
        # Without ``groups`` (seed 002's heartbeat) the inventory's groups and labels stay.
        reports_groups="groups" in message,
        os=_text(message, "os"),
        running_run_ids=frozenset(_names(message, "running_run_ids")),
        finished_run_ids=frozenset(_names(message, "finished_run_ids")),
        abandoned_run_ids=frozenset(_names(message, "abandoned_run_ids")),
        public_key=_text(message, "public_key"),
        reconcile=is_hello,
        reconcile_before=now - RECONCILE_MARGIN,
    )
