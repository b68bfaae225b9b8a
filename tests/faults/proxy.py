"""A TCP proxy on loopback for fault and attack tests: put it between opsplane and a service (a
database, RabbitMQ, the control plane an agent dials), then break the path and mend it.

- :meth:`TcpProxy.pause`: a network that drops everything. Connections stay open (no FIN, no
  RST), nothing passes either way, new connections are accepted and held; :meth:`resume`
  lets what was held back through.
- :meth:`TcpProxy.cut`: every connection closed, with RST (a crash, a reset) or FIN (an orderly
  close); with ``refuse`` the port is closed too, so new connections are refused (a service
  gone away) until :meth:`resume`.
- ``on_client_bytes``: a hook that sees what each client sent (an eavesdropper, for replays).

It runs its own event loop on a thread of its own, so that synchronous tests (processes driven
with ``subprocess``) and asynchronous ones use it alike, and a test that blocks its own loop
does not stop the traffic. Every control method returns once the change is in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
_CHUNK = 64 * 1024
_BOUND = 10.0  # seconds for any control call

#: Called on the proxy's thread with the connection's number (0 for the first accepted) and
#: the bytes its client sent, before they are forwarded.
ClientBytesHook = Callable[[int, bytes], None]


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    handler: asyncio.Task[Any] | None
    server: asyncio.StreamWriter | None = None


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        on_client_bytes: ClientBytesHook | None = None,
    ) -> None:
        self._target = (target_host, target_port)
        self._on_client_bytes = on_client_bytes
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._flowing = asyncio.Event()
        #: Connections accepted from clients in all (held or refused by the target included).
        self.accepted = 0
        #: Connections forwarded to the target in all.
        self.connections_made = 0

    # Control, from any thread -------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def pause(self) -> None:
        """Stop forwarding bytes, both ways, keeping every connection open (no FIN, no RST);
        new connections are accepted and held, not yet connected to the target."""
        self._call(self._set_flowing(False))

    def cut(self, *, rst: bool = True, refuse: bool = True) -> None:
        """Close every connection (with RST, or with FIN when ``rst`` is False); with
        ``refuse``, the port is closed as well, so new connections are refused until
        :meth:`resume`."""
        self._call(self._cut(rst=rst, refuse=refuse))

    def resume(self) -> None:
        """Forward again (what was held back goes through) and accept new connections again,
        on the same port."""
        self._call(self._resume())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut(rst=True, refuse=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_BOUND)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        # Stopped: end what is left (pipes, held connections), then close the loop.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_BOUND)

    # On the proxy's loop ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self, *, rst: bool, refuse: bool) -> None:
        if refuse and self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self._connections):
            self._drop(connection, rst=rst)

    async def _resume(self) -> None:
        if self._server is None:
            await self._listen()
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.accepted
        self.accepted += 1
        connection = _Connection(writer, asyncio.current_task())
        self._connections.add(connection)
        # Ended by ``cut`` or ``stop``: not an error (asyncio's stream callback would report a
        # cancelled handler as one).
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await self._forward(connection, reader, number)
            finally:
                self._drop(connection, rst=False)

    async def _forward(
        self, connection: _Connection, reader: asyncio.StreamReader, number: int
    ) -> None:
        # Paused: held open, never answered, until the path is resumed.
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:  # the service itself is down: so is the proxied path
            _reset(connection.client)
            return
        connection.server = up_writer
        self.connections_made += 1
        await asyncio.gather(
            self._pump(reader, up_writer, number), self._pump(up_reader, connection.client)
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: int = -1
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if client >= 0 and self._on_client_bytes is not None:
                    self._on_client_bytes(client, data)
                # Paused: held until resumed, as TCP retransmits across a dead path.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:  # one side was reset: so is the other
            _reset(writer)
            return
        # One way done: pass the half-close on; the other way may still be talking.
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()

    def _drop(self, connection: _Connection, *, rst: bool) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        for writer in (connection.client, connection.server):
            if writer is None:
                continue
            if rst:
                _reset(writer)
            else:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()
        if connection.handler is not None and connection.handler is not asyncio.current_task():
            connection.handler.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, RuntimeError, AttributeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()


@contextlib.contextmanager
def running_proxy(
    target_host: str, target_port: int, *, on_client_bytes: ClientBytesHook | None = None
) -> Iterator[TcpProxy]:
    """A started proxy to ``target_host:target_port``, stopped afterwards."""
    proxy = TcpProxy(target_host, target_port, on_client_bytes=on_client_bytes).start()
    try:
        yield proxy
    finally:
        proxy.stop()
