"""Time to welcome for gRPC agents: what the hello challenge (issue 14 §3) costs a connect.

Starts a real control plane in-process (engine on SQLite, gRPC link on loopback), then connects
simulated agents that speak the real protocol (signed hello; on a control plane that sends a
challenge, the hello answers it) and measures, per agent, dial → welcome. Runs them one after
the other (``--sequential``) and then ``--concurrent`` at once, each agent on its own channel.
Works against a checkout without the challenge too (PYTHONPATH=old/src), for a before/after.

    python bench/grpc_connect.py [--sequential 200] [--concurrent 300]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import grpc.aio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.security.signing import public_key_text, sign
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc import opsplane_pb2_grpc as pb_grpc
from opsplane.transport.grpc.server import GrpcLink

CHALLENGE_KEY = getattr(convert, "CHALLENGE_KEY", None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _connect(address: str, name: str, key: Ed25519PrivateKey) -> float:
    """Dial, say hello (answering the challenge if there is one), wait for the welcome."""
    start = time.perf_counter()
    channel = grpc.aio.insecure_channel(address)
    try:
        call = pb_grpc.CommandServiceStub(channel).ConnectForCommands()
        fields: dict[str, object] = {}
        if CHALLENGE_KEY is not None:
            metadata = await call.initial_metadata()
            fields["challenge"] = str((metadata or {}).get(CHALLENGE_KEY) or "")
        hello = pb.Hello(
            hostname=name,
            groups=["bench"],
            public_key=public_key_text(key.public_key()),
            timestamp=time.time(),
            **fields,  # type: ignore[arg-type]
        )
        hello.signature = sign(key, convert.hello_claims(hello))
        await call.write(pb.CommandMessage(hello=hello))
        welcome = await call.read()
        assert isinstance(welcome, pb.CommandMessage) and welcome.HasField("welcome"), welcome
        elapsed = time.perf_counter() - start
        call.cancel()
        return elapsed
    finally:
        await channel.close()


def _summary(label: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"{label:<28} n={len(ms):<5} median {statistics.median(ms):7.2f} ms   p95 {p95:7.2f} ms"


async def main(sequential: int, concurrent: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        address = f"127.0.0.1:{_free_port()}"
        link = GrpcLink(address, heartbeat_interval=10.0)
        settings = load_settings(data_dir=Path(tmp), require_enrollment=False)
        engine = make_engine(settings, [link])
        await engine.start()
        try:
            keys = [Ed25519PrivateKey.generate() for _ in range(max(sequential, concurrent))]
            print(f"challenge: {'yes' if CHALLENGE_KEY else 'no (old protocol)'}")
            times = [await _connect(address, f"seq-{i}", keys[i]) for i in range(sequential)]
            print(_summary("sequential dial → welcome", times))
            started = time.perf_counter()
            times = await asyncio.gather(
                *(_connect(address, f"con-{i}", keys[i]) for i in range(concurrent))
            )
            wall = time.perf_counter() - started
            print(_summary("concurrent dial → welcome", list(times)) + f"   all in {wall:.2f} s")
        finally:
            await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.sequential, args.concurrent))
