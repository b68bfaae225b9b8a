"""Failed logins hold the name and the address for longer and longer (issue 14 item 6)."""

from __future__ import annotations

import pytest

from opsplane.security.throttle import LoginThrottle, LoginThrottled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _held(throttle: LoginThrottle, name: str, address: str | None) -> int | None:
    try:
        throttle.check(name, address)
    except LoginThrottled as e:
        return e.retry_after
    return None


def test_delays_start_after_two_failures_then_double_up_to_thirty_seconds() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    delays = []
    for _ in range(10):
        delays.append(throttle.failed("alice", "192.0.2.7"))
        clock.now += 60  # long enough for any hold, not enough to be forgotten
    assert delays == [0, 0, 0.5, 1, 2, 4, 8, 16, 30, 30]
    assert throttle.failures == 10 and throttle.delay_seconds == sum(delays)


def test_a_held_name_or_address_is_refused_without_a_check_until_the_hold_ends() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(5):
        throttle.failed("alice", "192.0.2.7")
    # Held 2 s: the name from any address, the address for any name.
    assert _held(throttle, "alice", "198.51.100.1") == 2
    assert _held(throttle, "bob", "192.0.2.7") == 2
    assert _held(throttle, "bob", "198.51.100.1") is None
    assert throttle.throttled == 2
    clock.now += 2.1
    assert _held(throttle, "alice", "192.0.2.7") is None


def test_many_names_from_one_address_hold_the_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock)
    for index in range(4):
        throttle.failed(f"user-{index}", "203.0.113.9")
    assert _held(throttle, "user-99", "203.0.113.9") == 1
    assert _held(throttle, "user-99", None) is None


def test_success_clears_and_quiet_time_forgets() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock=clock, forget_after=900)
    for _ in range(4):
        throttle.failed("alice", "192.0.2.7")
    clock.now += 10
    throttle.succeeded("alice", "192.0.2.7")
    assert throttle.failed("alice", "192.0.2.7") == 0
    for _ in range(3):
        throttle.failed("bob", None)
    clock.now += 901
    assert throttle.failed("bob", None) == 0  # starts again from zero


def test_memory_is_bounded() -> None:
    throttle = LoginThrottle(clock=Clock(), max_entries=1000)
    for index in range(20_000):
        throttle.failed(f"user-{index}", f"10.0.{index // 256}.{index % 256}")
    assert throttle.remembered == 2000


@pytest.mark.parametrize("seconds", [0.1, 1.0, 29.2])
def test_retry_after_is_whole_seconds_rounded_up(seconds: float) -> None:
    assert LoginThrottled(seconds).retry_after == max(1, -(-seconds // 1))
