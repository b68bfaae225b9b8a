"""The swarm's figures for ``bench/run`` (bench/suite/providers.py, provider ``swarm``).

    python -m bench.swarm.figures --bench-run-json OUT [--quick]

Runs ``python -m bench.swarm --agents N --broadcasts 3 --restart --json`` (N = 10,000, or 1,000
with ``--quick``) and writes the figures ``connect.10k``, ``broadcast.grpc.10k``,
``memory.10k`` and ``restart.10k`` in bench/run's shape. The broadcast figure is the median of
the three broadcasts. ``broadcast.amqp.10k`` (the swarm's ``--link amqp`` on MariaDB) is the
``swarm-amqp`` provider's (bench/suite/scripts.py), which needs a vhost and a database of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BROADCASTS = 3


def _phase_figure(phase: dict[str, Any] | None, agents: int) -> dict[str, Any]:
    if not phase:
        return {}
    give_ups = int(phase.get("give_ups", 0))
    return {
        "value": phase.get("all_online_s"),
        "unit": "s",
        "note": f"{phase.get('online')}/{agents} online, {give_ups} give-ups, "
        f"{phase.get('shed', 0)} shed; control plane {phase.get('cp_cpu_pct')} % of a core",
        "conditions_met": phase.get("online") == agents and give_ups == 0,
    }


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """bench/run's figures from one swarm report (``python -m bench.swarm --json``)."""
    agents = int(report["agents"])
    done = [b["terminal_s"] for b in report.get("broadcasts", []) if b.get("terminal_s")]
    out: dict[str, Any] = {
        "connect.10k": _phase_figure(report.get("connect"), agents),
        "restart.10k": _phase_figure(report.get("restart"), agents),
        "memory.10k": {
            "value": report.get("cp_rss_mib_after"),
            "unit": "MiB",
            "note": f"{agents} streams, after {len(done)} broadcasts",
        },
    }
    if done:
        out["broadcast.grpc.10k"] = {
            "value": statistics.median(done),
            "unit": "s",
            "note": f"median of {len(done)} broadcasts to {agents} agents, SQLite",
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm.figures")
    parser.add_argument("--bench-run-json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    agents = 1000 if opts.quick else 10_000
    argv = [sys.executable, "-m", "bench.swarm", "--agents", str(agents), "--procs", "3",
            "--broadcasts", str(BROADCASTS), "--restart", "--online-timeout", "240",
            "--broadcast-timeout", "180", "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1200)
    sys.stderr.write(done.stderr)
    report = json.loads(done.stdout)
    opts.bench_run_json.write_text(json.dumps(figures(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
