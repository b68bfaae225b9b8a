"""API tokens (admin only): created with a role, groups and an expiry, shown once, revoked at
once."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, get_security, require
from opsplane.api.schemas import Cursor, Items
from opsplane.api.security_schemas import NewTokenOut, TokenCreate, TokenOut
from opsplane.domain.errors import InvalidInput
from opsplane.domain.paging import PageRequest
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])

AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]
# A century: longer than any token needs, and far inside the dates that can be stored (a
# larger expires_in overflowed the date arithmetic: a 500). null still means never.
MAX_LIFETIME_SECONDS = 100 * 365 * 24 * 3600


@router.get("", response_model=Items[TokenOut])
async def list_tokens(
    request: Request,
    _principal: AdminDep,
    include_inactive: Annotated[
        bool, Query(alias="all", description="also revoked and expired tokens")
    ] = False,
    size: Annotated[int, Query(ge=1, le=1000)] = 1000,
    cursor: Cursor = None,
) -> Items[TokenOut]:
    """Tokens, newest first, ``size`` at a time (follow ``next_cursor``); never the tokens
    themselves: only their hashes are kept."""
    found = await get_security(request).list_tokens(
        PageRequest.of(page=1, size=size, cursor=cursor), include_inactive=include_inactive
    )
    items = [TokenOut.from_row(token, owner) for token, owner in found.items]
    return Items[TokenOut](items=items, next_cursor=found.next_cursor)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=NewTokenOut)
async def create_token(
    body: TokenCreate, request: Request, _principal: AdminDep, audit: AuditDep
) -> NewTokenOut:
    """A new token, in ``token``: shown this once. It acts for ``user`` (default: the caller's
    user) and never has more role or groups than that user."""
    if body.expires_in is not None and body.expires_in > MAX_LIFETIME_SECONDS:
        raise InvalidInput(
            f"expires_in is at most {MAX_LIFETIME_SECONDS} seconds (100 years), "
            f"got {body.expires_in}; null for a token that never expires"
        )
    expires_in = timedelta(seconds=body.expires_in) if body.expires_in is not None else None
    async with audit.failures("token.create", detail={"name": body.name, "role": body.role}):
        created = await get_security(request).create_token(
            audit.caller,
            name=body.name,
            role=body.role,
            groups=body.groups,
            all_groups=body.all_groups,
            expires_in=expires_in,
            owner=body.user,
        )
    out = TokenOut.from_row(created.token, created.owner)
    return NewTokenOut(**out.model_dump(), token=created.secret)


@router.post("/{token_id}/revoke", response_model=TokenOut)
async def revoke_token(
    token_id: str, request: Request, _principal: AdminDep, audit: AuditDep
) -> TokenOut:
    """Revoke a token: the next request with it is refused."""
    async with audit.failures("token.revoke", target=token_id):
        token, owner = await get_security(request).revoke_token(audit.caller, token_id)
    return TokenOut.from_row(token, owner)
