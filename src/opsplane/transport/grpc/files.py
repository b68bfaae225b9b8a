"""Uploads over the gRPC stream (docs/filepush.md): the manifest that goes in a command, and
the chunks agents then ask for, read from disk one at a time as asked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from opsplane.transport.base import UploadSpec
from opsplane.transport.filepush import Manifest, Manifests, build_manifest
from opsplane.transport.grpc import opsplane_pb2 as pb

log = logging.getLogger(__name__)

Write = Callable[[pb.CommandMessage], Awaitable[None]]


class ChunkServer:
    def __init__(self) -> None:
        self._manifests = Manifests()
        # One hashing of a task's files, however many hosts ask at once.
        self._building: dict[tuple[str, str, str], asyncio.Future[Manifest]] = {}
        # Chunks sent, all runs together (tests and the bench read it).
        self.chunks_served = 0

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

    def finished(self, run_id: str) -> None:
        self._manifests.finished(run_id)

    async def serve(self, hostname: str, request: pb.ChunkRequest, write: Write) -> None:
        """Answer one agent's request, a chunk at a time: the stream's flow control holds the
        next read until the last chunk is taken, so memory stays at one chunk per request."""
        manifest = self._manifests.for_run(request.run_id, hostname)
        for digest in request.hashes:
            chunk = pb.FileChunk(run_id=request.run_id, hash=digest)
            if manifest is None:
                chunk.error = "no upload of this run was sent to this host"
            else:
                try:
                    chunk.data = await asyncio.to_thread(manifest.read_chunk, digest)
                except KeyError:
                    chunk.error = "the manifest names no such chunk"
                except (OSError, ValueError) as e:
                    chunk.error = str(e)
            if chunk.error:
                log.warning("chunk %s for %s not served: %s", digest[:12], hostname, chunk.error)
            await write(pb.CommandMessage(file_chunk=chunk))
            self.chunks_served += 1
