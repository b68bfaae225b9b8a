"""Database bytes per run, and archive bytes per run, for docs/operations.md's sizing table.

The engine in process on a fresh database (SQLite file, or a throwaway MariaDB database on
127.0.0.1:3306), ``--hosts`` simulated agents (the in-memory link), ``--tasks`` tasks each aimed
at every host; each run reports started, one output chunk of ``--output-bytes`` and its result,
through ingest as an agent's would. The database's size is read before and after (SQLite: the
file after a WAL checkpoint; MariaDB: ``data_length + index_length`` of the schema after
``ANALYZE TABLE``, InnoDB's page-granular figure) and divided by the runs.

    .venv/bin/python bench/db_size.py [--hosts 100] [--tasks 50] [--output-bytes 64]
        [--backends sqlite,mariadb] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsplane.app_factory import make_engine
from opsplane.config import load_settings
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import TaskRequest
from opsplane.engine.core import Engine
from opsplane.transport.base import RunFinished, RunOutput, RunStarted
from opsplane.transport.memory import MemoryLink
from tests.integration.databases import (
    create_database,
    drop_database,
    migrate,
    server_url,
)


async def _size(engine: Engine, backend: str, path: Path | None) -> int:
    async with engine.sessions() as session:
        if backend == "sqlite":
            await session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            assert path is not None
            return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        tables = (await session.execute(text("SHOW TABLES"))).scalars().all()
        for table in tables:
            await session.execute(text(f"ANALYZE TABLE `{table}`"))
        total = await session.scalar(
            text(
                "SELECT SUM(data_length + index_length) FROM information_schema.tables "
                "WHERE table_schema = DATABASE()"
            )
        )
        return int(total or 0)


def _archive_bytes(data_dir: Path) -> tuple[int, int]:
    """The run logs' bytes, and the disk they take (whole blocks: one file per run)."""
    files = [p.stat() for p in (data_dir / "logs").rglob("*.log") if p.is_file()]
    return sum(f.st_size for f in files), sum(f.st_blocks * 512 for f in files)


async def measure(backend: str, hosts: int, tasks: int, output_bytes: int) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="opsplane-dbsize-"))
    name = ""
    path: Path | None = None
    if backend == "sqlite":
        path = scratch / "opsplane.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        name = await create_database(backend)
        url = server_url(backend, name)
    await migrate(url)
    link = MemoryLink()
    settings = load_settings(database_url=url, data_dir=scratch, redact_patterns=[])
    engine = make_engine(settings, [link])
    await engine.start()
    try:
        names = [f"host-{i:05d}" for i in range(hosts)]
        for host in names:
            await link.connect(host, ["all"])
        line = ("x" * (output_bytes - 1) + "\n").encode()
        before, archive_before = await _size(engine, backend, path), _archive_bytes(scratch)
        for _ in range(tasks):
            task = await engine.tasks.create_task(
                TaskRequest(command="uptime", targets=Targets(groups=("all",)))
            )
            futures = []
            for run in await engine.tasks.list_runs(task.id):
                now = datetime.now(UTC)
                futures.append(await engine.report(RunStarted(run.host, run.id, now)))
                futures.append(await engine.report(RunOutput(run.host, run.id, "stdout", 0, line)))
                finished = RunFinished(
                    hostname=run.host, run_id=run.id, status="succeeded", exit_code=0,
                    stdout=line.decode(), stderr="", truncated=False, error=None,
                    started_at=now, finished_at=datetime.now(UTC), duration_ms=3,
                )  # fmt: skip
                futures.append(await engine.report(finished))
            await asyncio.gather(*futures)
        await engine.ingest.archived()
        after, archive_after = await _size(engine, backend, path), _archive_bytes(scratch)
    finally:
        await engine.stop()
        if name:
            await drop_database(backend, name)
    runs = hosts * tasks
    return {
        "backend": backend,
        "runs": runs,
        "output_bytes": output_bytes,
        "database_bytes_per_run": round((after - before) / runs),
        "database_mib_per_1000_runs": round((after - before) / runs * 1000 / 2**20, 2),
        "archive_bytes_per_run": round((archive_after[0] - archive_before[0]) / runs),
        "archive_disk_bytes_per_run": round((archive_after[1] - archive_before[1]) / runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--output-bytes", type=int, default=64)
    parser.add_argument("--backends", default="sqlite,mariadb")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        figures = asyncio.run(measure(backend, args.hosts, args.tasks, args.output_bytes))
        if args.json:
            print(json.dumps(figures))
        else:
            print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
