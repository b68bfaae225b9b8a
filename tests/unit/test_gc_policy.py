"""The control plane's garbage-collector policy (docs/scale.md, Fan-out): young objects are
collected less often than CPython's default, and what start-up left is out of every later
collection, so that a broadcast does not set off full collections over every open stream."""

from __future__ import annotations

import gc

from opsplane.cli.processes import GC_THRESHOLDS, tune_gc


def test_the_server_collects_the_young_less_often_and_freezes_what_start_up_left() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        # A broadcast's transaction holds tens of thousands of objects: far above the default
        # 700 allocations per young collection, and full collections twenty times rarer.
        assert GC_THRESHOLDS[0] >= 50 * 700 and GC_THRESHOLDS[1] * GC_THRESHOLDS[2] >= 100
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
