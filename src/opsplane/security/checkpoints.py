"""Signed checkpoints of the audit trail's head, kept outside the database (issue 14, hole 5).

The chain head lives next to the records, so someone who can write the database can append a
correctly chained record, cut the end off and move the head back, or write a whole new chain,
and the chain alone still verifies. A checkpoint is the head at one moment — record ``id`` had
``hash`` — signed with the control plane's Ed25519 key (``opsplane keys init``, the key that
signs commands), and appended as one JSON line to a file (and POSTed to webhooks) that the
database's users cannot reach. ``opsplane audit verify --checkpoint FILE`` holds the trail to
every checkpoint: the record must be there with the same hash, and since each hash covers the
one before, nothing before it can have changed.

A line: ``{"type": "opsplane.audit.checkpoint", "v": 1, "id": 42, "hash": "…", "at":
"2026-12-03T10:00:00.000000+00:00", "key": "<public key, base64>", "signature": "<base64>"}``;
the signature covers the canonical JSON of every other field (DESIGN §3.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opsplane.security.audit import Anchor, format_time
from opsplane.security.signing import parse_public_key, public_key_text, sign, verify

log = logging.getLogger(__name__)

CHECKPOINT_TYPE: Final = "opsplane.audit.checkpoint"
CHECKPOINT_VERSION: Final = 1
# How long the checkpoint taken at stop may take.
_STOP_LIMIT: Final = 5.0
# Enough to find the last line of the file without reading all of it.
_TAIL_BYTES: Final = 8192

Head = Callable[[], Awaitable[tuple[int, str]]]


def make_checkpoint(
    key: Ed25519PrivateKey, head_id: int, head_hash: str, at: datetime
) -> dict[str, Any]:
    """The signed checkpoint of the head ``(head_id, head_hash)`` taken at ``at``."""
    doc: dict[str, Any] = {
        "type": CHECKPOINT_TYPE,
        "v": CHECKPOINT_VERSION,
        "id": head_id,
        "hash": head_hash,
        "at": format_time(at),
        "key": public_key_text(key.public_key()),
    }
    doc["signature"] = sign(key, doc)
    return doc


@dataclass
class CheckpointFile:
    """The checkpoints of a file that verify, the problems of those that do not, and the key
    their signatures were checked with."""

    anchors: list[Anchor] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    key: str | None = None
    key_from_file: bool = False


def read_checkpoints(
    lines: Iterable[str], key: Ed25519PublicKey | None, *, source: str = "checkpoint file"
) -> CheckpointFile:
    """Check every checkpoint line against ``key``. Without a key, the key the first
    checkpoint carries is used (``key_from_file``): that proves the lines were not edited one
    by one, not who wrote them — pin the control plane's public key to prove that."""
    result = CheckpointFile()
    pinned = key
    if key is not None:
        result.key = public_key_text(key)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            doc = json.loads(line)
        except ValueError:
            result.problems.append(f"{where} is not JSON")
            continue
        if not isinstance(doc, dict) or doc.get("type") != CHECKPOINT_TYPE:
            result.problems.append(f"{where} is not an audit checkpoint")
            continue
        record_id, digest, at = doc.get("id"), doc.get("hash"), doc.get("at")
        if not isinstance(record_id, int) or not isinstance(digest, str) or not isinstance(at, str):
            result.problems.append(f"{where}: a checkpoint needs an integer id, a hash and a time")
            continue
        if pinned is None:
            try:
                pinned = parse_public_key(str(doc.get("key") or ""))
            except ValueError:
                result.problems.append(f"{where} carries no usable public key")
                continue
            result.key = public_key_text(pinned)
            result.key_from_file = True
        if doc.get("key") != result.key:
            result.problems.append(
                f"{where} (record {record_id}, {at}) was signed by another key: {doc.get('key')}"
            )
            continue
        if not verify(pinned, doc, "signature"):
            result.problems.append(
                f"{where} (record {record_id}, {at}): bad signature, the checkpoint was edited"
            )
            continue
        result.anchors.append(Anchor(record_id, digest, at))
    return result


def load_checkpoints(path: Path, key: Ed25519PublicKey | None) -> CheckpointFile:
    """:func:`read_checkpoints` of a file; OSError if it cannot be read."""
    with path.open(encoding="utf-8") as lines:
        return read_checkpoints(lines, key, source=str(path))


def _last_line(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except FileNotFoundError:
        return None
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].decode("utf-8", "replace") if lines else None


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


class CheckpointWriter:
    """Takes a checkpoint of the audit head every ``interval`` seconds while the head moves,
    at start and at stop: appends it to ``path`` (one line, fsynced) and POSTs it to every
    webhook. A webhook that fails gets the newest checkpoint at the next round (a checkpoint
    vouches for everything before it, so the newest one is all a sink needs); failures are
    logged and counted in ``failures``, never silent.

    It also notices a head that went back behind the last checkpoint it wrote, and says so
    in the log at once, rather than waiting for someone to run ``verify``.
    """

    def __init__(
        self,
        head: Head,
        key: Ed25519PrivateKey,
        path: Path,
        *,
        interval: float,
        webhooks: Sequence[str] = (),
        clock: Callable[[], datetime],
        timeout: float = 10.0,
    ) -> None:
        self._head = head
        self._key = key
        self.path = path
        self._interval = interval
        self._webhooks = tuple(webhooks)
        self._clock = clock
        self._timeout = timeout
        self._last: tuple[int, str] | None = None
        self._undelivered: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self.failures = 0

    async def start(self) -> None:
        if self._interval <= 0 or self._task is not None:
            return
        line = await asyncio.to_thread(_last_line, self.path)
        if line is not None:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                doc = json.loads(line)
                self._last = (int(doc["id"]), str(doc["hash"]))
        if self._webhooks:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        self._task = asyncio.create_task(self._loop(), name="audit-checkpoints")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        # The last word: what was appended since the last round is anchored too (bounded:
        # a database that went away must not hold the shutdown).
        try:
            await asyncio.wait_for(self.checkpoint(), _STOP_LIMIT)
        except Exception as e:
            log.warning("no audit checkpoint at stop: %s", e or type(e).__name__)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def checkpoint(self) -> dict[str, Any] | None:
        """Write a checkpoint if the head moved since the last one; return it (None: none
        written). Deliver what the webhooks still lack either way."""
        async with self._lock:
            head_id, head_hash = await self._head()
            written = None
            if head_id > 0 and (head_id, head_hash) != self._last:
                self._warn_if_behind(head_id, head_hash)
                written = make_checkpoint(self._key, head_id, head_hash, self._clock())
                line = json.dumps(written, separators=(",", ":"), ensure_ascii=False) + "\n"
                await asyncio.to_thread(_append_line, self.path, line)
                self._last = (head_id, head_hash)
                for url in self._webhooks:
                    self._undelivered[url] = written
            await self._deliver()
            return written

    def _warn_if_behind(self, head_id: int, head_hash: str) -> None:
        if self._last is None:
            return
        last_id, last_hash = self._last
        if head_id < last_id or (head_id == last_id and head_hash != last_hash):
            log.error(
                "the audit trail's head (record %d) is behind or differs from the last "
                "checkpoint in %s (record %d): records were removed or rewritten; run "
                "`opsplane audit verify --checkpoint %s`",
                head_id, self.path, last_id, self.path,
            )  # fmt: skip

    async def _deliver(self) -> None:
        if self._client is None:
            return
        for url, doc in list(self._undelivered.items()):
            try:
                response = await self._client.post(url, json=doc)
                response.raise_for_status()
            except httpx.HTTPError as e:
                self.failures += 1
                log.error(
                    "audit checkpoint of record %s not delivered to %s (%s); retrying with "
                    "the next round", doc["id"], _safe_url(url), type(e).__name__,
                )  # fmt: skip
                continue
            if self._undelivered.get(url) is doc:
                del self._undelivered[url]

    async def _loop(self) -> None:
        while True:
            try:
                await self.checkpoint()
            except Exception:
                # A database that does not answer now may answer at the next round.
                log.exception("audit checkpoint failed; retrying in %.0fs", self._interval)
            await asyncio.sleep(self._interval)
