"""Rendering for the CLI: pure functions from API JSON (and stream events) to Rich objects.

Nothing here talks to the network, so every helper can be tested without a server. Remote
output is never interpreted as Rich markup: it goes through :meth:`Text.from_ansi`, which keeps
brackets literal and turns ANSI colours into styles (dropped when the output is not a terminal).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import CliError, Json, StreamEvent

#: Width used when output is not a terminal, so piped tables are not squeezed into 80 columns.
PIPE_WIDTH = 200
#: Partial lines longer than this are printed without waiting for their newline.
MAX_PENDING_LINE = 64 * 1024
#: Longest host name the live prefix is padded to.
MAX_PREFIX_WIDTH = 32

HOST_PALETTE: tuple[str, ...] = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_yellow",
    "bright_blue",
)

STATUS_STYLES: Mapping[str, str] = {
    # tasks and runs
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "canceled": "yellow",
    "running": "cyan",
    "dispatched": "blue",
    "pending": "dim",
    "delayed": "yellow",
    "undeliverable": "red",
    "lost": "red",
    # hosts
    "online": "green",
    "offline": "red",
    "unknown": "dim",
}

#: The order run counts are listed in.
COUNT_ORDER: tuple[str, ...] = (
    "succeeded",
    "failed",
    "timed_out",
    "canceled",
    "undeliverable",
    "lost",
    "running",
    "dispatched",
    "pending",
)
FAILED_COUNTS: tuple[str, ...] = ("failed", "timed_out", "undeliverable", "lost")
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"}
)


# -- consoles and errors ----------------------------------------------------------------------


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide when piped, plain when not a terminal."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def print_error(err: Console, message: str) -> None:
    err.print(Text(message, style="red"), soft_wrap=True)


@contextmanager
def reporting_errors(err: Console) -> Iterator[None]:
    """Turn a :class:`CliError` into a red message on stderr and its exit code."""
    try:
        yield
    except CliError as exc:
        print_error(err, exc.message)
        raise typer.Exit(exc.exit_code) from None


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# -- times, durations, numbers ----------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    """An aware datetime from an ISO 8601 string (naive means UTC), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_relative(when: datetime | str | None, now: datetime) -> str:
    """``"3s ago"``, ``"5m ago"``, ``"2h ago"``, ``"4d ago"``; ``"never"`` for no time."""
    moment = parse_time(when) if isinstance(when, str) else when
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        ahead = -seconds
        return "just now" if ahead < 2 else f"in {_coarse(ahead)}"
    if seconds < 1:
        return "just now"
    return f"{_coarse(seconds)} ago"


def _coarse(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_duration(seconds: float | None) -> str:
    """``"850ms"``, ``"12.3s"``, ``"2m05s"``, ``"1h02m"``; ``"-"`` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_duration_ms(ms: Any) -> str:
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return "-"
    return format_duration(ms / 1000)


def format_percent(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.0f}%" if value >= 10 else f"{value:.1f}%"


def format_load(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.2f}"


def elapsed(start: Any, end: Any, now: datetime | None = None) -> float | None:
    """Seconds from ``start`` to ``end`` (ISO strings); to ``now`` while ``end`` is unset."""
    begin = parse_time(start)
    finish = parse_time(end) or now
    if begin is None or finish is None:
        return None
    return max((finish - begin).total_seconds(), 0.0)


# -- statuses and colours ---------------------------------------------------------------------


def host_style(host: str) -> str:
    """A colour per host, stable across runs (not Python's salted ``hash``)."""
    return HOST_PALETTE[zlib.crc32(host.encode()) % len(HOST_PALETTE)]


def status_style(status: Any) -> str:
    return STATUS_STYLES.get(str(status), "")


def status_text(status: Any) -> Text:
    return Text(str(status or "-"), style=status_style(status))


def host_status_text(status: Any) -> Text:
    """A coloured dot and the word: green online, red offline, dim otherwise."""
    word = str(status or "unknown")
    style = status_style(word) or "dim"
    return Text.assemble(("●", style), " ", (word, style))


def counts_summary(counts: Mapping[str, Any]) -> str:
    """``"3 succeeded, 1 failed"``: the non-zero run counts, in a fixed order."""
    parts = [
        f"{counts[key]} {key.replace('_', ' ')}"
        for key in COUNT_ORDER
        if isinstance(counts.get(key), int) and counts[key] > 0
    ]
    return ", ".join(parts) if parts else "no runs"


def counts_cell(counts: Mapping[str, Any]) -> Text:
    """``ok/failed/total`` with the non-zero parts coloured."""
    ok = _int(counts.get("succeeded"))
    failed = sum(_int(counts.get(key)) for key in FAILED_COUNTS)
    total = _int(counts.get("total"))
    return Text.assemble(
        (str(ok), "green" if ok else ""),
        "/",
        (str(failed), "red" if failed else ""),
        "/",
        str(total),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(value: Any, default: str = "-") -> str:
    return default if value is None or value == "" else str(value)


# -- live output ------------------------------------------------------------------------------


class LineBuffer:
    """Splits chunks of output into whole lines, keeping each stream's unfinished line."""

    def __init__(self, max_pending: int = MAX_PENDING_LINE) -> None:
        self._pending: dict[tuple[str, str], str] = {}
        self._max_pending = max_pending

    def feed(self, key: tuple[str, str], chunk: str) -> list[str]:
        """The lines ``chunk`` completes for ``key``; the rest waits for the next chunk."""
        data = self._pending.pop(key, "") + chunk
        *lines, rest = data.split("\n")
        if len(rest) > self._max_pending:
            lines.append(rest)
            rest = ""
        if rest:
            self._pending[key] = rest
        return [clean_line(line) for line in lines]

    def flush(self, key: tuple[str, str]) -> list[str]:
        rest = self._pending.pop(key, "")
        return [clean_line(rest)] if rest else []

    def flush_all(self) -> list[tuple[tuple[str, str], str]]:
        keys = list(self._pending)
        return [(key, line) for key in keys for line in self.flush(key)]

    def pending_keys(self) -> list[tuple[str, str]]:
        return list(self._pending)


def clean_line(line: str) -> str:
    """A line as a terminal would leave it: no CRLF ``\\r``; after a bare ``\\r``, the last part."""
    line = line.rstrip("\r")
    if "\r" in line:
        line = line.rsplit("\r", 1)[1]
    return line


LineKind = Literal["stdout", "stderr", "status"]


@dataclass(frozen=True)
class LiveLine:
    """One line to print while following a task."""

    host: str
    kind: LineKind
    text: str
    style: str = ""

    @property
    def to_stderr(self) -> bool:
        """Remote stderr and run status notes go to stderr; stdout carries remote stdout only."""
        return self.kind != "stdout"


class LiveRenderer:
    """Turns a task's stream events into the lines to print, host by host."""

    def __init__(self, hosts: Iterable[str] = ()) -> None:
        self._buffer = LineBuffer()
        self._hosts: dict[str, str] = {}  # run id -> host
        self.width = 0
        for host in hosts:
            self._see_host(host)

    def _see_host(self, host: str) -> None:
        self.width = min(max(self.width, len(host)), MAX_PREFIX_WIDTH)

    def handle(self, event: StreamEvent) -> list[LiveLine]:
        data = event.data
        run_id = str(data.get("run_id", ""))
        host = str(data.get("host") or self._hosts.get(run_id) or "?")
        if event.event == "output":
            self._hosts[run_id] = host
            self._see_host(host)
            stream: LineKind = "stderr" if data.get("stream") == "stderr" else "stdout"
            chunk = data.get("data")
            if not isinstance(chunk, str):
                return []
            return [
                LiveLine(host, stream, line) for line in self._buffer.feed((run_id, stream), chunk)
            ]
        if event.event == "run":
            self._hosts[run_id] = host
            self._see_host(host)
            status = str(data.get("status", ""))
            if status not in TERMINAL_RUN_STATUSES:
                return []
            lines = self._flush_run(run_id, host)
            if status != "succeeded":
                lines.append(LiveLine(host, "status", run_note(data), status_style(status)))
            return lines
        return []

    def _flush_run(self, run_id: str, host: str) -> list[LiveLine]:
        lines: list[LiveLine] = []
        for stream in ("stdout", "stderr"):
            kind: LineKind = "stderr" if stream == "stderr" else "stdout"
            lines.extend(
                LiveLine(host, kind, line) for line in self._buffer.flush((run_id, stream))
            )
        return lines

    def finish(self) -> list[LiveLine]:
        """The unfinished lines still buffered, once the stream is over."""
        lines: list[LiveLine] = []
        for (run_id, stream), line in self._buffer.flush_all():
            kind: LineKind = "stderr" if stream == "stderr" else "stdout"
            lines.append(LiveLine(self._hosts.get(run_id, "?"), kind, line))
        return lines


def run_note(run: Mapping[str, Any]) -> str:
    """``"failed (exit 1)"``, ``"undeliverable: host offline"``: how a run ended."""
    status = str(run.get("status", "")).replace("_", " ")
    exit_code = run.get("exit_code")
    note = status
    if isinstance(exit_code, int) and status != "succeeded":
        note += f" (exit {exit_code})"
    error = run.get("error")
    if error:
        note += f": {error}"
    return note


def render_live_line(line: LiveLine, width: int = 0) -> Text:
    """``host | text`` for stdout, ``host ! text`` (red mark) for stderr, ``host » note``."""
    prefix = Text(line.host.ljust(width), style=host_style(line.host))
    if line.kind == "stdout":
        return Text.assemble(prefix, (" | ", "dim"), Text.from_ansi(line.text))
    if line.kind == "stderr":
        return Text.assemble(prefix, (" ! ", "bold red"), Text.from_ansi(line.text))
    return Text.assemble(prefix, (" » ", "dim"), (line.text, line.style))


# -- tables and details -----------------------------------------------------------------------


def runs_table(runs: Iterable[Json]) -> Table:
    """Host, status, exit code, duration and error of each run (attempt when retried)."""
    ordered = sorted(runs, key=lambda r: (str(r.get("host", "")), _int(r.get("attempt"))))
    show_attempt = any(_int(r.get("attempt")) > 1 for r in ordered)
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
            cells.append(str(_int(run.get("attempt"))))
        exit_code = run.get("exit_code")
        cells += [
            status_text(run.get("status")),
            "-" if exit_code is None else str(exit_code),
            format_duration_ms(run.get("duration_ms")),
            Text(_str(run.get("error"), ""), style="red"),
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
    total = _int(counts.get("total"))
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
            _str(task.get("name")),
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
        return _str(targets)
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
    progress_text = f"{_int(progress.get('finished'))}/{_int(progress.get('total'))}" + (
        f" ({percent:.0f}%)" if isinstance(percent, int | float) else ""
    )
    return _details(
        [
            ("id", str(task.get("id", "?"))),
            ("name", _str(task.get("name"))),
            *([("description", str(task["description"]))] if task.get("description") else []),
            ("kind", _str(task.get("kind"))),
            ("command", Text(_str(task.get("command")))),
            ("targets", format_targets(task.get("targets"))),
            ("timeout", "-" if timeout is None else f"{timeout}s"),
            ("status", status_text(task.get("status"))),
            ("runs", counts_summary(counts)),
            ("progress", progress_text),
            ("created by", _str(task.get("created_by"))),
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
            _str(host.get("link")),
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
            ("link", _str(host.get("link"))),
            ("groups", ", ".join(map(str, host.get("groups") or [])) or "-"),
            ("labels", label_text or "-"),
            ("last seen", _timestamp(host.get("last_seen_at"), now)),
            ("cpu", format_percent(host.get("cpu_usage"))),
            ("memory", format_percent(host.get("memory_usage"))),
            ("load", format_load(host.get("load"))),
            ("disk", format_percent(host.get("disk_usage"))),
            ("agent", _str(host.get("agent_version"))),
            ("os", _str(host.get("os"))),
        ]
    )
