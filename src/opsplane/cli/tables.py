"""Tables and detail views of tasks, runs and hosts, from the API's JSON (no network)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from opsplane.cli.client import Json
from opsplane.cli.output import (
    counts_cell,
    counts_summary,
    elapsed,
    format_duration,
    format_duration_ms,
    format_load,
    format_percent,
    format_relative,
    host_status_text,
    host_style,
    int_or_zero,
    parse_time,
    status_style,
    status_text,
    text_or,
)


def runs_table(runs: Iterable[Json]) -> Table:
    """Host, status, exit code, duration and error of each run (attempt when retried)."""
    ordered = sorted(runs, key=lambda r: (str(r.get("host", "")), int_or_zero(r.get("attempt"))))
    show_attempt = any(int_or_zero(r.get("attempt")) > 1 for r in ordered)
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("HOST", no_wrap=True)
    if show_attempt:
        table.add_column("TRY", justify="right")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("EXIT", justify="right")
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("ERROR", overflow="fold")
    for run in ordered:
        host = str(run.get("host", "?"))
        cells: list[Text | str] = [Text(host, style=host_style(host))]
        if show_attempt:
            cells.append(str(int_or_zero(run.get("attempt"))))
        exit_code = run.get("exit_code")
        cells += [
            status_text(run.get("status")),
            "-" if exit_code is None else str(exit_code),
            format_duration_ms(run.get("duration_ms")),
            Text(text_or(run.get("error"), ""), style="red"),
        ]
        table.add_row(*cells)
    return table


def summary_runs(runs: list[Json], limit: int) -> tuple[list[Json], int]:
    """The runs a summary shows, and how many it leaves out: all of them up to ``limit``,
    else the ones that did not succeed (still at most ``limit``)."""
    if len(runs) <= limit:
        return runs, 0
    shown = [r for r in runs if r.get("status") != "succeeded"][:limit]
    return shown, len(runs) - len(shown)


def interrupted_message(task_id: str) -> str:
    return (
        f"interrupted: task {task_id} was not canceled and goes on without you.\n"
        f"  cancel it:  opsplane tasks cancel {task_id}\n"
        f"  follow it:  opsplane tasks logs {task_id} --follow"
    )


def summary_line(task: Mapping[str, Any], wall_seconds: float | None) -> Text:
    """``✓ task ID succeeded · 3 hosts: 3 succeeded · 1.2s``."""
    status = str(task.get("status", "?"))
    counts = task.get("counts") or {}
    total = int_or_zero(counts.get("total"))
    mark = "✓" if status == "succeeded" else "✗"
    style = status_style(status) or "bold"
    return Text.assemble(
        (f"{mark} task {task.get('id', '?')} {status.replace('_', ' ')}", f"bold {style}"),
        f" · {total} host{'' if total == 1 else 's'}: {counts_summary(counts)}",
        f" · {format_duration(wall_seconds)}",
    )


def tasks_table(tasks: Iterable[Json], now: datetime) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("NAME", overflow="fold")
    table.add_column("STATUS", no_wrap=True)
    table.add_column("OK/FAILED/TOTAL", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    for task in tasks:
        table.add_row(
            str(task.get("id", "?")),
            text_or(task.get("name")),
            status_text(task.get("status")),
            counts_cell(task.get("counts") or {}),
            format_relative(task.get("created_at"), now),
            format_duration(task_duration(task, now)),
        )
    return table


def task_duration(task: Mapping[str, Any], now: datetime) -> float | None:
    """From start to finish; to now while it runs; None before it starts."""
    start = task.get("started_at") or (task.get("created_at") if task.get("finished_at") else None)
    return elapsed(start, task.get("finished_at"), now)


def task_wall_time(task: Mapping[str, Any]) -> float | None:
    """From creation to finish, when the task has finished."""
    return elapsed(task.get("created_at"), task.get("finished_at"))


def format_targets(targets: Any) -> str:
    if not isinstance(targets, Mapping):
        return text_or(targets)
    parts: list[str] = []
    if targets.get("all"):
        parts.append("all hosts")
    if targets.get("hosts"):
        parts.append("hosts " + ", ".join(map(str, targets["hosts"])))
    if targets.get("groups"):
        parts.append("groups " + ", ".join(map(str, targets["groups"])))
    return "; ".join(parts) or "-"


def _timestamp(value: Any, now: datetime) -> str:
    moment = parse_time(value)
    if moment is None:
        return "-"
    return f"{moment.isoformat(timespec='seconds')} ({format_relative(moment, now)})"


def _details(rows: Iterable[tuple[str, Text | str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def task_detail(task: Mapping[str, Any], now: datetime) -> Table:
    counts = task.get("counts") or {}
    progress = task.get("progress") or {}
    timeout = task.get("timeout")
    percent = progress.get("percent")
    progress_text = (
        f"{int_or_zero(progress.get('finished'))}/{int_or_zero(progress.get('total'))}"
        + (f" ({percent:.0f}%)" if isinstance(percent, int | float) else "")
    )
    return _details(
        [
            ("id", str(task.get("id", "?"))),
            ("name", text_or(task.get("name"))),
            *([("description", str(task["description"]))] if task.get("description") else []),
            ("kind", text_or(task.get("kind"))),
            ("command", Text(text_or(task.get("command")))),
            ("targets", format_targets(task.get("targets"))),
            ("timeout", "-" if timeout is None else f"{timeout}s"),
            ("status", status_text(task.get("status"))),
            ("runs", counts_summary(counts)),
            ("progress", progress_text),
            ("created by", text_or(task.get("created_by"))),
            *([("run as", str(task["run_as"]))] if task.get("run_as") else []),
            ("created", _timestamp(task.get("created_at"), now)),
            ("started", _timestamp(task.get("started_at"), now)),
            ("finished", _timestamp(task.get("finished_at"), now)),
            ("duration", format_duration(task_duration(task, now))),
        ]
    )


def hosts_table(hosts: Iterable[Json], now: datetime) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("NAME", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("LINK", no_wrap=True)
    table.add_column("GROUPS", overflow="fold")
    table.add_column("CPU", justify="right", no_wrap=True)
    table.add_column("MEM", justify="right", no_wrap=True)
    table.add_column("LOAD", justify="right", no_wrap=True)
    table.add_column("LAST SEEN", no_wrap=True)
    for host in hosts:
        table.add_row(
            str(host.get("name", "?")),
            host_status_text(host.get("status")),
            text_or(host.get("link")),
            ", ".join(map(str, host.get("groups") or [])) or "-",
            format_percent(host.get("cpu_usage")),
            format_percent(host.get("memory_usage")),
            format_load(host.get("load")),
            format_relative(host.get("last_seen_at"), now),
        )
    return table


def hosts_caption(hosts: list[Json]) -> str:
    online = sum(1 for h in hosts if h.get("status") == "online")
    return f"{len(hosts)} host{'' if len(hosts) == 1 else 's'}, {online} online"


def host_detail(host: Mapping[str, Any], now: datetime) -> Table:
    labels = host.get("labels") or {}
    label_text = (
        ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        if isinstance(labels, Mapping)
        else str(labels)
    )
    return _details(
        [
            ("name", str(host.get("name", "?"))),
            ("status", host_status_text(host.get("status"))),
            ("link", text_or(host.get("link"))),
            ("groups", ", ".join(map(str, host.get("groups") or [])) or "-"),
            ("labels", label_text or "-"),
            ("last seen", _timestamp(host.get("last_seen_at"), now)),
            ("cpu", format_percent(host.get("cpu_usage"))),
            ("memory", format_percent(host.get("memory_usage"))),
            ("load", format_load(host.get("load"))),
            ("disk", format_percent(host.get("disk_usage"))),
            ("agent", text_or(host.get("agent_version"))),
            ("os", text_or(host.get("os"))),
        ]
    )
