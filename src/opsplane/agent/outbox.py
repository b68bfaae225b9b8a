"""Output on its way to the control plane: numbered, kept on disk, sent in order, re-sent.

Every chunk a command prints gets the next ``seq`` of its run (from 1, across both streams),
goes into the run's journal ``state_dir/output/<run_id>.out`` and is then sent by the run's
:class:`RunOutput`, strictly in ``seq`` order. A chunk is kept until the control plane has it
for sure: over RabbitMQ that is the broker's confirm of its publish; over gRPC, where nothing
acknowledges output, it is the acknowledgement of the run's result. After a reconnect every
chunk not known to have arrived is sent again, and the control plane drops the ones it
already placed (``runs.output_seq``, engine/ingest.py). A run's result is sent only after its
output, on the same connection, so the archive is whole when the result lands.

The journals of all runs together are bounded by ``output_spool_bytes``. A chunk that does not
fit is recorded by a placeholder (its number and size) and sent once from memory, best effort,
never again; when not even placeholders fit, output is only counted and the run's output
carries ``[opsplane: N bytes of output lost …]`` where it was (docs/reliability.md). In memory
the agent keeps 8 bytes per chunk (where its record starts), at most :data:`LIVE_MAX` of
unkept chunks per run, and at most three bytes of a character split across two reads (so that
every chunk is whole UTF-8 text for the RabbitMQ link, which sends text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Protocol

from opsplane.execution import Stream
from opsplane.transport.grpc import opsplane_pb2 as pb

logger = logging.getLogger(__name__)

# seq, stream code, data length; then the data.
_HEADER: Final = struct.Struct(">QBI")
_STREAM_CODE: Final[dict[str, int]] = {"stdout": 1, "stderr": 2}
_CODE_STREAM: Final[dict[int, Stream]] = {1: "stdout", 2: "stderr"}
# A send that failed while the link still looked connected is retried after this long.
_RETRY_DELAY: Final = 1.0
# A chunk that does not fit in the journal is recorded as a placeholder (its header only,
# flagged so) and sent once from memory, best effort, if its sender gets to it while at most
# this much of such output waits per run; placeholders may use this share of the limit more.
_UNKEPT: Final = 0x80
LIVE_MAX: Final = 1024 * 1024
_PLACEHOLDER_SHARE: Final = 8


def lost_marker(lost: int) -> bytes:
    """What a run's output holds where ``lost`` bytes did not fit in the agent's spool."""
    return (
        f"\n[opsplane: {lost} bytes of output lost: the agent's output spool "
        "(output_spool_bytes) was full]\n"
    ).encode()


def utf8_cut(data: bytes) -> int:
    """Where an incomplete UTF-8 sequence at the end of ``data`` begins (``len(data)`` if
    there is none): those bytes wait for the rest of their character in the next read."""
    size = len(data)
    for back in range(1, min(4, size) + 1):
        byte = data[size - back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead
        if 0xC0 <= byte < 0xF8:  # a lead byte (0xF8 and up never are)
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return size - back if needed > back else size
        return size
    return size


class OutputJournal:
    """The journals of one agent's runs under ``directory``, at most ``limit`` bytes in all.

    Chunks of a run are numbered contiguously from 1, so chunk ``seq`` is entry ``seq - 1``
    of the run's index. Appends are not synced one by one (output is not worth an fsync per
    read); :meth:`seal` syncs a finished run's journal before its result is spooled.
    """

    def __init__(self, directory: Path, limit: int) -> None:
        self._dir = Path(directory)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._limit = limit
        # run id → where each chunk's record starts: 8 bytes per chunk in memory, the rest
        # (stream, length, data) is read back from the record's header when it is sent.
        self._index: dict[str, array[int]] = {}
        self._sizes: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self.total = 0

    def load(self, keep: Iterable[str]) -> None:
        """Read back the journals of ``keep`` (runs whose results wait to be re-sent) and
        delete every other one (runs acknowledged or abandoned before a crash)."""
        wanted = {run_id.lower() for run_id in keep}
        for path in self._dir.glob("*.out"):
            if path.stem not in wanted:
                path.unlink(missing_ok=True)
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                logger.warning("cannot read the output journal %s: %s", path, exc)
                continue
            entries: array[int] = array("Q")
            offset = 0
            # A record cut short by a crash ends the journal; it was never sent as a whole.
            while offset + _HEADER.size <= len(data):
                seq, code, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                end = start + length if not code & _UNKEPT else start
                if (
                    seq != len(entries) + 1
                    or code & ~_UNKEPT not in _CODE_STREAM
                    or end > len(data)
                ):
                    break
                entries.append(offset)
                offset = end
            self._index[path.stem] = entries
            self._sizes[path.stem] = offset
            self.total += offset

    def last_seq(self, run_id: str) -> int:
        """The number of the run's last kept chunk (0: none)."""
        run_id = run_id.lower()
        return len(self._index.get(run_id, ()))

    def append(self, run_id: str, stream: Stream, data: bytes, *, force: bool = False) -> int:
        """Keep ``data`` as the run's next chunk and return its seq; 0 when it does not fit
        (``force``: a marker, which always does) or cannot be written."""
        run_id = run_id.lower()
        record = _HEADER.size + len(data)
        if not force and self.total + record > self._limit:
            return 0
        entries = self._index.setdefault(run_id, array("Q"))
        seq = len(entries) + 1
        offset = self._sizes.get(run_id, 0)
        try:
            _write_all(self._fd(run_id), _HEADER.pack(seq, _STREAM_CODE[stream], len(data)) + data)
        except OSError as exc:
            logger.error("cannot keep output of run %s: %s", run_id, exc)
            return 0
        entries.append(offset)
        self._sizes[run_id] = offset + record
        self.total += record
        return seq

    def append_unkept(self, run_id: str, stream: Stream, length: int) -> int:
        """Record that the run's next chunk (``length`` bytes) is not kept here, and return
        its seq; 0 when even that does not fit."""
        run_id = run_id.lower()
        if self.total + _HEADER.size > self._limit + self._limit // _PLACEHOLDER_SHARE:
            return 0
        entries = self._index.setdefault(run_id, array("Q"))
        seq = len(entries) + 1
        offset = self._sizes.get(run_id, 0)
        try:
            _write_all(self._fd(run_id), _HEADER.pack(seq, _STREAM_CODE[stream] | _UNKEPT, length))
        except OSError as exc:
            logger.error("cannot record output of run %s: %s", run_id, exc)
            return 0
        entries.append(offset)
        self._sizes[run_id] = offset + _HEADER.size
        self.total += _HEADER.size
        return seq

    def read(self, run_id: str, seq: int) -> tuple[Stream, bytes | None] | None:
        """Chunk ``seq`` of the run (its data None if it was not kept), or None if there is
        no such chunk or it cannot be read."""
        run_id = run_id.lower()
        entries = self._index.get(run_id)
        if entries is None or not 0 < seq <= len(entries):
            return None
        try:
            with open(self._path(run_id), "rb") as handle:
                handle.seek(entries[seq - 1])
                header = handle.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return None
                _, code, length = _HEADER.unpack(header)
                data = handle.read(length) if not code & _UNKEPT else None
        except OSError as exc:
            logger.error("cannot read back output of run %s: %s", run_id, exc)
            return None
        stream = _CODE_STREAM.get(code & ~_UNKEPT)
        if stream is None or (data is not None and len(data) != length):
            return None
        return stream, data

    def seal(self, run_id: str) -> None:
        """The run printed its last: sync its journal and close the file."""
        run_id = run_id.lower()
        fd = self._fds.pop(run_id, None)
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, run_id: str) -> None:
        """The control plane has the run's output (or never will): forget it."""
        run_id = run_id.lower()
        self.seal(run_id)
        self._index.pop(run_id, None)
        self.total -= self._sizes.pop(run_id, 0)
        with contextlib.suppress(OSError):
            self._path(run_id).unlink(missing_ok=True)

    def _fd(self, run_id: str) -> int:
        fd = self._fds.get(run_id)
        if fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            fd = self._fds[run_id] = os.open(self._path(run_id), flags, 0o600)
        return fd

    def _path(self, run_id: str) -> Path:
        return self._dir / f"{run_id.lower()}.out"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class OutputLink(Protocol):
    """What sending output needs of a link."""

    @property
    def connected(self) -> bool: ...

    @property
    def confirms_delivery(self) -> bool:
        """Whether a successful send means the chunk is safe (RabbitMQ's publisher confirm),
        rather than only written to a connection that may still break (gRPC)."""
        ...

    async def send(self, message: pb.CommandMessage, *, droppable: bool = False) -> bool: ...


class Connections:
    """Counts the connections the link has made, so that each run knows when to re-send."""

    def __init__(self) -> None:
        self.generation = 0

    def reconnected(self) -> None:
        self.generation += 1


class RunOutput:
    """One run's output: numbered and journaled as it is printed, sent in order by a task.

    ``add`` never waits, so a slow or absent connection never stalls the command on its pipe;
    what waits is in the journal, not in memory.
    """

    def __init__(
        self,
        run_id: str,
        task_id: str,
        journal: OutputJournal,
        link: OutputLink,
        connections: Connections,
        *,
        finished: bool = False,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self._journal = journal
        self._link = link
        self._connections = connections
        self._next = 1  # the next seq to send on this connection
        self._confirmed = 0  # every chunk up to this one is safe with the control plane
        self._generation = connections.generation
        self._carry: dict[Stream, bytes] = {}
        self.lost = 0  # bytes that did not fit, not yet marked
        # Chunks not sent yet, by seq: those not kept in the journal (their only copy), and
        # fresh ones that are (no read-back for the first send); at most LIVE_MAX of them.
        self._live: dict[int, tuple[Stream, bytes]] = {}
        self._live_bytes = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if not finished:
            self._task = asyncio.create_task(self._pump(), name=f"output-{run_id}")

    def add(self, stream: Stream, data: bytes) -> None:
        """A chunk the command printed."""
        data = self._carry.pop(stream, b"") + data
        cut = utf8_cut(data)
        if cut < len(data):
            self._carry[stream] = data[cut:]
            data = data[:cut]
        if data:
            self._keep(stream, data)

    def _keep(self, stream: Stream, data: bytes) -> None:
        if self.lost and self._journal.append(self.run_id, "stderr", lost_marker(self.lost)):
            self.lost = 0
        if not self.lost:
            seq = self._journal.append(self.run_id, stream, data)
            if seq:
                self._hold(seq, stream, data)
                self._wake.set()
                return
            # The spool is full: sent once if possible, not again after a reconnect (the
            # control plane marks what then never arrived).
            seq = self._journal.append_unkept(self.run_id, stream, len(data))
            if seq:
                self._hold(seq, stream, data)
                self._wake.set()
                return
            logger.warning("output spool full: output of run %s is being lost", self.run_id)
        self.lost += len(data)

    def _hold(self, seq: int, stream: Stream, data: bytes) -> None:
        if self._live_bytes + len(data) <= LIVE_MAX:
            self._live[seq] = (stream, data)
            self._live_bytes += len(data)

    def wake(self) -> None:
        """Look again: the link reconnected."""
        self._wake.set()

    def end(self) -> None:
        """The command ended: keep what is left (a split character, the lost-output marker)
        and sync the journal, before the result is spooled."""
        for stream in list(self._carry):
            self._keep(stream, self._carry.pop(stream))
        if self.lost:
            self._journal.append(self.run_id, "stderr", lost_marker(self.lost), force=True)
            self.lost = 0
        self._journal.seal(self.run_id)

    async def drain(self) -> bool:
        """Stop the sending task and send what is left; True if everything went out on the
        current connection (then the result may follow on it)."""
        await self.stop()
        return await self.flush()

    def cancel(self) -> None:
        """Stop the sending task without waiting for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Stop the sending task between two sends (a flush still sends)."""
        task, self._task = self._task, None
        if task is None:
            return
        # Not in the middle of a send: one cut short may still go out, and would go twice.
        async with self._lock:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def flush(self) -> bool:
        """Send every kept chunk not sent on this connection yet; True if all went out."""
        async with self._lock:
            while True:
                if self._connections.generation != self._generation:
                    # A new connection: what went out on the old one may not have arrived.
                    self._generation = self._connections.generation
                    self._next = self._confirmed + 1
                if self._next > self._journal.last_seq(self.run_id):
                    return True
                if not self._link.connected:
                    return False
                held = self._live.pop(self._next, None)
                if held is not None:
                    stream, data = held
                    self._live_bytes -= len(data)
                else:
                    chunk = self._journal.read(self.run_id, self._next)
                    kept = None if chunk is None else chunk[1]
                    if chunk is None or kept is None:
                        # Not kept and already sent (or never could be), or unreadable (the
                        # disk failed under us): if it never arrived, the control plane
                        # marks the gap.
                        self._next += 1
                        continue
                    stream, data = chunk[0], kept
                message = pb.CommandMessage(
                    output=pb.OutputChunk(
                        run_id=self.run_id,
                        task_id=self.task_id,
                        stream=stream,
                        seq=self._next,
                        data=data,
                    )
                )
                generation = self._generation
                if not await self._link.send(message):
                    return False
                if generation == self._connections.generation:
                    if self._link.confirms_delivery:
                        self._confirmed = self._next
                    self._next += 1

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not await self.flush() and self._link.connected:
                await asyncio.sleep(_RETRY_DELAY)
                self._wake.set()
