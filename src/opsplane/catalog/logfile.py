"""Per-task log files (seed 004): ``<logs_dir>/<name>.log``, one record per run.

A record is written when the run ends::

    === 2024-08-14T09:16:37.961224+08:00 session 0191… POST /async/tendb-cluster/demo1
    argv: sh -c 'echo hello aaa bbb 123 456'
    started 2024-08-14T09:16:37.950000+08:00, 12 ms, succeeded, exit code 0
    stdout| hello aaa bbb 123 456
    stderr| a warning

Every output line carries its stream, so stdout and stderr stay apart in one file. The output
is what the run's row keeps (the first and last 64 KiB of each stream); when it was cut, the
record says where the whole output is archived.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class RunRecord:
    name: str
    session_id: str
    route: str
    command: str
    status: str
    exit_code: int | None
    error: str | None
    stdout: str
    stderr: str
    started_at: datetime | None
    finished_at: datetime
    duration_ms: int | None
    truncated: bool
    archive: str | None

    def render(self) -> str:
        lines = [
            f"=== {_local(self.finished_at)} session {self.session_id} {self.route}",
            f"command: {self.command}",
        ]
        outcome = [
            f"started {_local(self.started_at) if self.started_at else '-'}",
            f"{self.duration_ms if self.duration_ms is not None else '-'} ms",
            self.status,
        ]
        if self.exit_code is not None:
            outcome.append(f"exit code {self.exit_code}")
        lines.append(", ".join(outcome))
        if self.error:
            lines.append(f"error: {self.error}")
        for stream, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            lines += [f"{stream}| {line}" for line in text.splitlines()]
        if self.truncated and self.archive:
            lines.append(f"output truncated; the whole output is in {self.archive}")
        return "\n".join(lines) + "\n"


class TaskLogs:
    """Appends run records to ``<logs_dir>/<name>.log``, one writer per file at a time."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def path_for(self, name: str) -> Path:
        # Names are validated at load to be one safe path segment (registry._NAME).
        return self.logs_dir / f"{name}.log"

    async def append(self, record: RunRecord) -> None:
        text = record.render()
        async with self._locks[record.name]:
            await asyncio.to_thread(self._write, self.path_for(record.name), text)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(text)


def _local(moment: datetime) -> str:
    """RFC 3339 in the server's local zone, as the seed prints times."""
    return moment.astimezone().isoformat()
