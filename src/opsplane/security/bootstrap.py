"""Start-up: the first admin token, and the demo's admin user and credentials."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from opsplane.domain.errors import ConfigError
from opsplane.domain.ids import new_id
from opsplane.security.roles import (
    Role,
)
from opsplane.security.service_base import (
    DEMO_CREDENTIALS_FILE,
    INITIAL_TOKEN_FILE,
    SYSTEM,
    SYSTEM_CALLER,
    DemoCredentials,
    SecurityState,
)
from opsplane.security.tokens import (
    new_secret,
    new_token,
    secret_hash,
)
from opsplane.store import security_queries as sq
from opsplane.store.leases import claim_lease, release_lease
from opsplane.store.tables import UserRow

log = logging.getLogger(__name__)

# The lease that makes the first admin token once cluster-wide. Its time only matters should a
# row ever be left (it is deleted in the transaction that takes it).
BOOTSTRAP_LEASE = "bootstrap"
BOOTSTRAP_LEASE_TTL = timedelta(minutes=1)


class Bootstrap(SecurityState):
    """Users and tokens a fresh database starts with."""

    async def bootstrap(self, *, generate: bool = True) -> Path | None:
        """On a database without users or tokens: create the admin token given by
        ``bootstrap_admin_token``, or (``generate``) a random one written to
        ``<data dir>/initial-admin-token`` (mode 0600), whose path this returns. Never logs a
        secret. A bootstrap token that exists already is left alone, revoked or not.

        Once cluster-wide: instances starting at the same moment on an empty database take the
        ``bootstrap`` lease row first in their write transaction (the database decides by its
        primary key, or on SQLite by its single writer), then look again; the one that finds
        the other's token creates none and returns None."""
        token = self._bootstrap_token
        async with self._sessions() as session:
            # A restart on a bootstrapped database: nothing to write, so no write transaction.
            if token and await sq.token_by_hash(session, secret_hash(token)) is not None:
                return None
            if await sq.count_principals(session):
                if token:
                    log.warning(
                        "bootstrap_admin_token ignored: the database already has users or tokens"
                    )
                return None
        if not token and not generate:
            return None
        written: Path | None = None
        holder = new_id()
        async with self._write() as w:
            # First statement of the transaction: on SQLite it takes the write lock before
            # anything is read, so the look below cannot be a snapshot older than a rival's
            # commit.
            if not await claim_lease(w.session, BOOTSTRAP_LEASE, holder, BOOTSTRAP_LEASE_TTL):
                log.info(
                    "another control-plane instance is creating the first admin token: "
                    "this one creates none"
                )
                return None
            # Released in this same transaction: a rival waiting on the row then finds it
            # gone and the token there, and nothing of the lease outlives the bootstrap.
            await release_lease(w.session, BOOTSTRAP_LEASE, holder)
            if token and await sq.token_by_hash(w.session, secret_hash(token)) is not None:
                return None
            if await sq.count_principals(w.session):
                log.info(
                    "another control-plane instance created the first admin token at the same "
                    "moment: this one creates none (the other's is in its data directory)"
                )
                return None
            name = "bootstrap" if token else "initial-admin"
            secret = token or new_token()
            now = self._clock()
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
