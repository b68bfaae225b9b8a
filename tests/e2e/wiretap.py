"""A logging TCP proxy for capture-and-replay attacks, and just enough HTTP/2 to read a gRPC
message out of what it captured.

The proxy (the fault tests' :class:`~tests.faults.proxy.TcpProxy`, with a capture hook) listens
on loopback, relays every connection to ``target`` and records what each client sent: what an
eavesdropper on a plaintext link would have.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from tests.faults.proxy import TcpProxy

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _PADDED = 0, 0x8


class WireTap:
    """Relays ``127.0.0.1:port`` to ``target``; ``captured()[i]`` is what connection ``i``'s
    client sent so far."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._lock = threading.Lock()
        self._captured: dict[int, bytearray] = {}
        self._proxy = TcpProxy(*target, on_client_bytes=self._record)

    def start(self) -> WireTap:
        self._proxy.start()
        return self

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def address(self) -> str:
        return self._proxy.address

    def captured(self) -> list[bytes]:
        """One entry per connection accepted so far (empty for one that sent nothing yet)."""
        with self._lock:
            return [bytes(self._captured.get(i, b"")) for i in range(self._proxy.accepted)]

    def stop(self) -> None:
        self._proxy.stop()

    def _record(self, connection: int, data: bytes) -> None:
        with self._lock:
            self._captured.setdefault(connection, bytearray()).extend(data)


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
