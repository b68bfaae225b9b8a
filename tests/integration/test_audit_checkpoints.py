"""The audit trail's tail, anchored (issue 14, hole 5): on every database, someone who can write
it appends a correctly chained record after the head, cuts the end off and moves the head
back, or writes a whole new chain. The chain alone cannot tell the last two; signed checkpoints
kept in a file can, and ``opsplane audit verify --checkpoint FILE`` says so. Records past the
head are reported with or without checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, update

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.security.audit import GENESIS, AuditEntry
from opsplane.security.checkpoints import CheckpointWriter, load_checkpoints
from opsplane.security.service import SecurityService
from opsplane.security.signing import load_public_key, public_key_text
from opsplane.store import security_queries as sq
from opsplane.store.tables import AuditChainRow, AuditRow, utcnow
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import free_port
from tests.integration.test_metrics_alerts import Webhook, webhook_server

RECORDS = 6


@pytest.fixture
def security(engine: Engine, tmp_path: Path) -> SecurityService:
    return SecurityService(engine.sessions, engine.write, data_dir=tmp_path)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def public_key_file(key: Ed25519PrivateKey, tmp_path: Path) -> Path:
    path = tmp_path / "control-plane.pub"
    path.write_text(public_key_text(key.public_key()) + "\n")
    return path


def _writer(security: SecurityService, key: Ed25519PrivateKey, path: Path) -> CheckpointWriter:
    return CheckpointWriter(security.audit_head, key, path, interval=60, clock=utcnow)


def _entry(i: int, actor: str = "alice") -> AuditEntry:
    return AuditEntry(actor=actor, role="admin", action="task.create", target=f"t-{i}")


async def _append(security: SecurityService, count: int, actor: str = "alice") -> None:
    for i in range(count):
        await security.audit(_entry(i, actor))


async def _hash_of(engine: Engine, record_id: int) -> str:
    async with engine.sessions() as session:
        row = await session.get(AuditRow, record_id)
    assert row is not None
    return row.hash


async def _set_head(engine: Engine, head_id: int, head_hash: str) -> None:
    async with engine.db.begin() as connection:
        await connection.execute(
            update(AuditChainRow).where(AuditChainRow.id == sq.CHAIN_HEAD_ID)
            .values(last_id=head_id, last_hash=head_hash)
        )  # fmt: skip


def _cli_verify(database_url: str, *args: str) -> tuple[int, str]:
    """``opsplane audit verify --database-url … ARGS``: its exit status and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    result = subprocess.run(
        [sys.executable, "-m", "opsplane", "audit", "verify", "--database-url", database_url,
         *args],
        capture_output=True, text=True, env={**env, "NO_COLOR": "1", "COLUMNS": "400"},
        timeout=60, check=False,
    )  # fmt: skip
    return result.returncode, result.stderr + result.stdout


async def test_a_record_chained_on_after_the_head_is_reported(
    engine: Engine, security: SecurityService, database_url: str
) -> None:
    await _append(security, RECORDS)
    # A forged record, correctly chained to the last one, with the head left where it was.
    head = await security.audit_head()
    async with engine.write() as w:
        await sq.append_audit(w.session, _entry(99, actor="mallory"), utcnow())
    await _set_head(engine, *head)

    report = await security.verify_audit()
    assert not report.ok and report.past_head == 1 and report.first_bad_id == RECORDS + 1
    assert report.problems == [
        f"record {RECORDS + 1} (1) past the chain head (record {RECORDS}): appended without "
        "moving the head, or the head was moved back"
    ]
    status, printed = _cli_verify(database_url)
    assert status == 1 and f"record {RECORDS + 1} (1) past the chain head" in printed, printed


async def test_a_truncation_with_the_head_moved_back_is_caught_by_a_checkpoint(
    caplog: pytest.LogCaptureFixture,
    engine: Engine,
    security: SecurityService,
    database_url: str,
    key: Ed25519PrivateKey,
    public_key_file: Path,
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit-checkpoints.jsonl"
    await _append(security, RECORDS)
    writer = _writer(security, key, path)
    written = await writer.checkpoint()
    assert written is not None and written["id"] == RECORDS
    status, printed = _cli_verify(
        database_url, "--checkpoint", str(path), "--public-key", str(public_key_file)
    )
    assert status == 0 and "1 checkpoint(s) match" in printed, printed

    # Cut the last two records and move the head back: the chain alone is consistent.
    async with engine.db.begin() as connection:
        await connection.execute(delete(AuditRow).where(AuditRow.id > RECORDS - 2))
    await _set_head(engine, RECORDS - 2, await _hash_of(engine, RECORDS - 2))
    assert (await security.verify_audit()).ok
    # The control plane notices at its next round; the checkpoint it then writes of the
    # shortened trail does not make the earlier one go away.
    with caplog.at_level(logging.ERROR, logger="opsplane.security.checkpoints"):
        assert await writer.checkpoint() is not None
    assert "behind or differs from the last checkpoint" in caplog.text

    status, printed = _cli_verify(
        database_url, "--checkpoint", str(path), "--public-key", str(public_key_file)
    )
    assert status == 1, printed
    assert f"record {RECORDS}, signed in the checkpoint of {written['at']}, is missing" in printed
    assert f"the chain ends at record {RECORDS - 2}" in printed


async def test_a_full_rewrite_with_a_fresh_chain_is_caught_by_a_checkpoint(
    engine: Engine,
    security: SecurityService,
    database_url: str,
    key: Ed25519PrivateKey,
    public_key_file: Path,
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit-checkpoints.jsonl"
    await _append(security, 3)
    writer = _writer(security, key, path)
    first = await writer.checkpoint()
    await _append(security, RECORDS - 3)
    assert await writer.checkpoint() is not None
    assert await writer.checkpoint() is None  # the head did not move: nothing new to sign
    assert first is not None

    # Every record replaced by a forged one, chained afresh from the start, head and all.
    async with engine.db.begin() as connection:
        await connection.execute(delete(AuditRow))
    await _set_head(engine, 0, GENESIS)
    await _append(security, RECORDS, actor="mallory")
    assert (await security.verify_audit()).ok

    status, printed = _cli_verify(
        database_url, "--checkpoint", str(path), "--public-key", str(public_key_file)
    )
    assert status == 1, printed
    assert (
        f"record 3 is not the one the checkpoint of {first['at']} signed: the trail was "
        "rewritten up to record 3"
    ) in printed
    assert f"record {RECORDS} is not the one the checkpoint" in printed
    assert "first bad record 3" in printed


async def test_an_edited_or_foreign_checkpoint_is_refused(
    security: SecurityService, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "audit-checkpoints.jsonl"
    await _append(security, 2)
    await _writer(security, key, path).checkpoint()
    await _append(security, 1)
    await _writer(security, Ed25519PrivateKey.generate(), path).checkpoint()
    lines = path.read_text().splitlines()
    edited = json.loads(lines[0])
    edited["id"] = 1  # the signature covers the id
    path.write_text("\n".join([json.dumps(edited), *lines]) + "\n")

    found = load_checkpoints(path, key.public_key())
    assert [(a.id, a.hash) for a in found.anchors] == [(2, (await _head(security))[1])]
    assert len(found.problems) == 2
    assert "line 1 (record 1," in found.problems[0] and "bad signature" in found.problems[0]
    assert "line 3 (record 3," in found.problems[1] and "signed by another key" in found.problems[1]


async def _head(security: SecurityService) -> tuple[int, str]:
    async with security._sessions() as session:
        row = (await session.execute(select(AuditRow).where(AuditRow.id == 2))).scalar_one()
    return row.id, row.hash


# The server: checkpoints at start, at stop, to a webhook; past-head records in the export ----


def _settings(tmp_path: Path, **extra: Any) -> Any:
    return load_settings(
        data_dir=tmp_path / "data",
        grpc_listen=f"127.0.0.1:{free_port()}",
        bootstrap_admin_token=ADMIN_TOKEN,
        **extra,
    )


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with webhook_server(Webhook(statuses=[500])) as hook:
        yield hook


async def test_the_server_writes_signed_checkpoints_and_exports_records_past_the_head(
    tmp_path: Path, webhook: Webhook
) -> None:
    settings = _settings(
        tmp_path, audit_checkpoint_interval=0.2, audit_checkpoint_webhooks=[webhook.url]
    )
    app = create_app(settings)
    path = settings.effective_audit_checkpoint_file
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            created = await client.post(
                "/api/v1/tokens", headers=ADMIN_HEADERS, json={"role": "viewer", "name": "v"}
            )
            assert created.status_code == 201, created.text
            security: SecurityService = app.state.security
            head = await security.audit_head()
            # The first delivery failed (500); the next round delivers the newest checkpoint.
            bodies = await asyncio.to_thread(webhook.wait_for, 2)
            assert bodies[-1]["id"] >= 1
            # A forged record past the head: the export ends with it, marked, and verify says so.
            engine: Engine = app.state.engine
            async with engine.write() as w:
                await sq.append_audit(w.session, _entry(1, actor="mallory"), utcnow())
            forged_id, _ = await security.audit_head()
            await _set_head(engine, forged_id - 1, await _hash_of(engine, forged_id - 1))
            export = await client.get(
                "/api/v1/audit", params={"format": "jsonl"}, headers=ADMIN_HEADERS
            )
            last = json.loads(export.text.splitlines()[-1])
            assert last["past_head"] is True and last["actor"] == "mallory"
            verified = (await client.get("/api/v1/audit/verify", headers=ADMIN_HEADERS)).json()
            assert verified["ok"] is False and verified["past_head"] == 1
    # Signed with the control plane's own key, the one `opsplane keys init` makes.
    found = load_checkpoints(path, load_public_key(settings.signing_key_path.with_suffix(".pub")))
    assert found.problems == [] and found.anchors
    assert found.anchors[-1].id >= head[0]


async def test_anonymous_enrollment_attempts_are_counted_not_audited_under_a_chosen_name(
    tmp_path: Path,
) -> None:
    app = create_app(_settings(tmp_path))
    public = public_key_text(Ed25519PrivateKey.generate().public_key())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for name in ("admin", "system", "web-1"):
                refused = await client.post(
                    "/api/v1/agents/enroll",
                    json={"token": "enr_guessed", "name": name, "public_key": public},
                )
                assert refused.status_code == 401, refused.text
            token = await client.post(
                "/api/v1/agents/tokens", headers=ADMIN_HEADERS, json={"groups": ["web"]}
            )
            enrolled = await client.post(
                "/api/v1/agents/enroll",
                json={"token": token.json()["token"], "name": "web-1", "public_key": public},
            )
            assert enrolled.status_code == 201, enrolled.text
            export = await client.get(
                "/api/v1/audit", params={"format": "jsonl"}, headers=ADMIN_HEADERS
            )
            metrics = (await client.get("/metrics")).text
    records = [json.loads(line) for line in export.text.splitlines()]
    enrollments = [(r["actor"], r["target"], r["outcome"]) for r in records
                   if r["action"] == "agent.enroll"]  # fmt: skip
    assert enrollments == [("agent:web-1", "web-1", "ok")]
    # No record names what the anonymous callers chose, as actor or as target.
    actors = {r["actor"] for r in records if r["actor"].startswith("agent:")}
    assert actors == {"agent:web-1"}
    chosen = [r for r in records if r["target"] in ("admin", "system")]
    assert chosen == []
    assert 'opsplane_enrollments_refused_total{reason="unauthenticated"} 3.0' in metrics
