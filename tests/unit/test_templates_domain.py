"""Templates and schedules without I/O (issue 20): typed parameters, due times in a time zone,
and the misfire and overlap policies under a controllable clock."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from opsplane.domain.errors import InvalidInput
from opsplane.domain.schedules import Timing, decide
from opsplane.domain.templates import ParamSpec, resolve_params

T0 = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def _s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_parameters_become_param_variables_and_secrets_stay_apart() -> None:
    specs = (
        ParamSpec.parse({"name": "unit", "default": "nginx"}),
        ParamSpec.parse({"name": "count", "type": "int", "default": 2}),
        ParamSpec.parse({"name": "mode", "type": "choice", "choices": ["soft", "hard"]}),
        ParamSpec.parse({"name": "token", "type": "secret"}),
    )
    launch = resolve_params(specs, {"mode": "hard", "count": "7", "token": "t0p"})
    assert launch.env["PARAM_UNIT"] == "nginx"
    assert launch.env["PARAM_COUNT"] == "7"
    assert launch.env["PARAM_MODE"] == "hard"
    assert "PARAM_TOKEN" not in launch.env and "t0p" not in launch.env["PARAMS_JSON"]
    assert launch.secret_env == {"PARAM_TOKEN": "t0p"}


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"mode": "x"}, "mode"),
        ({"count": 1.5, "mode": "soft"}, "count"),
        ({"count": "1e3", "mode": "soft"}, "count"),
        ({"mode": "soft", "nope": 1}, "nope"),
        ({"mode": "soft", "unit": "a\x00b"}, "unit"),
        ({"mode": "soft", "unit": ["a"]}, "unit"),
    ],
)
def test_a_bad_value_is_refused_naming_its_parameter(given: dict[str, object], named: str) -> None:
    specs = (
        ParamSpec.parse({"name": "unit", "default": "nginx"}),
        ParamSpec.parse({"name": "count", "type": "int", "default": 2}),
        ParamSpec.parse({"name": "mode", "type": "choice", "choices": ["soft", "hard"]}),
    )
    with pytest.raises(InvalidInput, match=named):
        resolve_params(specs, given)


def test_cron_due_times_follow_the_time_zone_across_a_dst_change() -> None:
    timing = Timing(cron="30 2 * * *", timezone="Europe/Berlin").validated()
    # 2026-03-29: Berlin skips 02:00-03:00; cronsim runs a skipped time once, at 03:00.
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    dues = timing.upcoming(before, 3)
    assert dues[0] == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert dues[1] == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)  # 02:30 CEST
    # 2026-10-25: Berlin repeats 02:00-03:00; a fixed 02:30 runs once, at the first one.
    autumn = timing.upcoming(datetime(2026, 10, 24, 12, 0, tzinfo=UTC), 2)
    assert autumn == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]
    # Every 30 minutes goes on through both hours: wall-clock repeats, real time does not.
    half = Timing(cron="*/30 * * * *", timezone="Europe/Berlin").validated()
    dues = half.upcoming(datetime(2026, 10, 24, 23, 50, tzinfo=UTC), 5)
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(dues)] == [1800] * 4
    every5 = Timing(cron="*/5 * * * *", timezone="Europe/Berlin").validated()
    assert every5.after(_s(0)) == _s(300)
    assert every5.after(_s(1)) == _s(300)


@pytest.mark.parametrize(
    "bad",
    [
        Timing(cron="* * * *"),
        Timing(cron="61 * * * *"),
        Timing(cron="* * * * *", timezone="Mars/Base"),
        Timing(interval_seconds=0, anchor=T0),
        Timing(),
        Timing(cron="* * * * *", interval_seconds=5),
    ],
)
def test_a_bad_timing_is_refused(bad: Timing) -> None:
    with pytest.raises(InvalidInput):
        bad.validated()


def test_an_interval_schedule_fires_once_per_due_time_under_a_stepped_clock() -> None:
    timing = Timing(interval_seconds=2, anchor=T0).validated()
    next_due = timing.after(T0)
    fired = []
    for step in range(1, 41):  # 20 s in 0.5 s ticks
        now = _s(step / 2)
        if next_due > now:
            continue
        decision = decide(
            timing, next_due, now, misfire="skip", misfire_window=0, overlap="skip",
            previous_running=False,
        )  # fmt: skip
        assert decision.missed is None
        fired.append(decision.fire)
        assert decision.next_due is not None
        next_due = decision.next_due
    assert fired == [_s(2 * k) for k in range(1, 11)]


def test_misfire_skip_records_the_passed_due_times_and_launches_nothing_late() -> None:
    timing = Timing(interval_seconds=60, anchor=T0).validated()
    # Down from 0:59 to 11:45: eleven due times passed, the latest 45 s ago (not on time).
    late = decide(
        timing, _s(60), _s(705), misfire="skip", misfire_window=3600, overlap="skip",
        previous_running=False,
    )  # fmt: skip
    assert late.fire is None
    assert late.missed == (_s(60), 11)
    assert late.next_due == _s(720)
    on_time = decide(
        timing, _s(60), _s(605), misfire="skip", misfire_window=0, overlap="skip",
        previous_running=False,
    )  # fmt: skip
    assert on_time.fire == _s(600) and on_time.missed == (_s(60), 9)


def test_misfire_run_once_launches_the_latest_within_its_window_only() -> None:
    timing = Timing(interval_seconds=60, anchor=T0).validated()
    within = decide(
        timing, _s(60), _s(705), misfire="run_once", misfire_window=120, overlap="skip",
        previous_running=False,
    )  # fmt: skip
    assert within.fire == _s(660) and within.missed == (_s(60), 10)
    beyond = decide(
        timing, _s(60), _s(705), misfire="run_once", misfire_window=10, overlap="skip",
        previous_running=False,
    )  # fmt: skip
    assert beyond.fire is None and beyond.missed == (_s(60), 11)


def test_overlap_skip_skips_and_queue_waits_then_runs_once_late() -> None:
    timing = Timing(interval_seconds=60, anchor=T0).validated()
    skipped = decide(
        timing, _s(60), _s(61), misfire="skip", misfire_window=0, overlap="skip",
        previous_running=True,
    )  # fmt: skip
    assert skipped.fire is None and skipped.skipped == _s(60) and skipped.next_due == _s(120)
    waiting = decide(
        timing, _s(60), _s(61), misfire="skip", misfire_window=0, overlap="queue",
        previous_running=True,
    )  # fmt: skip
    assert waiting.wait and waiting.next_due == _s(60)
    # The previous launch ended at 150 s: the held 60 s due time runs once, now, however late;
    # the 120 s one passed meanwhile and is folded into it.
    released = decide(
        timing, _s(60), _s(170), misfire="skip", misfire_window=0, overlap="queue",
        previous_running=False, held=True,
    )  # fmt: skip
    assert released.fire == _s(120) and released.missed == (_s(60), 1)
    assert released.next_due == _s(180)
