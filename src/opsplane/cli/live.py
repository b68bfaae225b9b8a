"""Live output while following a task: stream events → lines of ``host | text``.

Remote output is never interpreted as Rich markup (``Text.from_ansi`` keeps brackets literal);
a partial line waits for its newline unless it grows past ``MAX_PENDING_LINE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rich.text import Text

from opsplane.cli.client import StreamEvent
from opsplane.cli.output import TERMINAL_RUN_STATUSES, host_style, status_style

#: Partial lines longer than this are printed without waiting for their newline.
MAX_PENDING_LINE = 64 * 1024
#: Longest host name the live prefix is padded to.
MAX_PREFIX_WIDTH = 32


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
