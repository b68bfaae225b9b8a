"""Recovery at start for runs this control plane executed itself (issue 13 defect 5).

A run on a link that executes in this process (``Link.executes_here``: the control plane's own
host, SSH without workers) reports only through this process. When the process died, the run's
local processes died with it (the warden, ``execution/warden.py``) and its SSH session was cut;
nothing will ever report it, so at the next start it ends ``lost`` at once — retried if its
task's policy says so — instead of staying ``dispatched`` or ``running`` forever.

With several instances on one database the engine runs this only when no other instance's
liveness lease is current (docs/instances.md): a run does not say which instance executes it.
A process restarted at once after a ``kill -9`` finds its predecessor's lease still current:
it then settles, once it is alone (the predecessor's lease expired), the runs dispatched before
it started, which none but the dead can have been executing (the monitor's pass, engine/core.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from opsplane.domain.states import IN_FLIGHT_RUN_STATUSES, RunStatus
from opsplane.engine.changes import Changes
from opsplane.store import queries

log = logging.getLogger(__name__)

INTERRUPTED = "the control plane restarted while the run was in progress on {host}"
_BATCH = 1000


async def settle_interrupted_runs(
    changes: Changes, links: Sequence[str], *, dispatched_before: datetime | None = None
) -> int:
    """Within the caller's transaction: end as ``lost`` the runs in flight on ``links``
    (dispatched before ``dispatched_before``, when given)."""
    if not links:
        return 0
    settled = 0
    while True:
        runs = await queries.runs_on_links(
            changes.session,
            IN_FLIGHT_RUN_STATUSES,
            links,
            limit=_BATCH,
            dispatched_before=dispatched_before,
        )
        moved = [
            run
            for run in runs
            if changes.move(run, RunStatus.LOST, error=INTERRUPTED.format(host=run.host))
        ]
        settled += len(moved)
        await changes.session.flush()
        if len(runs) < _BATCH or not moved:
            break
    if settled:
        log.warning("%d runs were cut short by the last stop of the control plane: lost", settled)
    return settled
