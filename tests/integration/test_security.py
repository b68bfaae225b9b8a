"""Users, tokens, sessions and the audit trail: the SecurityService on every database, and the
API's login, CSRF, redaction and audit-before-dispatch on SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, select, text, update

from opsplane.config import load_settings
from opsplane.domain.errors import ConfigError, Conflict, InvalidInput, Unauthenticated
from opsplane.engine.core import Engine
from opsplane.security.audit import AuditEntry
from opsplane.security.roles import Role
from opsplane.security.service import INITIAL_TOKEN_FILE, SYSTEM_CALLER, Caller, SecurityService
from opsplane.store import security_queries
from opsplane.store.tables import ApiTokenRow, AuditRow, SessionRow, TaskRow, UserRow
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.integration.apps import WEB_1, admin_api, running_engine


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def security(engine: Engine, clock: Clock, tmp_path: Path) -> SecurityService:
    return SecurityService(
        engine.sessions, engine.write, data_dir=tmp_path, session_lifetime=3600, clock=clock
    )


ADMIN = SYSTEM_CALLER


# Tokens -----------------------------------------------------------------------------------


async def test_tokens_are_stored_only_as_hashes_and_expire_and_revoke(
    engine: Engine, security: SecurityService, clock: Clock
) -> None:
    made = await security.create_token(
        ADMIN, name="ci", role="operator", groups=["web"], expires_in=timedelta(days=30)
    )
    other = await security.create_token(
        ADMIN, name="x", role="viewer", groups=None, expires_in=None
    )
    assert made.secret.startswith("ops_") and len(made.secret) > 40 and made.secret != other.secret
    async with engine.sessions() as session:
        row = await session.get(ApiTokenRow, made.token.id)
        assert row is not None
        assert row.token_hash == hashlib.sha256(made.secret.encode()).hexdigest()
        stored = " ".join(str(v) for v in (await session.execute(select(ApiTokenRow))).all())
    assert made.secret not in stored and other.secret not in stored

    principal = await security.authenticate_token(made.secret)
    assert (principal.name, principal.role, principal.groups) == ("ci", Role.OPERATOR, {"web"})
    clock.advance(days=30)
    with pytest.raises(Unauthenticated, match="expired"):
        await security.authenticate_token(made.secret)

    await security.authenticate_token(other.secret)
    await security.revoke_token(ADMIN, other.token.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await security.authenticate_token(other.secret)
    with pytest.raises(Unauthenticated, match="unknown"):
        await security.authenticate_token("ops_" + "x" * 43)


async def test_a_token_never_has_more_than_its_user_has_now(security: SecurityService) -> None:
    await security.create_user(ADMIN, "root", "admin", password=None, groups=None)
    operator = await security.create_user(ADMIN, "op", "operator", password=None, groups=["web"])
    as_op = Caller(await security.authenticate_token((await _token(security, owner="op")).secret))
    assert as_op.principal.user_id == operator.id
    with pytest.raises(InvalidInput, match="more rights than its owner"):
        await security.create_token(as_op, name="", role="admin", groups=None, expires_in=None)
    with pytest.raises(InvalidInput, match="groups its owner cannot"):
        await security.create_token(as_op, name="", role="operator", groups=["db"], expires_in=None)
    admin_token = await security.create_token(
        ADMIN, name="", role="admin", groups=None, expires_in=None, owner="root"
    )
    await security.create_user(ADMIN, "second", "admin", password=None, groups=None)
    # Demoting the user demotes its tokens at once; disabling it refuses them.
    await security.update_user(ADMIN, "root", role="operator", groups=["db"])
    demoted = await security.authenticate_token(admin_token.secret)
    assert (demoted.role, demoted.groups) == (Role.OPERATOR, {"db"})
    await security.update_user(ADMIN, "root", disabled=True)
    with pytest.raises(Unauthenticated, match="disabled"):
        await security.authenticate_token(admin_token.secret)
    with pytest.raises(Conflict, match="last enabled admin"):
        await security.update_user(ADMIN, "second", role="viewer")


async def _token(security: SecurityService, *, owner: str) -> Any:
    return await security.create_token(
        ADMIN, name="", role="operator", groups=["web"], expires_in=None, owner=owner
    )


# Passwords and sessions -------------------------------------------------------------------


async def test_passwords_are_argon2id_hashes_and_sessions_expire(
    engine: Engine, security: SecurityService, clock: Clock
) -> None:
    with pytest.raises(InvalidInput, match="at least 8"):
        await security.create_user(ADMIN, "short", "viewer", password="2short", groups=None)
    await security.create_user(ADMIN, "alice", "viewer", password="correct horse", groups=None)
    async with engine.sessions() as session:
        user = (await session.execute(select(UserRow))).scalar_one()
    assert user.password_hash is not None and user.password_hash.startswith("$argon2id$")
    assert "correct horse" not in user.password_hash

    with pytest.raises(Unauthenticated, match="wrong name or password"):
        await security.login("alice", "incorrect horse", "192.0.2.7")
    with pytest.raises(Unauthenticated, match="wrong name or password"):
        await security.login("nobody", "correct horse", "192.0.2.7")
    opened = await security.login("alice", "correct horse", "192.0.2.7")
    auth = await security.authenticate_session(opened.secret)
    assert auth.principal.name == "alice" and auth.principal.via == "session"
    assert auth.csrf_hash == hashlib.sha256(opened.csrf_token.encode()).hexdigest()
    async with engine.sessions() as session:
        row = (await session.execute(select(SessionRow))).scalar_one()
    assert row.id != opened.secret and opened.secret not in row.csrf_hash

    clock.advance(seconds=3601)
    with pytest.raises(Unauthenticated, match="expired"):
        await security.authenticate_session(opened.secret)
    again = await security.login("alice", "correct horse", None)
    await security.logout(Caller(again.principal))
    with pytest.raises(Unauthenticated):
        await security.authenticate_session(again.secret)
    # A new password ends the sessions opened with the old one.
    third = await security.login("alice", "correct horse", None)
    await security.update_user(ADMIN, "alice", password="battery staple")
    with pytest.raises(Unauthenticated):
        await security.authenticate_session(third.secret)

    outcomes = [(r["action"], r["outcome"]) async for r in security.export_audit(up_to=99)]
    assert outcomes.count(("auth.login", "denied")) == 2
    assert outcomes.count(("auth.login", "ok")) == 3


# Bootstrap --------------------------------------------------------------------------------


async def test_the_bootstrap_token_is_created_once_on_an_empty_database(
    engine: Engine, tmp_path: Path
) -> None:
    def service(token: str | None) -> SecurityService:
        return SecurityService(
            engine.sessions, engine.write, data_dir=tmp_path, bootstrap_token=token
        )

    with pytest.raises(ConfigError, match="at least 16"):
        service("too-short")
    await service(ADMIN_TOKEN).bootstrap()
    await service(ADMIN_TOKEN).bootstrap()  # a restart changes nothing
    principal = await service(None).authenticate_token(ADMIN_TOKEN)
    assert (principal.name, principal.role) == ("bootstrap", Role.ADMIN)
    # Another token on a database that has one is ignored, not added.
    await service("ops_another-bootstrap-token-value").bootstrap()
    with pytest.raises(Unauthenticated):
        await service(None).authenticate_token("ops_another-bootstrap-token-value")
    async with engine.sessions() as session:
        assert len((await session.execute(select(ApiTokenRow))).all()) == 1


async def test_a_fresh_server_without_a_bootstrap_token_writes_one_for_its_owner(
    engine: Engine, tmp_path: Path
) -> None:
    security = SecurityService(engine.sessions, engine.write, data_dir=tmp_path)
    written = await security.bootstrap()
    assert written == tmp_path / INITIAL_TOKEN_FILE
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    principal = await security.authenticate_token(written.read_text().strip())
    assert principal.role == Role.ADMIN
    assert await security.bootstrap() is None  # only on an empty database


async def test_two_instances_bootstrapping_at_once_make_one_initial_admin_token(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    # docs/deployment.md "Defects found": two servers started at the same moment on an empty
    # database each wrote an initial admin token.
    settings = load_settings(data_dir=tmp_path / "b", database_url=database_url)
    async with running_engine(settings, []) as other:
        services = [
            SecurityService(e.sessions, e.write, data_dir=tmp_path / name)
            for e, name in ((engine, "a"), (other, "b"))
        ]
        written = await asyncio.gather(*(s.bootstrap() for s in services))
        made = [path for path in written if path is not None]
        assert len(made) == 1, written
        # The loser wrote no file: it holds no token it did not create.
        holders = [d for d in (tmp_path / "a", tmp_path / "b") if (d / INITIAL_TOKEN_FILE).exists()]
        assert holders == [made[0].parent]
        async with engine.sessions() as session:
            rows = (await session.execute(select(ApiTokenRow))).scalars().all()
        assert [r.name for r in rows] == ["initial-admin"]
        principal = await services[0].authenticate_token(made[0].read_text().strip())
        assert principal.role == Role.ADMIN
        # Both are restarts now: nothing more.
        assert await asyncio.gather(*(s.bootstrap() for s in services)) == [None, None]


# The audit trail --------------------------------------------------------------------------


async def _append(security: SecurityService, count: int) -> None:
    for i in range(count):
        await security.audit(
            AuditEntry(
                actor="ålice 🚀",
                role="admin",
                action="task.create",
                source_ip="192.0.2.1",
                target=f"t-{i}",
                targets={"selector": {"groups": ["web"], "all": False}, "count": 2},
                detail={"command": "echo 'x\x00y' && true", "nested": {"n": i, "ok": True}},
            )
        )


async def test_the_audit_chain_verifies_and_names_an_edited_record(
    engine: Engine, security: SecurityService, database_url: str
) -> None:
    await _append(security, 6)
    assert (await security.verify_audit()).ok
    async with engine.db.begin() as connection:
        await connection.execute(update(AuditRow).where(AuditRow.id == 3).values(actor="mallory"))
    report = await security.verify_audit()
    assert not report.ok and report.first_bad_id == 3
    assert report.problems == ["record 3 was edited: it no longer matches its hash"]
    status, printed = _cli_verify(database_url)
    assert status == 1 and "record 3 was edited" in printed, printed


async def test_the_audit_chain_names_a_deleted_record_in_the_middle_and_at_the_end(
    engine: Engine, security: SecurityService, database_url: str
) -> None:
    await _append(security, 6)
    async with engine.db.begin() as connection:
        await connection.execute(delete(AuditRow).where(AuditRow.id == 4))
    report = await security.verify_audit()
    assert report.first_bad_id == 4 and "record 4 missing: deleted" in report.problems[0]
    async with engine.db.begin() as connection:
        await connection.execute(delete(AuditRow).where(AuditRow.id == 6))
    report = await security.verify_audit()
    assert any("record 6 missing: deleted from the end" in p for p in report.problems), report
    status, printed = _cli_verify(database_url)
    assert status == 1 and "record 4 missing" in printed and "BROKEN" in printed, printed


def _cli_verify(database_url: str) -> tuple[int, str]:
    """``opsplane audit verify --database-url``: its exit status and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    result = subprocess.run(
        [sys.executable, "-m", "opsplane", "audit", "verify", "--database-url", database_url],
        capture_output=True, text=True, env={**env, "NO_COLOR": "1"}, timeout=60, check=False,
    )  # fmt: skip
    return result.returncode, result.stderr + result.stdout


# The API on SQLite ------------------------------------------------------------------------


@asynccontextmanager
async def _api(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The API with host web-1 online and an operator "alice" who logs in with a password."""
    async with admin_api(tmp_path, connected=[WEB_1], **settings) as (app, client):
        answer = await client.post(
            "/api/v1/users",
            headers=ADMIN_HEADERS,
            json={"name": "alice", "role": "operator", "all_groups": True,
                  "password": "correct horse"},
        )  # fmt: skip
        assert answer.status_code == 201, answer.text
        yield app, client


def _cookie_flags(answer: httpx.Response) -> dict[str, str]:
    flags: dict[str, str] = {}
    for header in answer.headers.get_list("set-cookie"):
        name = header.split("=", 1)[0]
        flags[name] = header.lower()
    return flags


async def test_login_sets_a_strict_http_only_cookie_and_state_changes_need_the_csrf_token(
    tmp_path: Path,
) -> None:
    async with _api(tmp_path, session_lifetime=2.0) as (_app, client):
        wrong = await client.post("/api/v1/auth/login", json={"name": "alice", "password": "nope"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        login = await client.post(
            "/api/v1/auth/login", json={"name": "alice", "password": "correct horse"}
        )
        assert login.status_code == 200
        flags = _cookie_flags(login)
        session = flags["opsplane_session"]
        assert "httponly" in session and "samesite=strict" in session and "secure" not in session
        assert "httponly" not in flags["opsplane_csrf"]
        csrf = login.json()["csrf_token"]
        secret = login.cookies["opsplane_session"]

        body = {"command": "true", "targets": {"hosts": ["web-1"]}}
        assert (await client.get("/api/v1/hosts")).status_code == 200  # reads need no CSRF
        refused = await client.post("/api/v1/tasks", json=body)
        assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["detail"]
        forged = await client.post("/api/v1/tasks", json=body, headers={"X-CSRF-Token": "x"})
        assert forged.status_code == 403
        created = await client.post("/api/v1/tasks", json=body, headers={"X-CSRF-Token": csrf})
        assert created.status_code == 201 and created.json()["created_by"] == "alice"
        # A Bearer token is never sent by a browser on its own: no CSRF token needed.
        bearer = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        assert bearer.status_code == 201

        await asyncio.sleep(2.1)
        # The browser drops the cookie (Max-Age); one sent anyway is refused by the server.
        client.cookies.clear()
        cookie = {"Cookie": f"opsplane_session={secret}"}
        expired = await client.get("/api/v1/hosts", headers=cookie)
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]


async def test_cookies_are_secure_over_https_and_logout_ends_the_session(tmp_path: Path) -> None:
    async with _api(tmp_path) as (app, _client):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
            body = {"name": "alice", "password": "correct horse"}
            login = await client.post("/api/v1/auth/login", json=body)
            assert "secure" in _cookie_flags(login)["opsplane_session"]
            csrf = login.json()["csrf_token"]
            me = await client.get("/api/v1/auth/me")
            assert me.json() == {"name": "alice", "role": "operator", "groups": None,
                                 "via": "session"}  # fmt: skip
            out = await client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
            assert out.status_code == 204
            assert (await client.get("/api/v1/auth/me")).status_code == 401


async def test_secrets_in_commands_are_redacted_in_the_audit_trail(tmp_path: Path) -> None:
    command = (
        "mysql -u root --password=hunter2 -e 'select 1'; "
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE aws s3 ls; "
        "curl -H 'Authorization: Bearer abcdefghijklmnopqrstuvwxyz' https://deploy:s3cr3t@x.test/"
    )
    async with _api(tmp_path) as (_app, client):
        body = {"command": command, "targets": {"hosts": ["web-1"]}}
        task = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        assert task.status_code == 201
        audit = await client.get(
            "/api/v1/audit", params={"action": "task.create"}, headers=ADMIN_HEADERS
        )
        (record,) = audit.json()["items"]
    recorded = record["detail"]["command"]
    for secret in ("hunter2", "AKIAIOSFODNN7EXAMPLE", "abcdefghijklmnopqrstuvwxyz", "s3cr3t"):
        assert secret not in recorded, recorded
    assert recorded.startswith("mysql -u root --password=")
    assert record["targets"]["hosts"] == ["web-1"] and record["target"] == task.json()["id"]
    # The task itself keeps the command as given: the host must run it.
    assert task.json()["command"] == command


async def test_a_tasks_audit_record_is_committed_before_dispatch_and_never_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _api(tmp_path) as (app, client):
        engine: Engine = app.state.engine
        seen: list[int] = []
        send = engine.dispatcher.send

        async def checking_send(plan: Any) -> None:
            async with engine.sessions() as session:
                rows = await session.execute(
                    select(AuditRow).where(AuditRow.action == "task.create")
                )
                seen.append(len(rows.all()))
            await send(plan)

        monkeypatch.setattr(engine.dispatcher, "send", checking_send)
        body = {"command": "true", "targets": {"hosts": ["web-1"]}}
        assert (await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)).is_success
        assert seen == [1]

        async def failing(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("the audit trail is unavailable")

        monkeypatch.setattr(security_queries, "append_audit", failing)
        with pytest.raises(RuntimeError):
            await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        async with engine.sessions() as session:
            tasks = (await session.execute(select(TaskRow))).all()
        assert len(tasks) == 1 and seen == [1]


async def test_the_api_export_verifies_and_carries_the_chain_head(tmp_path: Path) -> None:
    async with _api(tmp_path) as (app, client):
        export = await client.get(
            "/api/v1/audit", params={"format": "jsonl"}, headers=ADMIN_HEADERS
        )
        lines = [json.loads(line) for line in export.text.splitlines()]
        assert export.headers["content-type"].startswith("application/x-ndjson")
        assert int(export.headers["x-audit-head-id"]) == lines[-1]["id"] == len(lines)
        verified = await client.get("/api/v1/audit/verify", headers=ADMIN_HEADERS)
        assert verified.json()["ok"] is True and verified.json()["checked"] == len(lines)
        engine: Engine = app.state.engine
        async with engine.db.begin() as connection:
            await connection.execute(text("UPDATE audit_log SET outcome = 'ok' WHERE id = 1"))
            await connection.execute(text("UPDATE audit_log SET action = 'x' WHERE id = 1"))
        broken = (await client.get("/api/v1/audit/verify", headers=ADMIN_HEADERS)).json()
        assert broken["ok"] is False and broken["first_bad_id"] == 1


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Settings read OPSPLANE_* variables: a developer's shell must not change these tests.
    for name in list(os.environ):
        if name.startswith("OPSPLANE_"):
            monkeypatch.delenv(name)
    yield
