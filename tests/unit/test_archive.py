"""The run log archive: dated layout and retention by age and by size."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from opsplane.engine.archive import ArchivePruner, LogArchive, PruneResult, cap_marker

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
DAY = 86400.0


def _log(root: Path, rel: str, size: int, age: float) -> Path:
    """A run log of ``size`` bytes last written ``age`` seconds before NOW."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    moment = NOW.timestamp() - age
    os.utime(path, (moment, moment))
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_run_log_goes_under_its_tasks_creation_date_in_utc(tmp_path: Path) -> None:
    archive = LogArchive(tmp_path)
    # 01:30 in UTC+2 is still the previous day in UTC.
    created = datetime(2025, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert archive.path_for("t1", "r1", created) == tmp_path / "2024/12/31/t1/r1.log"
    assert archive.path_for("t1", "r1", datetime(2025, 3, 4, 23, 59)) == (
        tmp_path / "2025/03/04/t1/r1.log"
    )
    assert archive.legacy_path_for("t1", "r1") == tmp_path / "t1/r1.log"


async def test_a_run_log_is_cut_at_the_cap_and_the_cut_is_marked_once(tmp_path: Path) -> None:
    archive = LogArchive(tmp_path, max_bytes_per_run=10)
    path = archive.path_for("t1", "r1", NOW)
    other = archive.path_for("t1", "r2", NOW)
    await archive.append([(path, b"12345678")])
    await archive.append([(path, b"abcd"), (path, b"efgh"), (other, b"fine")])
    await archive.append([(path, b"more and more")])
    assert await archive.read(path) == b"12345678ab" + cap_marker(10)
    assert await archive.read(other) == b"fine"
    # A new archive (a restarted control plane) goes on from the file.
    await LogArchive(tmp_path, max_bytes_per_run=10).append([(path, b"again")])
    assert await archive.read(path) == b"12345678ab" + cap_marker(10)


async def test_a_run_log_that_reaches_the_cap_exactly_is_marked_when_more_comes(
    tmp_path: Path,
) -> None:
    # Output in 4 KiB pieces under a cap of a power of two lands on the cap exactly: the next
    # piece used to be dropped as if the cut were marked already (seen in fault scenario 8).
    archive = LogArchive(tmp_path, max_bytes_per_run=10)
    path = archive.path_for("t1", "r1", NOW)
    await archive.append([(path, b"12345"), (path, b"67890")])
    assert await archive.read(path) == b"1234567890"
    await archive.append([(path, b"more")])
    await archive.append([(path, b"and more")])
    assert await archive.read(path) == b"1234567890" + cap_marker(10)


async def test_appended_output_lands_in_the_dated_file(tmp_path: Path) -> None:
    archive = LogArchive(tmp_path)
    path = archive.path_for("t1", "r1", NOW)
    await archive.append([(path, b"one\n"), (path, b"two\n")])
    assert await archive.read(tmp_path / "2025/06/15/t1/r1.log") == b"one\ntwo\n"


async def test_logs_older_than_the_retention_age_are_removed(tmp_path: Path) -> None:
    old = _log(tmp_path, "2025/06/01/t1/r1.log", 10, 14 * DAY)
    legacy = _log(tmp_path, "t0/r0.log", 5, 20 * DAY)
    young = _log(tmp_path, "2025/06/14/t2/r2.log", 10, 1 * DAY)
    archive = LogArchive(tmp_path, retention_days=7)
    result = await archive.prune(NOW)
    assert (result.files, result.bytes, result.complete) == (2, 15, True)
    assert not old.exists() and not legacy.exists() and young.exists()


async def test_age_counts_from_the_last_write_not_the_date_directory(tmp_path: Path) -> None:
    # A task created long ago whose run is still writing keeps its log.
    started_late = _log(tmp_path, "2025/01/01/t1/r1.log", 10, 1 * DAY)
    result = await LogArchive(tmp_path, retention_days=7).prune(NOW)
    assert result == PruneResult()
    assert started_late.exists()


async def test_the_size_cap_removes_the_oldest_logs_first(tmp_path: Path) -> None:
    oldest = _log(tmp_path, "2025/06/10/t1/a.log", 100, 5 * DAY)
    older = _log(tmp_path, "2025/06/11/t2/b.log", 100, 4 * DAY)
    newer = _log(tmp_path, "2025/06/12/t3/c.log", 100, 3 * DAY)
    newest = _log(tmp_path, "2025/06/13/t4/d.log", 100, 2 * DAY)
    result = await LogArchive(tmp_path, retention_bytes=250).prune(NOW)
    assert (result.files, result.bytes) == (2, 200)
    assert not oldest.exists() and not older.exists()
    assert newer.exists() and newest.exists()


async def test_the_size_cap_never_removes_a_log_written_in_the_last_minutes(
    tmp_path: Path,
) -> None:
    finished = _log(tmp_path, "2025/06/15/t1/a.log", 100, 3600)
    live = [_log(tmp_path, f"2025/06/15/t1/live{i}.log", 100, 60 * i) for i in range(1, 4)]
    result = await LogArchive(tmp_path, retention_bytes=50).prune(NOW)
    # Over the cap still: the live files stay, the finished one goes.
    assert (result.files, result.bytes) == (1, 100)
    assert not finished.exists()
    assert all(path.exists() for path in live)


async def test_a_retention_shorter_than_the_grace_spares_live_logs(tmp_path: Path) -> None:
    live = _log(tmp_path, "2025/06/15/t1/a.log", 10, 120)
    result = await LogArchive(tmp_path, retention_days=60 / DAY).prune(NOW)
    assert result.files == 0 and live.exists()


async def test_directories_left_empty_are_removed(tmp_path: Path) -> None:
    _log(tmp_path, "2025/05/01/t1/r1.log", 10, 45 * DAY)
    _log(tmp_path, "t0/r0.log", 10, 45 * DAY)
    (tmp_path / "2025/04/30/t9").mkdir(parents=True)  # an empty one from before
    kept = _log(tmp_path, "2025/06/14/t2/r2.log", 10, DAY)
    result = await LogArchive(tmp_path, retention_days=30).prune(NOW)
    assert result.files == 2
    assert _tree(tmp_path) == [
        "2025",
        "2025/06",
        "2025/06/14",
        "2025/06/14/t2",
        "2025/06/14/t2/r2.log",
    ]
    assert kept.exists()


async def test_files_that_are_not_run_logs_are_left_alone(tmp_path: Path) -> None:
    # The catalog writes <logs_dir>/<name>.log by default.
    catalog = _log(tmp_path, "nightly-backup.log", 1000, 90 * DAY)
    stray = _log(tmp_path, "2025/06/01/t1/notes.txt", 1000, 90 * DAY)
    result = await LogArchive(tmp_path, retention_days=1, retention_bytes=1).prune(NOW)
    assert result.files == 0
    assert catalog.exists() and stray.exists()


async def test_a_missing_archive_directory_is_an_empty_archive(tmp_path: Path) -> None:
    archive = LogArchive(tmp_path / "nope", retention_days=1, retention_bytes=1)
    assert await archive.prune(NOW) == PruneResult()


async def test_a_pass_stops_at_its_removal_limit_and_says_so(tmp_path: Path) -> None:
    paths = [_log(tmp_path, f"2025/06/01/t1/r{i}.log", 10, 10 * DAY) for i in range(5)]
    archive = LogArchive(tmp_path, retention_days=1, max_removals=3)
    first = await archive.prune(NOW)
    assert (first.files, first.complete) == (3, False)
    second = await archive.prune(NOW)
    assert (second.files, second.complete) == (2, True)
    assert not any(path.exists() for path in paths)


async def test_without_retention_nothing_is_scanned_or_removed(tmp_path: Path) -> None:
    old = _log(tmp_path, "2020/01/01/t1/r1.log", 10, 2000 * DAY)
    assert await LogArchive(tmp_path).prune(NOW) == PruneResult()
    assert old.exists()


async def test_the_pruner_prunes_periodically_and_survives_os_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    archive = LogArchive(tmp_path, retention_days=1)
    calls = 0
    third_pass = asyncio.Event()

    async def flaky_prune(now: datetime | None = None) -> PruneResult:
        nonlocal calls
        calls += 1
        if calls == 3:
            third_pass.set()
        if calls == 1:
            raise PermissionError("denied")
        return PruneResult(files=1, bytes=10)

    monkeypatch.setattr(archive, "prune", flaky_prune)
    pruner = ArchivePruner(archive, interval=0.01)
    caplog.set_level(logging.INFO, logger="opsplane.engine.archive")
    await pruner.start()
    try:
        async with asyncio.timeout(5):
            await third_pass.wait()
    finally:
        await pruner.stop()
    assert "pruning failed" in caplog.text
    assert "removed 1 run logs (10 bytes)" in caplog.text
