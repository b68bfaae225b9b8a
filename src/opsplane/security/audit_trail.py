"""Reading the audit trail: list, export, its head, and verification of its chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.records import AuditRecord
from opsplane.security.audit import (
    ChainReport,
    ChainVerifier,
    format_time,
)
from opsplane.security.service_base import (
    AUDIT_BATCH,
    SecurityState,
)
from opsplane.store import security_queries as sq
from opsplane.store.records import records_of
from opsplane.store.tables import AuditRow


class AuditTrail(SecurityState):
    """The audit trail as admins and the checkpoint writer read it."""

    async def list_audit(
        self,
        *,
        actor: str | None,
        action: str | None,
        since: datetime | None,
        until: datetime | None,
        page: PageRequest,
    ) -> PageOf[AuditRecord]:
        async with self._sessions() as session:
            found = await sq.list_audit(
                session, page, actor=actor, action=action, since=since, until=until
            )
        return records_of(AuditRecord, found)

    async def audit_head(self) -> tuple[int, str]:
        async with self._sessions() as session:
            head = await sq.audit_head(session)
        return head if head is not None else (0, "")

    async def export_audit(
        self,
        *,
        up_to: int,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching record up to id ``up_to``, in chain order, as export documents; read
        in batches so that memory stays flat however long the trail is."""
        after = 0
        while after < up_to:
            async with self._sessions() as session:
                rows = await sq.audit_after(
                    session,
                    after,
                    AUDIT_BATCH,
                    actor=actor,
                    action=action,
                    since=since,
                    until=until,
                )
            for row in rows:
                if row.id > up_to:
                    return
                yield export_document(row)
            if len(rows) < AUDIT_BATCH:
                return
            after = rows[-1].id

    async def audit_past_head(self) -> list[dict[str, Any]]:
        """Records stored beyond the chain head (the first ``AUDIT_BATCH``), as export
        documents marked ``"past_head": true``: the chain head does not vouch for them."""
        async with self._sessions() as session:
            rows = await sq.audit_past_head(session, AUDIT_BATCH)
        return [{**export_document(row), "past_head": True} for row in rows]

    async def verify_audit(self) -> ChainReport:
        """Recompute the whole chain up to the head as it is now, and report records stored
        past the head."""
        head_id, head_hash = await self.audit_head()
        verifier = ChainVerifier()
        async for doc in self.export_audit(up_to=head_id):
            verifier.feed(doc)
        past = [int(doc["id"]) for doc in await self.audit_past_head()]
        return verifier.finish(head_id, head_hash or None, past)


def export_document(row: AuditRow) -> dict[str, Any]:
    """A record as the export carries it: the hashed fields plus the two hashes."""
    return {
        "id": row.id,
        "at": format_time(row.at),
        "actor": row.actor,
        "role": row.role,
        "source_ip": row.source_ip,
        "action": row.action,
        "target": row.target,
        "targets": row.targets,
        "outcome": row.outcome,
        "detail": row.detail,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }
