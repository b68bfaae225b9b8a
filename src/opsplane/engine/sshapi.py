"""Seed 000's API on top of the engine: ad-hoc SSH targets behind a bastion, commands or an
upload, a task id at once, per-server results later.

Each request's targets become SSH hosts (group ``adhoc``, flagged ad hoc: selected by their
name only, never by ``all``, a group or a label, until an operator adds them to the inventory;
passwords and keys given inline stay in the link's memory, never in the store). Commands run
one after another, each as an ordinary task, so the seed's order of commands holds on every
server; the seed's task id is the first task's id, and the others are found by idempotency key
``sshapi:<id>:<n>``.

A request with several commands is also a row of ``ssh_sequences`` (written with its first
task), so that a restarted control plane goes on with the commands not yet started. One that
needed a password or private key given inline cannot: those are never stored. Its remaining
commands are then answered ``FAILURE`` with the reason, per server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import InvalidInput, NotFound
from opsplane.domain.ids import new_id
from opsplane.domain.inventory import SshHostRequest
from opsplane.domain.records import TaskRecord
from opsplane.domain.states import TERMINAL_TASK_STATUSES, RunStatus
from opsplane.domain.targeting import Targets
from opsplane.domain.tasks import ExecSpec, TaskRequest
from opsplane.engine.changes import Changes
from opsplane.engine.hosts import HostService
from opsplane.engine.service import BeforeCommit, TaskService
from opsplane.store import queries
from opsplane.store.tables import SshSequenceRow

log = logging.getLogger(__name__)
ADHOC_GROUP = "adhoc"
SECRETS_LOST = (
    "not run: the control plane restarted before this command, and the request's passwords "
    "or private keys are never stored, so it could not go on; send the request again"
)


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
        wait_task: Callable[[str], Awaitable[TaskRecord]],
        write: Callable[[], AbstractAsyncContextManager[Changes]],
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self._hosts = hosts
        self._tasks = tasks
        self._wait_task = wait_task
        self._write = write
        self._sessions = sessions
        self._sequences: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Go on with the sequences a previous process left unfinished."""
        async with self._sessions() as session:
            rows = await queries.open_ssh_sequences(session)
        for row in rows:
            if row.needs_secrets:
                async with self._write() as changes:
                    await queries.end_ssh_sequence(changes.session, row.id, SECRETS_LOST)
                log.warning(
                    "seed 000 request %s: remaining commands given up: %s",
                    row.id,
                    "its passwords or keys were only in the previous process's memory",
                )
                continue
            log.info("seed 000 request %s: going on after a restart", row.id)
            self._spawn(_Sequence.of(row))

    def _spawn(self, sequence: _Sequence) -> None:
        task = asyncio.create_task(self._run_rest(sequence), name=f"sshapi-{sequence.id}")
        self._sequences.add(task)
        task.add_done_callback(self._sequences.discard)

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
        if request.upload is not None:
            local, remote = request.upload
            spec = ExecSpec(local_path=local, remote_path=remote)
            sequence = _Sequence("", key_base, (f"upload {local} -> {remote}",), tuple(names),
                                 request.timeout, request.created_by)  # fmt: skip
            first = await self._tasks.create_task(
                sequence.step(0, "upload", spec), before_commit=before_commit
            )
            return first.id
        commands = tuple(c for c in request.commands if c.strip())
        sequence = _Sequence(
            "", key_base, commands, tuple(names), request.timeout, request.created_by
        )
        needs_secrets = any(
            e.password or e.private_key for e in (*request.targets, request.proxy) if e is not None
        )

        async def remember(session: AsyncSession, task: TaskRecord, hosts: list[str]) -> None:
            if before_commit is not None:
                await before_commit(session, task, hosts)
            if len(commands) < 2:
                return
            # In the first command's transaction: a restart finds the rest of the request.
            session.add(
                SshSequenceRow(
                    id=task.id,
                    key_base=key_base,
                    commands=list(commands),
                    hosts=list(names),
                    timeout=request.timeout,
                    created_by=request.created_by,
                    needs_secrets=needs_secrets,
                    done=False,
                )
            )

        first = await self._tasks.create_task(sequence.step(0), before_commit=remember)
        if len(commands) > 1:
            self._spawn(dataclasses.replace(sequence, id=first.id))
        return first.id

    async def _run_rest(self, sequence: _Sequence) -> None:
        previous = sequence.id
        for index in range(1, len(sequence.commands)):
            step = sequence.step(index)
            assert step.idempotency_key is not None
            created = await self._tasks.find_by_idempotency_key(step.idempotency_key)
            if created is None:
                await self._wait_task(previous)
                try:
                    created = await self._tasks.create_task(step)
                except Exception as e:
                    log.exception("seed 000 request %s: could not start a command", sequence.id)
                    async with self._write() as changes:
                        await queries.end_ssh_sequence(
                            changes.session, sequence.id, f"not run: could not start: {e}"
                        )
                    return
            previous = created.id
        async with self._write() as changes:
            await queries.end_ssh_sequence(changes.session, sequence.id, None)

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
            ),
            adhoc=True,
        )
        return host.name

    async def result(self, task_id: str) -> dict[str, Any]:
        """``PENDING`` while any step runs, then ``SUCCESS``/``FAILURE`` with per-server results."""
        first = await self._tasks.get_task(task_id)
        meta = _meta(first.description)
        if meta is None or first.idempotency_key is None:
            raise NotFound(f"task {task_id} is not a seed 000 SSH task")
        base = first.idempotency_key.rsplit(":", 1)[0]
        row: SshSequenceRow | None = None
        if int(meta["count"]) > 1:
            async with self._sessions() as session:
                row = await session.get(SshSequenceRow, task_id)
        tasks = [first]
        given_up: list[str] = []  # commands that will never run (row.error says why)
        for index in range(1, int(meta["count"])):
            step = await self._tasks.find_by_idempotency_key(f"{base}:{index}")
            if step is None:
                if row is None or row.error is None:
                    return {"task_id": task_id, "status": "PENDING"}
                given_up.append(row.commands[index])
                continue
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
                    entry["uploaded"] = [line for line in (run.stdout or "").splitlines() if line]
                    entry["failed"] = [line for line in (run.stderr or "").splitlines() if line]
                else:
                    entry.update(command=task.command, stdout=run.stdout, stderr=run.stderr)
                results.append(entry)
        for command in given_up:
            assert row is not None and row.error is not None
            results += [
                {"host": host, "success": False, "error": row.error, "exit_code": None,
                 "command": command, "stdout": "", "stderr": ""}
                for host in row.hosts
            ]  # fmt: skip
        status = "SUCCESS" if all(r["success"] for r in results) else "FAILURE"
        return {"task_id": task_id, "status": status, "results": results}


@dataclass(frozen=True)
class _Sequence:
    """The commands of one request, and what each of their tasks is created with."""

    id: str  # the first command's task id ("" until it exists)
    key_base: str
    commands: tuple[str, ...]
    hosts: tuple[str, ...]
    timeout: int | None
    created_by: str

    @classmethod
    def of(cls, row: SshSequenceRow) -> _Sequence:
        return cls(row.id, row.key_base, tuple(row.commands), tuple(row.hosts), row.timeout,
                   row.created_by)  # fmt: skip

    def step(self, index: int, kind: str = "command", spec: ExecSpec | None = None) -> TaskRequest:
        command = self.commands[index]
        meta = json.dumps({"api": "seed000", "index": index, "count": len(self.commands)})
        return TaskRequest(
            command=command,
            targets=Targets(hosts=self.hosts),
            timeout=self.timeout,
            name=f"ssh api {command}"[:255],
            description=meta,
            created_by=self.created_by,
            idempotency_key=f"{self.key_base}:{index}",
            kind=kind,
            spec=spec,
        )


def _meta(description: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(description)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("api") == "seed000" else None
