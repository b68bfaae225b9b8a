"""The bare grpc.aio floor: N streams on a server with no database, its memory and a broadcast
round trip (server writes one message to every stream → every client's reply is back).

Three processes, so the server's memory is its own: the server (``server``) and two clients
(``client``), each stream on its own channel (one TCP connection per agent, as agents have).
Raw bytes, no protobuf, nothing per stream but the call. ``provide`` runs it from ``bench/run``.

    python -m bench.suite.grpc_floor server --port P --streams N --broadcasts B --out FILE
    python -m bench.suite.grpc_floor client --port P --streams N
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.suite.common import HOST, Figures, Options, Processes, free_port, median

METHOD = "/floor.Floor/Connect"
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lags grpc.aio
CONNECT_BOUND = 180.0  # seconds for every stream to be open
BROADCAST_BOUND = 60.0  # seconds for one broadcast round trip
CONNECTS_IN_FLIGHT = 250  # per client: the DESIGN's measurement held 500 in all
CONNECT_ATTEMPTS = 8  # per stream, with full-jitter backoff
SETTLE = 20.0  # seconds without a new stream: the connect phase is over
MIN_SHARE = 0.95  # of the streams asked for, or the floor is not measured
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Floor:
    def __init__(self) -> None:
        self.streams: set[grpc.aio.ServicerContext[bytes, bytes]] = set()
        self.replies = 0
        self.wanted = 0
        self.all_back = asyncio.Event()

    async def connect(
        self, _requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        hello = await context.read()
        if hello is _EOF:
            return
        self.streams.add(context)
        try:
            while True:
                message = await context.read()
                if message is _EOF:
                    return
                self.replies += 1
                if self.replies >= self.wanted:
                    self.all_back.set()
        finally:
            self.streams.discard(context)

    async def settle(self, target: int) -> int:
        """Wait until ``target`` streams are open, or none opened for ``SETTLE`` seconds, or
        ``CONNECT_BOUND``; how many are open."""
        deadline = time.monotonic() + CONNECT_BOUND
        last_count, last_change = 0, time.monotonic()
        while len(self.streams) < target and time.monotonic() < deadline:
            if len(self.streams) != last_count:
                last_count, last_change = len(self.streams), time.monotonic()
            elif time.monotonic() - last_change > SETTLE:
                break
            await asyncio.sleep(0.5)
        return len(self.streams)

    async def broadcast(self) -> float:
        streams = list(self.streams)
        self.replies, self.wanted = 0, len(streams)
        self.all_back.clear()
        started = time.perf_counter()
        sent = await asyncio.gather(*(s.write(b"go") for s in streams), return_exceptions=True)
        failed = sum(1 for result in sent if isinstance(result, BaseException))
        if failed:
            self.wanted -= failed
            if self.replies >= self.wanted:
                self.all_back.set()
        await asyncio.wait_for(self.all_back.wait(), BROADCAST_BOUND)
        return time.perf_counter() - started


async def serve(port: int, streams: int, broadcasts: int, out: Path) -> None:
    import psutil

    _raise_fd_limit()
    floor = _Floor()
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(floor.connect)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("floor.Floor", {"Connect": handler}),)
    )
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    me = psutil.Process()
    started = time.perf_counter()
    result: dict[str, Any] = {"idle_rss_mib": me.memory_info().rss / 2**20}
    opened = await floor.settle(streams)
    result["connect_seconds"] = time.perf_counter() - started
    if opened < MIN_SHARE * streams:
        result["error"] = f"only {opened}/{streams} streams opened"
    else:
        try:
            gc.collect()
            await asyncio.sleep(2)
            result["streams"] = len(floor.streams)
            result["rss_mib"] = me.memory_info().rss / 2**20
            result["broadcast_seconds"] = [await floor.broadcast() for _ in range(broadcasts)]
            result["rss_after_mib"] = me.memory_info().rss / 2**20
        except TimeoutError:
            result["error"] = f"broadcast: {floor.replies}/{floor.wanted} replies in time"
    out.write_text(json.dumps(result))  # noqa: ASYNC240 (the loop has nothing left to do)
    await asyncio.wait_for(server.stop(grace=None), 30)


async def clients(port: int, streams: int) -> None:
    """Open ``streams`` streams, each on its own channel, at most ``CONNECTS_IN_FLIGHT``
    connecting at once; a stream that fails to open retries with full-jitter backoff, as an
    agent does. Then answer every message with a reply, until the server goes away."""
    _raise_fd_limit()
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)

    async def open_stream() -> tuple[grpc.aio.Channel, Any]:
        for attempt in range(CONNECT_ATTEMPTS):
            # A local subchannel pool: otherwise channels to one address share one TCP
            # connection, and the floor would not hold one connection per agent.
            channel = grpc.aio.insecure_channel(f"{HOST}:{port}", options=_OWN_CONNECTION)
            try:
                async with gate:
                    await asyncio.wait_for(channel.channel_ready(), 20)
                    # No serializers: raw bytes both ways (grpc-stubs wants them spelled out).
                    call = channel.stream_stream(METHOD, None, None)()  # type: ignore[call-arg]
                    await call.write(b"hi")
                return channel, call
            except (grpc.aio.AioRpcError, TimeoutError):
                await channel.close(None)
                await asyncio.sleep(random.uniform(0, min(10.0, 0.5 * 2**attempt)))
        raise RuntimeError(f"no stream after {CONNECT_ATTEMPTS} attempts")

    async def one() -> None:
        # A stream the server drops (GOAWAY under a connect storm) is opened again, as an
        # agent would; bounded like the connect attempts.
        for _ in range(CONNECT_ATTEMPTS):
            channel, call = await open_stream()
            try:
                while True:
                    message = await call.read()
                    if message is _EOF:
                        return
                    await call.write(b"ok")
            except grpc.aio.AioRpcError:
                continue
            finally:
                await channel.close(None)

    await asyncio.gather(*(one() for _ in range(streams)), return_exceptions=True)


def provide(opts: Options, processes: Processes) -> Figures:
    streams = 1000 if opts.quick else 10_000
    port = free_port()
    out = opts.work / "grpc-floor.json"
    module = [sys.executable, "-m", "bench.suite.grpc_floor"]
    server = processes.spawn(
        [*module, "server", "--port", str(port), "--streams", str(streams),
         "--broadcasts", str(max(3, opts.iterations)), "--out", str(out)],
        opts.work / "grpc-floor-server.log",
    )  # fmt: skip
    time.sleep(1.0)
    half = streams // 2
    client_procs = [
        processes.spawn(
            [*module, "client", "--port", str(port), "--streams", str(n)],
            opts.work / f"grpc-floor-client-{i}.log",
        )
        for i, n in enumerate((half, streams - half))
    ]
    try:
        server.wait(timeout=CONNECT_BOUND + 10 * BROADCAST_BOUND)
    finally:
        processes.stop([server, *client_procs])
    if not out.exists():
        raise RuntimeError(f"the floor server wrote nothing: see {opts.work}/grpc-floor-server.log")
    result = json.loads(out.read_text())
    if "error" in result:
        raise RuntimeError(f"grpc floor: {result['error']}")
    note = (
        f"{result['streams']} of {streams} streams open, 2 client processes, one TCP "
        "connection per stream"
    )
    return {
        "floor.grpc.memory": {
            "peer_value": result["rss_mib"],
            "unit": "MiB",
            "peer": "bare grpc.aio server",
            "note": f"{note}; connected in {result['connect_seconds']:.1f} s; RSS after "
            f"{len(result['broadcast_seconds'])} broadcasts {result['rss_after_mib']:.0f} MiB",
        },
        "floor.grpc.broadcast": {
            "peer_value": median(result["broadcast_seconds"]),
            "unit": "s",
            "peer": "bare grpc.aio broadcast round trip",
            "note": f"{note}; median of {len(result['broadcast_seconds'])}",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--broadcasts", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port, args.streams, args.broadcasts, args.out))
    else:
        asyncio.run(clients(args.port, args.streams))


if __name__ == "__main__":
    main()
