"""Logging for the long-running verbs (server, demo, agent, worker).

A module of its own so that ``opsplane agent`` can set up logging without importing the
control plane (``cli/processes.py`` imports the API and the engine).
"""

from __future__ import annotations

import logging


def configure_logging(verbose: bool = False) -> None:
    """Log lines with time, level and logger to stderr; debug with ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Per-request lines drown the events an operator needs to see.
    logging.getLogger("httpx").setLevel(logging.WARNING)
