"""When a schedule is due, and what to do with due times that passed: no I/O, no clock of its
own (every function takes ``now``), so the policies are tested with a controllable clock.

A schedule is a cron expression (5 fields, in an IANA time zone, DST handled by ``cronsim``)
or a fixed interval counted from the schedule's creation. Its ``next_due`` is the earliest due
time not yet handled. When the scheduler looks, every due time up to now is handled once:

- the latest one fires if it is on time (within ``ON_TIME`` seconds), or, with misfire policy
  ``run_once``, if it is within ``misfire_window`` seconds; otherwise it is recorded ``missed``;
- earlier ones (the control plane was down, or the loop stalled) are recorded as one
  ``missed`` entry: a schedule never fires a burst to catch up.
- overlap ``skip``: a due time that finds the previous launch still running is recorded
  ``skipped``; ``queue``: it waits (not handled) until the previous launch ends, then fires
  once, however late, with the due times that passed meanwhile folded into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from opsplane.domain.errors import InvalidInput

MISFIRE_POLICIES = ("skip", "run_once")
OVERLAP_POLICIES = ("skip", "queue")
# A due time handled this late is still on time (the loop's tick, a busy event loop).
ON_TIME = timedelta(seconds=30)
MIN_INTERVAL = 1
MAX_INTERVAL = 366 * 24 * 3600
MAX_WINDOW = 7 * 24 * 3600
# Due times walked at most per look: a per-second schedule down for a year is not walked.
MAX_WALK = 10_000


@dataclass(frozen=True)
class Timing:
    cron: str | None = None
    timezone: str = "UTC"
    interval_seconds: int | None = None
    # Interval schedules count from here.
    anchor: datetime | None = None

    def validated(self) -> Timing:
        if (self.cron is None) == (self.interval_seconds is None):
            raise InvalidInput("give exactly one of cron and interval_seconds")
        zone(self.timezone)
        if self.cron is not None:
            if len(self.cron.split()) != 5:
                raise InvalidInput(
                    f"cron must have 5 fields (minute hour day month weekday): {self.cron!r}"
                )
            try:
                CronSim(self.cron, datetime(2000, 1, 1, tzinfo=UTC))
            except CronSimError as e:
                raise InvalidInput(f"cron {self.cron!r} is not valid: {e}") from e
        elif not (
            isinstance(self.interval_seconds, int)
            and MIN_INTERVAL <= self.interval_seconds <= MAX_INTERVAL
        ):
            raise InvalidInput(f"interval_seconds must be {MIN_INTERVAL}..{MAX_INTERVAL}")
        return self

    def after(self, moment: datetime) -> datetime:
        """The first due time strictly after ``moment`` (aware, returned in UTC)."""
        if self.cron is not None:
            local = moment.astimezone(zone(self.timezone))
            found = next(iter(CronSim(self.cron, local)))
            if found <= local:  # cronsim starts at the given minute itself
                found = next(iter(CronSim(self.cron, local + timedelta(minutes=1))))
            return found.astimezone(UTC)
        assert self.interval_seconds is not None and self.anchor is not None
        step = timedelta(seconds=self.interval_seconds)
        if moment < self.anchor:
            return self.anchor + step
        count = (moment - self.anchor) // step + 1
        return self.anchor + count * step

    def upcoming(self, start: datetime, count: int) -> list[datetime]:
        """``count`` due times from ``start`` (included when it is one)."""
        out: list[datetime] = []
        moment = start - timedelta(microseconds=1)
        for _ in range(count):
            moment = self.after(moment)
            out.append(moment)
        return out

    def due_until(self, first: datetime, now: datetime) -> Iterator[datetime]:
        """Due times from ``first`` up to ``now``, both included, at most MAX_WALK."""
        moment = first
        for _ in range(MAX_WALK):
            if moment > now:
                return
            yield moment
            moment = self.after(moment)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise InvalidInput(f"unknown time zone {name!r} (an IANA name: Europe/Berlin)") from e


@dataclass(frozen=True)
class Decision:
    """What to do with a schedule's due times at one look."""

    fire: datetime | None = None
    # Passed without a launch: (first such due time, how many).
    missed: tuple[datetime, int] | None = None
    # The fire's due time found the previous launch running (overlap skip).
    skipped: datetime | None = None
    # Nothing is handled now: the previous launch still runs (overlap queue).
    wait: bool = False
    next_due: datetime | None = None


def decide(
    timing: Timing,
    next_due: datetime,
    now: datetime,
    *,
    misfire: str,
    misfire_window: int,
    overlap: str,
    previous_running: bool,
    held: bool = False,
) -> Decision:
    """The decision for a schedule whose ``next_due`` is at or before ``now``. ``held``: the
    previous launch ended after ``next_due`` (overlap ``queue`` held this due time for it)."""
    dues = list(timing.due_until(next_due, now))
    if not dues:
        return Decision(next_due=next_due)
    following = timing.after(max(dues[-1], now))
    if previous_running and overlap == "queue":
        return Decision(wait=True, next_due=next_due)
    latest = dues[-1]
    lateness = now - latest
    on_time = lateness <= ON_TIME or (
        misfire == "run_once" and lateness <= timedelta(seconds=misfire_window)
    )
    if overlap == "queue" and held:
        # A due time held while the previous launch ran fires now, however late.
        on_time = True
    earlier = dues[:-1]
    if not on_time:
        earlier = dues
    missed = (earlier[0], len(earlier)) if earlier else None
    if not on_time:
        return Decision(missed=missed, next_due=following)
    if previous_running:
        return Decision(missed=missed, skipped=latest, next_due=following)
    return Decision(fire=latest, missed=missed, next_due=following)


def check_policies(misfire: str, misfire_window: int, overlap: str) -> None:
    if misfire not in MISFIRE_POLICIES:
        raise InvalidInput(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}, got {misfire!r}")
    if overlap not in OVERLAP_POLICIES:
        raise InvalidInput(f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, got {overlap!r}")
    if not 0 <= misfire_window <= MAX_WINDOW:
        raise InvalidInput(f"misfire_window must be 0..{MAX_WINDOW} seconds")
