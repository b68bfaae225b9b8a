"""Logging for the long-running verbs (server, demo, agent, worker): text lines, or JSON lines
(``--log-format json`` / ``OPSPLANE_LOG_FORMAT=json``) with the task, run and host a line
concerns as fields (``opsplane/logcontext.py``).

A module of its own so that ``opsplane agent`` can set up logging without importing the
control plane (``cli/processes.py`` imports the API and the engine).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Literal

from opsplane.logcontext import FIELDS, ContextFilter

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_FORMAT_ENV = "OPSPLANE_LOG_FORMAT"


def default_log_format() -> str:
    return os.environ.get(LOG_FORMAT_ENV, "text")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context
    fields present, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(verbose: bool = False, log_format: str | None = None) -> None:
    """Log lines to stderr, text (time, level, logger) or JSON; debug with ``verbose``."""
    chosen = log_format or default_log_format()
    if chosen not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {chosen!r}")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # Per-request lines drown the events an operator needs to see.
    logging.getLogger("httpx").setLevel(logging.WARNING)
