"""Leases of singleton duties (DESIGN §7): plain rows, claimed with one conditional UPDATE, so
that they work the same on SQLite, MySQL/MariaDB and PostgreSQL and need no advisory locks."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from opsplane.store.tables import HostRow, LeaseRow, utcnow


async def claim_lease(session: AsyncSession, name: str, holder: str, ttl: timedelta) -> bool:
    """Whether ``holder`` holds lease ``name`` for ``ttl`` from now: renewed if it held it,
    taken if it was free or expired, refused while another holder's is current.

    Two instances claiming at once are decided by the database: the UPDATE's condition is
    evaluated under its row lock, and the INSERT of a new lease by the primary key."""
    now = utcnow()
    taken = await session.execute(
        update(LeaseRow)
        .where(LeaseRow.name == name)
        .where(or_(LeaseRow.holder == holder, LeaseRow.expires_at < now))
        .values(holder=holder, expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    if getattr(taken, "rowcount", 0):
        return True
    if await session.scalar(select(LeaseRow.name).where(LeaseRow.name == name)) is not None:
        return False
    try:
        async with session.begin_nested():
            session.add(LeaseRow(name=name, holder=holder, expires_at=now + ttl))
    except IntegrityError:
        return False  # another instance inserted it first
    return True


async def release_lease(session: AsyncSession, name: str, holder: str) -> None:
    """Give lease ``name`` up if ``holder`` holds it (a clean stop: no wait for expiry)."""
    await session.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))


async def lease_holder(session: AsyncSession, name: str) -> str | None:
    """Who holds lease ``name`` now, or None when nobody's is current."""
    row = await session.get(LeaseRow, name, populate_existing=True)
    if row is None or row.expires_at < utcnow():
        return None
    return row.holder


async def expired_leases(session: AsyncSession, prefix: str) -> list[str]:
    """Names of the leases starting with ``prefix`` whose time has passed."""
    stmt = select(LeaseRow.name).where(
        LeaseRow.name.startswith(prefix, autoescape=True), LeaseRow.expires_at < utcnow()
    )
    return list((await session.execute(stmt)).scalars())


async def current_holders(session: AsyncSession, prefix: str) -> set[str]:
    """Names of the leases starting with ``prefix`` held now (their time has not passed)."""
    stmt = select(LeaseRow.name).where(
        LeaseRow.name.startswith(prefix, autoescape=True), LeaseRow.expires_at >= utcnow()
    )
    return set((await session.execute(stmt)).scalars())


async def drop_expired_lease(session: AsyncSession, name: str) -> bool:
    """Delete lease ``name`` if it has expired (nobody renewed it meanwhile); whether it did."""
    done = await session.execute(
        delete(LeaseRow)
        .where(LeaseRow.name == name, LeaseRow.expires_at < utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(done, "rowcount", 0))


async def stream_holders(session: AsyncSession) -> set[str]:
    """The instances the host rows name as holding a stream (any link)."""
    stmt = select(HostRow.instance).where(HostRow.instance.is_not(None)).distinct()
    return {name for name in (await session.execute(stmt)).scalars() if name}


async def release_streams_of(session: AsyncSession, instance: str) -> list[str]:
    """The hosts whose streams ``instance`` held are offline and held by none; their names.
    Their ``last_seen_at`` stays: their runs end lost ``lost_grace`` after it, as for any host
    that went away."""
    names = list(
        (await session.execute(select(HostRow.name).where(HostRow.instance == instance))).scalars()
    )
    if names:
        await session.execute(
            update(HostRow)
            .where(HostRow.instance == instance)
            .values(status="offline", instance=None)
            .execution_options(synchronize_session=False)
        )
    return names
