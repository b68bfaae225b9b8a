"""Seed 000's API on top of the engine: ad-hoc SSH targets behind a bastion, commands or an
upload, a task id at once, per-server results later.

Each request's targets become SSH hosts (group ``adhoc``; passwords and keys given inline stay
in the link's memory, never in the store). Commands run one after another, each as an ordinary
task, so the seed's order of commands holds on every server; the seed's task id is the first
task's id, and the others are found by idempotency key ``sshapi:<id>:<n>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opsplane.domain.errors import InvalidInput, NotFound
from opsplane.domain.ids import new_id
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.states import TERMINAL_TASK_STATUSES, RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.hosts import HostService
from opsplane.engine.service import BeforeCommit, TaskService
from opsplane.store.tables import TaskRow

log = logging.getLogger(__name__)
ADHOC_GROUP = "adhoc"


@dataclass(frozen=True)
class AdhocEndpoint:
    host: str
    port: int = 22
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class AdhocRequest:
    targets: Sequence[AdhocEndpoint]
    proxy: AdhocEndpoint | None = None
    commands: Sequence[str] = ()
    upload: tuple[str, str] | None = None
    timeout: int | None = None
    created_by: str = "anonymous"


class SshApi:
    def __init__(
        self,
        hosts: HostService,
        tasks: TaskService,
        wait_task: Callable[[str], Awaitable[TaskRow]],
    ) -> None:
        self._hosts = hosts
        self._tasks = tasks
        self._wait_task = wait_task
        self._sequences: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        for sequence in list(self._sequences):
            sequence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sequence

    async def submit(
        self, request: AdhocRequest, *, before_commit: BeforeCommit | None = None
    ) -> str:
        """Register the targets, start the first command (or the upload); returns the id.
        ``before_commit`` runs in the transaction creating the first task (its audit record)."""
        if not request.targets:
            raise InvalidInput("targets must list at least one server")
        if request.upload is None and not [c for c in request.commands if c.strip()]:
            raise InvalidInput("commands must list at least one command")
        names = [await self._register(target, request.proxy) for target in request.targets]
        key_base = f"sshapi:{new_id()}"
        steps: list[TaskRequest] = []
        if request.upload is not None:
            local, remote = request.upload
            steps.append(
                self._step(request, names, f"upload {local} -> {remote}", key_base, 0, 1, "upload",
                           ExecSpec(local_path=local, remote_path=remote))
            )  # fmt: skip
        else:
            commands = [c for c in request.commands if c.strip()]
            steps = [
                self._step(request, names, command, key_base, i, len(commands), "command", None)
                for i, command in enumerate(commands)
            ]
        first = await self._tasks.create_task(steps[0], before_commit=before_commit)
        if len(steps) > 1:
            sequence = asyncio.create_task(self._run_rest(first.id, steps[1:]))
            self._sequences.add(sequence)
            sequence.add_done_callback(self._sequences.discard)
        return first.id

    @staticmethod
    def _step(
        request: AdhocRequest,
        names: list[str],
        command: str,
        key_base: str,
        index: int,
        count: int,
        kind: str,
        spec: ExecSpec | None,
    ) -> TaskRequest:
        meta = json.dumps({"api": "seed000", "index": index, "count": count})
        return TaskRequest(
            command=command,
            targets=Targets(hosts=tuple(names)),
            timeout=request.timeout,
            name=f"ssh api {command}"[:255],
            description=meta,
            created_by=request.created_by,
            idempotency_key=f"{key_base}:{index}",
            kind=kind,
            spec=spec,
        )

    async def _run_rest(self, first_id: str, rest: list[TaskRequest]) -> None:
        previous = first_id
        for step in rest:
            await self._wait_task(previous)
            try:
                previous = (await self._tasks.create_task(step)).id
            except Exception:
                log.exception("seed 000 request %s: could not start a command", first_id)
                return

    async def _register(self, target: AdhocEndpoint, proxy: AdhocEndpoint | None) -> str:
        secrets: dict[str, str] = {}
        if target.password:
            secrets["password"] = target.password
        if target.private_key:
            secrets["private_key"] = target.private_key
        bastions = ""
        bastion_key_file = None
        if proxy is not None:
            bastions = proxy.name
            bastion_key_file = proxy.key_file
            if proxy.password:
                secrets["bastion_password"] = proxy.password
            if proxy.private_key:
                secrets["bastion_private_key"] = proxy.private_key
        host = await self._hosts.register_ssh_host(
            SshHostRequest(
                name=target.name,
                address=target.host,
                port=target.port,
                user=target.username,
                key_file=target.key_file,
                bastions=bastions,
                bastion_key_file=bastion_key_file,
                groups=(ADHOC_GROUP,),
                labels={"registered_by": "seed000-api"},
                secrets=secrets,
            )
        )
        return host.name

    async def result(self, task_id: str) -> dict[str, Any]:
        """``PENDING`` while any step runs, then ``SUCCESS``/``FAILURE`` with per-server results."""
        first = await self._tasks.get_task(task_id)
        meta = _meta(first.description)
        if meta is None or first.idempotency_key is None:
            raise NotFound(f"task {task_id} is not a seed 000 SSH task")
        base = first.idempotency_key.rsplit(":", 1)[0]
        tasks = [first]
        for index in range(1, int(meta["count"])):
            step = await self._tasks.find_by_idempotency_key(f"{base}:{index}")
            if step is None:
                return {"task_id": task_id, "status": "PENDING"}
            tasks.append(step)
        if any(task.status not in TERMINAL_TASK_STATUSES for task in tasks):
            return {"task_id": task_id, "status": "PENDING"}
        results: list[dict[str, Any]] = []
        for task in tasks:
            for run in await self._tasks.list_runs(task.id):
                entry: dict[str, Any] = {
                    "host": run.host,
                    "success": run.status == RunStatus.SUCCEEDED,
                    "error": run.error or "",
                    "exit_code": run.exit_code,
                }
                if task.kind == "upload":
                    entry["uploaded"] = [line for line in run.stdout.splitlines() if line]
                    entry["failed"] = [line for line in run.stderr.splitlines() if line]
                else:
                    entry.update(command=task.command, stdout=run.stdout, stderr=run.stderr)
                results.append(entry)
        status = "SUCCESS" if all(r["success"] for r in results) else "FAILURE"
        return {"task_id": task_id, "status": status, "results": results}


def _meta(description: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(description)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("api") == "seed000" else None
