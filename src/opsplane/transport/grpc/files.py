"""Uploads over the gRPC stream (docs/filepush.md): the manifest that goes in a command, and
the chunks agents then ask for, read from disk one at a time as asked."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

from opsplane.transport.base import UploadSpec
from opsplane.transport.filepush import Manifest, Manifests, build_manifest
from opsplane.transport.grpc import opsplane_pb2 as pb

log = logging.getLogger(__name__)

# Chunks kept after a read for the other hosts of the task (1 MiB each).
RECENT = 8
# Chunks being read or written at once, all agents together: each agent's window bounds its
# own share, this bounds the control plane's whatever the fleet (each write holds a copy).
SERVING = 32
# A write that has not gone out in this long (an agent that stopped reading) gives its slot
# back and goes on alone: such an agent holds at most its window, never the others' slots.
SLOT_HOLD = 5.0

Write = Callable[[pb.CommandMessage], Awaitable[None]]


class ChunkServer:
    def __init__(self, *, serving: int = SERVING, slot_hold: float = SLOT_HOLD) -> None:
        self._manifests = Manifests()
        # One hashing of a task's files, however many hosts ask at once.
        self._building: dict[tuple[str, str, str], asyncio.Future[Manifest]] = {}
        # Chunks sent, all runs together (tests and the bench read it).
        self.chunks_served = 0
        # The last chunks read, by hash: a task's hosts ask for the same chunks at about the
        # same time, so one read (and one SHA-256 check) serves many. Bounded: RECENT MiB.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._slots = asyncio.Semaphore(serving)
        self._slot_hold = slot_hold
        self._slow_writes: set[asyncio.Future[None]] = set()

    async def manifest_for(
        self, task_id: str, run_id: str, hostname: str, spec: UploadSpec
    ) -> Manifest:
        key = (task_id, spec.local_path, spec.remote_path)
        manifest = self._manifests.cached(*key)
        if manifest is None:
            building = self._building.get(key)
            if building is None:
                building = self._building[key] = asyncio.ensure_future(
                    asyncio.to_thread(build_manifest, Path(spec.local_path), spec.remote_path)
                )
            try:
                manifest = await asyncio.shield(building)
            finally:
                if building.done():
                    self._building.pop(key, None)
            self._manifests.remember(*key, manifest)
        self._manifests.sent(run_id, hostname, manifest)
        return manifest

    def also_sent(self, run_id: str, hostname: str, manifest: Manifest) -> None:
        """``manifest`` went to ``hostname``'s run too (a fan-out: one message, many runs)."""
        self._manifests.sent(run_id, hostname, manifest)

    def finished(self, run_id: str) -> None:
        self._manifests.finished(run_id)

    async def read_for_run(self, run_id: str, hostname: str, digest: str) -> bytes:
        """The chunk ``digest`` of the upload sent to ``hostname``'s run; KeyError if that
        run got no upload or its manifest names no such chunk (OSError, ValueError: the
        source is unreadable or changed)."""
        manifest = self._manifests.for_run(run_id, hostname)
        if manifest is None:
            raise KeyError("no upload of this run was sent to this host")
        async with self._slots:
            return await self._read(manifest, digest)

    async def _read(self, manifest: Manifest, digest: str) -> bytes:
        data = self._recent.get(digest)
        if data is not None and digest in manifest.locations:
            self._recent.move_to_end(digest)
            return data
        data = await asyncio.to_thread(manifest.read_chunk, digest)
        self._recent[digest] = data
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return data

    async def serve(self, hostname: str, request: pb.ChunkRequest, write: Write) -> None:
        """Answer one agent's request, a chunk at a time: the stream's flow control holds the
        next read until the last chunk is taken, and at most ``SERVING`` chunks are in hand
        at once across all agents."""
        manifest = self._manifests.for_run(request.run_id, hostname)
        for digest in request.hashes:
            async with self._slots:
                await self._serve_one(hostname, request.run_id, manifest, digest, write)

    async def _serve_one(
        self, hostname: str, run_id: str, manifest: Manifest | None, digest: str, write: Write
    ) -> None:
        chunk = pb.FileChunk(run_id=run_id, hash=digest)
        if manifest is None:
            chunk.error = "no upload of this run was sent to this host"
        else:
            try:
                chunk.data = await self._read(manifest, digest)
            except KeyError:
                chunk.error = "the manifest names no such chunk"
            except (OSError, ValueError) as e:
                chunk.error = str(e)
        if chunk.error:
            log.warning("chunk %s for %s not served: %s", digest[:12], hostname, chunk.error)
        sending = asyncio.ensure_future(write(pb.CommandMessage(file_chunk=chunk)))
        done, _ = await asyncio.wait({sending}, timeout=self._slot_hold)
        if done:
            sending.result()  # a broken stream is the caller's to see
            self.chunks_served += 1
            return
        log.info("a chunk write to %s is slow; its slot goes to others", hostname)
        self._slow_writes.add(sending)
        sending.add_done_callback(self._slow_write_done)

    def _slow_write_done(self, sending: asyncio.Future[None]) -> None:
        self._slow_writes.discard(sending)
        if not sending.cancelled() and sending.exception() is None:
            self.chunks_served += 1
