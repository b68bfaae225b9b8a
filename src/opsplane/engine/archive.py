"""Per-run output archive: the whole output of every run, appended as it arrives.

Paths are ``<logs_dir>/<task_id>/<run_id>.log``, one file per run, so the archive can move to
object storage run by run (DESIGN §7).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path


class LogArchive:
    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir

    def path_for(self, task_id: str, run_id: str) -> Path:
        return self.logs_dir / task_id / f"{run_id}.log"

    async def append(self, chunks: list[tuple[Path, bytes]]) -> None:
        if chunks:
            await asyncio.to_thread(self._append, chunks)

    @staticmethod
    def _append(chunks: list[tuple[Path, bytes]]) -> None:
        by_path: defaultdict[Path, list[bytes]] = defaultdict(list)
        for path, data in chunks:
            by_path[path].append(data)
        for path, parts in by_path.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as handle:
                handle.write(b"".join(parts))

    async def read(self, path: Path) -> bytes:
        def _read() -> bytes:
            return path.read_bytes() if path.is_file() else b""

        return await asyncio.to_thread(_read)
