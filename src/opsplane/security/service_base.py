"""The state and the types the parts of the SecurityService share (security/service.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.domain.ids import new_id
from opsplane.domain.records import TokenRecord, UserRecord
from opsplane.security import passwords
from opsplane.security.audit import (
    AuditEntry,
)
from opsplane.security.roles import (
    Principal,
    Role,
    normalize_groups,
)
from opsplane.security.throttle import LoginThrottle
from opsplane.security.tokens import (
    MIN_BOOTSTRAP_LENGTH,
    secret_hash,
)
from opsplane.store import security_queries as sq
from opsplane.store.tables import ApiTokenRow, UserRow, utcnow

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
    token: TokenRecord
    owner: UserRecord | None


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


class SecurityState:
    """What every part of the SecurityService shares: its sessions and writer, its clock,
    the password hashing pool, and the one way to append an audit record."""

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

    async def audit(self, entry: AuditEntry) -> None:
        """Append a record in a transaction of its own."""
        now = self._clock()
        async with self._write() as w:
            await sq.append_audit(w.session, entry, now)

    async def audit_within(self, session: AsyncSession, entry: AuditEntry) -> None:
        """Append a record in the caller's transaction (e.g. the one creating a task)."""
        await sq.append_audit(session, entry, self._clock())

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


def grant_groups(role: Role, groups: list[str] | None, all_groups: bool) -> list[str] | None:
    if role is Role.OPERATOR and all_groups:
        if groups:
            raise InvalidInput("give groups or all_groups, not both")
        return None
    if role is Role.OPERATOR:
        return normalize_groups(role, groups if groups is not None else [])
    return None
