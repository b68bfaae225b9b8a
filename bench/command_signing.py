"""CPU of making the signed gRPC command messages of one broadcast (docs/scale.md, Signatures).

``per-host``: what the control plane did before issue 15, and still does for a lone host: one
``CommandContent`` built, its fields through ``MessageToDict``, canonical JSON and an Ed25519
signature per host. ``batch``: the runs of a dispatch signed once (transport/grpc/signer.py):
the Merkle tree over the batch's (host, run id) pairs, one signature, then per host a copy of
the signed content with its run id, name, leaf index and path. Both serialize each message, as
the stream's write does. CPU seconds (``time.process_time``), best of ``--repeat``; the batch
is split as the engine dispatches a broadcast (``--batch`` runs per dispatch).

    python bench/command_signing.py [--hosts 10000] [--batch 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.transport.base import CommandBatch, CommandEnvelope
from opsplane.transport.grpc.signer import CommandSigner


def _envelopes(hosts: int, batch_size: int) -> list[tuple[str, CommandEnvelope]]:
    task_id = str(uuid.uuid4())
    names = [f"host-{i:05d}.example.internal" for i in range(hosts)]
    out: list[tuple[str, CommandEnvelope]] = []
    for start in range(0, hosts, batch_size):
        batch = CommandBatch(
            {name: str(uuid.uuid4()) for name in names[start : start + batch_size]}
        )
        for name, run_id in batch.run_ids.items():
            envelope = CommandEnvelope(
                task_id=task_id,
                run_id=run_id,
                attempt=1,
                command="systemctl is-active nginx && uptime",
                timeout=60,
                env={"LANG": "C.UTF-8"},
                user="",
                deliver_by=time.time() + 300,
                batch=batch,
            )
            out.append((name, envelope))
    return out


def _cpu(hosts: int, batch_size: int, *, batched: bool) -> tuple[float, int, int]:
    """CPU seconds, signatures made, bytes serialized."""
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    items = _envelopes(hosts, batch_size)
    size = 0
    start = time.process_time()
    now = time.time()
    for name, envelope in items:
        message = signer.command(name, envelope, now, batch_signed=batched)
        size += len(message.SerializeToString())
    return time.process_time() - start, signer.signatures, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=10_000, help="runs per dispatch batch")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for label, batched in (("per-host", False), ("batch", True)):
        runs = [_cpu(args.hosts, args.batch, batched=batched) for _ in range(args.repeat)]
        cpu, signatures, size = min(runs)
        print(
            f"{label:>8}: {args.hosts} hosts, batches of {args.batch}: CPU {cpu:.3f} s "
            f"({cpu / args.hosts * 1e6:.1f} µs/host), {signatures} signatures, "
            f"{size / args.hosts:.0f} bytes/message"
        )


if __name__ == "__main__":
    main()
