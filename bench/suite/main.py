# ruff: noqa: RUF001  (the multiplication sign is the issue's sign for a ratio)
"""``bench/run``: every figure of issue 15's budget table, the peer's figure from the same run,
the ratio, the budget and pass/MISS — a Markdown table on stdout and the same as JSON.

    bench/run [--quick] [--only salt,ssh] [--iterations N] [--json PATH] [--soak 10m]

Needs root (sshd for a test user, salt-minions), RabbitMQ on 127.0.0.1:5672, and the project's
venv (``pip install -e '.[dev]'``); the peers' venv is made on first use. Every process it
starts is stopped at the end, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.suite import peers_env
from bench.suite.common import BENCH, Options, Processes, cleanup_on_signals
from bench.suite.figures import BUDGETS, STAND_INS, judge
from bench.suite.providers import PROVIDERS, SOAK, Provider, run_provider

DEFAULT_JSON = BENCH / ".last-run.json"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _duration(text: str) -> int:
    """``10m``, ``90s``, ``1h`` or plain seconds → seconds."""
    match = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"a duration like 10m or 600s, not {text!r}")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def rows(figures: dict[str, dict[str, Any]], status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per budget line, judged; figures nobody measured say why."""
    table = []
    for budget in BUDGETS:
        figure = figures.get(budget.key, {})
        peer_value = figure.get("peer_value")
        peer = figure.get("peer")
        if budget.peer_from is not None:
            floor = figures.get(budget.peer_from, {})
            peer_value, peer = floor.get("peer_value"), floor.get("peer")
        verdict = judge(budget, figure, peer_value)
        if not figure:
            verdict["result"] = status.get(budget.key, "not measured (no provider)")
        table.append({
            "key": budget.key, "figure": budget.figure, "opsplane": figure.get("value"),
            "peer": peer, "peer_value": peer_value, "ratio": verdict["ratio"],
            "budget": budget.budget, "result": verdict["result"], "note": figure.get("note"),
        })  # fmt: skip
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| figure | opsplane | peer | peer's | ratio | budget | result |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for row in table:
        ratio = f"{row['ratio']:.2f} ×" if row["ratio"] is not None else "—"
        lines.append(
            f"| {row['figure']} | {_fmt(row['opsplane'])} | {row['peer'] or '—'} | "
            f"{_fmt(row['peer_value'])} | {ratio} | {row['budget']} | {row['result']} |"
        )
    notes = [f"- `{r['key']}`: {r['note']}" for r in table if r["note"]]
    return "\n".join([*lines, "", "Notes:", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N (about 3 minutes)")
    known = ", ".join(p.name for p in PROVIDERS)
    parser.add_argument("--only", default="", help=f"comma-separated providers, of: {known}")
    parser.add_argument("--skip", default="", help="comma-separated provider names")
    parser.add_argument("--iterations", type=int, default=None, help="samples per timing [3]")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the JSON goes")
    parser.add_argument("--soak", type=_duration, default=None, help="e.g. 10m: memory over time")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)

    names = {p.name for p in PROVIDERS}
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    if unknown := (only | skip) - names:
        parser.error(f"unknown providers {sorted(unknown)}; known: {sorted(names)}")
    chosen: list[Provider] = [
        p for p in PROVIDERS if (not only or p.name in only) and p.name not in skip
    ]
    if args.soak is not None:
        chosen.append(
            dataclasses.replace(SOAK, argv=(*SOAK.argv, "--seconds", str(args.soak)),
                                bound=args.soak + 900)
        )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="opsplane-bench-run-"))
    opts = Options(quick=args.quick, work=work, iterations=args.iterations or 3)
    processes = Processes()
    figures: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    timings: dict[str, float] = {}
    for provider in PROVIDERS:
        if provider not in chosen:
            status |= dict.fromkeys(provider.keys, "not run (--only/--skip)")
    if args.soak is None:
        status |= dict.fromkeys(SOAK.keys, "not run (bench/run --soak 10m)")
    started = time.monotonic()
    peers: dict[str, str] = {}
    try:
        with cleanup_on_signals(processes):
            if any(p.peers for p in chosen):
                _log("peers' venv: " + peers_env.ensure())
                peers = peers_env.versions()
            for provider in chosen:
                _log(f"{provider.name}: measuring {', '.join(provider.keys)}")
                t0 = time.monotonic()
                got, state = run_provider(provider, opts, processes)
                timings[provider.name] = time.monotonic() - t0
                _log(f"{provider.name}: {state} ({timings[provider.name]:.0f} s)")
                figures |= got
                for key in provider.keys:
                    if key not in got:
                        missing = "not measured in --quick" if args.quick else "not returned"
                        status[key] = state if state != "ok" else f"not measured ({missing})"
    except KeyboardInterrupt:
        _log("interrupted: every started process stopped; partial table follows")
    finally:
        if args.keep:
            _log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for key, stand_in in STAND_INS.items():
        if key not in figures and stand_in in figures:
            note = f"measured as `{stand_in}`: {figures[stand_in].get('note')}"
            figures[key] = {**figures[stand_in], "note": note}
    table = rows(figures, status)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "quick": args.quick, "iterations": opts.iterations, "peers": peers,
        "seconds": round(time.monotonic() - started, 1), "provider_seconds": timings,
        "rows": table, "figures": figures,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(markdown(table))
    print(f"\n{report['date']}, {os.cpu_count()} CPUs, {report['seconds']:.0f} s in all; "
          f"peers: {peers or 'not used'}; JSON: {args.json}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
