"""Cost of one pass of the control plane's timeout clock (``queries.runs_past_timeout``).

Fills a fresh database with ``--history`` finished runs and ``--in-flight`` runs in flight (none
past its deadline, the steady state), then times the query a monitor pass makes, median of
``--iterations``. The history should not matter; the runs in flight do (the WHERE is evaluated
over them).

    python bench/timeout_clock.py [--in-flight 10000] [--history 100000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from opsplane.store import queries
from opsplane.store.database import create_engine, session_factory
from opsplane.store.migrate import upgrade_to_head
from opsplane.store.tables import RunRow, TaskRow, utcnow


async def main(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp())
    url = args.database_url or f"sqlite+aiosqlite:///{scratch / 'bench.db'}"
    db = create_engine(url)
    await upgrade_to_head(db)
    now = utcnow()
    sessions = session_factory(db)
    async with sessions() as session, session.begin():
        task_id = str(uuid.uuid4())
        await session.execute(
            insert(TaskRow).values(
                id=task_id, name="bench", description="", kind="command", command="true",
                targets={"all": True}, timeout=3600, status="running", cancel_requested=False,
                counts={}, total=args.in_flight + args.history, created_by="bench",
                created_at=now,
            )
        )  # fmt: skip

        def rows(n: int, status: str) -> list[dict[str, object]]:
            sent, started = now - timedelta(seconds=60), now - timedelta(seconds=59)
            return [
                {
                    "id": str(uuid.uuid4()),
                    "task_id": task_id,
                    "host": f"h-{i}",
                    "attempt": 1,
                    "status": status,
                    "dispatched_at": sent,
                    "started_at": started,
                    "updated_at": now,
                }
                for i in range(n)
            ]

        for status, n in (("succeeded", args.history), ("running", args.in_flight)):
            for start in range(0, n, 5000):
                await session.execute(insert(RunRow), rows(min(5000, n - start), status))
    samples = []
    for _ in range(args.iterations):
        async with sessions() as session:
            began = time.perf_counter()
            found = await queries.runs_past_timeout(session, utcnow(), 30.0, limit=1000)
            samples.append(time.perf_counter() - began)
        assert not found
    await db.dispose()
    shutil.rmtree(scratch)
    print(
        f"{db.dialect.name}: {args.in_flight} in flight, {args.history} finished: "
        f"median {statistics.median(samples) * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--database-url")
    asyncio.run(main(parser.parse_args()))
