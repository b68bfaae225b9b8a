"""Who measures which figure: the registry ``bench/run`` walks.

An in-tree provider is a function ``(Options, Processes) -> Figures``. An external provider is
another helper's script, run as a subprocess with the project's Python; its contract:

    <argv> --bench-run-json OUT [--quick]

writes ``Figures`` (``common.Figures``: figure key → ``value``, ``peer_value``, ``unit``,
``peer``, ``note``, optional ``conditions_met``) as JSON to OUT and exits 0. A script that is
not in the tree yields "not measured"; one that fails yields "failed: …" on its rows — never
an aborted run. To wire a script in after a merge, fix its ``argv`` below (nothing else).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.suite import amqp_floor, grpc_floor, latency, salt_side, scripts, ssh_side
from bench.suite.common import PEERS_VENV, REPO, Figures, Options, Processes, project_python


@dataclass(frozen=True)
class Provider:
    name: str
    keys: tuple[str, ...]  # the figures it returns (figures.BUDGETS keys)
    measure: Callable[[Options, Processes], Figures] | None = None
    script: str | None = None  # external: a path under the repo that must exist
    argv: tuple[str, ...] = ()  # external: the command; "{python}" and "{peers_venv}" expand
    bound: float = 600.0  # seconds an external script may take
    peers: bool = False  # needs the peers' venv (Salt, parallel-ssh)


def _external(provider: Provider, opts: Options) -> Figures:
    out = opts.work / f"{provider.name}.json"
    argv = [a.format(python=project_python(), peers_venv=str(PEERS_VENV)) for a in provider.argv]
    argv += ["--bench-run-json", str(out)] + (["--quick"] if opts.quick else [])
    log = opts.work / f"{provider.name}.log"
    with log.open("wb") as handle:
        done = subprocess.run(
            argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=provider.bound,
            check=False,
        )  # fmt: skip
    if done.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-400:].strip().replace("\n", " ")
        raise RuntimeError(f"{' '.join(argv[:3])} exited {done.returncode}: {tail}")
    figures: Figures = json.loads(out.read_text())
    return figures


def run_provider(provider: Provider, opts: Options, processes: Processes) -> tuple[Figures, str]:
    """Its figures and a status: "ok", "not measured (…)" or "failed: …"."""
    if provider.script is not None and not (REPO / provider.script).exists():
        return {}, f"not measured ({provider.script} is not in this tree)"
    started = time.monotonic()
    try:
        if provider.measure is not None:
            figures = provider.measure(opts, processes)
        else:
            figures = _external(provider, opts)
    except Exception as e:  # one provider's failure must not cost the other figures
        lines = str(e).strip().splitlines() or [""]
        last = lines[-1][:300]  # the table gets the last line; the log and stderr the rest
        print(f"{provider.name}: {type(e).__name__}: {e}", file=sys.stderr)
        return {}, f"failed after {time.monotonic() - started:.0f} s: {type(e).__name__}: {last}"
    finally:
        # Whatever it started and did not stop (a failure halfway) goes now.
        processes.stop_all()
    return figures, "ok"


PROVIDERS: tuple[Provider, ...] = (
    # In this tree (bench/suite).
    Provider("latency", ("latency.p50", "latency.p99", "live.p99"), latency.provide),
    Provider("grpc-floor", ("floor.grpc.memory", "floor.grpc.broadcast"), grpc_floor.provide),
    Provider("amqp-floor", ("floor.amqp.roundtrip",), amqp_floor.provide),
    Provider("ssh", ("ssh.vs_asyncssh", "ssh.vs_pssh"), ssh_side.provide, peers=True),
    Provider(
        "salt",
        (
            "salt.api.k10",
            "salt.api.k50",
            "salt.cli.k10",
            "salt.cli.k50",
            "agent.rss.k10",
            "agent.rss.k50",
            "agents.online.k10",
            "agents.online.k50",
        ),
        salt_side.provide,
        peers=True,
    ),
    # The stand-alone scripts of bench/, read through their --json output (bench/suite/scripts.py).
    Provider("agent-footprint", ("agent.rss", "agents.online.100"), scripts.agent_footprint),
    Provider("heartbeats", ("cpu.idle.10k",), scripts.idle_fleet),
    Provider("fanout", ("throughput",), scripts.broadcast),
    Provider("reads", ("reads.hosts", "reads.fleet_view"), scripts.list_hosts),
    Provider("swarm-amqp", ("broadcast.amqp.10k",), scripts.swarm_amqp),
    # The gRPC swarm, an external script by the --bench-run-json contract.
    Provider(
        "swarm",
        ("connect.10k", "broadcast.grpc.10k", "memory.10k", "restart.10k"),
        script="bench/swarm",
        argv=("{python}", "-m", "bench.swarm.figures"),
        bound=900,
    ),
)

# ``--soak DURATION``: memory over time, from the swarm's soak mode (the seam: its argv gets
# ``--seconds N`` and the same ``--bench-run-json OUT``; it returns at least "memory.soak",
# whose note should carry the samples, e.g. "MiB at 0/1/…/10 min: 612, 615, …").
SOAK = Provider(
    "soak",
    ("memory.soak",),
    script="bench/swarm",
    argv=("{python}", "-m", "bench.swarm", "soak"),
    bound=3600,
)
