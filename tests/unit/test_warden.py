"""The warden (execution/warden.py): what a process started dies with it, even by kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

# The owner: starts a warden and a run's tree (one child in the run's group, one that left it
# with setsid), registers the run's leader, says so, then waits to be killed.
_OWNER = """
import os, signal, subprocess, sys, time
from opsplane.execution.warden import Warden
warden = Warden(grace=0.5)
warden.start()
marker = sys.argv[1]
leader = subprocess.Popen(
    ["sh", "-c", f"sleep {marker} & setsid sleep {marker} & wait"], start_new_session=True
)
warden.watch(leader.pid)
if sys.argv[2] == "release":
    warden.release(leader.pid)
if sys.argv[2] == "respawn":
    first = warden.pid
    os.kill(first, signal.SIGKILL)
    time.sleep(0.2)
    warden.watch(leader.pid)  # notices, and hands what it watches to a new warden
    assert warden.pid != first
print(warden.pid, flush=True)
time.sleep(600)
"""
BOUND = 10.0


def _sleeping(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and process.info["cmdline"] == [
            "sleep",
            marker,
        ]:
            found.append(process)
    return found


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def marker() -> Iterator[str]:
    value = f"1001.{uuid.uuid4().int % 10**9:09d}"
    yield value
    for process in _sleeping(value):
        process.kill()


def _killed_owner(marker: str, mode: str) -> int:
    """Run the owner until its run is going, kill -9 it; returns its warden's pid."""
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER, marker, mode], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        warden_pid = int(owner.stdout.readline())
        _wait(lambda: len(_sleeping(marker)) == 2, "the run's tree to be running")
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=BOUND)
    return warden_pid


def test_a_killed_owners_runs_die_with_it_setsid_children_included(marker: str) -> None:
    warden_pid = _killed_owner(marker, "watch")
    _wait(lambda: not _sleeping(marker), "the run's tree to be gone")
    _wait(lambda: _gone(warden_pid), "the warden to exit")


def test_a_killed_warden_is_replaced_at_the_next_run(marker: str) -> None:
    warden_pid = _killed_owner(marker, "respawn")
    _wait(lambda: not _sleeping(marker), "the run's tree to be gone")
    _wait(lambda: _gone(warden_pid), "the new warden to exit")


def test_a_released_run_is_not_the_wardens_business(marker: str) -> None:
    warden_pid = _killed_owner(marker, "release")
    _wait(lambda: _gone(warden_pid), "the warden to exit")
    assert len(_sleeping(marker)) == 2
