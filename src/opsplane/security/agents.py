"""Agent enrollment and identity: which agents may connect, with which key and which groups.

An operator creates a one-time enrollment token limited to some groups (``opsplane agents
token --group web``), and optionally to one host name (``--name web-7``). An agent enrolls once
with it: it sends its name and its Ed25519 public key, and is registered with the token's
groups; the token is spent. The name must be free in the inventory (no host of that name: not
an SSH host, not the control plane's own, not another agent's), or the one the token was issued
for (which may name an agent's host, to re-enroll it; never an SSH host or the control plane).
From then on:

- a hello must present the enrolled key (and prove it holds it: the link checks the hello's
  signature) and may claim only the enrolled groups;
- every result and heartbeat signed by an agent is verified with the key of the host it
  claims to come from, so agent A cannot speak for host B;
- a revoked agent is refused, and so is every message signed by it.

With ``require_enrollment`` off, agents that never enrolled may still connect (and choose their
own groups, as before enrollment existed); an enrolled name is always held to its enrollment.
The registry keeps a snapshot in memory for the links' checks, which must not wait on the
database for every message; it is refreshed whenever this instance changes it, and when another
instance says it changed it (``on_change``, docs/instances.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from opsplane.domain.ids import new_id
from opsplane.domain.paging import PageOf, PageRequest
from opsplane.domain.records import AgentRecord
from opsplane.domain.targeting import check_host_name, normalize_names
from opsplane.security.service import Write
from opsplane.security.signing import parse_public_key
from opsplane.security.tokens import new_token, secret_hash
from opsplane.store import queries
from opsplane.store.paging import Keyset, keyset_page
from opsplane.store.records import record_of, records_of
from opsplane.store.tables import AgentRow, EnrollmentTokenRow, HostRow, utcnow
from opsplane.transport.base import AGENT_LINKS, LOCAL_LINK

log = logging.getLogger(__name__)

ENROLL_PREFIX = "enr_"
DEFAULT_TOKEN_LIFETIME = timedelta(hours=24)
_AGENTS = Keyset("agents", (AgentRow.name,), (str,))


@dataclass(frozen=True)
class AgentIdentity:
    name: str
    public_key: str
    key: Ed25519PublicKey
    groups: frozenset[str]
    revoked: bool


@dataclass(frozen=True)
class NewEnrollmentToken:
    token: EnrollmentTokenRow
    secret: str


class AgentRegistry:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        write: Write,
        *,
        require_enrollment: bool = True,
        reserved_names: Iterable[str] = (),
    ) -> None:
        self._sessions = sessions
        self._write = write
        self.require_enrollment = require_enrollment
        # Names no agent may take: the control plane's own host.
        self._reserved = frozenset(reserved_names)
        self._identities: dict[str, AgentIdentity] = {}
        # Told of every enrollment and revocation made here: other instances refresh theirs.
        self._listeners: list[Callable[[list[str]], None]] = []

    def on_change(self, listener: Callable[[list[str]], None]) -> None:
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        for listener in self._listeners:
            listener([name])

    async def load(self) -> None:
        """Read every enrolled agent into the snapshot the links check against."""
        async with self._sessions() as session:
            rows = (await session.execute(select(AgentRow))).scalars().all()
        self._identities = {row.name: _identity(row) for row in rows}

    # What the links ask ----------------------------------------------------------------

    def identity(self, name: str) -> AgentIdentity | None:
        return self._identities.get(name)

    def refusal(self, name: str, public_key: str, groups: Iterable[str]) -> str | None:
        """Why an agent saying hello as ``name`` with this key and these groups is refused,
        or None when it may connect. The link has checked that it holds ``public_key``."""
        if name in self._reserved:
            return f"{name} is the control plane's own host, not an agent's"
        identity = self._identities.get(name)
        if identity is None:
            if self.require_enrollment:
                return f"agent {name} is not enrolled: start it once with --enroll TOKEN"
            return None
        if identity.revoked:
            return f"agent {name} was revoked"
        if public_key != identity.public_key:
            return f"agent {name} presented a key other than the one it enrolled with"
        extra = set(groups) - identity.groups
        if extra:
            return f"agent {name} claims groups it was not enrolled for: {', '.join(sorted(extra))}"
        return None

    # What operators do -----------------------------------------------------------------

    async def create_token(
        self,
        groups: Iterable[str],
        *,
        created_by: str,
        lifetime: timedelta | None = None,
        name: str | None = None,
    ) -> NewEnrollmentToken:
        """A one-time token for an agent in ``groups``; with ``name``, for that host only."""
        names = normalize_names(list(groups), "group")
        lifetime = lifetime or DEFAULT_TOKEN_LIFETIME
        if lifetime <= timedelta(0):
            raise InvalidInput("an enrollment token must expire in the future")
        if name is not None:
            check_host_name(name)
        secret = ENROLL_PREFIX + new_token().removeprefix("ops_")
        row = EnrollmentTokenRow(
            id=new_id(),
            token_hash=secret_hash(secret),
            groups=list(names),
            created_by=created_by,
            created_at=utcnow(),
            expires_at=utcnow() + lifetime,
            name=name,
        )
        async with self._write() as changes:
            session = changes.session
            if name is not None:
                # Refused now rather than when the agent tries: the admin is here to read it.
                self._check_not_inventory(name, await queries.get_host(session, name))
            session.add(row)
        return NewEnrollmentToken(row, secret)

    def _check_not_inventory(self, name: str, host: HostRow | None) -> None:
        """Conflict if ``name`` belongs to a host no agent may become: the control plane's own,
        or an inventory (SSH) host."""
        if name in self._reserved or (host is not None and host.link == LOCAL_LINK):
            raise Conflict(f"{name} is the control plane's own host: no agent may enroll as it")
        if host is not None and host.link not in AGENT_LINKS:
            raise Conflict(f"{name} is an {host.link} host: no agent may enroll under its name")

    async def enroll(self, secret: str, name: str, public_key: str) -> AgentRecord:
        """Register ``name`` with ``public_key`` and the token's groups, spending the token.
        A spent, expired or unknown token is refused (401) without saying which; a token
        issued for another name is refused (403); a name that is not free in the inventory
        (409) unless the token was issued for it, and never the control plane's or an SSH
        host's. A refused enrollment leaves the token unspent."""
        check_host_name(name)
        try:
            parse_public_key(public_key)
        except ValueError as e:
            raise InvalidInput(f"public_key: {e}") from e
        now = utcnow()
        async with self._write() as changes:
            session = changes.session
            token = (
                await session.execute(
                    select(EnrollmentTokenRow)
                    .where(EnrollmentTokenRow.token_hash == secret_hash(secret))
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if token is None or token.used_at is not None or token.expires_at <= now:
                raise Unauthenticated("the enrollment token is unknown, spent or expired")
            if token.name is not None and token.name != name:
                raise Forbidden(f"this enrollment token was issued for {token.name!r} only")
            host = await queries.get_host(session, name)
            self._check_not_inventory(name, host)
            if host is not None and token.name != name:
                raise Conflict(
                    f"host {name} is already in the inventory: enroll it with a token issued "
                    f"for its name (opsplane agents token --name {name})"
                )
            existing = await session.get(AgentRow, name)
            if existing is not None and existing.revoked_at is None:
                raise Conflict(f"agent {name} is already enrolled; revoke it first to re-enroll")
            token.used_at = now
            token.used_by = name
            if existing is not None:
                await session.delete(existing)
                await session.flush()
            row = AgentRow(
                name=name,
                public_key=public_key,
                groups=list(token.groups),
                token_id=token.id,
                enrolled_at=now,
            )
            session.add(row)
        self._identities[name] = _identity(row)
        self._changed(name)
        log.info("agent %s enrolled for groups %s", name, ", ".join(row.groups) or "(none)")
        return record_of(AgentRecord, row)

    async def list_agents(self, page: PageRequest) -> PageOf[AgentRecord]:
        async with self._sessions() as session:
            found = await keyset_page(session, select(AgentRow), _AGENTS, page, lambda a: (a.name,))
        return records_of(AgentRecord, found)

    async def revoke(self, name: str, *, revoked_by: str) -> AgentRecord:
        async with self._write() as changes:
            session = changes.session
            row = await session.get(AgentRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"agent {name} is not enrolled")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                row.revoked_by = revoked_by
        self._identities[name] = _identity(row)
        self._changed(name)
        log.info("agent %s revoked by %s", name, revoked_by)
        return record_of(AgentRecord, row)


def _identity(row: AgentRow) -> AgentIdentity:
    return AgentIdentity(
        name=row.name,
        public_key=row.public_key,
        key=parse_public_key(row.public_key),
        groups=frozenset(row.groups or ()),
        revoked=row.revoked_at is not None,
    )
