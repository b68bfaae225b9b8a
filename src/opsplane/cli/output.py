"""Rendering for the CLI: consoles, errors, times, statuses and colours, as pure functions from
API JSON to Rich objects. The live output of a task is in ``cli/live.py``, tables and detail
views in ``cli/tables.py``; both are built from these helpers.

Nothing here talks to the network, so every helper can be tested without a server. Remote
output is never interpreted as Rich markup: it goes through :meth:`Text.from_ansi`, which keeps
brackets literal and turns ANSI colours into styles (dropped when the output is not a terminal).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from opsplane.cli.client import CliError

#: Width used when output is not a terminal, so piped tables are not squeezed into 80 columns.
PIPE_WIDTH = 200

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
    ok = int_or_zero(counts.get("succeeded"))
    failed = sum(int_or_zero(counts.get(key)) for key in FAILED_COUNTS)
    total = int_or_zero(counts.get("total"))
    return Text.assemble(
        (str(ok), "green" if ok else ""),
        "/",
        (str(failed), "red" if failed else ""),
        "/",
        str(total),
    )


def int_or_zero(value: Any) -> int:
    """A count from JSON; anything but an int (a missing key, a bool) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def text_or(value: Any, default: str = "-") -> str:
    """A cell's text: ``default`` for a missing or empty value."""
    return default if value is None or value == "" else str(value)
