"""A TCP proxy on loopback for fault tests: put it between opsplane and a service (a database,
RabbitMQ, an agent's connection), then cut and restore the path.

It runs its own event loop on a thread of its own, so that synchronous tests (processes driven
with ``subprocess``) and asynchronous ones use it alike, and a test that blocks its own loop
does not stop the traffic. ``cut("refuse")`` is a service gone away: open connections are reset
and new ones refused. ``cut("blackhole")`` is a network that drops everything: connections stay
open, nothing passes, new ones are accepted and never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")
CutMode = Literal["refuse", "blackhole"]
_BOUND = 10.0  # seconds for any control call


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until cut."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self._target = (target_host, target_port)
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._mode: CutMode | None = None
        self._flowing = asyncio.Event()
        #: Connections accepted in all, for the test's own checks.
        self.accepted = 0

    # Control, from any thread -------------------------------------------------------------

    def start(self) -> int:
        self._thread.start()
        self._call(self._listen())
        return self.port

    def cut(self, mode: CutMode = "refuse") -> None:
        self._call(self._cut(mode))

    def restore(self) -> None:
        self._call(self._restore())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut("refuse"))
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

    async def _cut(self, mode: CutMode) -> None:
        self._mode = mode
        self._flowing.clear()
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for client, upstream in list(self._pipes):
                for writer in (client, upstream):
                    if writer is not None:
                        writer.transport.abort()
            self._pipes.clear()

    async def _restore(self) -> None:
        mode, self._mode = self._mode, None
        if mode == "refuse":
            await self._listen()
        else:
            self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        # Ended by ``stop`` with the rest: not an error (asyncio's stream callback would report
        # a cancelled handler as one).
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pipe: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._pipes.add(pipe)
        try:
            # Blackholed: held open, never answered, until the path is restored.
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:  # the service itself is down: so is the proxied path
            self._pipes.discard(pipe)
            writer.transport.abort()
            return
        except asyncio.CancelledError:
            self._pipes.discard(pipe)
            writer.transport.abort()
            raise
        self._pipes.discard(pipe)
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._pipes.discard(pipe)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                # Blackholed: held until restored, as TCP retransmits across a dead path.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


@contextlib.contextmanager
def proxy_to(host: str, port: int) -> Iterator[TcpProxy]:
    """A started proxy to ``host:port``, stopped afterwards."""
    proxy = TcpProxy(host, port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
