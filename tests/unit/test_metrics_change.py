"""When an agent sends its figures before their time (docs/scale.md, "Heartbeats and
liveness")."""

from __future__ import annotations

from opsplane.agent.metrics import changed_significantly

SENT = {"cpu_usage": 10.0, "memory_usage": 40.0, "disk_usage": 70.0, "load": 4.0}


def test_small_moves_wait_for_the_metrics_interval() -> None:
    now = {"cpu_usage": 30.0, "memory_usage": 45.0, "disk_usage": 72.0, "load": 5.5}
    assert not changed_significantly(SENT, now)


def test_a_large_move_of_any_figure_is_sent_at_once() -> None:
    assert changed_significantly(SENT, {**SENT, "cpu_usage": 90.0})
    assert changed_significantly(SENT, {**SENT, "memory_usage": 55.0})
    assert changed_significantly(SENT, {**SENT, "disk_usage": 76.0})
    # Load: by half of what was sent (2.0 here), or by 1.0 on a quiet host.
    assert changed_significantly(SENT, {**SENT, "load": 6.5})
    assert changed_significantly({**SENT, "load": 0.1}, {**SENT, "load": 1.2})
