"""The audit trail (admin only): filtered pages, a JSON-lines export, and verification."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from opsplane.api.deps import Principal, get_security, require
from opsplane.api.schemas import Cursor, Page, PageNumber
from opsplane.api.security_schemas import AuditOut, AuditVerifyOut
from opsplane.domain.paging import PageRequest
from opsplane.security.roles import Permission
from opsplane.security.service import SecurityService

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]
JSONL = "application/x-ndjson"


def _utc(value: datetime | None) -> datetime | None:
    # A time without a zone is taken as UTC, the zone of every time opsplane shows.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@router.get(
    "",
    response_model=Page[AuditOut],
    responses={200: {"content": {JSONL: {}}, "description": "a page, or JSON lines"}},
)
async def list_audit(
    request: Request,
    _principal: AdminDep,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="e.g. task (every task.*) or task.create")
    ] = None,
    since: Annotated[datetime | None, Query(description="from this time (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="before this time (ISO 8601)")] = None,
    page: PageNumber = 1,
    size: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Cursor = None,
    format: Annotated[
        Literal["json", "jsonl"], Query(description="jsonl: every match, oldest first")
    ] = "json",
) -> Page[AuditOut] | StreamingResponse:
    """Records, newest first, by actor, action and time. ``format=jsonl`` exports every match
    in chain order, one JSON object a line, with both hashes: ``opsplane audit verify`` (or
    ``opsplane.security.audit.verify_chain``) checks an unfiltered export. The headers
    ``X-Audit-Head-Id`` and ``X-Audit-Head-Hash`` give the chain head at the time of export.
    An unfiltered export ends with the records stored past the head, if any, each marked
    ``"past_head": true``: the head does not vouch for them, and verify reports them."""
    security = get_security(request)
    if format == "jsonl":
        head_id, head_hash = await security.audit_head()
        lines = _jsonl(security, head_id, actor, action, _utc(since), _utc(until))
        headers = {"X-Audit-Head-Id": str(head_id), "X-Audit-Head-Hash": head_hash}
        return StreamingResponse(lines, media_type=JSONL, headers=headers)
    found = await security.list_audit(
        actor=actor,
        action=action,
        since=_utc(since),
        until=_utc(until),
        page=PageRequest.of(page=page, size=size, cursor=cursor),
    )
    items = [AuditOut.from_row(row) for row in found.items]
    return Page[AuditOut].of(found, items, page=page, size=size)


async def _jsonl(
    security: SecurityService,
    head_id: int,
    actor: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
) -> AsyncIterator[str]:
    async for doc in security.export_audit(
        up_to=head_id, actor=actor, action=action, since=since, until=until
    ):
        yield json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"
    if not (actor or action or since or until):
        for doc in await security.audit_past_head():
            yield json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


@router.get("/verify", response_model=AuditVerifyOut)
async def verify_audit(request: Request, _principal: AdminDep) -> AuditVerifyOut:
    """Recompute the whole chain on the server: every problem names the record ids."""
    report = await get_security(request).verify_audit()
    return AuditVerifyOut(**report.to_json())
