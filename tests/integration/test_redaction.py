"""Log redaction (seed 003's log masking): secrets never reach the live stream, the archive or
the run row — also when a secret is split across two output chunks, and also when a write
fails and is retried. Over every database, with the in-memory link standing in for agents,
and with real processes on the local link."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from opsplane.app_factory import make_engine
from opsplane.config import Settings, load_settings
from opsplane.domain.redaction import DEFAULT_REDACT_PATTERNS, MASK, LineBuffer, Redactor
from opsplane.domain.states import RunStatus, TaskStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.changes import Changes
from opsplane.engine.core import Engine
from opsplane.store import queries
from opsplane.transport.base import RunFinished, RunOutput, RunStarted
from opsplane.transport.local import LocalLink
from opsplane.transport.memory import MemoryLink
from tests.integration.reports import report_result

SECRET = "hunter2-Sup3r"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


# The patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        ("password=hunter2 user=bob", f"password={MASK} user=bob"),
        ("DB_PASSWORD: 's3cr3t'", f"DB_PASSWORD: '{MASK}'"),
        ('{"passwd": "abc", "n": 1}', f'{{"passwd": "{MASK}", "n": 1}}'),
        ("export API_KEY=abc123; echo", f"export API_KEY={MASK}; echo"),
        ("curl 'https://h/x?token=abc&page=2'", f"curl 'https://h/x?token={MASK}&page=2'"),
        ("client_secret = xyz", f"client_secret = {MASK}"),
        ("Authorization: Bearer eyJhbGciOi.J9.x", f"Authorization: Bearer {MASK}"),
        ("authorization: Basic dXNlcjpwYXNz", f"authorization: Basic {MASK}"),
        ("sent bearer abcdefgh12345678", f"sent bearer {MASK}"),
        (f"key {AWS_KEY} in use", f"key {MASK} in use"),
        ("mysql://root:pa55@db:3306/x", f"mysql://root:{MASK}@db:3306/x"),
        ("Password: ", "Password: "),  # a prompt: nothing to hide
        ("the password was changed", "the password was changed"),
        ("ok 12 tests passed", "ok 12 tests passed"),
    ],
)
def test_default_patterns(line: str, redacted: str) -> None:
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    assert redactor.text(line) == redacted
    assert redactor.data(line.encode()) == redacted.encode()


def test_bytes_outside_a_secret_are_kept_as_they_were() -> None:
    raw = b"\xff\xfe caf\xc3\xa9 token=abc \x00end\n"
    assert (
        Redactor(DEFAULT_REDACT_PATTERNS).data(raw)
        == b"\xff\xfe caf\xc3\xa9 token=[REDACTED] \x00end\n"
    )


def test_a_bad_pattern_is_refused_at_start() -> None:
    from opsplane.domain.errors import ConfigError

    with pytest.raises(ConfigError, match="redact pattern '\\(unclosed' is not a usable"):
        load_settings(redact_patterns=["(unclosed"])


def test_line_buffer_releases_whole_lines_and_lets_long_ones_through() -> None:
    buffer = LineBuffer(limit=8)
    assert buffer.feed(b"pass") == b"" and buffer
    assert buffer.feed(b"word=x\nnext") == b"password=x\n"
    assert buffer.feed(b"\r") == b"next\r" and not buffer
    assert buffer.feed(b"0123456789") == b"0123456789"
    assert buffer.feed(b"tail") == b"" and buffer.flush() == b"tail"


# Through the engine -----------------------------------------------------------------------


def _settings(tmp_path: Path, database_url: str | None = None, **extra: Any) -> Settings:
    return load_settings(data_dir=tmp_path, database_url=database_url, **extra)


@pytest.fixture
async def engine(tmp_path: Path, database_url: str, link: MemoryLink) -> AsyncIterator[Engine]:
    the_engine = make_engine(_settings(tmp_path, database_url), [link])
    await the_engine.start()
    await link.connect("web-1", ["web"])
    try:
        yield the_engine
    finally:
        await the_engine.stop()


async def _start(engine: Engine) -> tuple[str, str]:
    task = await engine.tasks.create_task(
        TaskRequest(command="deploy", targets=Targets(hosts=("web-1",)))
    )
    (run,) = await engine.tasks.list_runs(task.id)
    await (await engine.report(RunStarted("web-1", run.id, datetime.now(UTC))))
    return task.id, run.id


async def _archived(engine: Engine, task_id: str, run_id: str) -> bytes:
    run = await engine.tasks.get_run(task_id, run_id)
    assert run.log_path is not None
    return await engine.archive.read(Path(run.log_path))


def _finished(run_id: str, stdout: str, error: str | None = None) -> RunFinished:
    now = datetime.now(UTC)
    return RunFinished(
        hostname="web-1", run_id=run_id, status="failed", exit_code=1, stdout=stdout,
        stderr=f"token={SECRET}\n", truncated=False, error=error, started_at=now,
        finished_at=now, duration_ms=5,
    )  # fmt: skip


async def _output(engine: Engine, run_id: str, *chunks: bytes, stream: str = "stdout") -> None:
    # Unnumbered (seq 0): placed as they come, whichever call they are sent by.
    for chunk in chunks:
        await (await engine.report(RunOutput("web-1", run_id, stream, 0, chunk)))  # type: ignore[arg-type]


async def _stored_output(engine: Engine, task_id: str) -> str:
    async with engine.sessions() as session:
        events = await queries.events_after(session, task_id, 0, 1000)
    return "".join(e.data["data"] for e in events if e.kind == "output")


async def test_a_secret_split_across_two_chunks_is_redacted_everywhere(engine: Engine) -> None:
    task_id, run_id = await _start(engine)
    live = engine.hub.subscribe(task_id)
    try:
        await _output(engine, run_id, b"connect with pass", b"word=" + SECRET.encode() + b" ok\n")
        await _output(engine, run_id, AWS_KEY[:7].encode(), AWS_KEY[7:].encode() + b"\n")
        await report_result(
            engine,
            _finished(run_id, f"password={SECRET} ok\n", error=f"failed with token={SECRET}"),
        )
        events = []
        async with asyncio.timeout(5):
            while not events or events[-1].kind != "task" or events[-1].data["status"] == "running":
                events.append(await live.queue.get())
    finally:
        engine.hub.unsubscribe(live)
    streamed = "".join(e.data["data"] for e in events if e.kind == "output")
    expected = f"connect with password={MASK} ok\n{MASK}\n"
    assert streamed == expected
    assert await _stored_output(engine, task_id) == expected
    archived = await _archived(engine, task_id, run_id)
    assert archived == expected.encode()
    run = await engine.tasks.get_run(task_id, run_id)
    assert run.stdout == f"password={MASK} ok\n" and run.stderr == f"token={MASK}\n"
    assert run.error == f"failed with token={MASK}"
    assert SECRET not in (run.stdout + run.stderr + (run.error or ""))


async def test_the_held_end_of_a_line_is_written_before_the_run_ends(engine: Engine) -> None:
    task_id, run_id = await _start(engine)
    await _output(engine, run_id, b"line one\nno newline, then the end: secret=", SECRET.encode())
    await _output(engine, run_id, b"err: passwd=x", stream="stderr")
    await report_result(engine, _finished(run_id, ""))
    async with engine.sessions() as session:
        events = await queries.events_after(session, task_id, 0, 1000)
    kinds = [(e.kind, e.data.get("stream"), e.data.get("status")) for e in events]
    # Both held parts are events before the run's final state.
    assert kinds.index(("run", None, "failed")) > max(
        i for i, k in enumerate(kinds) if k[0] == "output"
    )
    archived = await _archived(engine, task_id, run_id)
    assert (
        archived == f"line one\nno newline, then the end: secret={MASK}err: passwd={MASK}".encode()
    )


async def test_an_incomplete_line_is_not_held_for_long(engine: Engine) -> None:
    task_id, run_id = await _start(engine)
    live = engine.hub.subscribe(task_id)
    try:
        await _output(engine, run_id, b"progress: 50%")
        async with asyncio.timeout(5):  # held for half a second, then released on its own
            while (await live.queue.get()).kind != "output":
                pass
    finally:
        engine.hub.unsubscribe(live)
    assert await _stored_output(engine, task_id) == "progress: 50%"
    await engine.ingest.archived()
    archived = await _archived(engine, task_id, run_id)
    assert archived == b"progress: 50%"
    assert (await engine.tasks.get_run(task_id, run_id)).status == RunStatus.RUNNING


async def test_a_failed_write_is_retried_without_losing_or_leaking_a_held_line(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id, run_id = await _start(engine)
    await _output(engine, run_id, b"pass")
    real_write = engine.ingest._write
    failures = 0

    @asynccontextmanager
    async def failing_once() -> AsyncIterator[Changes]:
        nonlocal failures
        async with real_write() as changes:
            yield changes
            if failures == 0:
                # The batch was applied in memory, then its transaction fails.
                failures += 1
                raise OperationalError("COMMIT", {}, Exception("database went away"))

    monkeypatch.setattr(engine.ingest, "_write", failing_once)
    await _output(engine, run_id, f"word={SECRET}\n".encode())
    assert failures == 1
    await report_result(engine, _finished(run_id, ""))
    expected = f"password={MASK}\n"
    assert await _stored_output(engine, task_id) == expected
    archived = await _archived(engine, task_id, run_id)
    assert archived == expected.encode()


async def test_no_patterns_means_output_passes_at_once_unchanged(tmp_path: Path) -> None:
    link = MemoryLink()
    engine = make_engine(_settings(tmp_path, redact_patterns=[]), [link])
    await engine.start()
    try:
        await link.connect("web-1", ["web"])
        task_id, run_id = await _start(engine)
        await _output(engine, run_id, b"password=")
        assert await _stored_output(engine, task_id) == "password="
        await _output(engine, run_id, SECRET.encode())
        assert await _stored_output(engine, task_id) == f"password={SECRET}"
    finally:
        await engine.stop()


async def test_a_real_process_printing_a_secret_in_two_writes(tmp_path: Path) -> None:
    engine = make_engine(_settings(tmp_path), [LocalLink("control-plane")])
    await engine.start()
    try:
        script = f"printf 'api_key=abc'; sleep 0.3; printf '{SECRET}\\ndone\\n'"
        task = await engine.tasks.create_task(
            TaskRequest(
                command="script", targets=Targets(hosts=("control-plane",)), kind="script",
                spec=ExecSpec(argv=("sh", "-c", script)),
            )
        )  # fmt: skip
        async with asyncio.timeout(15):
            done = await engine.wait_task(task.id)
        assert done.status == TaskStatus.SUCCEEDED
        (run,) = await engine.tasks.list_runs(task.id)
        expected = f"api_key={MASK}\ndone\n"
        assert run.stdout == expected
        assert await _stored_output(engine, task.id) == expected
        assert await engine.archive.read(Path(run.log_path or "")) == expected.encode()
    finally:
        await engine.stop()
