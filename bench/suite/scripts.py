"""Providers that run the stand-alone bench scripts and read their figures.

``bench/idle_fleet.py``, ``bench/broadcast.py``, ``bench/list_hosts.py``,
``bench/agent_footprint.py`` and ``python -m bench.swarm --link amqp`` each print their own
table for a person at a terminal; each also has a machine-readable output (``--json``, or a
summary line), which is what these adapters read. The scripts stay usable alone (and against
an older checkout, ``PYTHONPATH=…/src``); nothing here changes what they measure.

Every script runs in its own session under :class:`Processes` (so a control plane or fleet it
started dies with it), bounded in time; its stdout goes to ``<work>/<name>.out`` and its stderr
to ``<work>/<name>.log``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import uuid
from collections.abc import Sequence
from typing import Any

from bench.suite.common import REPO, Figures, Options, Processes, project_python

AMQP_HOST = "amqp://guest:guest@127.0.0.1:5672"
MARIADB = "mysql+asyncmy://root@127.0.0.1:3306"


def _run(name: str, argv: Sequence[str], opts: Options, processes: Processes, bound: float) -> str:
    """The script's stdout, once it exited 0 within ``bound`` seconds; else RuntimeError."""
    out, log = opts.work / f"{name}.out", opts.work / f"{name}.log"
    process = processes.spawn([project_python(), *argv], log, cwd=REPO, out=out)
    try:
        code = process.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        processes.stop([process])
        raise RuntimeError(f"{argv[0]} did not finish within {bound:.0f} s") from None
    if code != 0:
        tail = log.read_text(errors="replace")[-300:].strip().replace("\n", " ")
        raise RuntimeError(f"{argv[0]} exited {code}: {tail}")
    return out.read_text(errors="replace")


def _json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def idle_fleet(opts: Options, processes: Processes) -> Figures:
    """``cpu.idle.10k``: control-plane CPU with N idle gRPC agents (heartbeats only)."""
    agents, warmup, window = (1000, 10, 20) if opts.quick else (10_000, 30, 60)
    argv = ["bench/idle_fleet.py", "--agents", str(agents), "--workers", "3",
            "--warmup", str(warmup), "--window", str(window), "--json"]  # fmt: skip
    rows = _json_lines(_run("idle_fleet", argv, opts, processes, bound=900))
    if not rows:
        raise RuntimeError("bench/idle_fleet.py printed no JSON row")
    row = rows[0]
    return {
        "cpu.idle.10k": {
            "value": row.get("cp_cpu_pct"),
            "unit": "%",
            "note": f"{row.get('agents')} idle agents (bench/idle_fleet.py), {window} s window "
            f"after {warmup} s; {row.get('commits_per_s')} commits/s, fleet CPU "
            f"{row.get('fleet_cpu_pct')} %, {row.get('offline_at_end')} offline at end; "
            f"{_load()}",
            "conditions_met": row.get("offline_at_end", 0) == 0,
        }
    }


_THROUGHPUT = re.compile(r"throughput: (\d+) one-host tasks over (\d+) agents: ([\d.]+) runs/s")
_BROADCAST = re.compile(r"median submit → all terminal: ([\d.]+) s")


def broadcast(opts: Options, processes: Processes) -> Figures:
    """``throughput``: many one-host tasks over 100 agents (bench/broadcast.py --tasks)."""
    tasks = 3000 if opts.quick else 30_000
    argv = ["bench/broadcast.py", "--agents", "100", "--broadcasts", "3", "--tasks", str(tasks)]
    text = _run("broadcast", argv, opts, processes, bound=900)
    rate = _THROUGHPUT.search(text)
    if rate is None:
        raise RuntimeError("bench/broadcast.py printed no throughput line")
    median = _BROADCAST.search(text)
    shown = f"; broadcast to the 100: {median.group(1)} s (median of 3)" if median else ""
    return {
        "throughput": {
            "value": float(rate.group(3)),
            "unit": "runs/s",
            "note": f"{rate.group(1)} one-host tasks over {rate.group(2)} simulated gRPC agents, "
            f"engine in process on SQLite (bench/broadcast.py){shown}; {_load()}",
        }
    }


def list_hosts(opts: Options, processes: Processes) -> Figures:
    """``reads.hosts`` and ``reads.fleet_view`` at N hosts on SQLite (bench/list_hosts.py)."""
    hosts, repeat = (2000, 5) if opts.quick else (10_000, max(20, opts.iterations))
    out = opts.work / "list_hosts.json"
    argv = ["bench/list_hosts.py", "--hosts", str(hosts), "--repeat", str(repeat),
            "--backends", "sqlite", "--json", str(out)]  # fmt: skip
    _run("list_hosts", argv, opts, processes, bound=600)
    rows = {row["case"]: row for row in json.loads(out.read_text())}

    def figure(case: str, what: str) -> dict[str, Any]:
        row = rows[case]
        every = rows.get("fleet view: every host", {}).get("median_ms")
        return {
            "value": round(row["median_ms"], 1),
            "unit": "ms",
            "note": f"{what} at {hosts:,} hosts, SQLite, median of {repeat} (p90 "
            f"{row['p90_ms']:.1f} ms, CPU {row['cpu_ms']:.1f} ms; every host: "
            f"{every and round(every)} ms)",
        }

    return {
        "reads.hosts": figure("GET /hosts?size=100", "`GET /api/v1/hosts?size=100`"),
        "reads.fleet_view": figure("fleet view: first screen", "the page's first screen"),
    }


def agent_footprint(opts: Options, processes: Processes) -> Figures:
    """``agent.rss`` and ``agents.online.100``: K real agent processes (bench/agent_footprint)."""
    k = 20 if opts.quick else 100
    argv = ["bench/agent_footprint.py", "--k", str(k), "--idle", "10", "--json"]
    text = _run("agent_footprint", argv, opts, processes, bound=600)
    report = json.loads(text[text.index("{") :])
    [row] = [r for r in report["rows"] if r["who"] != "salt-minion"]
    online = {
        "value": row["online_s"],
        "unit": "s",
        "note": f"{row['online_of_k']}/{k} `opsplane agent` processes started at once, "
        f"{row['cpu_per_agent_s']} s CPU each to online; load {report['conditions']['load_1m']}",
        "conditions_met": row["online_of_k"] == k,
    }
    figures: Figures = {
        "agent.rss": {
            "value": row["rss_mib_median"],
            "unit": "MiB",
            "note": f"median RSS of {k} idle agents (USS {row['uss_mib_median']} MiB); the "
            "salt-minion's from the Salt side by side (`agent.rss.k10`)",
        }
    }
    if k == 100:
        figures["agents.online.100"] = online
    else:
        figures[f"agents.online.k{k}"] = online
    return figures


async def _database(statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(f"{MARIADB}/", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


def _rabbitmqctl(*args: str) -> None:
    binary = shutil.which("rabbitmqctl")
    if binary is None:
        raise RuntimeError("rabbitmqctl is not installed (a private vhost needs it)")
    subprocess.run([binary, *args], capture_output=True, timeout=60, check=True)


def swarm_amqp(opts: Options, processes: Processes) -> Figures:
    """``broadcast.amqp.10k``: the swarm's RabbitMQ agents, control plane on MariaDB; on a
    vhost and a database of this run's own (created here, dropped after)."""
    agents = 1000 if opts.quick else 10_000
    suffix = uuid.uuid4().hex[:8]
    vhost, database = f"opsplane-bench-{suffix}", f"opsplane_bench_{suffix}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        asyncio.run(_database(f"CREATE DATABASE {database}"))
        try:
            argv = ["-m", "bench.swarm", "--link", "amqp", "--amqp-url", f"{AMQP_HOST}/{vhost}",
                    "--database-url", f"{MARIADB}/{database}", "--agents", str(agents),
                    "--procs", "3", "--amqp-connections", "3",
                    "--broadcasts", str(max(3, opts.iterations)), "--online-timeout", "600",
                    "--broadcast-timeout", "300", "--json"]  # fmt: skip
            report = json.loads(_run("swarm_amqp", argv, opts, processes, bound=1500))
        finally:
            asyncio.run(_database(f"DROP DATABASE IF EXISTS {database}"))
    finally:
        _rabbitmqctl("delete_vhost", vhost)
    done = [b["terminal_s"] for b in report.get("broadcasts", []) if b.get("terminal_s")]
    if not done:
        raise RuntimeError(f"no broadcast finished: {report.get('connect')}")
    swarm = report.get("swarm", {})
    busiest = max(b.get("swarm_worker_max_cpu_pct", 0) for b in report["broadcasts"])
    return {
        "broadcast.amqp.10k": {
            "value": statistics.median(done),
            "unit": "s",
            "note": f"median of {len(done)} broadcasts ({', '.join(map(str, done))} s) to "
            f"{agents} swarm agents over RabbitMQ, MariaDB; online in "
            f"{report['connect'].get('all_online_s')} s; {swarm.get('duplicates', 0)} "
            f"duplicates; busiest swarm worker {busiest} % of a core; {_load()}",
            "conditions_met": all(b["succeeded"] == b["runs"] for b in report["broadcasts"]),
        }
    }
