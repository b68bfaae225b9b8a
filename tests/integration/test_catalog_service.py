"""The catalog service (seed 004) through the real engine on SQLite and the local link: real
python, perl, sh, bash and binary scripts, sessions, kill, retention and per-task logs."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from opsplane.app_factory import make_engine
from opsplane.catalog import (
    Catalog,
    CatalogService,
    ExternalEntry,
    HandlerRegistry,
    load_catalog,
)
from opsplane.catalog.handlers import demo_counter
from opsplane.catalog.service import KILLED, UnknownRoute, UnknownSession
from opsplane.config import load_settings
from opsplane.domain.paging import PageRequest
from opsplane.domain.states import TaskStatus
from opsplane.engine.core import Engine
from opsplane.transport.local import HandlerContext, LocalLink

FIXTURES = Path(__file__).parents[1] / "fixtures" / "catalog"
HOST = "control-plane"


async def _explode(ctx: HandlerContext, body: Any) -> int:
    await ctx.write("about to fail\n")
    raise RuntimeError(f"exploded with {body!r}")


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register(cluster_type="TendbHA", name="counter")(demo_counter)
    registry.register(cluster_type="redis", name="explode")(_explode)
    return registry


def _extra_entries(collect: Path) -> list[ExternalEntry]:
    common: dict[str, Any] = {"cluster_type": "test", "args": (), "collect_dir": collect}
    return [
        ExternalEntry(
            name="short-timeout", slug="test", timeout=1, language="sh",
            executable="echo started; sleep 20", collected=False, **common,
        ),
        ExternalEntry(
            name="missing", slug="test", timeout=None, language="binary",
            executable="/nonexistent/opsplane-tool", collected=False, **common,
        ),
    ]  # fmt: skip


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    # Seed 004: the parent's environment passes to children, through the allow-list
    # (docs/catalog.md): CATALOG_FIXTURE_* is allowed here as env_passthrough would.
    link = LocalLink(
        HOST, _registry().link_handlers(), kill_grace=2.0, env_passthrough=("CATALOG_FIXTURE_*",)
    )
    the_engine = make_engine(load_settings(data_dir=tmp_path / "data"), [link])
    await the_engine.start()
    try:
        yield the_engine
    finally:
        await the_engine.stop()


def _catalog() -> Catalog:
    loaded = load_catalog(FIXTURES / "catalog.yaml", handlers=_registry())
    return Catalog([*loaded.entries, *_extra_entries(FIXTURES / "collect")])


@pytest.fixture
async def service(engine: Engine, tmp_path: Path) -> AsyncIterator[CatalogService]:
    the_service = CatalogService(engine, _catalog(), logs_dir=tmp_path / "logs", retention=60)
    await the_service.start()
    try:
        yield the_service
    finally:
        await the_service.stop()


async def _sync(service: CatalogService, slug: str, name: str, body: bytes = b"") -> Any:
    entry = service.entry(slug, name)
    async with asyncio.timeout(30):
        return await service.run_sync(entry, entry.parse_body(body))


async def _eventually(predicate: Callable[[], Any], within: float = 20.0) -> Any:
    """Poll: the conditions (a process table, a file, the session table) have no event."""
    async with asyncio.timeout(within):
        while not (value := predicate()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return value


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead, only not yet reaped by its (new) parent
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


async def test_sync_runs_the_seeds_demo1_and_answers_with_the_last_lines(
    service: CatalogService, engine: Engine
) -> None:
    result = await _sync(service, "tendb-cluster", "demo1", b'["123", "456"]')
    assert (result.code, result.data, result.msg) == (0, "hello aaa bbb 123 456", "")
    # It is an ordinary script task on the control plane's host, output kept in its run.
    tasks = (await engine.tasks.list_tasks(status=None, name=None, page=PageRequest(10))).items
    (task,) = tasks
    assert task.kind == "script" and task.status == TaskStatus.SUCCEEDED
    assert task.command == "sh -c 'echo hello aaa bbb 123 456'"
    (run,) = await engine.tasks.list_runs(task.id)
    assert run.host == HOST and run.stdout == "hello aaa bbb 123 456\n"
    assert run.log_path
    archived = await engine.archive.read(Path(run.log_path))
    assert archived == b"hello aaa bbb 123 456\n"


async def test_sync_of_a_failing_script_answers_code_1_with_the_last_stderr_line(
    service: CatalogService,
) -> None:
    ok = await _sync(service, "tendb-cluster", "demo2", b'["x"]')
    assert (ok.code, ok.data, ok.msg) == (0, "sh done", "sh note on stderr")
    failed = await _sync(service, "tendb-cluster", "demo2", b'["fail"]')
    assert (failed.code, failed.data, failed.msg) == (1, "sh got: fail", "sh failing as asked")


async def test_every_language_really_runs(
    service: CatalogService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent's environment reaches the child, what the allow-list lets through of it.
    monkeypatch.setenv("CATALOG_FIXTURE_VAR", "from-the-parent")
    python = await _sync(service, "sqlsvr", "demopython", b'["a b"]')
    assert (python.code, python.data, python.msg) == (
        0,
        "python env: from-the-parent",
        "python warning on stderr",
    )
    perl = await _sync(service, "redis", "demoperl", b'["p1", "p2"]')
    assert (perl.code, perl.data, perl.msg) == (0, "perl got: p1 p2", "perl warning on stderr")
    bash = await _sync(service, "tendb-ha", "demobash")
    assert bash.code == 0 and re.fullmatch(r"bash [4-9]", bash.data), bash
    binary = await _sync(service, "tendb-cluster", "demo3", b'["x y", "$HOME"]')
    assert binary.data == "binary argv: [first] [second] [x y] [$HOME]"


async def test_a_run_that_cannot_start_or_times_out_says_why(service: CatalogService) -> None:
    missing = await _sync(service, "test", "missing")
    assert missing.code == 1 and missing.msg.startswith("could not start"), missing
    timed = await _sync(service, "test", "short-timeout")
    assert (timed.code, timed.data, timed.msg) == (1, "started", "timed out after 1s")


async def test_async_returns_a_session_that_query_shows_until_done(
    service: CatalogService, engine: Engine
) -> None:
    entry = service.entry("tendb-cluster", "demo2")
    session_id = await service.run_async(entry, ("fail",))
    assert (await engine.tasks.get_task(session_id)).kind == "script"
    view = await _eventually(lambda: service.query(session_id).done and service.query(session_id))
    assert view.id == session_id and view.message == "sh got: fail"
    assert view.error == "exit code 3: sh failing as asked"
    assert datetime.fromisoformat(view.start_at).tzinfo is not None
    good = await service.run_async(service.entry("tendb-cluster", "demo1"), ())
    await _eventually(lambda: service.query(good).done)
    assert (service.query(good).message, service.query(good).error) == ("hello aaa bbb", "")
    assert [v.id for v in service.query_all()] == [session_id, good]


async def test_sync_calls_do_not_appear_as_sessions_and_unknowns_are_refused(
    service: CatalogService,
) -> None:
    await _sync(service, "tendb-cluster", "demo1")
    assert service.query_all() == []
    with pytest.raises(UnknownSession):
        service.query("no-such-session")
    with pytest.raises(UnknownSession):
        await service.kill("no-such-session")
    with pytest.raises(UnknownRoute):
        service.entry("tendb-cluster", "nope")


async def test_kill_ends_the_whole_process_group_and_the_session_says_killed(
    service: CatalogService,
) -> None:
    marker = f"47.{os.getpid()}"  # unique to this test run: a sleep of 47.<pid> seconds
    session_id = await service.run_async(service.entry("tendb-cluster", "sleeper"), (marker,))
    # The script, its background sleep and its foreground sleep.
    await _eventually(lambda: len(_processes_with(marker)) >= 3)
    view = await service.kill(session_id)
    assert view.done and view.error == KILLED
    # The group got SIGKILL before the kill returned; the kernel may take a moment to show it.
    await _eventually(lambda: _processes_with(marker) == [], within=5)
    assert service.query(session_id).error == KILLED
    # Killing again changes nothing.
    assert (await service.kill(session_id)).error == KILLED


async def test_sync_calls_run_concurrently(service: CatalogService, engine: Engine) -> None:
    slow = asyncio.create_task(_sync(service, "tendb-cluster", "sleeper", b'["30"]'))
    quick = await _sync(service, "tendb-cluster", "demo1")
    assert quick.code == 0 and not slow.done()
    # A sync call is not a session, but its task can be canceled like any other.
    running = (
        await engine.tasks.list_tasks(status="running", name=None, page=PageRequest(10))
    ).items
    (task,) = running
    await engine.tasks.cancel_task(task.id)
    canceled = await slow
    assert (canceled.code, canceled.msg) == (1, "killed: the task was canceled")


async def test_in_process_handlers_take_any_json_and_can_be_killed(
    service: CatalogService,
) -> None:
    counted = await _sync(service, "tendb-ha", "counter", b'{"count": 3}')
    assert (counted.code, counted.data) == (0, "counted to 3")
    refused = await _sync(service, "tendb-ha", "counter", b"[1]")
    assert refused.code == 1 and "body must be a JSON object" in refused.msg
    exploded = await _sync(service, "redis", "explode", b'{"x": [1, null]}')
    assert exploded.code == 1 and exploded.data == "about to fail"
    assert exploded.msg == "RuntimeError: exploded with {'x': [1, None]}"
    entry = service.entry("tendb-ha", "counter")
    session_id = await service.run_async(entry, {"count": 1000, "interval": 0.05})
    await _eventually(lambda: service.query(session_id).message not in ("", "1"))
    assert (await service.kill(session_id)).error == KILLED


async def test_finished_sessions_are_removed_after_the_retention(
    engine: Engine, tmp_path: Path
) -> None:
    service = CatalogService(engine, _catalog(), logs_dir=tmp_path / "logs", retention=0.3)
    await service.start()
    try:
        running = await service.run_async(service.entry("tendb-cluster", "sleeper"), ("30",))
        done = await service.run_async(service.entry("tendb-cluster", "demo1"), ())
        await _eventually(lambda: service.query(done).done)
        await _eventually(lambda: [v.id for v in service.query_all()] == [running])
        with pytest.raises(UnknownSession):
            service.query(done)
        await service.kill(running)
        await _eventually(lambda: service.query_all() == [])
    finally:
        await service.stop()


async def test_each_task_logs_one_record_per_run_to_its_own_file(
    service: CatalogService, tmp_path: Path
) -> None:
    ok = await _sync(service, "tendb-cluster", "demo2", b'["first"]')
    session_id = await service.run_async(service.entry("tendb-cluster", "demo2"), ("fail",))
    await _eventually(lambda: service.query(session_id).done)
    await _sync(service, "tendb-cluster", "demo1")
    assert ok.code == 0
    # The record is written before the answer: no waiting needed.
    text = await asyncio.to_thread((tmp_path / "logs" / "demo2.log").read_text)
    records = text.split("=== ")[1:]
    assert len(records) == 2
    assert "POST /sync/tendb-cluster/demo2" in records[0]
    assert "stdout| sh got: first" in records[0] and "stderr| sh note on stderr" in records[0]
    assert f"session {session_id} POST /async/tendb-cluster/demo2" in records[1]
    assert "exit code 3" in records[1] and "stderr| sh failing as asked" in records[1]
    stamp = records[1].split(" ", 1)[0]
    assert datetime.fromisoformat(stamp).tzinfo is not None
    demo1 = await asyncio.to_thread((tmp_path / "logs" / "demo1.log").read_text)
    assert demo1.count("=== ") == 1


async def test_async_sessions_are_answered_after_a_restart(tmp_path: Path) -> None:
    marker = f"49.{os.getpid()}"

    async def plane() -> tuple[Engine, CatalogService]:
        link = LocalLink(HOST, _registry().link_handlers(), kill_grace=2.0)
        engine = make_engine(load_settings(data_dir=tmp_path / "data"), [link])
        await engine.start()
        service = CatalogService(engine, _catalog(), logs_dir=tmp_path / "logs", retention=60)
        await service.start()
        return engine, service

    engine, service = await plane()
    try:
        done = await service.run_async(service.entry("tendb-cluster", "demo1"), ())
        await _eventually(lambda: service.query(done).done)
        cut = await service.run_async(service.entry("tendb-cluster", "sleeper"), (marker,))
        await _eventually(lambda: len(_processes_with(marker)) >= 3)
        await _sync(service, "tendb-cluster", "demo1")  # not a session, before or after
    finally:
        # The link kills the script and reports nothing, as if the process had died.
        await service.stop()
        await engine.stop()

    engine, service = await plane()
    try:
        assert [view.id for view in service.query_all()] == [done, cut]
        assert (service.query(done).message, service.query(done).error) == ("hello aaa bbb", "")
        restarted = service.query(cut)
        assert restarted.done and "restarted" in restarted.error
        assert not _processes_with(marker)
    finally:
        await service.stop()
        await engine.stop()
