"""Start-up: the first admin token, and the demo's admin user and credentials."""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
from opsplane.store.tables import UserRow

log = logging.getLogger(__name__)


class Bootstrap(SecurityState):
    """Users and tokens a fresh database starts with."""

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
