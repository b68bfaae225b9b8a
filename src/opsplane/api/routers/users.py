"""Users (admin only): who may log in to the web page, with which role and groups."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from opsplane.api.auditing import AuditDep
from opsplane.api.deps import Principal, get_security, require
from opsplane.api.schemas import Cursor, Items
from opsplane.api.security_schemas import UserCreate, UserOut, UserUpdate
from opsplane.domain.paging import PageRequest
from opsplane.security.roles import Permission

router = APIRouter(prefix="/api/v1/users", tags=["users"])

AdminDep = Annotated[Principal, Depends(require(Permission.ADMIN))]


@router.get("", response_model=Items[UserOut])
async def list_users(
    request: Request,
    _principal: AdminDep,
    size: Annotated[int, Query(ge=1, le=1000)] = 1000,
    cursor: Cursor = None,
) -> Items[UserOut]:
    """Users by name, ``size`` at a time (follow ``next_cursor``)."""
    found = await get_security(request).list_users(PageRequest.of(page=1, size=size, cursor=cursor))
    items = [UserOut.from_row(user) for user in found.items]
    return Items[UserOut](items=items, next_cursor=found.next_cursor)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def create_user(
    body: UserCreate, request: Request, _principal: AdminDep, audit: AuditDep
) -> UserOut:
    """A user with a role; an operator needs ``groups`` (or ``all_groups``). The password is
    hashed with argon2id and never returned."""
    async with audit.failures("user.create", target=body.name, detail={"role": body.role}):
        user = await get_security(request).create_user(
            audit.caller,
            body.name,
            body.role,
            password=body.password,
            groups=body.groups,
            all_groups=body.all_groups,
        )
    return UserOut.from_row(user)


@router.get("/{name}", response_model=UserOut)
async def get_user(name: str, request: Request, _principal: AdminDep) -> UserOut:
    return UserOut.from_row(await get_security(request).get_user(name))


@router.patch("/{name}", response_model=UserOut)
async def update_user(
    name: str, body: UserUpdate, request: Request, _principal: AdminDep, audit: AuditDep
) -> UserOut:
    """Change role, groups, password or ``disabled``. Disabling a user or setting its password
    ends its web sessions; a disabled user's tokens are refused until it is enabled again."""
    async with audit.failures("user.update", target=name):
        user = await get_security(request).update_user(
            audit.caller,
            name,
            role=body.role,
            groups=body.groups,
            all_groups=body.all_groups,
            password=body.password,
            disabled=body.disabled,
        )
    return UserOut.from_row(user)
