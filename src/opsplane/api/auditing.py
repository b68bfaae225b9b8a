"""The audit trail as routes write it: one record per state-changing request.

- a task's record is written in the transaction that creates it (``task_hook``), so it is
  durable before anything is dispatched;
- a change made by the SecurityService writes its record in its own transaction;
- anything else records its outcome once done (``record``);
- a request that fails records that, with the reason (``failures``).
Commands are redacted (``redact_patterns``) before they reach a record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.api.deps import AuthenticatedDep, client_ip, get_security, outcome_of
from opsplane.domain.errors import OpsplaneError
from opsplane.domain.records import TaskRecord
from opsplane.domain.redaction import Redactor
from opsplane.domain.targeting import Targets
from opsplane.engine.service import BeforeCommit
from opsplane.security.audit import OK, targets_summary
from opsplane.security.service import Caller, SecurityService


class Audit:
    """Request-scoped: knows the caller and where the request came from."""

    def __init__(self, request: Request, caller: Caller, security: SecurityService) -> None:
        self._request = request
        self.caller = caller
        self._security = security
        redactor: Redactor | None = getattr(request.app.state, "redactor", None)
        self._redactor = redactor

    def redact(self, text: str) -> str:
        return self._redactor.text(text) if self._redactor is not None else text

    def _mark(self) -> None:
        # require_principal writes a generic record for routes that write none themselves.
        self._request.state.audited = True

    async def record(
        self,
        action: str,
        *,
        target: str | None = None,
        targets: dict[str, Any] | None = None,
        outcome: str = OK,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self._mark()
        await self._security.audit(
            self.caller.entry(
                action, target=target, targets=targets, outcome=outcome, detail=detail
            )
        )

    @asynccontextmanager
    async def failures(
        self,
        action: str,
        *,
        target: str | None = None,
        targets: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AsyncIterator[None]:
        """Record the failure of the block (refused, invalid, failed) with its reason, then
        let the error go on to its HTTP answer. Success is recorded by the block itself."""
        self._mark()
        try:
            yield
        except (OpsplaneError, HTTPException) as e:
            reason = str(e.detail) if isinstance(e, HTTPException) else str(e)
            await self.record(
                action,
                target=target,
                targets=targets,
                outcome=outcome_of(e),
                detail={**(detail or {}), "error": reason},
            )
            raise

    def task_hook(
        self, action: str, targets: Targets | None, detail: dict[str, Any]
    ) -> BeforeCommit:
        """The record of a task, written in the transaction that creates it. ``targets``
        None: the task's own (a template launch without an override)."""
        self._mark()

        async def hook(session: AsyncSession, task: TaskRecord, hosts: list[str]) -> None:
            selector = asdict(targets) if targets is not None else dict(task.targets)
            entry = self.caller.entry(
                action,
                target=task.id,
                targets=targets_summary(selector, hosts),
                detail=detail,
            )
            await self._security.audit_within(session, entry)

        return hook


async def get_audit(request: Request, principal: AuthenticatedDep) -> Audit:
    return Audit(request, Caller(principal, client_ip(request)), get_security(request))


AuditDep = Annotated[Audit, Depends(get_audit)]
