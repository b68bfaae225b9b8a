"""The agent spool: at most once execution and no lost results, across restarts."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from opsplane.agent.spool import Spool, check_run_id
from opsplane.domain.errors import ConfigError, InvalidInput


def new_run_id() -> str:
    return str(uuid.uuid4())


def result_for(run_id: str, status: str = "succeeded") -> dict[str, object]:
    return {"run_id": run_id, "task_id": "t1", "status": status, "exit_code": 0, "stdout": "hi\n"}


def test_accept_is_once_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    run_id = new_run_id()
    assert spool.accept(run_id, "t1", {"attempt": 1})
    assert not spool.accept(run_id, "t1", {"attempt": 1})
    # Case does not make a run id new.
    assert not spool.accept(run_id.upper(), "t1", {})


def test_accept_is_once_only_across_restarts(tmp_path: Path) -> None:
    accepted, finished, acknowledged = new_run_id(), new_run_id(), new_run_id()
    first = Spool(tmp_path)
    for run_id in (accepted, finished, acknowledged):
        assert first.accept(run_id, "t1", {})
    first.finish(finished, result_for(finished))
    first.finish(acknowledged, result_for(acknowledged))
    first.acknowledge(acknowledged)

    second = Spool(tmp_path)
    for run_id in (accepted, finished, acknowledged):
        assert not second.accept(run_id, "t1", {})
    assert second.accept(new_run_id(), "t1", {})


def test_results_stay_pending_until_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    one, two = new_run_id(), new_run_id()
    spool.accept(one, "t1", {})
    spool.accept(two, "t1", {})
    assert spool.pending_results() == []

    spool.finish(one, result_for(one, "failed"))
    spool.finish(two, result_for(two))
    assert [r["run_id"] for r in Spool(tmp_path).pending_results()] == [one, two]
    assert spool.pending_result(one) == result_for(one, "failed")

    assert spool.acknowledge(one)
    assert [r["run_id"] for r in Spool(tmp_path).pending_results()] == [two]
    assert spool.pending_result(one) is None
    assert not spool.acknowledge(one)  # a repeated ack changes nothing
    assert not spool.acknowledge(new_run_id())  # nor does one for a run never seen


def test_interrupted_runs_are_listed_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    running, done = new_run_id(), new_run_id()
    spool.accept(running, "t1", {})
    spool.record_pid(running, 4242, 1700000000.5)
    spool.accept(done, "t2", {})
    spool.finish(done, result_for(done))

    restarted = Spool(tmp_path)
    restarted.lock()
    try:
        [interrupted] = restarted.interrupted()
        assert (interrupted.run_id, interrupted.task_id) == (running, "t1")
        assert (interrupted.pid, interrupted.create_time) == (4242, 1700000000.5)

        restarted.mark_abandoned(running)
        assert restarted.interrupted() == []
        assert not restarted.accept(running, "t1", {})
        assert [r["run_id"] for r in restarted.pending_results()] == [done]
    finally:
        restarted.unlock()


def test_unreadable_record_counts_as_interrupted_never_as_new(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    run_id = new_run_id()
    (tmp_path / "runs" / f"{run_id}.json").write_text("{not json")
    assert [r.run_id for r in spool.interrupted()] == [run_id]
    assert not spool.accept(run_id, "t1", {})


def test_prune_forgets_old_done_runs_but_keeps_a_day(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old, recent, pending = new_run_id(), new_run_id(), new_run_id()
    for run_id in (old, recent, pending):
        spool.accept(run_id, "t1", {})
        spool.finish(run_id, result_for(run_id))
    spool.acknowledge(old)
    spool.acknowledge(recent)
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / "done" / f"{old}.json", (two_days_ago, two_days_ago))

    # Asking for less than a day still keeps a day.
    assert spool.prune(timedelta(seconds=1)) == 1
    assert spool.accept(old, "t1", {})  # forgotten
    assert not spool.accept(recent, "t1", {})
    assert [r["run_id"] for r in spool.pending_results()] == [pending]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../../etc/passwd",
        "a/b",
        "not-a-uuid",
        "7f2da8cc-a468-4c23-b409-ac783587e851\n",
        "5f0904ab-c936-469a-bdbc-42da8a16dc81/../x",
        "00000000-0000-0000-0000-00000000000g",
    ],
)
def test_bad_run_ids_are_refused(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(InvalidInput):
        check_run_id(bad)
    with pytest.raises(InvalidInput):
        spool.accept(bad, "t1", {})
    with pytest.raises(InvalidInput):
        spool.finish(bad, {})
    with pytest.raises(InvalidInput):
        spool.acknowledge(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "runs"]
    assert list((tmp_path / "runs").iterdir()) == []


def test_one_agent_per_state_dir(tmp_path: Path) -> None:
    first, second = Spool(tmp_path), Spool(tmp_path)
    first.lock()
    try:
        with pytest.raises(ConfigError):
            second.lock()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


def test_lock_tidies_what_a_crash_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    run_id = new_run_id()
    spool.accept(run_id, "t1", {})
    spool.finish(run_id, result_for(run_id))
    # A crash between writing the done marker and removing the record leaves both.
    (tmp_path / "done" / f"{run_id}.json").write_text('{"state":"acknowledged"}')
    (tmp_path / "runs" / ".leftover.tmp").write_text("half")

    spool.lock()
    try:
        assert spool.pending_results() == []
        assert not (tmp_path / "runs" / ".leftover.tmp").exists()
        assert not spool.accept(run_id, "t1", {})
    finally:
        spool.unlock()


def test_recently_acknowledged_and_abandoned_runs(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    acked, old, abandoned, pending = (new_run_id() for _ in range(4))
    for run_id in (acked, old, abandoned, pending):
        spool.accept(run_id, "t1", {})
    for run_id in (acked, old, pending):
        spool.finish(run_id, result_for(run_id))
    spool.acknowledge(acked)
    spool.acknowledge(old)
    spool.mark_abandoned(abandoned)
    # Acknowledged an hour ago.
    an_hour_ago = time.time() - 3600
    os.utime(tmp_path / "done" / f"{old}.json", (an_hour_ago, an_hour_ago))

    restarted = Spool(tmp_path)
    assert restarted.recently_acknowledged(timedelta(minutes=10)) == [acked]
    assert sorted(restarted.recently_acknowledged(timedelta(hours=2))) == sorted([acked, old])
    assert restarted.recently_abandoned(timedelta(days=1)) == [abandoned]
    # A pending result is not "acknowledged", whatever its age.
    assert pending not in restarted.recently_acknowledged(timedelta(days=1))
