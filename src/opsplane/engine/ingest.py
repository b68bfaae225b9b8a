"""Result ingest: reports from hosts are queued and written in batches, one transaction per
batch (seed 001), then archived and published. One module past the house's 500 lines on
purpose: the ordering rules below (seq, early chunks, held lines, redaction before storage)
hold across one batch's steps, and split across modules they could no longer be read together;
heartbeats, the unplanned-run finder and the batch steps are the parts to move out next.

A report's future completes once it is durable, so a link acknowledges a result to its host
only after the database has it.

Output is redacted here, the one place it enters (seed 003's log masking): before it becomes an
event, a line of the archive, or the run row. Live output is redacted line by line; the part
after a stream's last line break is held back briefly (``hold_for``) so that a secret split
across two chunks is matched whole. Large pieces are redacted in a worker thread, so that a
flood of output never holds the event loop (API, gRPC, heartbeats) for long.

Output chunks carry ``seq`` (per run, from 1): a chunk at or below ``runs.output_seq`` was
placed before (an agent re-sends its spooled output after a reconnect) and is dropped; one
that comes early (a gap before it) waits here until the gap is filled, so that the archive
holds the output in the order it was printed. A gap that cannot be filled — the run's result
arrived, or too much waits behind it — is written as :func:`gap_marker` and the rest follows
(docs/reliability.md). Chunks without a number (``seq`` 0, agents that do not count) are
placed as they come.

What the database keeps of output is bounded (DESIGN §2): the first ``event_output_cap`` bytes
of each run's stream become durable ``output`` events, then one durable marker (``capped``,
with where the whole log is); output past it is published live only. The archive keeps all of
it, and the run row keeps the head and the tail (``output_cap`` bytes each).

Failures (docs/reliability.md): while the database is unreachable a batch is retried with
backoff for as long as it takes, and the bounded queue (``max_queue`` reports,
``max_queue_bytes``) makes the links wait, so hosts keep their unacknowledged results and send
them again. Any other failure of a batch is a report the database or ingest cannot take: the
batch is written again report by report, and only the offender fails (its future gets
``ReportRejected``; the link refuses the message). A failure to append to the archive (disk
full) is logged and counted; the database effect stands and the report is acknowledged. The
loop itself runs under ``background.Supervised``: should it crash all the same, it restarts.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path

from opsplane.domain.errors import ReportNotWritten, ReportRejected
from opsplane.domain.ids import run_id_for
from opsplane.domain.redaction import LineBuffer, Redactor
from opsplane.domain.states import RunStatus
from opsplane.engine.archive import LogArchive
from opsplane.engine.background import Supervised
from opsplane.engine.changes import Changes, run_event_data
from opsplane.execution.capture import DEFAULT_CAP, OutputCapture
from opsplane.logcontext import about
from opsplane.store import queries
from opsplane.store.database import is_unavailable
from opsplane.store.tables import RunRow, TaskRow, utcnow
from opsplane.transport.base import (
    HeartbeatReport,
    HostReport,
    RunFinished,
    RunOutput,
    RunStarted,
    Stream,
)

log = logging.getLogger(__name__)

WriteContext = Callable[[], AbstractAsyncContextManager[Changes]]
_Item = tuple[HostReport, asyncio.Future[None]]
# Heartbeats waiting, latest per host, with the futures of every beat it stands for.
_Beats = list[tuple[HeartbeatReport, list[asyncio.Future[None]]]]
_Chunks = list[tuple[Path, bytes]]
_STREAMS: tuple[Stream, ...] = ("stdout", "stderr")
# Early chunks (a gap before them) kept per run while the gap may still be filled, and runs
# with early chunks at once; past either bound the gap is given up (written as lost).
EARLY_MAX_CHUNKS = 256
EARLY_MAX_BYTES = 4 * 1024 * 1024
EARLY_MAX_RUNS = 1000
_Early = dict[int, tuple[Stream, bytes]]


def gap_marker(missing: int) -> bytes:
    """What the archive holds where ``missing`` output chunks never arrived."""
    return f"[opsplane: output lost here: {missing} chunk(s) never arrived]\n".encode()


# Streams whose stored output bytes are counted: beyond this, the oldest are forgotten (a run
# that never ended, lost with its host); a forgotten one may store another cap's worth.
_MAX_COUNTED_STREAMS = 100_000
# A run row's output passes as the host capped it as long as it is within twice the cap, plus
# room for the host's truncation marker; anything longer is cut to head and tail again.
_MARKER_ROOM = 128


# A batch holds at most this much output, so that one transaction stays short and the
# heartbeats that wait for the next one wait briefly (batch_size bounds the count).
MAX_BATCH_BYTES = 2 * 1024 * 1024
# Applying a batch hands the event loop back at least this often (seconds).
STEP_SECONDS = 0.005
# Redaction of more than this many bytes (or characters) at once runs in a worker thread.
REDACT_IN_THREAD_ABOVE = 8 * 1024
# Retries of a batch while the database is unreachable: backoff from the first to the last.
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0
# A batch failing as "unavailable" this many times in a row while ``probe`` answers is not an
# outage but a report the database refuses that way: it is written report by report.
_UNAVAILABLE_BUT_UP = 5


def _size(report: HostReport) -> int:
    """About what a queued report holds in memory, for the queue's byte budget."""
    if isinstance(report, RunOutput):
        return 200 + len(report.data)
    if isinstance(report, RunFinished):
        return 300 + len(report.stdout) + len(report.stderr) + len(report.error or "")
    return 200


class _Held:
    """One run stream's incomplete last line, and where it goes once released."""

    def __init__(self, run: RunRow, stream: Stream) -> None:
        self.task_id = run.task_id
        self.run_id = run.id
        self.host = run.host
        self.stream: Stream = stream
        self.log_path = run.log_path
        self.buffer = LineBuffer()
        self.since = 0.0  # monotonic time the held part began


class Ingest:
    def __init__(
        self,
        write: WriteContext,
        archive: LogArchive,
        *,
        batch_size: int,
        linger: float,
        history_every: timedelta = timedelta(seconds=60),
        redactor: Redactor | None = None,
        hold_for: float = 0.5,
        event_output_cap: int = 64 * 1024,
        output_cap: int = DEFAULT_CAP,
        max_queue_bytes: int = 64 * 1024 * 1024,
        probe: Callable[[], Awaitable[None]] | None = None,
        on_rejected: Callable[[str], None] | None = None,
        beats_every: float = 1.0,
    ) -> None:
        """``probe`` checks that the database answers (it raises otherwise); ``on_rejected``
        is told why each report that failed alone failed (metrics). Heartbeats that come
        alone are written at most once per ``beats_every`` seconds, all of them in one
        statement (docs/scale.md, "Heartbeats and liveness")."""
        self._write = write
        self._archive = archive
        self._batch_size = batch_size
        self._linger = linger
        self._history_every = history_every
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=batch_size * 20)
        # Bytes held by queued reports; ``report`` waits while the budget is spent.
        self._max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._room = asyncio.Condition()
        self._probe = probe
        self._on_rejected = on_rejected or (lambda _reason: None)
        # The batch being written, failed by ``_crashed`` if the loop dies under it.
        self._current: list[_Item] = []
        # Heartbeats never queue behind run reports (DESIGN §5): they wait here, latest per
        # host (bounded by the fleet), and go with the next batch, however full the queue.
        self._beats: dict[str, tuple[HeartbeatReport, list[asyncio.Future[None]]]] = {}
        self._beats_due = asyncio.Event()
        self._current_beats: _Beats = []
        self._current_beat_hosts: set[str] = set()
        # Heartbeats alone go at a bounded cadence: a fleet beating at random instants is
        # one small transaction per ``beats_every``, not one per beat.
        self._beats_every = beats_every
        self._beats_taken_at = -math.inf
        self.loop = Supervised("ingest", self._loop, on_crash=self._crashed)
        #: Whether the last write failed because the database was unreachable (until one
        #: succeeds): ingest is paused, the queue applies backpressure.
        self.paused = False
        #: Appends to the archive that failed (their database effect stands).
        self.archive_failures = 0
        self._decoders: dict[tuple[str, str], codecs.IncrementalDecoder] = {}
        self._last_history: dict[str, datetime] = {}
        self._redactor = redactor or Redactor(())
        self._hold_for = hold_for
        self._event_output_cap = event_output_cap
        self._output_cap = output_cap
        # Bytes of output stored as events so far, per (run id, stream); oldest first.
        self._stored: dict[tuple[str, str], int] = {}
        # Oldest first: a part re-held after a release moves to the end.
        self._held: dict[tuple[str, str], _Held] = {}
        # Per run: chunks that arrived before one they follow (by seq), oldest run first.
        self._early: dict[str, _Early] = {}
        # Observers of each batch's size (metrics); called before the batch is written.
        self.batch_observers: list[Callable[[int], None]] = []
        # Batches begun and batches whose output is in the archive, for ``archived()``.
        self._begun = 0
        self._archived_count = 0
        self._archived_cond = asyncio.Condition()
        # While a batch is being written: how to undo its effect on the held lines and the
        # decoders if the write fails, so that the retry sees them as they were.
        self._undo: dict[tuple[str, str, str], Callable[[], None]] | None = None

    @property
    def queue_depth(self) -> int:
        """Reports waiting to be written."""
        return self._queue.qsize()

    async def archived(self) -> None:
        """Returns once the output of every batch begun so far is in the archive (or its batch
        failed): a reader that saw a run end in the database then finds its whole log."""
        target = self._begun
        async with self._archived_cond:
            await self._archived_cond.wait_for(lambda: self._archived_count >= target)

    async def start(self) -> None:
        self.loop.start()

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Write what is queued (bounded by ``drain_seconds``), then stop."""
        if not self.loop.running:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_seconds)
        await self.loop.stop()
        if self._held or self._beats:
            # Incomplete last lines of runs still going: into the archive, not lost.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_with_retry([], release_all=True), drain_seconds)
        for _, futures in self._take_beats():
            _fail(futures, ReportNotWritten("ingest stopped before the heartbeat was written"))

    async def report(self, report: HostReport) -> asyncio.Future[None]:
        """Queue ``report``; waits while the queue is full (backpressure on the link). The
        future completes once the report is durable, or fails with ``ReportRejected`` (the
        report cannot be applied) or ``ReportNotWritten`` (ingest stopped first)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if isinstance(report, HeartbeatReport):
            if not self._beats:
                # The first beat since the last write sets the cadence's clock going; the
                # loop need not wake for the ones that join it.
                self._beats_due.set()
            _, futures = self._beats.pop(report.hostname, (report, []))
            self._beats[report.hostname] = (report, [*futures, future])
            return future
        size = _size(report)
        async with self._room:
            # One report larger than the whole budget still goes, alone.
            await self._room.wait_for(
                lambda: (
                    self._queued_bytes == 0 or self._queued_bytes + size <= self._max_queue_bytes
                )
            )
            self._queued_bytes += size
        await self._queue.put((report, future))
        return future

    async def _took(self, item: _Item) -> _Item:
        """Bookkeeping of a report taken from the queue: its bytes leave the budget."""
        self._queued_bytes -= _size(item[0])
        async with self._room:
            self._room.notify_all()
        return item

    def _crashed(self, error: BaseException) -> None:
        self._abandon(f"ingest failed: {type(error).__name__}: {error}")

    def _abandon(self, why: str) -> None:
        """The loop ended under a batch: its reports fail, so that links refuse or resend
        them, rather than wait for an answer that would never come."""
        batch, self._current = self._current, []
        beats, self._current_beats = self._current_beats, []
        self._current_beat_hosts = set()
        for _, future in batch:
            if not future.done():
                future.set_exception(ReportNotWritten(why))
            self._queue.task_done()
        # Heartbeats go back to wait for the next write (the restarted loop's, or the last
        # one of ``stop``): a newer beat of the same host stands for them.
        for beat, futures in beats:
            newer, waiting = self._beats.pop(beat.hostname, (beat, []))
            self._beats[beat.hostname] = (newer, [*futures, *waiting])

    async def _loop(self) -> None:
        # Group commit: a batch is whatever queued up while the previous one was being written,
        # so one lone report is written at once and a flood is written in large transactions.
        # ``linger`` optionally waits a little longer for company.
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_report()
            if first is None:
                # Heartbeats, or a held line that waited long enough: written at once, with or
                # without company.
                try:
                    await self._flush_with_retry([])
                except asyncio.CancelledError:
                    self._abandon("ingest stopped before the heartbeat was written")
                    raise
                continue
            batch = self._current = [first]
            size = _size(first[0])
            if self._linger > 0:
                deadline = loop.time() + self._linger
                while (
                    len(batch) < self._batch_size
                    and size < MAX_BATCH_BYTES
                    and (remaining := deadline - loop.time()) > 0
                ):
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                    batch.append(await self._took(item))
                    size += _size(item[0])
            while len(batch) < self._batch_size and size < MAX_BATCH_BYTES:
                if self._queue.empty():
                    break
                batch.append(item := await self._took(self._queue.get_nowait()))
                size += _size(item[0])
            for observe in self.batch_observers:
                observe(len(batch))
            try:
                await self._flush_with_retry(batch)
            except asyncio.CancelledError:
                self._abandon("ingest stopped before the report was written")
                raise
            self._current = []
            for _ in batch:
                self._queue.task_done()

    async def _next_report(self) -> _Item | None:
        """The next report, or None when heartbeats are due or the oldest held line is."""
        while True:
            wait: float | None = None
            if self._beats:
                wait = self._beats_taken_at + self._beats_every - time.monotonic()
                if wait <= 0:
                    return None
            if self._held:
                oldest = next(iter(self._held.values()))
                held_wait = oldest.since + self._hold_for - time.monotonic()
                if held_wait <= 0:
                    return None
                wait = held_wait if wait is None else min(wait, held_wait)
            if not self._queue.empty():
                return await self._took(self._queue.get_nowait())
            # Idle: wait for a report, a heartbeat, or the time of beats or held lines.
            self._beats_due.clear()
            getter = asyncio.ensure_future(self._queue.get())
            beat = asyncio.ensure_future(self._beats_due.wait())
            try:
                await asyncio.wait(
                    {getter, beat}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                beat.cancel()
                if not getter.done():
                    getter.cancel()  # takes nothing from the queue
            if getter.done() and not getter.cancelled():
                return await self._took(getter.result())

    def beat_waiting(self, hostname: str) -> bool:
        """Whether a heartbeat of ``hostname`` is taken but not yet written: the host was
        heard, whatever its row says (the monitor must not call it silent)."""
        return hostname in self._beats or hostname in self._current_beat_hosts

    def _take_beats(self) -> _Beats:
        beats = list(self._beats.values())
        self._beats.clear()
        if beats:
            self._beats_taken_at = time.monotonic()
        return beats

    async def _flush_with_retry(self, batch: list[_Item], *, release_all: bool = False) -> None:
        self._begun += 1
        try:
            await self._write_and_archive(batch, release_all)
        finally:
            async with self._archived_cond:
                self._archived_count += 1
                self._archived_cond.notify_all()

    async def _write_and_archive(self, batch: list[_Item], release_all: bool) -> None:
        # Held lines and heartbeats are taken once, outside the retries: a failed write must
        # not lose them.
        released = await self._release_held(release_all)
        beats = self._current_beats = self._take_beats()
        self._current_beat_hosts = {beat.hostname for beat, _ in beats}
        try:
            chunks = await self._write_retrying(batch, released, beats)
        except Exception as e:
            # Not an outage: something in the batch. Each report alone, so one fails alone.
            log.warning(
                "ingest: a batch of %d reports failed (%s: %s); writing them one by one",
                len(batch),
                type(e).__name__,
                e,
            )
            chunks = await self._write_alone([], released, beats) if released or beats else []
            for item in batch:
                chunks += await self._write_alone([item], [])
        else:
            _succeed(beats)
        self._current_beats = []
        self._current_beat_hosts = set()
        await self._archive_append(chunks)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _write_alone(
        self, items: list[_Item], released: list[tuple[_Held, bytes]], beats: _Beats | None = None
    ) -> _Chunks:
        beats = beats or []
        try:
            chunks = await self._write_retrying(items, released, beats)
            _succeed(beats)
            return chunks
        except Exception as e:
            what = type(items[0][0]).__name__ if items else "held output"
            host = items[0][0].hostname if items else "-"
            log.error("ingest rejected a %s from %s: %s: %s", what, host, type(e).__name__, e,
                      exc_info=e)  # fmt: skip
            self._on_rejected(type(e).__name__)
            for _, future in items:
                if not future.done():
                    future.set_exception(ReportRejected(f"{type(e).__name__}: {e}"))
            for _, futures in beats:
                _fail(futures, ReportRejected(f"{type(e).__name__}: {e}"))
            return []

    async def _write_retrying(
        self, batch: list[_Item], released: list[tuple[_Held, bytes]], beats: _Beats
    ) -> _Chunks:
        """Write, retrying with backoff for as long as the database is unreachable; any other
        error is raised (with the memory of held lines and decoders as before the attempt)."""
        delay = _RETRY_FIRST
        up_but_failing = 0
        while True:
            self._undo = {}
            try:
                chunks = await self._flush(batch, released, beats)
                if self.paused:
                    log.info("ingest: the database is back; writing again")
                self.paused = False
                return chunks
            except Exception as e:
                self._roll_back_memory()
                if not is_unavailable(e):
                    raise
                if await self._database_answers():
                    up_but_failing += 1
                    if up_but_failing >= _UNAVAILABLE_BUT_UP:
                        raise
                if not self.paused:
                    log.warning("ingest paused: the database is unavailable: %s", e)
                self.paused = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
            finally:
                self._undo = None

    async def _database_answers(self) -> bool:
        if self._probe is None:
            return False
        try:
            await self._probe()
        except Exception:
            return False
        return True

    async def _archive_append(self, chunks: _Chunks) -> None:
        try:
            await self._archive.append(chunks)
        except OSError as e:
            # The database has the output (head and tail in the row, events) and the result:
            # acknowledged all the same, as holding the report back would not free the disk.
            self.archive_failures += 1
            log.error("log archive: %d chunks not appended: %s", len(chunks), e)

    async def _redact_data(self, data: bytes) -> bytes:
        if not data or not self._redactor.enabled:
            return data
        if len(data) > REDACT_IN_THREAD_ABOVE:
            return await asyncio.to_thread(self._redactor.data, data)
        return self._redactor.data(data)

    async def _redact_text(self, text: str) -> str:
        if not text or not self._redactor.enabled:
            return text
        if len(text) > REDACT_IN_THREAD_ABOVE:
            return await asyncio.to_thread(self._redactor.text, text)
        return self._redactor.text(text)

    def _roll_back_memory(self) -> None:
        for restore in reversed(list((self._undo or {}).values())):
            restore()
        self._held = dict(sorted(self._held.items(), key=lambda item: item[1].since))

    def _remember_held(self, key: tuple[str, str]) -> None:
        if self._undo is None or ("held", *key) in self._undo:
            return
        held = self._held.get(key)
        if held is None:

            def restore() -> None:
                self._held.pop(key, None)

        else:
            kept, since = held.buffer.snapshot(), held.since

            def restore() -> None:
                held.buffer.restore(kept)
                held.since = since
                self._held[key] = held

        self._undo["held", *key] = restore

    def _remember_early(self, run_id: str) -> None:
        if self._undo is None or ("early", run_id, "") in self._undo:
            return
        kept = self._early.get(run_id)
        copy = None if kept is None else dict(kept)

        def restore() -> None:
            if copy is None:
                self._early.pop(run_id, None)
            else:
                self._early[run_id] = dict(copy)

        self._undo["early", run_id, ""] = restore

    def _remember_decoder(self, key: tuple[str, str]) -> None:
        if self._undo is None or ("decoder", *key) in self._undo:
            return
        decoder = self._decoders.get(key)
        if decoder is None:

            def restore() -> None:
                self._decoders.pop(key, None)

        else:
            state = decoder.getstate()

            def restore() -> None:
                decoder.setstate(state)
                self._decoders[key] = decoder

        self._undo["decoder", *key] = restore

    def _remember_stored(self, key: tuple[str, str]) -> None:
        if self._undo is None or ("stored", *key) in self._undo:
            return
        count = self._stored.get(key)

        def restore() -> None:
            if count is None:
                self._stored.pop(key, None)
            else:
                self._stored[key] = count

        self._undo["stored", *key] = restore

    async def _release_held(self, release_all: bool) -> list[tuple[_Held, bytes]]:
        """Held lines older than ``hold_for`` (all of them with ``release_all``), redacted."""
        now = time.monotonic()
        released: list[tuple[_Held, bytes]] = []
        for key, held in list(self._held.items()):
            if not release_all and now - held.since < self._hold_for:
                break  # oldest first: the rest are younger
            del self._held[key]
            released.append((held, held.buffer.flush()))
        return [(held, await self._redact_data(data)) for held, data in released]

    async def _flush(
        self, batch: list[_Item], released: list[tuple[_Held, bytes]], beats: _Beats
    ) -> _Chunks:
        chunks: _Chunks = []
        async with self._write() as changes:
            for held, data in released:
                chunks += self._output(
                    changes, held.task_id, held.run_id, held.host, held.stream, data, held.log_path
                )
            reports = [report for report, _ in batch]
            await self._apply_heartbeats(
                changes,
                [beat for beat, _ in beats]
                + [r for r in reports if isinstance(r, HeartbeatReport)],
            )
            if not batch:
                return chunks
            run_reports = [r for r in reports if not isinstance(r, HeartbeatReport)]
            find = await self._run_finder(changes, run_reports)
            unplanned = await self._unplanned_runs(
                changes, [r for r in run_reports if find(r) is None]
            )
            stepped = time.monotonic()
            for report in run_reports:
                if time.monotonic() - stepped >= STEP_SECONDS:
                    # Let the API and the links run: applying a whole batch of small chunks
                    # was one step of 40-60 ms of CPU, stretched to 0.2-0.5 s on a busy
                    # machine (docs/reliability.md, scenario 8).
                    await asyncio.sleep(0)
                    stepped = time.monotonic()
                run = find(report) or unplanned.get((report.task_id or "", report.hostname))
                if run is None:
                    log.warning(
                        "%s reported on run %s (task %s), which is not its run",
                        report.hostname,
                        report.run_id,
                        report.task_id,
                        extra=about(report.task_id, report.run_id, report.hostname),
                    )
                    continue
                chunks += await self._apply_run_report(changes, run, report)
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

    async def _unplanned_runs(
        self, changes: Changes, reports: list[RunStarted | RunOutput | RunFinished]
    ) -> dict[tuple[str, str], RunRow]:
        """Runs created for reports that no run was planned for: a group or broadcast message
        (which names no hosts) reached a host the control plane did not count in, e.g. one
        whose agent binds a group the inventory does not give it. Its result is stored, never
        dropped (issue 16 item 2). Only for a fan-out task, a registered host with no run of
        that task, and a run id (if given) that is the one the host derives (domain/ids.py)."""
        wanted = {(r.task_id, r.hostname): r for r in reports if r.task_id}
        if not wanted:
            return {}
        session = changes.session
        tasks = await queries.tasks_by_id(session, {task_id for task_id, _ in wanted})
        wanted = {pair: r for pair, r in wanted.items() if _fans_out(tasks.get(pair[0]))}
        if not wanted:
            return {}
        known = await queries.known_host_names(session, {host for _, host in wanted})
        existing = await queries.latest_runs_of(session, wanted)
        created: dict[tuple[str, str], RunRow] = {}
        now = utcnow()
        for (task_id, host), report in wanted.items():
            attempt = report.attempt or 1
            run_id = run_id_for(task_id, host, attempt)
            if (
                host not in known
                or (task_id, host) in existing
                or report.run_id
                not in (
                    None,
                    run_id,
                )
            ):
                continue
            task = tasks[task_id]
            run = RunRow(
                id=run_id,
                task_id=task_id,
                host=host,
                attempt=attempt,
                wave=0,
                status=RunStatus.DISPATCHED,
                dispatched_at=now,
                unplanned=True,
                error=None,
                output_seq=0,
                log_path=str(self._archive.path_for(task_id, run_id, task.created_at)),
                updated_at=now,
            )
            session.add(run)
            task.total += 1
            changes.add_event(task_id, "run", run_event_data(run), run_id=run_id)
            created[(task_id, host)] = run
            log.info(
                "%s reported on task %s, no run planned: run %s added",
                host,
                task_id,
                run_id,
                extra=about(task_id, run_id, host),
            )
        if created:
            await session.flush()
        return created

    async def _apply_run_report(
        self, changes: Changes, run: RunRow, report: RunStarted | RunOutput | RunFinished
    ) -> _Chunks:
        if run.status in (RunStatus.PENDING, RunStatus.DELAYED):
            # The host has it already (a group or broadcast message reached it while its run
            # waited here): the report stands, the run goes the usual way.
            changes.move(run, RunStatus.DISPATCHED, dispatched_at=utcnow(), error=None)
        if isinstance(report, RunStarted):
            changes.move(run, RunStatus.RUNNING, started_at=report.started_at)
            return []
        if isinstance(report, RunOutput):
            if run.status not in (RunStatus.DISPATCHED, RunStatus.RUNNING):
                # Late output of a run that ended (lost, canceled, or re-sent after its
                # result was stored) stays out: a terminal run's log does not change.
                return []
            return await self._place(changes, run, self._in_order(run, report))
        # Chunks still waiting for a gap to be filled go in now, with the gap marked.
        chunks: _Chunks = []
        self._remember_early(run.id)
        if run.status in (RunStatus.DISPATCHED, RunStatus.RUNNING):
            chunks += await self._place(changes, run, self._release_early(run, give_up=True))
        else:
            self._early.pop(run.id, None)
        # The run's last words, held for a line break that will not come, go before its end.
        for stream in _STREAMS:
            self._remember_held((run.id, stream))
            self._remember_decoder((run.id, stream))
            held = self._held.pop((run.id, stream), None)
            if held is not None:
                data = await self._redact_data(held.buffer.flush())
                chunks += self._output(
                    changes, run.task_id, run.id, run.host, stream, data, run.log_path
                )
            self._decoders.pop((run.id, stream), None)
            self._remember_stored((run.id, stream))
            self._stored.pop((run.id, stream), None)
        redact = self._redact_text
        stdout, cut_stdout = self._bounded(report.stdout)
        stderr, cut_stderr = self._bounded(report.stderr)
        changes.move(
            run,
            RunStatus(report.status),
            exit_code=report.exit_code,
            stdout=await redact(stdout),
            stderr=await redact(stderr),
            truncated=report.truncated or cut_stdout or cut_stderr,
            error=await redact(report.error) if report.error else None,
            started_at=run.started_at or report.started_at,
            finished_at=report.finished_at,
            duration_ms=report.duration_ms,
        )
        return chunks

    async def _place(
        self, changes: Changes, run: RunRow, parts: list[tuple[Stream, bytes]]
    ) -> _Chunks:
        chunks: _Chunks = []
        stepped = time.monotonic()
        for stream, data in parts:
            if time.monotonic() - stepped >= STEP_SECONDS:
                # One report may release hundreds of chunks that waited behind gaps (an
                # agent's spool overflowed under a flood): placed in one go they were one
                # step of 20-60 ms of CPU (docs/reliability.md, scenario 8).
                await asyncio.sleep(0)
                stepped = time.monotonic()
            ready = await self._redact_data(self._complete_lines(run, stream, data))
            chunks += self._output(
                changes, run.task_id, run.id, run.host, stream, ready, run.log_path
            )
        return chunks

    def _in_order(self, run: RunRow, report: RunOutput) -> list[tuple[Stream, bytes]]:
        """The output to place now for ``report``: nothing for a chunk placed before (a
        re-send) or one that came early (kept until the chunks before it arrive); the chunk
        and any early ones it makes contiguous otherwise."""
        seq = report.seq
        if seq <= 0:
            return [(report.stream, report.data)]
        placed = run.output_seq or 0
        if seq <= placed:
            return []
        self._remember_early(run.id)
        if seq > placed + 1:
            early = self._early.get(run.id)
            if early is None:
                if len(self._early) >= EARLY_MAX_RUNS:
                    # Runs that ended without a result (lost) leave theirs behind: the oldest
                    # go, so that this memory stays bounded.
                    oldest = next(iter(self._early))
                    self._remember_early(oldest)
                    del self._early[oldest]
                    log.warning("gave up waiting for missing output of run %s", oldest)
                early = self._early[run.id] = {}
            early.setdefault(seq, (report.stream, report.data))
            if (
                len(early) <= EARLY_MAX_CHUNKS
                and sum(len(data) for _, data in early.values()) <= EARLY_MAX_BYTES
            ):
                return []
            return self._release_early(run, give_up=True)
        run.output_seq = seq
        return [(report.stream, report.data), *self._release_early(run, give_up=False)]

    def _release_early(self, run: RunRow, *, give_up: bool) -> list[tuple[Stream, bytes]]:
        """Early chunks of ``run`` that now follow what was placed; with ``give_up``, all of
        them, a marker standing in for each gap (``run.output_seq`` advances past them)."""
        early = self._early.pop(run.id, None)
        if not early:
            return []
        parts: list[tuple[Stream, bytes]] = []
        placed = run.output_seq or 0
        gaps = lost = 0
        first = placed + 1
        for seq in sorted(early):
            if seq <= placed:
                continue
            if seq > placed + 1:
                if not give_up:
                    self._early[run.id] = {s: c for s, c in early.items() if s >= seq}
                    break
                missing = seq - placed - 1
                gaps, lost = gaps + 1, lost + missing
                parts.append(("stderr", gap_marker(missing)))
            parts.append(early[seq])
            placed = seq
        if gaps:
            # One line per release, not one per gap: a spool that overflowed under a flood
            # leaves hundreds of gaps, and a line each was hundreds of writes in one step.
            log.warning(
                "run %s: %d output chunk(s) lost in %d gap(s) between #%d and #%d",
                run.id,
                lost,
                gaps,
                first,
                placed,
                extra=about(run.task_id, run.id, run.host),
            )
        run.output_seq = placed
        return parts

    def _complete_lines(self, run: RunRow, stream: Stream, data: bytes) -> bytes:
        """``data`` less the incomplete last line, which is held (and redacted later, whole);
        the caller redacts what is returned. Without patterns, output passes at once."""
        if not self._redactor.enabled:
            return data
        key = (run.id, stream)
        self._remember_held(key)
        held = self._held.get(key) or _Held(run, stream)
        had_part = bool(held.buffer)
        ready = held.buffer.feed(data)
        if not held.buffer:
            self._held.pop(key, None)
        elif ready or not had_part:
            # A new incomplete line: youngest, so it goes to the end (the dict stays ordered
            # by age). A line that only grew keeps its age and place: it never waits longer
            # than ``hold_for`` in all.
            self._held.pop(key, None)
            held.since = time.monotonic()
            self._held[key] = held
        return ready

    def _output(
        self,
        changes: Changes,
        task_id: str,
        run_id: str,
        host: str,
        stream: Stream,
        data: bytes,
        log_path: str | None,
    ) -> _Chunks:
        if not data:
            return []
        text = self._decode(run_id, stream, data)
        key = (run_id, stream)
        self._remember_stored(key)
        stored = self._stored.pop(key, 0)
        room = self._event_output_cap - stored
        durable, live = text, ""
        if len(text) > room // 4:  # cheap: a character is at most 4 bytes
            encoded = text.encode()
            if len(encoded) > room:
                # Cut at a character boundary: the stored part is whole characters.
                durable = encoded[: max(room, 0)].decode(errors="ignore")
                live = text[len(durable) :]
            stored += len(durable.encode()) if live else len(encoded)
        else:
            stored += len(text.encode())
        if durable:
            event = {"run_id": run_id, "host": host, "stream": stream, "data": durable}
            changes.add_event(task_id, "output", event, run_id=run_id)
        if live:
            if stored <= self._event_output_cap:
                # The first output past the cap: a durable marker that says where the rest is.
                stored = self._event_output_cap + 1
                marker = {
                    "run_id": run_id,
                    "host": host,
                    "stream": stream,
                    "data": "",
                    "capped": True,
                    "log": f"/api/v1/tasks/{task_id}/runs/{run_id}/log",
                }
                changes.add_event(task_id, "output", marker, run_id=run_id)
            event = {"run_id": run_id, "host": host, "stream": stream, "data": live}
            changes.add_event(task_id, "output", event, run_id=run_id, durable=False)
        self._stored[key] = stored
        while len(self._stored) > _MAX_COUNTED_STREAMS:
            del self._stored[next(iter(self._stored))]
        return [(Path(log_path), data)] if log_path else []

    def _bounded(self, text: str) -> tuple[str, bool]:
        """``text`` cut to its head and tail (``output_cap`` bytes each) when a host sent more
        than it should have; whether it was cut."""
        if len(text) <= 2 * self._output_cap // 4:
            return text, False
        encoded = text.encode(errors="replace")
        if len(encoded) <= 2 * self._output_cap + _MARKER_ROOM:
            return text, False
        capture = OutputCapture(self._output_cap)
        capture.feed("out", encoded)
        return capture.text("out"), True

    def _decode(self, run_id: str, stream: str, data: bytes) -> str:
        # Chunks are not aligned to characters; one decoder per stream keeps a multi-byte
        # character that straddles two chunks intact, and invalid bytes become U+FFFD. NUL
        # becomes U+FFFD too, as in the store (PostgreSQL text cannot hold it), so a live event
        # and its replay from the database are the same text.
        key = (run_id, stream)
        self._remember_decoder(key)
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = self._decoders[key] = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder.decode(data).replace("\x00", "\ufffd")

    async def _apply_heartbeats(self, changes: Changes, beats: list[HeartbeatReport]) -> None:
        """The latest beat of each host in one UPDATE (executemany), and the history rows due
        in one INSERT: two statements whatever the number of hosts."""
        if not beats:
            return
        latest: dict[str, HeartbeatReport] = {}
        for beat in beats:
            latest[beat.hostname] = beat
        history = []
        for beat in latest.values():
            previous = self._last_history.get(beat.hostname)
            if previous is None or beat.at - previous >= self._history_every * _HISTORY_SLACK:
                self._last_history[beat.hostname] = beat.at
                history.append(_figures(beat) | {"host": beat.hostname, "at": beat.at})
        known = await queries.known_host_names(changes.session, latest)
        await queries.record_heartbeats(
            changes.session,
            [
                _figures(beat) | {"name": beat.hostname, "last_seen_at": beat.at}
                for beat in latest.values()
                if beat.hostname in known
            ],
            history,
        )
        changes.hosts_changed |= known


def _fans_out(task: TaskRow | None) -> bool:
    """Whether ``task`` may have gone out as a group or broadcast message."""
    targets = (task.targets or {}) if task is not None else {}
    return bool(targets.get("all") or targets.get("groups"))


# A history row is due once ``history_every`` has nearly passed: beats come about that often
# (metrics every 60 s), and a beat a moment early must not push the row to the one after.
_HISTORY_SLACK = 0.9


def _figures(beat: HeartbeatReport) -> dict[str, float | None]:
    return {
        "cpu_usage": beat.cpu_usage,
        "memory_usage": beat.memory_usage,
        "load": beat.load,
        "disk_usage": beat.disk_usage,
    }


def _succeed(beats: _Beats) -> None:
    for _, futures in beats:
        for future in futures:
            if not future.done():
                future.set_result(None)


def _fail(futures: list[asyncio.Future[None]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
