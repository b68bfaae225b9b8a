"""SecurityService: users, API tokens, web sessions and the audit trail over the store.

Like the engine's services it reads with its own sessions and writes through the engine's
``write()`` (one writer per instance: on SQLite a second writer would fail its transaction).
Every change it makes writes its audit record in the same transaction, so a change never
exists without its record. Password hashing runs in worker threads, a few at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import ConfigError, Conflict, InvalidInput, NotFound, Unauthenticated
from opsplane.domain.ids import new_id
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.security import passwords
from opsplane.security.audit import (
    DENIED,
    AuditEntry,
    ChainReport,
    ChainVerifier,
    format_time,
)
from opsplane.security.roles import (
    Principal,
    Role,
    intersect_groups,
    lesser_role,
    normalize_groups,
    parse_role,
    role_at_least,
)
from opsplane.security.throttle import LoginThrottle
from opsplane.security.tokens import (
    MIN_BOOTSTRAP_LENGTH,
    new_secret,
    new_token,
    secret_hash,
)
from opsplane.store import security_queries as sq
from opsplane.store.tables import ApiTokenRow, AuditRow, SessionRow, UserRow, utcnow

log = logging.getLogger(__name__)

SYSTEM = Principal(name="system", role=Role.ADMIN, via="system")
# last_used_at is a hint for humans (which tokens are still in use), not an access log: it is
# written at most this often per token, so that requests do not each cost a write.
TOUCH_EVERY = 60.0
# Password hashes in flight at once: each takes 64 MiB and a core for about 0.1 s.
HASHING_AT_ONCE = 2
AUDIT_BATCH = 1000
INITIAL_TOKEN_FILE = "initial-admin-token"
DEMO_CREDENTIALS_FILE = "demo-admin.json"


class HasSession(Protocol):
    session: AsyncSession


Write = Callable[[], AbstractAsyncContextManager[HasSession]]


@dataclass(frozen=True)
class Caller:
    """Who asks for a change, and from where: what the audit record names."""

    principal: Principal
    source_ip: str | None = None

    def entry(
        self,
        action: str,
        *,
        target: str | None = None,
        targets: dict[str, Any] | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        return AuditEntry(
            actor=self.principal.name,
            role=str(self.principal.role),
            action=action,
            source_ip=self.source_ip,
            target=target,
            targets=targets,
            outcome=outcome,
            detail={"via": self.principal.via, **(detail or {}), **self._marker()},
        )

    def _marker(self) -> dict[str, Any]:
        # A call let in without credentials (compat_anonymous) is told from a login of the
        # same name by this, in every record it leaves.
        return {"anonymous": True} if self.principal.anonymous else {}


SYSTEM_CALLER = Caller(SYSTEM)


@dataclass(frozen=True)
class NewToken:
    """A token just created: ``secret`` is shown once and never again."""

    secret: str
    token: ApiTokenRow
    owner: UserRow | None


@dataclass(frozen=True)
class Login:
    """A web session just opened: the cookie's secret and the CSRF token, both shown once."""

    secret: str
    csrf_token: str
    expires_at: datetime
    principal: Principal


@dataclass(frozen=True)
class SessionAuth:
    principal: Principal
    csrf_hash: str


@dataclass(frozen=True)
class DemoCredentials:
    name: str
    password: str
    token: str
    path: Path


def check_user_name(name: str) -> str:
    if not name or len(name) > 255:
        raise InvalidInput("a user name must have 1 to 255 characters")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise InvalidInput(f"user name {name!r} must not contain spaces or control characters")
    return name


class SecurityService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Write,
        *,
        data_dir: Path,
        bootstrap_token: str | None = None,
        session_lifetime: float = 8 * 3600.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if bootstrap_token is not None and len(bootstrap_token) < MIN_BOOTSTRAP_LENGTH:
            raise ConfigError(
                f"bootstrap_admin_token must have at least {MIN_BOOTSTRAP_LENGTH} characters"
            )
        self._sessions = sessions
        self._write = write
        self._data_dir = data_dir
        self._bootstrap_token = bootstrap_token or None
        self.session_lifetime = timedelta(seconds=session_lifetime)
        self._clock = clock
        self._hashing = asyncio.Semaphore(HASHING_AT_ONCE)
        self._touched: dict[str, float] = {}
        # Failed logins slow the next try of that name and that address (security.throttle).
        self.login_throttle = LoginThrottle()

    # Start-up ---------------------------------------------------------------------------

    async def bootstrap(self, *, generate: bool = True) -> Path | None:
        """On a database without users or tokens: create the admin token given by
        ``bootstrap_admin_token``, or (``generate``) a random one written to
        ``<data dir>/initial-admin-token`` (mode 0600), whose path this returns. Never logs a
        secret. A bootstrap token that exists already is left alone, revoked or not."""
        token = self._bootstrap_token
        now = self._clock()
        written: Path | None = None
        async with self._write() as w:
            if token and await sq.token_by_hash(w.session, secret_hash(token)) is not None:
                return None
            if await sq.count_principals(w.session):
                if token:
                    log.warning(
                        "bootstrap_admin_token ignored: the database already has users or tokens"
                    )
                return None
            if not token and not generate:
                return None
            name = "bootstrap" if token else "initial-admin"
            secret = token or new_token()
            row = self._token_row(
                name=name,
                secret=secret,
                role=Role.ADMIN,
                groups=None,
                owner=None,
                by=SYSTEM,
                expires_at=None,
                now=now,
            )
            w.session.add(row)
            await sq.append_audit(
                w.session,
                SYSTEM_CALLER.entry("token.bootstrap", target=row.id, detail={"name": name}),
                now,
            )
            if not token:
                written = self._data_dir / INITIAL_TOKEN_FILE
                _write_private(written, secret + "\n")
        if token:
            log.info("created the bootstrap admin API token (from bootstrap_admin_token)")
        else:
            log.warning(
                "no users or API tokens yet: an admin token was written to %s (readable by this "
                "user only); use it as OPSPLANE_TOKEN to create users and tokens",
                written,
            )
        return written

    async def ensure_demo_admin(self, name: str = "admin") -> DemoCredentials:
        """The demo's admin user and CLI token, kept in ``<data dir>/demo-admin.json`` (mode
        0600) and reused on the next start; created or repaired in the database as needed."""
        path = self._data_dir / DEMO_CREDENTIALS_FILE
        stored: dict[str, Any] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the demo credentials in {path}: {e}") from e
        password = str(stored.get("password") or new_secret()[:20])
        token = str(stored.get("token") or new_token())
        name = str(stored.get("name") or name)
        async with self._sessions() as session:
            existing = await sq.user_by_name(session, name)
        known = existing is not None and await self._verify(existing.password_hash, password)
        password_hash = None if known else await self._hash(password)
        now = self._clock()
        async with self._write() as w:
            user = await sq.user_by_name(w.session, name, for_update=True)
            if user is None:
                user = UserRow(
                    id=new_id(),
                    name=name,
                    password_hash=password_hash,
                    role=Role.ADMIN.value,
                    groups=None,
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
                w.session.add(user)
                await w.session.flush()
                await sq.append_audit(
                    w.session,
                    SYSTEM_CALLER.entry("user.create", target=name, detail={"role": "admin"}),
                    now,
                )
            elif user.disabled or user.role != Role.ADMIN or password_hash is not None:
                # Someone changed the demo's admin: the demo puts it back as it prints it.
                user.role, user.disabled, user.groups = Role.ADMIN.value, False, None
                user.password_hash = password_hash or user.password_hash
                user.updated_at = now
                await sq.append_audit(
                    w.session, SYSTEM_CALLER.entry("user.update", target=name), now
                )
            found = await sq.token_by_hash(w.session, secret_hash(token))
            usable = (
                found is not None and found[0].revoked_at is None and found[0].user_id == user.id
            )
            if not usable:
                if found is not None:
                    token = new_token()  # the stored one was revoked: a fresh one
                row = self._token_row(
                    name="demo",
                    secret=token,
                    role=Role.ADMIN,
                    groups=None,
                    owner=user,
                    by=SYSTEM,
                    expires_at=None,
                    now=now,
                )
                w.session.add(row)
                await sq.append_audit(
                    w.session,
                    SYSTEM_CALLER.entry("token.create", target=row.id, detail={"name": "demo"}),
                    now,
                )
            _write_private(
                path, json.dumps({"name": name, "password": password, "token": token}) + "\n"
            )
        return DemoCredentials(name, password, token, path)

    # Authentication ---------------------------------------------------------------------

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

    # Users ------------------------------------------------------------------------------

    async def list_users(self, page: PageRequest) -> PageOf[UserRow]:
        async with self._sessions() as session:
            return await sq.list_users(session, page)

    async def get_user(self, name: str) -> UserRow:
        async with self._sessions() as session:
            user = await sq.user_by_name(session, name)
        if user is None:
            raise NotFound(f"no user {name!r}")
        return user

    async def create_user(
        self,
        by: Caller,
        name: str,
        role: str,
        *,
        password: str | None,
        groups: list[str] | None,
        all_groups: bool = False,
    ) -> UserRow:
        check_user_name(name)
        the_role = parse_role(role)
        stored_groups = _grant(the_role, groups, all_groups)
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
        return user

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
    ) -> UserRow:
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
                user.groups = _grant(new_role, groups, all_groups)
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
        return user

    async def _other_admins(self, session: AsyncSession, user_id: str) -> int:
        return await sq.other_active_admins(session, user_id)

    # API tokens -------------------------------------------------------------------------

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
        stored_groups = _grant(the_role, groups, all_groups)
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
        return NewToken(secret, row, owner_row)

    async def list_tokens(
        self, page: PageRequest, *, include_inactive: bool
    ) -> PageOf[tuple[ApiTokenRow, UserRow | None]]:
        async with self._sessions() as session:
            return await sq.list_tokens(
                session, page, active_at=None if include_inactive else self._clock()
            )

    async def revoke_token(self, by: Caller, token_id: str) -> tuple[ApiTokenRow, UserRow | None]:
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
        return token, owner

    # The audit trail --------------------------------------------------------------------

    async def audit(self, entry: AuditEntry) -> None:
        """Append a record in a transaction of its own."""
        now = self._clock()
        async with self._write() as w:
            await sq.append_audit(w.session, entry, now)

    async def audit_within(self, session: AsyncSession, entry: AuditEntry) -> None:
        """Append a record in the caller's transaction (e.g. the one creating a task)."""
        await sq.append_audit(session, entry, self._clock())

    async def list_audit(
        self,
        *,
        actor: str | None,
        action: str | None,
        since: datetime | None,
        until: datetime | None,
        page: PageRequest,
    ) -> PageOf[AuditRow]:
        async with self._sessions() as session:
            return await sq.list_audit(
                session, page, actor=actor, action=action, since=since, until=until
            )

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

    # Internals --------------------------------------------------------------------------

    async def _hash(self, password: str) -> str:
        passwords.check_password_policy(password)
        async with self._hashing:
            return await asyncio.to_thread(passwords.hash_password, password)

    async def _verify(self, encoded: str | None, password: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(passwords.verify_password, encoded, password)

    async def _touch(self, token_id: str, now: datetime) -> None:
        last = self._touched.get(token_id)
        tick = time.monotonic()
        if last is not None and tick - last < TOUCH_EVERY:
            return
        self._touched[token_id] = tick
        if len(self._touched) > 10_000:  # tokens come and go: keep the map bounded
            self._touched.clear()
        async with self._write() as w:
            await sq.touch_token(w.session, token_id, now)

    @staticmethod
    def _token_row(
        *,
        name: str,
        secret: str,
        role: Role,
        groups: list[str] | None,
        owner: UserRow | None,
        by: Principal,
        expires_at: datetime | None,
        now: datetime,
    ) -> ApiTokenRow:
        return ApiTokenRow(
            id=new_id(),
            name=name,
            token_hash=secret_hash(secret),
            user_id=owner.id if owner is not None else None,
            role=role.value,
            groups=groups,
            created_by=by.name,
            created_at=now,
            expires_at=expires_at,
        )


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


def _grant(role: Role, groups: list[str] | None, all_groups: bool) -> list[str] | None:
    if role is Role.OPERATOR and all_groups:
        if groups:
            raise InvalidInput("give groups or all_groups, not both")
        return None
    if role is Role.OPERATOR:
        return normalize_groups(role, groups if groups is not None else [])
    return None


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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (mode 0600), atomically: the file
    is created with that mode, never widened after the fact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
