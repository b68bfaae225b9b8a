"""Query functions for users, API tokens, web sessions and the audit trail. Like
``queries``, they take a session and never commit: the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.domain.paging import PageOf, PageRequest
from opsplane.security.audit import GENESIS, AuditEntry, chain_hash, document
from opsplane.store.paging import Keyset, keyset_page
from opsplane.store.tables import (
    ApiTokenRow,
    AuditChainRow,
    AuditRow,
    SessionRow,
    UserRow,
    without_nul,
)

CHAIN_HEAD_ID = 1


async def count_principals(session: AsyncSession) -> int:
    """Users plus API tokens: zero on a fresh database."""
    users = (await session.execute(select(func.count()).select_from(UserRow))).scalar_one()
    tokens = (await session.execute(select(func.count()).select_from(ApiTokenRow))).scalar_one()
    return int(users) + int(tokens)


# Users ----------------------------------------------------------------------------------


async def user_by_name(
    session: AsyncSession, name: str, *, for_update: bool = False
) -> UserRow | None:
    stmt = select(UserRow).where(UserRow.name == name)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def users_by_id(session: AsyncSession, ids: Sequence[str]) -> dict[str, UserRow]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = (await session.execute(select(UserRow).where(UserRow.id.in_(wanted)))).scalars()
    return {row.id: row for row in rows}


USERS = Keyset("users", (UserRow.name,), (str,))


async def other_active_admins(session: AsyncSession, user_id: str) -> int:
    """Enabled admins other than ``user_id``."""
    stmt = (
        select(func.count())
        .select_from(UserRow)
        .where(UserRow.id != user_id, UserRow.role == "admin", UserRow.disabled.is_(False))
    )
    return int((await session.execute(stmt)).scalar_one())


async def list_users(session: AsyncSession, page: PageRequest) -> PageOf[UserRow]:
    return await keyset_page(session, select(UserRow), USERS, page, lambda u: (u.name,))


# API tokens -----------------------------------------------------------------------------


async def token_by_hash(
    session: AsyncSession, token_hash: str
) -> tuple[ApiTokenRow, UserRow | None] | None:
    stmt = (
        select(ApiTokenRow, UserRow)
        .outerjoin(UserRow, UserRow.id == ApiTokenRow.user_id)
        .where(ApiTokenRow.token_hash == token_hash)
    )
    found = (await session.execute(stmt)).first()
    return None if found is None else (found[0], found[1])


async def get_token(
    session: AsyncSession, token_id: str, *, for_update: bool = False
) -> ApiTokenRow | None:
    stmt = select(ApiTokenRow).where(ApiTokenRow.id == token_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


TOKENS = Keyset(
    "tokens", (ApiTokenRow.created_at, ApiTokenRow.id), (datetime, str), descending=True
)


async def list_tokens(
    session: AsyncSession, page: PageRequest, *, active_at: datetime | None
) -> PageOf[tuple[ApiTokenRow, UserRow | None]]:
    """Tokens with their owners, newest first; only those usable at ``active_at`` if given."""
    stmt = select(ApiTokenRow, UserRow).outerjoin(UserRow, UserRow.id == ApiTokenRow.user_id)
    if active_at is not None:
        stmt = stmt.where(
            ApiTokenRow.revoked_at.is_(None),
            or_(ApiTokenRow.expires_at.is_(None), ApiTokenRow.expires_at > active_at),
        )
    return await keyset_page(
        session, stmt, TOKENS, page, lambda pair: (pair[0].created_at, pair[0].id), scalars=False
    )


async def revoke_tokens_of(session: AsyncSession, user_id: str, at: datetime) -> None:
    await session.execute(
        update(ApiTokenRow)
        .where(ApiTokenRow.user_id == user_id, ApiTokenRow.revoked_at.is_(None))
        .values(revoked_at=at)
    )


async def touch_token(session: AsyncSession, token_id: str, at: datetime) -> None:
    await session.execute(
        update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=at)
    )


# Web sessions ---------------------------------------------------------------------------


async def session_with_user(
    session: AsyncSession, session_id: str
) -> tuple[SessionRow, UserRow] | None:
    stmt = (
        select(SessionRow, UserRow)
        .join(UserRow, UserRow.id == SessionRow.user_id)
        .where(SessionRow.id == session_id)
    )
    found = (await session.execute(stmt)).first()
    return None if found is None else (found[0], found[1])


async def delete_session(session: AsyncSession, session_id: str) -> None:
    await session.execute(delete(SessionRow).where(SessionRow.id == session_id))


async def delete_sessions_of(session: AsyncSession, user_id: str) -> None:
    await session.execute(delete(SessionRow).where(SessionRow.user_id == user_id))


async def delete_expired_sessions(session: AsyncSession, now: datetime) -> None:
    await session.execute(delete(SessionRow).where(SessionRow.expires_at <= now))


# The audit trail ------------------------------------------------------------------------


async def append_audit(session: AsyncSession, entry: AuditEntry, at: datetime) -> AuditRow:
    """Append ``entry`` to the chain in the caller's transaction.

    The chain head is locked first (``FOR UPDATE``; SQLite has one writer anyway), so
    instances sharing a database append one at a time and never fork the chain.
    """
    stmt = select(AuditChainRow).where(AuditChainRow.id == CHAIN_HEAD_ID).with_for_update()
    head = (await session.execute(stmt)).scalar_one_or_none()
    if head is None:  # a database whose head row was lost: start a chain that says so
        head = AuditChainRow(id=CHAIN_HEAD_ID, last_id=0, last_hash=GENESIS)
        session.add(head)
    # NUL is replaced as the columns will store it, so that the hash covers what is stored.
    doc = without_nul(document(entry, head.last_id + 1, at))
    digest = chain_hash(head.last_hash, doc)
    row = AuditRow(
        id=doc["id"],
        at=at,
        actor=doc["actor"],
        role=doc["role"],
        source_ip=doc["source_ip"],
        action=doc["action"],
        target=doc["target"],
        targets=doc["targets"],
        outcome=doc["outcome"],
        detail=doc["detail"],
        prev_hash=head.last_hash,
        hash=digest,
    )
    session.add(row)
    head.last_id = row.id
    head.last_hash = digest
    return row


async def audit_head(session: AsyncSession) -> tuple[int, str] | None:
    stmt = select(AuditChainRow).where(AuditChainRow.id == CHAIN_HEAD_ID)
    head = (await session.execute(stmt)).scalar_one_or_none()
    return None if head is None else (head.last_id, head.last_hash)


async def audit_past_head(session: AsyncSession, limit: int) -> list[AuditRow]:
    """Records stored beyond the chain head, which the head does not vouch for: appended
    without the head, or left behind when the head was moved back. One statement, so the
    head and the records are read at one moment: a record appended meanwhile moves the head
    in its own transaction and is never taken for one of these."""
    head_id = (
        select(func.coalesce(func.max(AuditChainRow.last_id), 0))
        .where(AuditChainRow.id == CHAIN_HEAD_ID)
        .scalar_subquery()
    )
    stmt = select(AuditRow).where(AuditRow.id > head_id).order_by(AuditRow.id).limit(limit)
    return list((await session.execute(stmt)).scalars())


def _audit_filter(
    stmt: Select[AuditRow],
    *,
    actor: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Select[AuditRow]:
    if actor:
        stmt = stmt.where(AuditRow.actor == actor)
    if action:
        # "task" matches task.create, task.cancel…; "task.create" matches itself.
        stmt = stmt.where(or_(AuditRow.action == action, AuditRow.action.startswith(f"{action}.")))
    if since is not None:
        stmt = stmt.where(AuditRow.at >= since)
    if until is not None:
        stmt = stmt.where(AuditRow.at < until)
    return stmt


AUDIT = Keyset("audit", (AuditRow.id,), (int,), descending=True)


async def list_audit(
    session: AsyncSession,
    page: PageRequest,
    *,
    actor: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
) -> PageOf[AuditRow]:
    """A page of records, newest first, and how many match."""
    stmt = _audit_filter(select(AuditRow), actor=actor, action=action, since=since, until=until)
    return await keyset_page(session, stmt, AUDIT, page, lambda r: (r.id,))


async def audit_after(
    session: AsyncSession,
    after_id: int,
    limit: int,
    *,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[AuditRow]:
    """Records after ``after_id`` in chain order, for exports and verification in batches."""
    stmt = _audit_filter(
        select(AuditRow).where(AuditRow.id > after_id),
        actor=actor,
        action=action,
        since=since,
        until=until,
    )
    return list((await session.execute(stmt.order_by(AuditRow.id).limit(limit))).scalars())
