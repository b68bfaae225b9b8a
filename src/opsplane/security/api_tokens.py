"""API token administration: create, list and revoke tokens."""

from __future__ import annotations

from datetime import timedelta

from opsplane.domain.errors import InvalidInput, NotFound
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.records import TokenRecord, UserRecord
from opsplane.security.audit import (
    format_time,
)
from opsplane.security.roles import (
    Role,
    parse_role,
    role_at_least,
)
from opsplane.security.service_base import (
    Caller,
    NewToken,
    SecurityState,
    grant_groups,
)
from opsplane.security.tokens import (
    new_token,
)
from opsplane.store import security_queries as sq
from opsplane.store.records import record_of
from opsplane.store.tables import UserRow


class Tokens(SecurityState):
    """API tokens, each change with its audit record in its transaction."""

    async def create_token(
        self,
        by: Caller,
        *,
        name: str,
        role: str,
        groups: list[str] | None,
        all_groups: bool = False,
        expires_in: timedelta | None,
        owner: str | None = None,
    ) -> NewToken:
        """A new token acting for ``owner`` (default: the caller's own user; none when the
        caller has no user, e.g. the bootstrap token). It cannot have more role or groups than
        its owner."""
        the_role = parse_role(role)
        stored_groups = grant_groups(the_role, groups, all_groups)
        if expires_in is not None and expires_in.total_seconds() <= 0:
            raise InvalidInput("a token's lifetime must be positive (or never)")
        name = name.strip() or f"{the_role.value} token"
        if len(name) > 255:
            raise InvalidInput("a token name has at most 255 characters")
        now = self._clock()
        secret = new_token()
        async with self._write() as w:
            owner_row: UserRow | None = None
            if owner is not None:
                owner_row = await sq.user_by_name(w.session, owner)
                if owner_row is None:
                    raise NotFound(f"no user {owner!r}")
            elif by.principal.user_id is not None:
                owner_row = (await sq.users_by_id(w.session, [by.principal.user_id])).get(
                    by.principal.user_id
                )
            if owner_row is not None:
                _check_within_owner(the_role, stored_groups, owner_row)
            row = self._token_row(
                name=name,
                secret=secret,
                role=the_role,
                groups=stored_groups,
                owner=owner_row,
                by=by.principal,
                expires_at=now + expires_in if expires_in else None,
                now=now,
            )
            w.session.add(row)
            detail = {
                "name": name,
                "role": the_role.value,
                "groups": stored_groups,
                "owner": owner_row.name if owner_row else None,
                "expires_at": format_time(row.expires_at) if row.expires_at else None,
            }
            await sq.append_audit(
                w.session, by.entry("token.create", target=row.id, detail=detail), now
            )
        return NewToken(secret, record_of(TokenRecord, row), _owner(owner_row))

    async def list_tokens(
        self, page: PageRequest, *, include_inactive: bool
    ) -> PageOf[tuple[TokenRecord, UserRecord | None]]:
        async with self._sessions() as session:
            found = await sq.list_tokens(
                session, page, active_at=None if include_inactive else self._clock()
            )
        items = [(record_of(TokenRecord, token), _owner(owner)) for token, owner in found.items]
        return PageOf(items, found.total, found.next_cursor)

    async def revoke_token(
        self, by: Caller, token_id: str
    ) -> tuple[TokenRecord, UserRecord | None]:
        """Revoke a token (at once: the next request with it is refused). Revoking a revoked
        token changes nothing."""
        now = self._clock()
        async with self._write() as w:
            token = await sq.get_token(w.session, token_id, for_update=True)
            if token is None:
                raise NotFound(f"no API token {token_id!r}")
            if token.revoked_at is None:
                token.revoked_at = now
                await sq.append_audit(
                    w.session,
                    by.entry("token.revoke", target=token.id, detail={"name": token.name}),
                    now,
                )
            owner = (
                (await sq.users_by_id(w.session, [token.user_id])).get(token.user_id)
                if token.user_id
                else None
            )
        return record_of(TokenRecord, token), _owner(owner)


def _owner(row: UserRow | None) -> UserRecord | None:
    return record_of(UserRecord, row) if row is not None else None


def _check_within_owner(role: Role, groups: list[str] | None, owner: UserRow) -> None:
    owner_role = parse_role(owner.role)
    if owner.disabled:
        raise InvalidInput(f"user {owner.name} is disabled")
    if not role_at_least(owner_role, role):
        raise InvalidInput(
            f"a token cannot have more rights than its owner: {owner.name} is {owner_role.value}"
        )
    if role is Role.OPERATOR and owner_role is Role.OPERATOR and owner.groups is not None:
        beyond = sorted(set(groups or ["(all groups)"]) - set(owner.groups))
        if groups is None or beyond:
            raise InvalidInput(
                f"a token cannot reach groups its owner cannot: {owner.name} may run on "
                f"{', '.join(owner.groups)} only"
            )
