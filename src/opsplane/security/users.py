"""User administration: list, read, create and change users."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.domain.errors import Conflict, NotFound
from opsplane.domain.ids import new_id
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.records import UserRecord
from opsplane.security.roles import (
    Role,
    parse_role,
)
from opsplane.security.service_base import (
    Caller,
    SecurityState,
    check_user_name,
    grant_groups,
)
from opsplane.store import security_queries as sq
from opsplane.store.records import record_of, records_of
from opsplane.store.tables import UserRow


class Users(SecurityState):
    """Users, each change with its audit record in its transaction."""

    async def list_users(self, page: PageRequest) -> PageOf[UserRecord]:
        async with self._sessions() as session:
            return records_of(UserRecord, await sq.list_users(session, page))

    async def get_user(self, name: str) -> UserRecord:
        async with self._sessions() as session:
            user = await sq.user_by_name(session, name)
        if user is None:
            raise NotFound(f"no user {name!r}")
        return record_of(UserRecord, user)

    async def create_user(
        self,
        by: Caller,
        name: str,
        role: str,
        *,
        password: str | None,
        groups: list[str] | None,
        all_groups: bool = False,
    ) -> UserRecord:
        check_user_name(name)
        the_role = parse_role(role)
        stored_groups = grant_groups(the_role, groups, all_groups)
        password_hash = await self._hash(password) if password is not None else None
        now = self._clock()
        async with self._write() as w:
            if await sq.user_by_name(w.session, name) is not None:
                raise Conflict(f"user {name!r} already exists")
            user = UserRow(
                id=new_id(),
                name=name,
                password_hash=password_hash,
                role=the_role.value,
                groups=stored_groups,
                disabled=False,
                created_at=now,
                updated_at=now,
            )
            w.session.add(user)
            detail = {"role": the_role.value, "groups": stored_groups, "password": bool(password)}
            await sq.append_audit(
                w.session, by.entry("user.create", target=name, detail=detail), now
            )
        return record_of(UserRecord, user)

    async def update_user(
        self,
        by: Caller,
        name: str,
        *,
        role: str | None = None,
        groups: list[str] | None = None,
        all_groups: bool = False,
        password: str | None = None,
        disabled: bool | None = None,
    ) -> UserRecord:
        """Change a user's role, groups, password or disabled flag. Disabling a user or changing
        its password ends its web sessions; a disabled user's tokens are refused while it is
        disabled. The last enabled admin cannot be demoted or disabled (no lock-out)."""
        password_hash = await self._hash(password) if password is not None else None
        now = self._clock()
        async with self._write() as w:
            user = await sq.user_by_name(w.session, name, for_update=True)
            if user is None:
                raise NotFound(f"no user {name!r}")
            new_role = parse_role(role) if role is not None else parse_role(user.role)
            changed: dict[str, Any] = {}
            if role is not None or groups is not None or all_groups:
                if groups is None and not all_groups and new_role is Role.OPERATOR:
                    groups = user.groups  # keep the grant when only the role changes
                    all_groups = groups is None
                user.groups = grant_groups(new_role, groups, all_groups)
                changed["groups"] = user.groups
            if new_role.value != user.role:
                changed["role"] = new_role.value
            if disabled is not None and disabled != user.disabled:
                changed["disabled"] = disabled
            losing_admin = (
                user.role == Role.ADMIN
                and not user.disabled
                and (new_role is not Role.ADMIN or disabled is True)
            )
            if losing_admin and not await self._other_admins(w.session, user.id):
                raise Conflict(f"{name} is the last enabled admin: create another admin first")
            user.role = new_role.value
            if disabled is not None:
                user.disabled = disabled
            if password_hash is not None:
                user.password_hash = password_hash
                changed["password"] = True
            if disabled or password_hash is not None:
                await sq.delete_sessions_of(w.session, user.id)
            user.updated_at = now
            await sq.append_audit(
                w.session, by.entry("user.update", target=name, detail=changed), now
            )
        return record_of(UserRecord, user)

    async def _other_admins(self, session: AsyncSession, user_id: str) -> int:
        return await sq.other_active_admins(session, user_id)
