"""A logging TCP proxy for capture-and-replay attacks, and just enough HTTP/2 to read a gRPC
message out of what it captured.

The proxy listens on loopback, relays every connection to ``target`` and records what each
client sent: what an eavesdropper on a plaintext link would have. It runs its own asyncio loop
in a thread, so that synchronous end-to-end tests can use it next to real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _PADDED = 0, 0x8


class WireTap:
    """Relays ``127.0.0.1:port`` to ``target``; ``captured[i]`` is what connection ``i``'s
    client sent so far."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._lock = threading.Lock()
        self._captured: list[bytearray] = []
        self.port = 0

    def start(self) -> WireTap:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=10)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def captured(self) -> list[bytes]:
        with self._lock:
            return [bytes(c) for c in self._captured]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            log = bytearray()
            self._captured.append(log)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, into: bytearray | None
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if into is not None:
                        with self._lock:
                            into.extend(data)
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer, log), pump(up_reader, writer, None))
        finally:
            self._transports -= pair
            for transport in pair:
                transport.abort()


@dataclass(frozen=True)
class GrpcMessage:
    stream: int
    body: bytes
    # Where in the captured bytes the HTTP/2 frame completing this message ends.
    end: int


def grpc_messages(client_bytes: bytes) -> list[GrpcMessage]:
    """The gRPC messages a client sent on a captured plaintext HTTP/2 connection, in order."""
    if not client_bytes.startswith(PREFACE):
        raise ValueError("not an HTTP/2 client connection")
    position = len(PREFACE)
    pending: dict[int, bytearray] = {}
    found: list[GrpcMessage] = []
    while position + 9 <= len(client_bytes):
        header = client_bytes[position : position + 9]
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        payload = client_bytes[position + 9 : position + 9 + length]
        if len(payload) < length:
            break
        position += 9 + length
        if kind != _DATA:
            continue
        if flags & _PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        buffer = pending.setdefault(stream, bytearray())
        buffer.extend(payload)
        # Length-prefixed messages: a compressed flag, a 4-byte length, the message.
        while len(buffer) >= 5 and len(buffer) >= 5 + int.from_bytes(buffer[1:5], "big"):
            size = int.from_bytes(buffer[1:5], "big")
            found.append(GrpcMessage(stream, bytes(buffer[5 : 5 + size]), position))
            del buffer[: 5 + size]
    return found


def replay_raw(address: tuple[str, int], data: bytes, *, listen_for: float = 3.0) -> bytes:
    """Send captured bytes on a fresh TCP connection, as they were; what came back until the
    server closed the connection or ``listen_for`` seconds passed."""
    answer = bytearray()
    with socket.create_connection(address, timeout=5) as connection:
        connection.sendall(data)
        deadline = time.monotonic() + listen_for
        while (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer.extend(chunk)
    return bytes(answer)
