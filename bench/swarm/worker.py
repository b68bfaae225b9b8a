"""One swarm worker process: runs ``--count`` simulated agents and reports their counters.

Started by the orchestrator (``bench/swarm/cli.py``), never by hand. Protocol on stdio, one JSON
object a line: the worker prints ``{"ready": true}`` once its agents' keys exist, starts them
when it reads ``go`` on stdin, then prints its :class:`SwarmStats` every ``--every`` seconds
until it is terminated (SIGTERM) or stdin closes.

    python -m bench.swarm.worker --address 127.0.0.1:50051 --first 0 --count 2500
    python -m bench.swarm.worker --link amqp --amqp-url amqp://… --first 0 --count 2500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
from typing import get_args

from bench.swarm.amqp import AmqpStats, make_agents
from bench.swarm.simulator import AgentSimulator, GrpcAgent, Mode, SwarmStats
from opsplane.security.signing import load_public_key


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _agents(args: argparse.Namespace) -> tuple[SwarmStats, list[AgentSimulator]]:
    groups = tuple(g for g in args.groups.split(",") if g)
    if args.link == "amqp":
        amqp_stats = AmqpStats()
        key = load_public_key(args.cp_key) if args.cp_key else None
        return amqp_stats, make_agents(
            url=args.amqp_url,
            prefix=args.prefix,
            first=args.first,
            count=args.count,
            groups=groups,
            mode=args.mode,
            stats=amqp_stats,
            connections=args.amqp_connections,
            control_plane_key=key,
            heartbeat_interval=args.heartbeat_interval,
        )
    stats = SwarmStats()
    agents: list[AgentSimulator] = [
        GrpcAgent(f"{args.prefix}-{i:05d}", groups, stats, args.mode, address=args.address)
        for i in range(args.first, args.first + args.count)
    ]
    for agent in agents:
        agent.record = args.record
    return stats, agents


async def _run(args: argparse.Namespace) -> None:
    stats, agents = _agents(args)
    # The agents' keys and objects live as long as the process: keep them out of the
    # collector's generations (DESIGN §5: GC was 40 % of a broadcast at 10,000 streams).
    gc.collect()
    gc.freeze()
    _emit({"ready": True})
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    closed = loop.run_in_executor(None, sys.stdin.readline)
    try:
        while not closed.done():
            await asyncio.wait([closed], timeout=args.every)
            _emit(stats.as_dict())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="", help="the control plane's gRPC endpoint")
    parser.add_argument("--link", choices=["grpc", "amqp"], default="grpc")
    parser.add_argument("--amqp-url", help="amqp: the broker (with the control plane's vhost)")
    parser.add_argument("--amqp-connections", type=int, default=2, help="amqp: per process")
    parser.add_argument("--cp-key", help="amqp: the control plane's public key (verify commands)")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="amqp: seconds")
    parser.add_argument("--first", type=int, default=0, help="index of the first agent")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="swarm")
    parser.add_argument("--groups", default="swarm")
    parser.add_argument("--mode", choices=get_args(Mode), default="reply")
    parser.add_argument("--record", help="grpc: append 'NAME RUN_ID ATTEMPT' per command run")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between stats lines")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))


if __name__ == "__main__":
    main()
