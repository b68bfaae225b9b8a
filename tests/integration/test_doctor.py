"""``opsplane doctor`` against a healthy setup and against each kind of broken one."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection
from typer.testing import CliRunner

from opsplane.cli.main import app
from opsplane.store.database import create_engine
from opsplane.store.migrate import alembic_config, upgrade_to_head
from opsplane.transport.amqp import messages as m
from tests.rabbitmq import private_vhost


def _doctor(*args: str) -> tuple[int, dict[str, list[dict[str, str]]]]:
    """The exit status and the findings by check."""
    result = CliRunner().invoke(app, ["doctor", "--json", *args])
    by_check: dict[str, list[dict[str, str]]] = {}
    for line in result.stdout.splitlines():
        finding = json.loads(line)
        by_check.setdefault(finding["check"], []).append(finding)
    return result.exit_code, by_check


def _levels(by_check: dict[str, list[dict[str, str]]], check: str) -> list[str]:
    return [finding["level"] for finding in by_check[check]]


@pytest.fixture
def healthy(tmp_path: Path) -> Path:
    """A data directory as `opsplane keys init` and `opsplane db upgrade` leave it."""
    runner = CliRunner()
    for verb in (["keys", "init"], ["db", "upgrade"]):
        result = runner.invoke(app, [*verb, "--data-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
    (tmp_path / "keys").mkdir(exist_ok=True)
    secrets_key = tmp_path / "keys" / "secrets.key"
    secrets_key.write_bytes(os.urandom(32))
    secrets_key.chmod(0o600)
    return tmp_path


def test_a_healthy_setup_is_all_ok(healthy: Path) -> None:
    status, by_check = _doctor("--data-dir", str(healthy))
    assert status == 0, by_check
    assert set(by_check) == {"database", "clock", "rabbitmq", "keys", "tls", "disk"}
    assert all(level == "ok" for check in by_check for level in _levels(by_check, check))
    assert "the newest" in by_check["database"][0]["detail"]
    assert len(by_check["tls"]) == 2  # the CA and the gRPC server certificate


def test_a_key_readable_by_others_fails_with_the_fix(healthy: Path) -> None:
    key = healthy / "keys" / "control-plane.key"
    key.chmod(0o644)
    status, by_check = _doctor("--data-dir", str(healthy))
    assert status == 2
    (failed,) = [f for f in by_check["keys"] if f["level"] == "fail"]
    assert "0644" in failed["detail"] and failed["hint"] == f"chmod 600 {key}"


def test_an_expired_certificate_fails(healthy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cp")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=10))
        .not_valid_after(now - timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = healthy / "https.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("OPSPLANE_TLS_CERT", str(path))
    status, by_check = _doctor("--data-dir", str(healthy))
    assert status == 2
    assert any(f["level"] == "fail" and "expired" in f["detail"] for f in by_check["tls"])


def test_an_old_schema_fails_and_names_the_upgrade(healthy: Path) -> None:
    async def one_back() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{healthy / 'opsplane.db'}")

        def _down(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "-1")

        try:
            async with engine.begin() as connection:
                await connection.run_sync(_down)
        finally:
            await engine.dispose()

    asyncio.run(one_back())
    status, by_check = _doctor("--data-dir", str(healthy))
    assert status == 2
    (schema,) = by_check["database"]
    assert schema["level"] == "fail" and "opsplane db upgrade" in schema["hint"]


def test_an_unreachable_database_fails_without_a_trace(healthy: Path) -> None:
    url = "postgresql+asyncpg://ops:hunter2@127.0.0.1:1/opsplane"
    status, by_check = _doctor("--data-dir", str(healthy), "--database-url", url)
    assert status == 2
    (database,) = by_check["database"]
    assert database["level"] == "fail" and "hunter2" not in database["detail"]
    assert "Traceback" not in json.dumps(by_check)


@pytest.mark.service("rabbitmq")
def test_rabbitmq_reachable_with_and_without_its_exchanges(healthy: Path) -> None:
    with private_vhost() as vhost:
        status, by_check = _doctor("--data-dir", str(healthy), "--amqp-url", vhost.url)
        assert status == 1 and _levels(by_check, "rabbitmq") == ["warn"]
        assert m.CMD_EXCHANGE in by_check["rabbitmq"][0]["detail"]

        async def declare() -> None:
            connection = await aio_pika.connect(vhost.url)
            async with connection:
                channel = await connection.channel()
                for name in (m.CMD_EXCHANGE, m.RESULT_EXCHANGE, m.MONITOR_EXCHANGE):
                    await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

        asyncio.run(declare())
        status, by_check = _doctor("--data-dir", str(healthy), "--amqp-url", vhost.url)
        assert status == 0 and _levels(by_check, "rabbitmq") == ["ok"]
    status, by_check = _doctor(
        "--data-dir", str(healthy), "--amqp-url", "amqp://guest:guest@127.0.0.1:1/"
    )
    assert status == 2 and _levels(by_check, "rabbitmq") == ["fail"]


def test_a_new_data_directory_only_warns(tmp_path: Path) -> None:
    status, by_check = _doctor("--data-dir", str(tmp_path / "new"))
    assert status == 1
    assert _levels(by_check, "database") == ["warn"]
    assert not (tmp_path / "new").exists()  # the doctor only reads


async def test_the_clock_against_a_server_database(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
    from opsplane.config import load_settings
    from opsplane.doctor import examine

    findings = await examine(load_settings(database_url=database_url, data_dir=tmp_path))
    (clock,) = [f for f in findings if f.check == "clock"]
    assert clock.level == "ok", clock
