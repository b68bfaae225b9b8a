"""Failed web logins slow down the next try, per user name and per source address.

The first ``free`` failures in a row cost nothing (a typo, then the right password at once);
after each further one a name (and, separately, an address) is held for ``first``, then twice
as long each time, at most ``longest``: 0.5 s, 1 s, 2 s, … 30 s. A login attempt
while either is held is answered at once with 429 and ``Retry-After`` (``LoginThrottled``),
without the password being looked at: parallel guesses gain nothing, and no request waits on
the server (an ``asyncio.sleep`` per attempt would hold a connection each and let parallel
attempts through together). A success clears the name and the address; a name or address
left alone for ``forget_after`` starts again from zero. Memory is bounded: at most
``max_entries`` names and as many addresses are remembered, the least recently failed ones
forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from opsplane.domain.errors import OpsplaneError


class LoginThrottled(OpsplaneError):
    """Too many failed logins for this name or address: try again in ``retry_after`` s."""

    def __init__(self, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed logins: try again in {seconds} s")
        self.retry_after = seconds


@dataclass
class _Failures:
    count: int
    held_until: float
    last: float


class _Recent:
    """Failures by key, the least recently failed forgotten first past ``size``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def get(self, key: str) -> _Failures | None:
        return self._entries.get(key)

    def put(self, key: str, entry: _Failures) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class LoginThrottle:
    """The login delays of one control plane (held in memory: a restart forgets them)."""

    def __init__(
        self,
        *,
        free: int = 2,
        first: float = 0.5,
        longest: float = 30.0,
        forget_after: float = 900.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = free
        self._first = first
        self._longest = longest
        self._forget_after = forget_after
        self._clock = clock
        self._names = _Recent(max_entries)
        self._addresses = _Recent(max_entries)
        # For /metrics: failed logins, attempts refused while held, seconds of holds imposed.
        self.failures = 0
        self.throttled = 0
        self.delay_seconds = 0.0

    def check(self, name: str, address: str | None) -> None:
        """``LoginThrottled`` while the name or the address is held."""
        now = self._clock()
        wait = max(self._wait(self._names, name, now), self._wait(self._addresses, address, now))
        if wait > 0:
            self.throttled += 1
            raise LoginThrottled(wait)

    def failed(self, name: str, address: str | None) -> float:
        """Count a failure; the seconds the name or address is now held (the longer)."""
        now = self._clock()
        self.failures += 1
        delay = max(self._fail(self._names, name, now), self._fail(self._addresses, address, now))
        self.delay_seconds += delay
        return delay

    def succeeded(self, name: str, address: str | None) -> None:
        self._names.clear(name)
        if address is not None:
            self._addresses.clear(address)

    @property
    def remembered(self) -> int:
        return len(self._names) + len(self._addresses)

    def _wait(self, recent: _Recent, key: str | None, now: float) -> float:
        entry = recent.get(key) if key is not None else None
        return 0.0 if entry is None else max(0.0, entry.held_until - now)

    def _fail(self, recent: _Recent, key: str | None, now: float) -> float:
        if key is None:
            return 0.0
        entry = recent.get(key)
        count = 1 if entry is None or now - entry.last > self._forget_after else entry.count + 1
        beyond = count - self._free
        delay = 0.0 if beyond <= 0 else min(self._longest, self._first * 2.0 ** min(beyond - 1, 60))
        recent.put(key, _Failures(count, now + delay, now))
        return delay
