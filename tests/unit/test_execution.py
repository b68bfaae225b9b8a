"""The shared process runner and its bounded output capture.

Orphan checks use ``sleep`` with a duration unique to the test, so that a leftover process can
be told apart from anything else on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from opsplane.domain.errors import InvalidInput
from opsplane.execution import (
    Outcome,
    OutputCapture,
    ProcessResult,
    ProcessRun,
    Stream,
    run_command,
)

# Bounds every wait in this file; nothing here should come close.
WAIT = 5.0


def _processes_with(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if token in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


async def _survivors(token: str, within: float = 3.0) -> list[str]:
    """Processes still carrying ``token`` once killed ones had ``within`` seconds to vanish."""
    deadline = time.monotonic() + within
    while True:
        alive = _processes_with(token)
        if not alive or time.monotonic() >= deadline:
            return [" ".join(p.info["cmdline"] or []) for p in alive]
        await asyncio.sleep(0.05)


@pytest.fixture
async def sleep_arg() -> AsyncIterator[str]:
    """A ``sleep`` duration no other process uses; whatever still sleeps it is killed after."""
    token = f"1000.{uuid.uuid4().int % 10**9:09d}"
    yield token
    for proc in _processes_with(token):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class Recorder:
    """An on_output callback that keeps every chunk and can signal when some text arrived."""

    def __init__(self, wait_for: bytes | None = None) -> None:
        self.chunks: list[tuple[Stream, bytes]] = []
        self._wait_for = wait_for
        self.seen = asyncio.Event()

    async def __call__(self, stream: Stream, data: bytes) -> None:
        self.chunks.append((stream, data))
        if self._wait_for is not None and self._wait_for in self.joined(stream):
            self.seen.set()

    def joined(self, stream: Stream) -> bytes:
        return b"".join(data for s, data in self.chunks if s == stream)


# --- OutputCapture -----------------------------------------------------------------------


def test_small_output_is_kept_whole_and_not_truncated() -> None:
    capture = OutputCapture(cap=8)
    capture.feed("stdout", b"hello ")
    capture.feed("stdout", b"world")

    assert capture.text("stdout") == "hello world"
    assert not capture.truncated
    assert capture.total_bytes("stdout") == 11


def test_capture_keeps_head_and_tail_and_marks_the_gap() -> None:
    capture = OutputCapture(cap=4)
    for piece in (b"ab", b"cdef", b"ghij", b"klm", b"nopq"):
        capture.feed("stdout", piece)

    assert capture.text("stdout") == "abcd\n... [9 bytes truncated] ...\nnopq"
    assert capture.truncated
    assert capture.total_bytes("stdout") == 17


def test_capture_matches_head_plus_tail_for_any_chunking() -> None:
    rng = random.Random(1234)
    cap = 100
    for _ in range(200):
        data = bytes(rng.choice(b"abcdefgh") for _ in range(rng.randrange(0, 500)))
        capture = OutputCapture(cap=cap)
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 250)
            capture.feed("stdout", data[pos : pos + step])
            pos += step

        if len(data) <= 2 * cap:
            expected = data.decode()
        else:
            dropped = len(data) - 2 * cap
            expected = (
                f"{data[:cap].decode()}\n... [{dropped} bytes truncated] ...\n"
                f"{data[-cap:].decode()}"
            )
        assert capture.text("stdout") == expected
        assert capture.truncated == (len(data) > 2 * cap)


def test_a_character_cut_at_either_end_of_the_gap_is_dropped_not_garbled() -> None:
    printed = ("\u00e9\u20ac\U0001f600" * 50).encode()
    for cap in range(5, 30):
        capture = OutputCapture(cap=cap)
        capture.feed("stdout", printed)
        text = capture.text("stdout")
        assert "\ufffd" not in text, (cap, text)
        head, rest = text.split("\n... [")
        dropped, tail = rest.split(" bytes truncated] ...\n")
        assert len(head.encode()) + int(dropped) + len(tail.encode()) == len(printed)


def test_capture_keeps_streams_apart() -> None:
    capture = OutputCapture(cap=4)
    capture.feed("stdout", b"out")
    capture.feed("stderr", b"0123456789")

    assert capture.text("stdout") == "out"
    assert capture.text("stderr") == "0123\n... [2 bytes truncated] ...\n6789"
    assert capture.text("other") == ""
    assert capture.total_bytes("other") == 0
    assert capture.truncated


def test_capture_memory_stays_bounded_for_many_megabytes() -> None:
    cap = 1024
    capture = OutputCapture(cap=cap)
    chunk = b"x" * (64 * 1024)
    for _ in range(800):  # 50 MiB
        capture.feed("stdout", chunk)

    text = capture.text("stdout")
    assert len(text) < 2 * cap + 100
    assert capture.total_bytes("stdout") == 800 * len(chunk)


def test_invalid_utf8_is_replaced_rather_than_raising() -> None:
    capture = OutputCapture()
    capture.feed("stdout", b"ok \xff\xfe end")

    assert capture.text("stdout") == "ok \ufffd\ufffd end"


def test_a_character_cut_by_truncation_does_not_leave_garbage_in_the_tail() -> None:
    capture = OutputCapture(cap=4)
    capture.feed("stdout", b"head" + b"x" * 10 + "€€".encode())  # the tail starts inside a "€"

    assert capture.text("stdout") == "head\n... [13 bytes truncated] ...\n€"


def test_a_non_positive_capture_cap_is_rejected() -> None:
    with pytest.raises(InvalidInput):
        OutputCapture(cap=0)


# --- ProcessRun: outcomes --------------------------------------------------------------


async def test_a_command_that_exits_zero_succeeds() -> None:
    result = await run_command("echo hello", timeout=WAIT)

    assert result.outcome is Outcome.SUCCEEDED
    assert result.exit_code == 0
    assert result.error is None
    assert result.stdout == "hello\n"
    assert result.pid is not None
    assert result.started_at.tzinfo is not None
    assert result.finished_at >= result.started_at
    assert result.duration_ms >= 0


async def test_a_non_zero_exit_code_fails_with_the_code_in_the_error() -> None:
    result = await run_command("exit 3", timeout=WAIT)

    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3
    assert result.error == "exit code 3"


async def test_a_command_killed_by_a_signal_fails_with_a_negative_exit_code() -> None:
    result = await run_command("kill -9 $$", timeout=WAIT)

    assert result.outcome is Outcome.FAILED
    assert result.exit_code == -9
    assert result.error == "killed by SIGKILL"


async def test_stdout_and_stderr_are_kept_separate() -> None:
    recorder = Recorder()
    result = await run_command(
        "echo to-out; echo to-err >&2; echo more-out", timeout=WAIT, on_output=recorder
    )

    assert result.stdout == "to-out\nmore-out\n"
    assert result.stderr == "to-err\n"
    assert recorder.joined("stdout") == b"to-out\nmore-out\n"
    assert recorder.joined("stderr") == b"to-err\n"


async def test_on_started_receives_the_pid_before_any_output() -> None:
    events: list[object] = []

    async def on_started(pid: int) -> None:
        events.append(pid)

    async def on_output(stream: Stream, data: bytes) -> None:
        events.append(data)

    result = await run_command("echo out", timeout=WAIT, on_started=on_started, on_output=on_output)

    assert events == [result.pid, b"out\n"]


async def test_output_reaches_the_callback_while_the_process_is_still_running(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "go-on"
    # The command only finishes once the test has seen "first", so no timing is assumed.
    command = (
        f"echo first; i=0; while [ ! -e '{flag}' ] && [ $i -lt 100 ]; "
        "do sleep 0.05; i=$((i+1)); done; echo second"
    )
    recorder = Recorder(wait_for=b"first\n")
    task = asyncio.create_task(run_command(command, timeout=WAIT, on_output=recorder))

    await asyncio.wait_for(recorder.seen.wait(), WAIT)
    assert not task.done()
    assert recorder.joined("stdout") == b"first\n"
    flag.touch()
    result = await asyncio.wait_for(task, WAIT)

    assert result.outcome is Outcome.SUCCEEDED
    assert result.stdout == "first\nsecond\n"


async def test_a_slow_callback_keeps_output_in_order_per_stream() -> None:
    async def slow(stream: Stream, data: bytes) -> None:
        await asyncio.sleep(0.001)
        received[stream].append(data)

    received: dict[Stream, list[bytes]] = {"stdout": [], "stderr": []}
    command = "for i in $(seq 1 300); do echo out$i; echo err$i >&2; done"
    result = await run_command(command, timeout=WAIT, on_output=slow, chunk_size=7)

    expected_out = "".join(f"out{i}\n" for i in range(1, 301))
    expected_err = "".join(f"err{i}\n" for i in range(1, 301))
    assert b"".join(received["stdout"]).decode() == expected_out
    assert b"".join(received["stderr"]).decode() == expected_err
    assert result.stdout == expected_out
    assert all(len(chunk) <= 7 for chunk in received["stdout"])


async def test_a_failing_callback_is_logged_and_the_run_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(stream: Stream, data: bytes) -> None:
        raise RuntimeError("callback broke")

    async def broken_start(pid: int) -> None:
        raise RuntimeError("start callback broke")

    with caplog.at_level(logging.WARNING, logger="opsplane.execution.process"):
        result = await run_command(
            "echo a; echo b >&2", timeout=WAIT, on_output=broken, on_started=broken_start
        )

    assert result.outcome is Outcome.SUCCEEDED
    assert result.stdout == "a\n"
    assert result.stderr == "b\n"
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_output callback failed" in m for m in messages)
    assert any("on_started callback failed" in m for m in messages)


async def test_non_utf8_output_is_replaced_in_text_but_passed_raw_to_the_callback() -> None:
    recorder = Recorder()
    result = await run_command(r"printf 'a\377\376b'", timeout=WAIT, on_output=recorder)

    assert result.outcome is Outcome.SUCCEEDED
    assert recorder.joined("stdout") == b"a\xff\xfeb"
    assert result.stdout == "a\ufffd\ufffdb"


async def test_large_output_keeps_head_and_tail_and_is_marked_truncated() -> None:
    recorder = Recorder()
    command = r"printf HEAD; head -c 1048576 /dev/zero | tr '\0' a; printf TAIL"
    result = await run_command(command, timeout=WAIT, output_cap=1024, on_output=recorder)

    total = 4 + 1024 * 1024 + 4
    assert result.outcome is Outcome.SUCCEEDED
    assert result.truncated
    assert result.stdout.startswith("HEAD" + "a" * 1020 + "\n... [")
    assert f"[{total - 2048} bytes truncated]" in result.stdout
    assert result.stdout.endswith("a" * 1020 + "TAIL")
    assert len(recorder.joined("stdout")) == total


async def test_env_is_laid_over_the_allowed_part_of_the_parent_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "from-parent")
    monkeypatch.setenv("LC_TEST_OVERRIDDEN", "from-parent")
    monkeypatch.setenv("OPSPLANE_TEST_INHERITED", "never-passed")

    result = await run_command(
        'echo "$TZ $LC_TEST_OVERRIDDEN $OPSPLANE_TEST_ADDED/$OPSPLANE_TEST_INHERITED"',
        timeout=WAIT,
        env={"LC_TEST_OVERRIDDEN": "from-run", "OPSPLANE_TEST_ADDED": "added"},
    )

    assert result.stdout == "from-parent from-run added/\n"


async def test_the_command_runs_in_the_given_working_directory(tmp_path: Path) -> None:
    # pytest's tmp_path is already resolved, so the physical path must match it exactly.
    result = await run_command("pwd -P", timeout=WAIT, cwd=str(tmp_path))

    assert result.stdout == f"{tmp_path}\n"


async def test_stdin_is_empty() -> None:
    result = await run_command("cat; echo done", timeout=WAIT)

    assert result.stdout == "done\n"


async def test_argv_without_a_shell_does_not_interpret_metacharacters() -> None:
    text = "a; echo b | cat $HOME `id` > /nonexistent"
    result = await ProcessRun(["printf", "%s", text], shell=False, timeout=WAIT).run()

    assert result.outcome is Outcome.SUCCEEDED
    assert result.stdout == text


async def test_a_missing_executable_fails_with_could_not_start() -> None:
    result = await ProcessRun(["opsplane-no-such-program-xyz"], shell=False, timeout=WAIT).run()

    assert result.outcome is Outcome.FAILED
    assert result.exit_code is None
    assert result.pid is None
    assert result.error is not None
    assert result.error.startswith("could not start: ")


async def test_a_missing_working_directory_fails_with_could_not_start(tmp_path: Path) -> None:
    result = await run_command("true", timeout=WAIT, cwd=str(tmp_path / "missing"))

    assert result.outcome is Outcome.FAILED
    assert result.error is not None
    assert result.error.startswith("could not start: ")


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_non_positive_or_non_finite_timeout_is_rejected(timeout: float) -> None:
    with pytest.raises(InvalidInput):
        ProcessRun("true", timeout=timeout)


def test_a_command_string_and_an_argv_list_are_not_confused() -> None:
    with pytest.raises(InvalidInput):
        ProcessRun(["echo", "hi"], shell=True, timeout=None)
    with pytest.raises(InvalidInput):
        ProcessRun("echo hi", shell=False, timeout=None)
    with pytest.raises(InvalidInput):
        ProcessRun([], shell=False, timeout=None)


async def test_a_run_can_only_be_run_once() -> None:
    run = ProcessRun("true", timeout=WAIT)
    await run.run()

    with pytest.raises(RuntimeError):
        await run.run()


# --- ProcessRun: stopping and cleanup ---------------------------------------------------


async def test_a_timeout_kills_the_whole_process_group_without_orphans(sleep_arg: str) -> None:
    result = await run_command(
        f"sleep {sleep_arg} & sleep {sleep_arg}", timeout=0.5, kill_grace=0.5
    )

    assert result.outcome is Outcome.TIMED_OUT
    assert result.exit_code is None
    assert result.error == "timed out after 0.5s"
    assert await _survivors(sleep_arg) == []


async def test_a_timeout_escalates_to_sigkill_when_sigterm_is_ignored(sleep_arg: str) -> None:
    result = await run_command(
        f"trap '' TERM; sleep {sleep_arg} & sleep {sleep_arg}", timeout=0.3, kill_grace=0.3
    )

    assert result.outcome is Outcome.TIMED_OUT
    assert result.duration_ms >= 600
    assert await _survivors(sleep_arg) == []


async def test_cancel_mid_run_reports_canceled_and_leaves_no_orphans(sleep_arg: str) -> None:
    recorder = Recorder(wait_for=b"ready")
    run = ProcessRun(
        f"sleep {sleep_arg} & echo ready; sleep {sleep_arg}",
        timeout=None,
        kill_grace=0.5,
        on_output=recorder,
    )
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(recorder.seen.wait(), WAIT)
    assert run.pid is not None

    run.cancel()
    run.cancel()  # a second request changes nothing
    result = await asyncio.wait_for(task, WAIT)

    assert result.outcome is Outcome.CANCELED
    assert result.exit_code is None
    assert result.error == "canceled"
    assert result.stdout == "ready\n"
    assert await _survivors(sleep_arg) == []


async def test_a_timeout_kills_children_that_left_the_process_group(sleep_arg: str) -> None:
    # Issue 13 fault scenario 7: setsid puts the second sleep outside the group killpg reaches.
    result = await run_command(
        f"sleep {sleep_arg} & setsid sleep {sleep_arg} & wait", timeout=0.5, kill_grace=0.5
    )

    assert result.outcome is Outcome.TIMED_OUT
    assert await _survivors(sleep_arg) == []


async def test_cancel_kills_children_that_left_the_process_group(sleep_arg: str) -> None:
    recorder = Recorder(wait_for=b"ready")
    run = ProcessRun(
        f"setsid sh -c 'setsid sleep {sleep_arg} & wait' & echo ready; wait",
        timeout=None,
        kill_grace=0.5,
        on_output=recorder,
    )
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(recorder.seen.wait(), WAIT)
    await asyncio.sleep(0.2)  # the grandchild's setsid has happened
    run.cancel()
    result = await asyncio.wait_for(task, WAIT)

    assert result.outcome is Outcome.CANCELED
    assert await _survivors(sleep_arg) == []


async def test_cancelling_the_task_kills_children_that_left_the_process_group(
    sleep_arg: str,
) -> None:
    recorder = Recorder(wait_for=b"ready")
    task = asyncio.create_task(
        run_command(f"setsid sleep {sleep_arg} & echo ready; wait", on_output=recorder)
    )
    await asyncio.wait_for(recorder.seen.wait(), WAIT)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3.0)

    assert await _survivors(sleep_arg) == []


async def test_cancel_before_run_returns_canceled_without_starting_anything() -> None:
    run = ProcessRun("echo should-not-run", timeout=None)
    run.cancel()
    result = await run.run()

    assert result.outcome is Outcome.CANCELED
    assert result.pid is None
    assert result.stdout == ""


async def test_cancel_after_the_process_ended_has_no_effect() -> None:
    run = ProcessRun("true", timeout=WAIT)
    result = await run.run()
    run.cancel()

    assert result.outcome is Outcome.SUCCEEDED


async def test_cancelling_the_task_kills_the_group_and_reraises(sleep_arg: str) -> None:
    recorder = Recorder(wait_for=b"ready")
    # The default five-second grace must not delay a cancelled task: it is killed at once.
    task = asyncio.create_task(
        run_command(
            f"sleep {sleep_arg} & echo ready; sleep {sleep_arg}", timeout=None, on_output=recorder
        )
    )
    await asyncio.wait_for(recorder.seen.wait(), WAIT)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3.0)

    assert await _survivors(sleep_arg) == []


async def test_a_background_child_holding_stdout_does_not_hang_the_run(sleep_arg: str) -> None:
    result = await run_command(f"sleep {sleep_arg} & echo hi", timeout=WAIT)

    assert result.outcome is Outcome.SUCCEEDED
    assert result.stdout == "hi\n"
    assert await _survivors(sleep_arg) == []


async def test_a_background_childs_last_output_is_still_collected() -> None:
    result = await run_command("(sleep 0.2; echo late) & echo early", timeout=WAIT)

    assert result.outcome is Outcome.SUCCEEDED
    assert result.stdout == "early\nlate\n"


async def test_the_leaders_exit_code_decides_even_when_background_children_remain(
    sleep_arg: str,
) -> None:
    result = await run_command(f"sleep {sleep_arg} & exit 4", timeout=WAIT)

    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 4
    assert await _survivors(sleep_arg) == []


async def test_every_run_result_is_a_frozen_record() -> None:
    result: ProcessResult = await run_command("true", timeout=WAIT)

    with pytest.raises(AttributeError):
        result.outcome = Outcome.FAILED  # type: ignore[misc]
