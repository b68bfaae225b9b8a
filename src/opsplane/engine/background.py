"""The engine's long-lived loops (ingest, monitor, scheduler, archive pruner, alerts): how they
run, restart and end, in one place.

A loop is a coroutine that never returns. :class:`Supervised` runs it in a task and, when it
raises (or returns), logs the error and starts it again after a backoff that doubles up to
``max_backoff`` and resets once the loop has run ``healthy_after`` seconds without failing. A
loop that is restarting is reported by :meth:`Loops.problems`, which ``/readyz`` serves: a
control plane whose ingest is down is not ready, even though its process is alive.
:func:`run_periodically` is the body of a periodic duty done in bounded passes (archive
pruning, database retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Literal

log = logging.getLogger(__name__)

LoopState = Literal["stopped", "running", "restarting"]


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: nothing to do) and return once it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_periodically(
    run_pass: Callable[[], Awaitable[bool]],
    *,
    interval: float,
    what: str,
    log: logging.Logger,
    retry_on: type[Exception] | tuple[type[Exception], ...] = Exception,
    sooner: float = 1.0,
) -> None:
    """Never returns: runs ``run_pass`` every ``interval`` seconds. A pass that returns False
    stopped at its limit with more left to do: the next one follows after ``sooner`` seconds
    at most, until the backlog is gone. A ``retry_on`` error is logged (``what`` failed) and
    retried at the next pass: an OSError (a disk, a network) as a warning, anything else with
    its traceback. Other errors end the loop, for its :class:`Supervised` to restart."""
    while True:
        delay = interval
        try:
            if not await run_pass():
                delay = min(sooner, interval)
        except retry_on as e:
            if isinstance(e, OSError):
                log.warning("%s failed; retrying in %.0fs: %s", what, delay, e)
            else:
                log.exception("%s failed; retrying in %.0fs", what, delay)
        await asyncio.sleep(delay)


class Supervised:
    """One named loop, restarted with backoff when it fails. ``start``/``stop`` are idempotent.

    ``on_crash`` is called with the error before the restart: the owner can settle what the
    failed run of the loop left half done (ingest fails the futures of the batch it held).
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Coroutine[Any, Any, None]],
        *,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
        on_crash: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._body = body
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._healthy_after = healthy_after
        self._on_crash = on_crash
        self._task: asyncio.Task[None] | None = None
        self.state: LoopState = "stopped"
        #: How many times the loop failed and was started again, since this object exists.
        self.restarts = 0
        #: The last failure, as ``Type: message`` (None until one happens).
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self.state = "running"
            self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.state = "stopped"

    async def _supervise(self) -> None:
        delay = self._initial_backoff
        while True:
            began = time.monotonic()
            self.state = "running"
            try:
                await self._body()
                error: BaseException = RuntimeError(f"the {self.name} loop returned")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                error = e
            self.restarts += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if time.monotonic() - began >= self._healthy_after:
                delay = self._initial_backoff
            self.state = "restarting"
            log.error(
                "background loop %s failed; restarting in %.1fs",
                self.name,
                delay,
                exc_info=(type(error), error, error.__traceback__),
            )
            if self._on_crash is not None:
                try:
                    self._on_crash(error)
                except Exception:
                    log.exception("cleaning up after the %s loop failed", self.name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)


class Loops:
    """Every supervised loop of a control plane, for readiness and metrics."""

    def __init__(self) -> None:
        self._loops: dict[str, Supervised] = {}

    def add(self, loop: Supervised) -> Supervised:
        self._loops[loop.name] = loop
        return loop

    def __iter__(self) -> Iterator[Supervised]:
        return iter(list(self._loops.values()))

    def problems(self) -> dict[str, str]:
        """Loops started but not running now (crashed, waiting to restart): name → why."""
        return {
            loop.name: f"{loop.state} after {loop.last_error}"
            for loop in self._loops.values()
            if loop.running and loop.state != "running"
        }
