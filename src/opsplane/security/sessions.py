"""Authentication: API tokens and web sessions (login, logout, the cookie's session)."""

from __future__ import annotations

from opsplane.domain.errors import Unauthenticated
from opsplane.security import passwords
from opsplane.security.audit import (
    DENIED,
    AuditEntry,
    format_time,
)
from opsplane.security.roles import (
    Principal,
    Role,
    intersect_groups,
    lesser_role,
    parse_role,
)
from opsplane.security.service_base import (
    Caller,
    Login,
    SecurityState,
    SessionAuth,
)
from opsplane.security.tokens import (
    new_secret,
    secret_hash,
)
from opsplane.store import security_queries as sq
from opsplane.store.tables import SessionRow, UserRow


class Sessions(SecurityState):
    """Who a token or a session cookie is; opening and closing web sessions."""

    async def authenticate_token(self, secret: str) -> Principal:
        """The principal of an API token; Unauthenticated saying why not."""
        async with self._sessions() as session:
            found = await sq.token_by_hash(session, secret_hash(secret))
        now = self._clock()
        if found is None:
            raise Unauthenticated("unknown API token")
        token, owner = found
        if token.revoked_at is not None:
            raise Unauthenticated("this API token was revoked")
        if token.expires_at is not None and token.expires_at <= now:
            raise Unauthenticated("this API token has expired")
        if token.user_id is not None and (owner is None or owner.disabled):
            raise Unauthenticated("the user of this API token is disabled")
        role = parse_role(token.role)
        groups = intersect_groups(token.groups if role is Role.OPERATOR else None, None)
        if owner is not None:
            owner_role = parse_role(owner.role)
            # A token never has more than its owner has now: demoting a user demotes its tokens.
            role = lesser_role(role, owner_role)
            owner_groups = owner.groups if owner_role is Role.OPERATOR else None
            groups = intersect_groups(sorted(groups) if groups is not None else None, owner_groups)
        await self._touch(token.id, now)
        return Principal(
            name=owner.name if owner is not None else token.name,
            role=role,
            groups=groups,
            via=f"token:{token.id}",
            user_id=owner.id if owner is not None else None,
            token_id=token.id,
        )

    async def authenticate_session(self, secret: str) -> SessionAuth:
        async with self._sessions() as session:
            found = await sq.session_with_user(session, secret_hash(secret))
        if found is None:
            raise Unauthenticated("not logged in, or the session has ended: log in again")
        row, user = found
        if row.expires_at <= self._clock():
            raise Unauthenticated("the session has expired: log in again")
        if user.disabled:
            raise Unauthenticated("this user is disabled")
        return SessionAuth(_user_principal(user, via="session", session_id=row.id), row.csrf_hash)

    async def login(self, name: str, password: str, source_ip: str | None) -> Login:
        """Open a web session; Unauthenticated (and an audit record) on a wrong name or
        password, which are never told apart. ``LoginThrottled`` (429), with nothing checked,
        while recent failures of the name or the address hold them (security.throttle)."""
        self.login_throttle.check(name, source_ip)
        async with self._sessions() as session:
            user = await sq.user_by_name(session, name)
        encoded = user.password_hash if user is not None and not user.disabled else None
        ok = await self._verify(encoded, password)
        if not ok or user is None:
            self.login_throttle.failed(name, source_ip)
            await self.audit(
                AuditEntry(
                    actor=name,
                    role="",
                    action="auth.login",
                    source_ip=source_ip,
                    target=name,
                    outcome=DENIED,
                    detail={"reason": "wrong name or password"},
                )
            )
            raise Unauthenticated("wrong name or password")
        rehashed = await self._hash(password) if passwords.needs_rehash(encoded or "") else None
        secret, csrf = new_secret(), new_secret()
        now = self._clock()
        expires_at = now + self.session_lifetime
        async with self._write() as w:
            await sq.delete_expired_sessions(w.session, now)
            fresh = await sq.user_by_name(w.session, name, for_update=True)
            if fresh is None or fresh.disabled:
                raise Unauthenticated("wrong name or password")
            fresh.last_login_at = now
            if rehashed is not None:
                fresh.password_hash = rehashed
            w.session.add(
                SessionRow(
                    id=secret_hash(secret),
                    user_id=fresh.id,
                    csrf_hash=secret_hash(csrf),
                    source_ip=source_ip,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            principal = _user_principal(fresh, via="session", session_id=secret_hash(secret))
            await sq.append_audit(
                w.session,
                Caller(principal, source_ip).entry(
                    "auth.login", target=name, detail={"expires_at": format_time(expires_at)}
                ),
                now,
            )
        self.login_throttle.succeeded(name, source_ip)
        return Login(secret, csrf, expires_at, principal)

    async def logout(self, caller: Caller) -> None:
        """End the caller's web session (a token caller has none: only the record is written)."""
        now = self._clock()
        async with self._write() as w:
            if caller.principal.session_id is not None:
                await sq.delete_session(w.session, caller.principal.session_id)
            await sq.append_audit(
                w.session, caller.entry("auth.logout", target=caller.principal.name), now
            )


def _user_principal(user: UserRow, *, via: str, session_id: str | None = None) -> Principal:
    role = parse_role(user.role)
    groups = user.groups if role is Role.OPERATOR else None
    return Principal(
        name=user.name,
        role=role,
        groups=frozenset(groups) if groups is not None else None,
        via=via,
        user_id=user.id,
        session_id=session_id,
    )
