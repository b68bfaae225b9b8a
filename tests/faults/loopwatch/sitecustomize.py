"""Test instrumentation, not part of opsplane: a watch on the event loop of the control plane
under test (fault scenario 8, ``test_output_abuse.py``), loaded through ``PYTHONPATH`` when
``TEST_LOOP_WATCH`` names a file.

Every step of the event loop (one callback, or one step of a task) is timed twice: in wall
time, and in CPU time of the loop's thread. A step whose wall time is long but whose CPU time
is short waited (for a core the machine did not give, or for the GIL); a step whose CPU time is
long is the control plane's own work, and holds every request behind it. Steps over either
bound are written to the file, one JSON line each, with what ran.
"""

from __future__ import annotations

import os

_PATH = os.environ.get("TEST_LOOP_WATCH")

if _PATH:
    import asyncio
    import asyncio.events
    import json
    import time
    from typing import Any

    _WALL, _CPU = 0.05, 0.01
    _out = open(_PATH, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    _run = asyncio.events.Handle._run

    def _what(handle: asyncio.events.Handle) -> str:
        owner = getattr(handle._callback, "__self__", None)
        if isinstance(owner, asyncio.Task):
            coro: Any = owner.get_coro()
            return f"task {owner.get_name()}: {getattr(coro, '__qualname__', '?')}"
        return repr(handle)[:200]

    def _timed_run(self: asyncio.events.Handle) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            _run(self)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            if wall > _WALL or cpu > _CPU:
                step = {"at": time.time(), "wall": wall, "cpu": cpu, "what": _what(self)}
                _out.write(json.dumps(step) + "\n")

    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
