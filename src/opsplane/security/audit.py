"""The audit trail's hash chain, without I/O: what a record holds, how it is hashed, and how a
whole trail is verified.

Every record carries ``prev_hash`` (the previous record's ``hash``; 64 zeros for the first)
and ``hash = sha256(prev_hash + canonical JSON of the record)``, where the record is every
field but the two hashes, keys sorted, separators ``,`` and ``:``, UTF-8, the time as ISO 8601
UTC with microseconds. Ids are consecutive from 1. So an edited record no longer matches its
hash, a deleted one leaves a gap in the ids and a broken link, and a record deleted from the
end is caught against the chain head (the last id and hash, kept in a row of its own).

The JSON export (``GET /api/v1/audit?format=jsonl``) is exactly these documents plus ``hash``
and ``prev_hash``, so anyone can verify an export with this module alone.

The head lives in the same database as the records, so whoever can write one can write the
other: a record chained on after the head, the end cut off with the head moved back, or a
whole new chain all look intact to the chain alone. Two checks reach further: records stored
past the head are reported (``past_head``), and signed checkpoints kept outside the database
(``security/checkpoints.py``) each vouch for one record's hash at one id, so a later trail
that lacks that record, or holds another one there, is caught.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
# Outcomes: the action happened; the caller was not allowed; the request was refused as
# invalid, conflicting or naming something unknown; the server failed.
OK, DENIED, REJECTED, FAILED = "ok", "denied", "rejected", "failed"
# Longer free text is cut so that a row always fits its columns on every database.
MAX_FIELD = 255
# A broadcast's record lists this many hosts and counts the rest.
MAX_LISTED_HOSTS = 100
HASHED_FIELDS = (
    "id",
    "at",
    "actor",
    "role",
    "source_ip",
    "action",
    "target",
    "targets",
    "outcome",
    "detail",
)


@dataclass(frozen=True)
class AuditEntry:
    """What happened, before it gets its place (id, time, hashes) in the chain."""

    actor: str
    role: str
    action: str
    source_ip: str | None = None
    target: str | None = None
    targets: dict[str, Any] | None = None
    outcome: str = OK
    detail: dict[str, Any] = field(default_factory=dict)


def format_time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def clip(value: str | None, limit: int = MAX_FIELD) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def document(entry: AuditEntry, record_id: int, at: datetime) -> dict[str, Any]:
    """The hashed fields of a record, as stored and exported."""
    return {
        "id": record_id,
        "at": format_time(at),
        "actor": clip(entry.actor) or "",
        "role": clip(entry.role, 16) or "",
        "source_ip": clip(entry.source_ip, 64),
        "action": clip(entry.action, 64) or "",
        "target": clip(entry.target),
        "targets": entry.targets,
        "outcome": clip(entry.outcome, 16) or "",
        "detail": entry.detail,
    }


def canonical(doc: Mapping[str, Any]) -> bytes:
    hashed = {key: doc.get(key) for key in HASHED_FIELDS}
    return json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(doc)).hexdigest()


def targets_summary(
    selector: Mapping[str, Any] | None, hosts: Iterable[str] | None = None
) -> dict[str, Any]:
    """Which targets a task asked for and which hosts that resolved to (the first
    ``MAX_LISTED_HOSTS`` of them; the runs table has them all)."""
    summary: dict[str, Any] = {"selector": dict(selector or {})}
    if hosts is not None:
        names = sorted(hosts)
        summary["count"] = len(names)
        summary["hosts"] = names[:MAX_LISTED_HOSTS]
    return summary


@dataclass(frozen=True)
class Anchor:
    """What a verified checkpoint vouches for: record ``id`` had ``hash`` at ``at``."""

    id: int
    hash: str
    at: str


@dataclass
class ChainReport:
    """The verdict on a trail: ``ok``, how many records were checked, the problems found (each
    naming the record ids), the first bad id, how many records lie past the head and how many
    checkpoints the trail was held to."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_id: int | None = None
    last_id: int = 0
    last_hash: str = GENESIS
    past_head: int = 0
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_id": self.first_bad_id,
            "problems": self.problems,
            "last_id": self.last_id,
            "last_hash": self.last_hash,
            "past_head": self.past_head,
            "checkpoints": self.checkpoints,
        }


class ChainVerifier:
    """Feed it every record in id order (documents with ``hash`` and ``prev_hash``), then
    ``finish`` with the chain head. Each problem is reported once, where it is: after a broken
    record the check continues from the record's stored hash, so one edit is one problem.

    ``anchors`` (verified checkpoints) must each find their record, with their hash: since
    every hash covers the one before, a matching record also proves that nothing before it
    changed."""

    def __init__(self, anchors: Iterable[Anchor] = ()) -> None:
        self.report = ChainReport()
        self._prev_hash = GENESIS
        self._prev_id = 0
        self._anchors: dict[int, list[Anchor]] = {}
        for anchor in anchors:
            self._anchors.setdefault(anchor.id, []).append(anchor)
            self.report.checkpoints += 1

    def _problem(self, record_id: int, text: str) -> None:
        if self.report.first_bad_id is None or record_id < self.report.first_bad_id:
            self.report.first_bad_id = record_id
        self.report.problems.append(text)

    def problem(self, record_id: int, text: str) -> None:
        """Report a problem found outside the chain (a checkpoint file's, say)."""
        self._problem(record_id, text)

    def feed(self, doc: Mapping[str, Any]) -> None:
        record_id = int(doc["id"])
        stored_hash = str(doc.get("hash") or "")
        prev_hash = str(doc.get("prev_hash") or "")
        if record_id != self._prev_id + 1:
            if record_id > self._prev_id + 1:
                missing = _records(self._prev_id + 1, record_id - 1)
                self._problem(self._prev_id + 1, f"{missing} missing: deleted")
            else:
                self._problem(record_id, f"record {record_id} out of order or repeated")
        elif prev_hash != self._prev_hash:
            before = f"record {self._prev_id}" if self._prev_id else "the start of the chain"
            self._problem(
                record_id,
                f"record {record_id} does not follow {before}: a record was replaced, or "
                f"{before} was edited and re-hashed",
            )
        if chain_hash(prev_hash, doc) != stored_hash:
            self._problem(
                record_id, f"record {record_id} was edited: it no longer matches its hash"
            )
        for anchor in self._anchors.pop(record_id, ()):
            if anchor.hash != stored_hash:
                self._problem(
                    record_id,
                    f"record {record_id} is not the one the checkpoint of {anchor.at} signed: "
                    f"the trail was rewritten up to record {record_id} (or the record replaced)",
                )
        self.report.checked += 1
        self._prev_id = record_id
        self._prev_hash = stored_hash
        self.report.last_id = record_id
        self.report.last_hash = stored_hash

    def finish(
        self, head_id: int | None, head_hash: str | None, past_head: Sequence[int] = ()
    ) -> ChainReport:
        """Compare the end of the trail with the chain head (None: no head to compare with),
        report ``past_head`` (ids of records stored beyond the head, which the chain head
        does not cover), and the checkpoints whose record never came."""
        if past_head:
            self.report.past_head = len(past_head)
            head = "" if head_id is None else f" (record {head_id})"
            self._problem(
                past_head[0],
                f"{_records(past_head[0], past_head[-1])} ({len(past_head)}) past the chain "
                f"head{head}: appended without moving the head, or the head was moved back",
            )
        for record_id, anchors in sorted(self._anchors.items()):
            for anchor in anchors:
                self._problem(
                    record_id,
                    f"record {record_id}, signed in the checkpoint of {anchor.at}, is missing: "
                    f"the chain ends at record {self._prev_id}, so records were removed from the "
                    "end (and the head moved back)",
                )
        self._anchors.clear()
        if head_id is not None and head_id > self._prev_id:
            missing = _records(self._prev_id + 1, head_id)
            self._problem(self._prev_id + 1, f"{missing} missing: deleted from the end")
        elif (
            head_id is not None
            and head_id == self._prev_id
            and head_hash is not None
            and head_hash != self._prev_hash
        ):
            self._problem(head_id, f"record {head_id} does not match the chain head: edited")
        return self.report


def verify_chain(
    docs: Iterable[Mapping[str, Any]],
    head_id: int | None = None,
    head_hash: str | None = None,
    *,
    anchors: Iterable[Anchor] = (),
    past_head: Sequence[int] = (),
) -> ChainReport:
    verifier = ChainVerifier(anchors)
    for doc in docs:
        verifier.feed(doc)
    return verifier.finish(head_id, head_hash, past_head)


def _records(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}-{last}"
