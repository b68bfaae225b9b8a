"""Protobuf messages ⇄ link-level dataclasses, in one place."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.message import Message

from opsplane.transport.base import (
    AgentHello,
    CommandEnvelope,
    HeartbeatReport,
    RunFinished,
    RunOutput,
    RunStarted,
    Stream,
    check_report,
    timestamp,
)
from opsplane.transport.grpc import opsplane_pb2 as pb

if TYPE_CHECKING:
    # Not at run time: the agent imports this module, and must not load SSH's code.
    from opsplane.transport.filepush import Manifest

LINK_NAME = "grpc"
# The server opens each stream with a fresh nonce under this initial-metadata key; the hello's
# signature covers it (``hello_claims``), so a captured hello cannot open another stream.
CHALLENGE_KEY = "opsplane-challenge"


def _time(seconds: float) -> datetime | None:
    return timestamp(seconds)


def _now_if_missing(seconds: float) -> datetime:
    return _time(seconds) or datetime.now(UTC)


def signed_fields(message: Message) -> dict[str, Any]:
    """What the signature of a command, result or heartbeat covers on gRPC: the message as
    JSON (protobuf's own mapping, field names as in the .proto), less its signature field;
    signed as DESIGN §3.3's canonical JSON."""
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return {key: value for key, value in fields.items() if key not in ("sign", "signature")}


# A hello's feature: the agent checks commands signed once for a batch (``command_claims``);
# agents without it get commands signed for them alone.
BATCH_SIGNED = "batch-signed-commands"

# A command signed once for a batch (``run_root`` set) leaves these out of what its signature
# covers: they differ per host, and the tree proves them (security/signing_tree.py).
BOUND_FIELDS = ("run_id", "target", "run_index", "run_path")


def command_claims(content: pb.CommandContent) -> dict[str, Any]:
    """What the control plane's signature of a command covers: every field (``signed_fields``)
    or, for a command signed once for a batch (``run_root`` set), every field but the per-host
    ones, which the signed root binds instead. A command without a root and with a path still
    covers the path, so it fails: nothing unsigned rides along."""
    fields = signed_fields(content)
    if content.run_root:
        for key in BOUND_FIELDS:
            fields.pop(key, None)
    return fields


def hello_claims(message: pb.Hello) -> dict[str, Any]:
    """What a hello's signature covers: who the agent says it is, with which key and groups,
    when, and the nonce the server sent on this stream (``challenge``): a hello captured on
    one stream answers no other. Signed by the agent, checked by the server."""
    return {
        "hostname": message.hostname,
        "public_key": message.public_key,
        "groups": sorted(message.groups),
        "timestamp": message.timestamp,
        "challenge": message.challenge,
    }


def hello_from_pb(message: pb.Hello) -> AgentHello:
    return AgentHello(
        hostname=message.hostname,
        link=LINK_NAME,
        version=message.version,
        groups=tuple(message.groups),
        labels=dict(message.labels),
        os=message.os,
        running_run_ids=frozenset(message.running_run_ids),
        finished_run_ids=frozenset(message.finished_run_ids),
        abandoned_run_ids=frozenset(message.abandoned_run_ids),
        public_key=message.public_key,
    )


# The report conversions raise InvalidInput for what the engine cannot take (check_report).


def heartbeat_from_pb(hostname: str, message: pb.Heartbeat) -> HeartbeatReport:
    report = HeartbeatReport(
        hostname=hostname,
        # The control plane's clock decides liveness; an agent's clock may be off.
        at=datetime.now(UTC),
        cpu_usage=message.cpu_usage,
        memory_usage=message.memory_usage,
        load=message.load,
        disk_usage=message.disk_usage,
    )
    return check_report(report)


def started_from_pb(hostname: str, message: pb.Started) -> RunStarted:
    report = RunStarted(
        hostname=hostname,
        run_id=message.run_id or None,
        started_at=_now_if_missing(message.started_at),
    )
    return check_report(report)


def output_from_pb(hostname: str, message: pb.OutputChunk) -> RunOutput:
    # An empty stream name is the proto default: stdout. Any other name is not ours.
    stream: Stream = message.stream or "stdout"  # type: ignore[assignment]
    report = RunOutput(
        hostname=hostname,
        run_id=message.run_id or None,
        stream=stream,
        seq=message.seq,
        data=message.data,
    )
    return check_report(report)


def result_from_pb(hostname: str, message: pb.CommandResult) -> RunFinished:
    report = RunFinished(
        hostname=hostname,
        run_id=message.run_id,
        status=message.status,
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        stdout=message.stdout,
        stderr=message.stderr,
        truncated=message.truncated,
        error=message.error or None,
        started_at=_time(message.started_at),
        finished_at=_now_if_missing(message.finished_at),
        duration_ms=message.duration_ms or None,
    )
    return check_report(report)


def command_to_pb(
    envelope: CommandEnvelope, now: float, target: str, manifest: Manifest | None = None
) -> pb.CommandMessage:
    """A command for host ``target``. The target is part of what the control plane signs, so
    a command captured on its way to one host is refused by every other (DESIGN §3.3); so is
    an upload's manifest, with every chunk's hash."""
    message = pb.CommandMessage(
        command_content=pb.CommandContent(
            task_id=envelope.task_id,
            run_id=envelope.run_id,
            attempt=envelope.attempt,
            command=envelope.command,
            timeout=envelope.timeout,
            env=dict(envelope.env),
            user=envelope.user,
            timestamp=now,
            deliver_by=envelope.deliver_by or 0.0,
            target=target,
        )
    )
    if manifest is not None:
        message.command_content.manifest.CopyFrom(manifest_to_pb(manifest))
        if envelope.upload is not None:
            # Per task, not per manifest (the manifest is the files'): signed all the same.
            message.command_content.manifest.owner = envelope.upload.owner or ""
            message.command_content.manifest.group = envelope.upload.group or ""
    return message


def manifest_to_pb(manifest: Manifest) -> pb.FileManifest:
    """An upload's manifest as it travels inside the (signed) command (docs/filepush.md)."""
    return pb.FileManifest(
        root=manifest.root,
        single_file=manifest.single_file,
        files=[
            pb.ManifestFile(
                path=f.path, size=f.size, mode=f.mode, sha256=f.sha256, chunks=list(f.chunks)
            )
            for f in manifest.files
        ],
        directories=list(manifest.directories),
        chunk_size=manifest.chunk_size,
        total_bytes=manifest.total_bytes,
        problems=list(manifest.problems),
    )
