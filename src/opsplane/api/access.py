"""The group rule for actions on an existing task (start, cancel, kill): the caller's grant must
cover every host the task runs on. Creating a task checks the same rule in the engine, where
its targets are resolved (``TaskRequest.allowed_groups``); both use ``domain.access``."""

from __future__ import annotations

from opsplane.domain.access import check_hosts_allowed
from opsplane.domain.targeting import HostRef
from opsplane.engine.core import Engine
from opsplane.security.roles import Principal


async def check_task_allowed(engine: Engine, principal: Principal, task_id: str) -> None:
    """NotFound for an unknown task; Forbidden, naming the hosts, when the task reaches a host
    outside the caller's groups (a host since removed counts as outside)."""
    allowed = principal.allowed_groups
    runs = await engine.tasks.list_runs(task_id)
    if allowed is None:
        return
    names = {run.host for run in runs}
    known = {host.name: host for host in await engine.hosts.hosts_named(names)}
    refs = [
        HostRef(name, tuple(known[name].groups or ()) if name in known else ())
        for name in sorted(names)
    ]
    check_hosts_allowed(allowed, refs)
