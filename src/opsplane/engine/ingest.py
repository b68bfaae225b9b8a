"""Result ingest: reports from hosts are queued and written in batches, one transaction per
batch (seed 001), then archived and published. A report's future completes once it is durable,
so a link acknowledges a result to its host only after the database has it."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from opsplane.domain.states import RunStatus
from opsplane.engine.archive import LogArchive
from opsplane.engine.changes import Changes
from opsplane.store import queries
from opsplane.store.tables import HeartbeatRow, RunRow
from opsplane.transport.base import HeartbeatReport, HostReport, RunFinished, RunOutput, RunStarted

log = logging.getLogger(__name__)

WriteContext = Callable[[], AbstractAsyncContextManager[Changes]]
_Item = tuple[HostReport, asyncio.Future[None]]


class Ingest:
    def __init__(
        self,
        write: WriteContext,
        archive: LogArchive,
        *,
        batch_size: int,
        linger: float,
        history_every: timedelta = timedelta(seconds=60),
        retry_for: float = 30.0,
    ) -> None:
        self._write = write
        self._archive = archive
        self._batch_size = batch_size
        self._linger = linger
        self._history_every = history_every
        self._retry_for = retry_for
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=batch_size * 20)
        self._task: asyncio.Task[None] | None = None
        self._decoders: dict[tuple[str, str], codecs.IncrementalDecoder] = {}
        self._last_history: dict[str, datetime] = {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ingest")

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Write what is queued (bounded by ``drain_seconds``), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_seconds)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((report, future))
        return future

    async def _loop(self) -> None:
        # Group commit: a batch is whatever queued up while the previous one was being written,
        # so one lone report is written at once and a flood is written in large transactions.
        # ``linger`` optionally waits a little longer for company.
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if self._linger > 0:
                deadline = loop.time() + self._linger
                while len(batch) < self._batch_size and (remaining := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._flush_with_retry(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _flush_with_retry(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._retry_for
        delay = 0.1
        while True:
            try:
                chunks = await self._flush(batch)
                break
            except SQLAlchemyError as e:
                if loop.time() + delay > give_up_at:
                    log.error("ingest gave up on a batch of %d reports: %s", len(batch), e)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    return
                log.warning("ingest write failed, retrying in %.1fs: %s", delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await self._archive.append(chunks)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _flush(self, batch: list[_Item]) -> list[tuple[Path, bytes]]:
        chunks: list[tuple[Path, bytes]] = []
        async with self._write() as changes:
            reports = [report for report, _ in batch]
            await self._apply_heartbeats(
                changes, [r for r in reports if isinstance(r, HeartbeatReport)]
            )
            run_reports = [r for r in reports if not isinstance(r, HeartbeatReport)]
            find = await self._run_finder(changes, run_reports)
            for report in run_reports:
                run = find(report)
                if run is None:
                    log.warning(
                        "%s reported on run %s (task %s), which is not its run",
                        report.hostname,
                        report.run_id,
                        report.task_id,
                    )
                    continue
                chunk = self._apply_run_report(changes, run, report)
                if chunk is not None:
                    chunks.append(chunk)
        return chunks

    @staticmethod
    async def _run_finder(
        changes: Changes, reports: list[RunStarted | RunOutput | RunFinished]
    ) -> Callable[[RunStarted | RunOutput | RunFinished], RunRow | None]:
        """Looks up the runs of a batch in two queries: by run id, and by task and host for
        agents that know only the seed's ``task_id``. A host may only report on its own runs."""
        by_id = await queries.runs_by_id(changes.session, [r.run_id for r in reports if r.run_id])
        pairs = {(r.task_id, r.hostname) for r in reports if not r.run_id and r.task_id}
        by_task_host = await queries.latest_runs_of(changes.session, pairs)

        def find(report: RunStarted | RunOutput | RunFinished) -> RunRow | None:
            if report.run_id:
                run = by_id.get(report.run_id)
            else:
                run = by_task_host.get((report.task_id or "", report.hostname))
                if run is not None and report.attempt and run.attempt != report.attempt:
                    run = None
            return run if run is not None and run.host == report.hostname else None

        return find

    def _apply_run_report(
        self, changes: Changes, run: RunRow, report: RunStarted | RunOutput | RunFinished
    ) -> tuple[Path, bytes] | None:
        if isinstance(report, RunStarted):
            changes.move(run, RunStatus.RUNNING, started_at=report.started_at)
            return None
        if isinstance(report, RunOutput):
            if run.status not in (RunStatus.DISPATCHED, RunStatus.RUNNING):
                return None
            text = self._decode(run.id, report.stream, report.data)
            data = {"run_id": run.id, "host": run.host, "stream": report.stream, "data": text}
            changes.add_event(run.task_id, "output", data, run_id=run.id)
            return (Path(run.log_path), report.data) if run.log_path else None
        for stream in ("stdout", "stderr"):
            self._decoders.pop((run.id, stream), None)
        changes.move(
            run,
            RunStatus(report.status),
            exit_code=report.exit_code,
            stdout=report.stdout,
            stderr=report.stderr,
            truncated=report.truncated,
            error=report.error or None,
            started_at=run.started_at or report.started_at,
            finished_at=report.finished_at,
            duration_ms=report.duration_ms,
        )
        return None

    def _decode(self, run_id: str, stream: str, data: bytes) -> str:
        # Chunks are not aligned to characters; one decoder per stream keeps a multi-byte
        # character that straddles two chunks intact, and invalid bytes become U+FFFD. NUL
        # becomes U+FFFD too, as in the store (PostgreSQL text cannot hold it), so a live event
        # and its replay from the database are the same text.
        key = (run_id, stream)
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = self._decoders[key] = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(data).replace("\x00", "\ufffd")

    async def _apply_heartbeats(self, changes: Changes, beats: list[HeartbeatReport]) -> None:
        if not beats:
            return
        latest: dict[str, HeartbeatReport] = {}
        for beat in beats:
            latest[beat.hostname] = beat
        values = []
        for beat in latest.values():
            values.append(
                {
                    "name": beat.hostname,
                    "status": "online",
                    "last_seen_at": beat.at,
                    "cpu_usage": beat.cpu_usage,
                    "memory_usage": beat.memory_usage,
                    "load": beat.load,
                    "disk_usage": beat.disk_usage,
                }
            )
            previous = self._last_history.get(beat.hostname)
            if previous is None or beat.at - previous >= self._history_every:
                self._last_history[beat.hostname] = beat.at
                changes.session.add(
                    HeartbeatRow(
                        host=beat.hostname,
                        at=beat.at,
                        cpu_usage=beat.cpu_usage,
                        memory_usage=beat.memory_usage,
                        load=beat.load,
                        disk_usage=beat.disk_usage,
                    )
                )
        known = await queries.known_host_names(changes.session, latest)
        await queries.bulk_update_hosts(changes.session, [v for v in values if v["name"] in known])
        changes.hosts_changed |= known
