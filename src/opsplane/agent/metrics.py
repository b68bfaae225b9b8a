"""The host figures an agent puts in every heartbeat."""

from __future__ import annotations

import logging
import os

import psutil

logger = logging.getLogger(__name__)


def snapshot() -> dict[str, float]:
    """CPU, memory and disk use in percent and the 1-minute load average, right now.

    Never sleeps: CPU use is measured since the previous call (the first call of a process
    reads 0.0), which is exactly the span between two heartbeats. A figure the host cannot
    provide reads 0.0 rather than failing the heartbeat that carries it.
    """
    figures = {"cpu_usage": 0.0, "memory_usage": 0.0, "load": 0.0, "disk_usage": 0.0}
    try:
        figures["cpu_usage"] = float(psutil.cpu_percent(interval=None))
        figures["memory_usage"] = float(psutil.virtual_memory().percent)
        figures["load"] = float(os.getloadavg()[0])
        figures["disk_usage"] = float(psutil.disk_usage("/").percent)
    except (OSError, psutil.Error) as exc:
        logger.debug("host metrics incomplete: %s", exc)
    return figures


# How far a figure must move from the one last sent to be sent before its time (gRPC agents
# send metrics every ``metrics_interval``; docs/scale.md): percentage points, and load.
SIGNIFICANT: dict[str, float] = {
    "cpu_usage": 25.0,
    "memory_usage": 10.0,
    "disk_usage": 5.0,
    "load": 1.0,
}


def changed_significantly(sent: dict[str, float], now: dict[str, float]) -> bool:
    """Whether a figure in ``now`` moved far enough from ``sent`` to be worth sending now
    (load: by 1.0 or by half of what was sent, whichever is more)."""
    for name, step in SIGNIFICANT.items():
        before, after = sent.get(name, 0.0), now.get(name, 0.0)
        if name == "load":
            step = max(step, before / 2)
        if abs(after - before) >= step:
            return True
    return False
