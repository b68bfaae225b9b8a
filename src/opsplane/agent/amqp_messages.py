"""What the agent's RabbitMQ link sends and accepts (docs/amqp.md), without the connection.

Going up, the daemon's ``pb`` messages become JSON bodies (the link signs and publishes them);
coming down, a command's JSON is checked — the control plane's signature (pinned key), the
replay window, the target, the run id not seen before — and becomes a ``pb.CommandMessage``,
or raises :class:`Refused` with one of :data:`REFUSAL_REASONS`. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format

from opsplane.agent.config import AgentConfig
from opsplane.agent.spool import check_run_id
from opsplane.domain.errors import InvalidInput
from opsplane.domain.ids import run_id_for
from opsplane.security.signing import verify
from opsplane.transport.amqp.messages import ALL_TARGET, group_target
from opsplane.transport.grpc import opsplane_pb2 as pb

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

logger = logging.getLogger(__name__)

UNSIGNED: Final = "unsigned"
BAD_SIGNATURE: Final = "bad_signature"
STALE: Final = "stale"
REPLAY: Final = "replay"
MALFORMED: Final = "malformed"
WRONG_TARGET: Final = "wrong_target"
REFUSAL_REASONS: Final = (UNSIGNED, BAD_SIGNATURE, STALE, REPLAY, MALFORMED, WRONG_TARGET)


# Attempts remembered for "started" messages (pb.Started has none); a run's entry goes with
# its result, this only bounds what runs without a result could leave behind.
_MAX_TRACKED_RUNS: Final = 10_000


class Refused(Exception):
    """A command that fails a check; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class AmqpMessages:
    """One agent's translation between the daemon's ``pb`` messages and docs/amqp.md JSON.

    It remembers each accepted command's attempt (``started`` messages carry none in ``pb``);
    ``already_seen`` is the daemon's spool, asked whether a run id was accepted before."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        control_plane_key: Ed25519PublicKey,
        public_key: str,
        already_seen: Callable[[str], bool],
        host_metrics: Callable[[], dict[str, float]],
    ) -> None:
        self._config = config
        self._name = config.name
        self._control_plane_key = control_plane_key
        self._public_key = public_key
        self._already_seen = already_seen
        self._host_metrics = host_metrics
        self._os = platform.platform()
        self._attempts: dict[str, int] = {}

    # -- up: daemon → broker ---------------------------------------------------------------

    def up(self, message: pb.CommandMessage, kind: str | None) -> tuple[dict[str, Any] | None, str]:
        """The JSON body (unsigned) for an outgoing pb message, and its run id."""
        name = self._name
        if kind == "command_result":
            r = message.command_result
            self._attempts.pop(r.run_id, None)
            body = {
                "type": "result",
                "task_id": r.task_id,
                "run_id": r.run_id,
                "attempt": r.attempt,
                "hostname": r.hostname or name,
                "status": r.status,
                "exit_code": r.exit_code if r.HasField("exit_code") else None,
                "stdout": r.stdout,
                "stderr": r.stderr,
                "truncated": r.truncated,
                "error": r.error,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "duration_ms": r.duration_ms,
                # When this message was sent (it is signed with it); finished_at is when
                # the run ended, which for a re-sent result may be long before.
                "timestamp": time.time(),
            }
            return body, r.run_id
        if kind == "started":
            s = message.started
            body = {
                "type": "started",
                "task_id": s.task_id,
                "run_id": s.run_id,
                "attempt": self._attempts.get(s.run_id, 1),
                "hostname": name,
                "started_at": s.started_at,
                "pid": s.pid,
                "timestamp": time.time(),
            }
            return body, s.run_id
        if kind == "output":
            o = message.output
            body = {
                "type": "output",
                "task_id": o.task_id,
                "run_id": o.run_id,
                "hostname": name,
                "stream": o.stream,
                "seq": o.seq,
                # The daemon cuts chunks between characters (agent/outbox.py): each one
                # decodes alone, the same when it is re-sent.
                "data": o.data.decode("utf-8", "replace"),
                "timestamp": time.time(),
            }
            return body, o.run_id
        if kind == "chunk_request":
            c = message.chunk_request
            body = {
                "type": "chunk_request",
                "task_id": c.task_id,
                "run_id": c.run_id,
                "hostname": name,
                "hashes": list(c.hashes),
                "timestamp": time.time(),
            }
            return body, c.run_id
        logger.debug("nothing to publish for a %s message on RabbitMQ", kind)
        return None, ""

    def heartbeat(self, hello: pb.Hello | None = None) -> dict[str, Any]:
        """The JSON body (unsigned) of a heartbeat; with ``hello``, the hello heartbeat."""
        config = self._config
        figures = self._host_metrics()
        body: dict[str, Any] = {
            "hostname": config.name,
            "status": "online",
            "timestamp": time.time(),
            "cpu_usage": figures.get("cpu_usage", 0.0),
            "memory_usage": figures.get("memory_usage", 0.0),
            "load": figures.get("load", 0.0),
            "disk_usage": figures.get("disk_usage", 0.0),
            "groups": list(config.groups),
            "labels": dict(config.labels),
            "version": config.version,
            "os": self._os,
            "public_key": self._public_key,
        }
        if hello is not None:
            body |= {
                "hello": True,
                "running_run_ids": list(hello.running_run_ids),
                "finished_run_ids": list(hello.finished_run_ids),
                "abandoned_run_ids": list(hello.abandoned_run_ids),
            }
        return body

    # -- down: broker → daemon -------------------------------------------------------------

    def down(self, body: bytes) -> pb.CommandMessage | None:
        """The pb message for a valid command or cancel; :class:`Refused` if it fails a check."""
        try:
            data = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise Refused(MALFORMED, f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Refused(MALFORMED, "not a JSON object")
        what = _describe_command(data)
        signature = data.get("sign")
        if not isinstance(signature, str) or not signature:
            raise Refused(UNSIGNED, f"{what} has no signature")
        if not verify(self._control_plane_key, data, "sign"):
            raise Refused(BAD_SIGNATURE, f"{what} is not signed by the pinned control plane key")
        timestamp = _number(data, "timestamp", what)
        skew = time.time() - timestamp
        if abs(skew) > self._config.replay_window:
            raise Refused(
                STALE,
                f"{what} is {abs(skew):.0f}s {'old' if skew > 0 else 'in the future'}; "
                f"the window is ±{self._config.replay_window:g}s",
            )
        kind = data.get("type", "command")
        if kind not in ("command", "cancel", "file_chunk"):
            raise Refused(MALFORMED, f"{what} has an unknown type {str(kind)[:40]!r}")
        self._check_target(data, what)
        run_id = self._own_run_id(data, what)
        task_id = _text(data, "task_id", what, default="")
        if kind == "cancel":
            reason = _text(data, "reason", what, default="")
            cancel = pb.Cancel(run_id=run_id, task_id=task_id, reason=reason)
            return pb.CommandMessage(cancel=cancel)
        if kind == "file_chunk":
            # Not a run of its own (no replay guard): the receiver keeps it only if asked for,
            # and only if its SHA-256 is the one the run's signed manifest names.
            try:
                data_bytes = base64.b64decode(_text(data, "data", what, default=""), validate=True)
            except (binascii.Error, ValueError):
                raise Refused(MALFORMED, f"{what}: data is not base64") from None
            chunk = pb.FileChunk(
                run_id=run_id,
                hash=_text(data, "hash", what),
                data=data_bytes,
                error=_text(data, "error", what, default=""),
            )
            return pb.CommandMessage(file_chunk=chunk)
        try:
            seen = self._already_seen(run_id)
        except InvalidInput:
            raise Refused(MALFORMED, f"{what} has an invalid run id") from None
        if seen:
            raise Refused(REPLAY, f"{what} was received before")
        timeout = _number(data, "timeout", what, default=0)
        if timeout >= 2**62:
            raise Refused(MALFORMED, f"{what}: timeout is out of range")
        content = pb.CommandContent(
            task_id=task_id,
            run_id=run_id,
            attempt=_integer(data, "attempt", what, default=1),
            command=_text(data, "command", what),
            timeout=math.ceil(timeout),
            env=_env(data, what),
            user=_text(data, "user", what, default=""),
            timestamp=timestamp,
            sign=signature,
            deliver_by=_number(data, "deliver_by", what, default=0),
        )
        manifest = data.get("manifest")
        if manifest is not None:
            try:
                content.manifest.CopyFrom(json_format.ParseDict(manifest, pb.FileManifest()))
            except (json_format.ParseError, TypeError, ValueError) as exc:
                raise Refused(MALFORMED, f"{what}: its manifest is malformed: {exc}") from None
        if len(self._attempts) >= _MAX_TRACKED_RUNS:
            self._attempts.clear()
        self._attempts[run_id] = content.attempt
        return pb.CommandMessage(command_content=content)

    def _check_target(self, data: Mapping[str, Any], what: str) -> None:
        """Refuse a command addressed (in its signed ``target``) to another host: one sent
        to a single host (``run_id``) names that host; a fan-out (no run id) names ``all``
        or a group of this host's. A captured command published into this host's queue is
        therefore refused, whatever its signature."""
        target = data.get("target")
        config = self._config
        if data.get("run_id") is not None:
            allowed = {config.name}
        else:
            allowed = {ALL_TARGET, *(group_target(g) for g in config.groups)}
        if not isinstance(target, str) or target not in allowed:
            shown = str(target)[:80] if target is not None else "nobody"
            raise Refused(WRONG_TARGET, f"{what} is addressed to {shown!r}, not to this host")

    def _own_run_id(self, data: Mapping[str, Any], what: str) -> str:
        """This host's run id: ``run_id`` (unicast), else derived from the task id, this
        host's name and the attempt (a group or broadcast message carries no per-host map)."""
        run_id = data.get("run_id")
        if run_id is None:
            task_id = _text(data, "task_id", what)
            if not task_id:
                raise Refused(MALFORMED, f"{what} has neither run_id nor task_id")
            attempt = _integer(data, "attempt", what, default=1)
            run_id = run_id_for(task_id, self._config.name, attempt)
        if not isinstance(run_id, str):
            raise Refused(MALFORMED, f"{what} has a run id that is not a string")
        try:
            check_run_id(run_id)
        except InvalidInput:
            raise Refused(MALFORMED, f"{what} has an invalid run id {run_id[:80]!r}") from None
        return run_id


def _describe_command(data: Mapping[str, Any]) -> str:
    """How a (maybe hostile) command is named in a log line: its ids, short, never its text."""
    parts = [str(data.get("type", "command"))[:20]]
    for key in ("task_id", "run_id"):
        value = data.get(key)
        if value is not None:
            parts.append(f"{key}={str(value)[:80]!r}")
    return " ".join(parts)


def _text(data: Mapping[str, Any], key: str, what: str, *, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise Refused(MALFORMED, f"{what}: {key} must be a string")
    return value


def _number(data: Mapping[str, Any], key: str, what: str, *, default: float | None = None) -> float:
    value = data.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise Refused(MALFORMED, f"{what}: {key} must be a non-negative number")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, what: str, *, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise Refused(MALFORMED, f"{what}: {key} must be a non-negative integer")
    return value


def _env(data: Mapping[str, Any], what: str) -> dict[str, str]:
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise Refused(MALFORMED, f"{what}: env must map strings to strings")
    return env
