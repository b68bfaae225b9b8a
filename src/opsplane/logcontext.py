"""Which task, run and host a log line concerns, without passing them to every call.

The engine wraps the handling of one run (dispatch, a report, a deadline) in
:func:`about_run`; :class:`ContextFilter` copies what it set onto each record, where the JSON
log format (``--log-format json``) prints it as fields, so that every line about a run can be
found by its id. A record given ``extra={"run_id": …}`` keeps its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FIELDS = ("task_id", "run_id", "host")
_current: ContextVar[dict[str, str] | None] = ContextVar("opsplane_log_context", default=None)


@contextmanager
def about_run(
    task_id: str | None = None, run_id: str | None = None, host: str | None = None
) -> Iterator[None]:
    """Log lines inside are about this task/run/host (inner calls add to outer ones)."""
    given = {"task_id": task_id, "run_id": run_id, "host": host}
    merged = {**(_current.get() or {}), **{k: v for k, v in given.items() if v}}
    token = _current.set(merged)
    try:
        yield
    finally:
        _current.reset(token)


def about(
    task_id: str | None = None, run_id: str | None = None, host: str | None = None
) -> dict[str, str]:
    """``extra=`` for one log line about this task/run/host (fields left out when None)."""
    given = {"task_id": task_id, "run_id": run_id, "host": host}
    return {key: value for key, value in given.items() if value}


class ContextFilter(logging.Filter):
    """Adds the current :func:`about_run` fields to each record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_current.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True
