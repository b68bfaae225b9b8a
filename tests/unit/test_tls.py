"""The control plane's CA and certificates (``opsplane keys init``), and TLS settings turned
into contexts for gRPC and RabbitMQ (security/tls.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from opsplane.agent.amqp_link import AmqpLink as AgentAmqpLink
from opsplane.agent.config import AgentConfig
from opsplane.cli.main import app
from opsplane.domain.errors import ConfigError
from opsplane.security.signing import load_or_create_private_key, public_key_text
from opsplane.security.tls import (
    TlsFiles,
    amqp_ssl_context,
    certificate_names,
    client_ssl_context,
    default_server_names,
    init_tls,
    issue_client_cert,
    load_certificate,
    resolve_grpc_server_files,
)
from opsplane.transport.amqp.link import AmqpLink as ServerAmqpLink

WAIT = 5.0


@pytest.fixture
def files(tmp_path: Path) -> TlsFiles:
    return TlsFiles.of(tmp_path / "data")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify_server(files: TlsFiles, name: str) -> None:
    store = Store([load_certificate(files.ca_cert)])
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    verifier.verify(load_certificate(files.server_cert), [])


def test_init_creates_a_ca_and_a_server_certificate_that_chains_to_it(files: TlsFiles) -> None:
    result = init_tls(files, extra_names=["cp.example.com", "10.1.2.3"])
    assert result.ca_created and result.server_created
    for name in ("localhost", "127.0.0.1", "::1", "cp.example.com", "10.1.2.3"):
        _verify_server(files, name)
    with pytest.raises(VerificationError):
        _verify_server(files, "elsewhere.example.com")

    ca = load_certificate(files.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3600)
    server = load_certificate(files.server_cert)
    assert server.not_valid_after_utc - server.not_valid_before_utc < dt.timedelta(days=370)
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_server_certificate_names_the_machine_loopback_and_extra_names(files: TlsFiles) -> None:
    result = init_tls(files, extra_names=["cp.example.com"])
    names = certificate_names(load_certificate(files.server_cert))
    assert set(default_server_names(["cp.example.com"])) <= set(names)
    assert {"localhost", "127.0.0.1", "::1", "cp.example.com"} <= set(names)
    assert set(names) == set(result.server_names)


def test_private_keys_are_readable_by_the_owner_only(files: TlsFiles) -> None:
    init_tls(files)
    cert, key = issue_client_cert(files, "web-1")
    for path in (files.ca_key, files.server_key, key):
        assert _mode(path) == 0o600, path
    for path in (files.ca_cert, files.server_cert, cert):
        assert _mode(path) == 0o644, path
    # No temporary files are left behind.
    assert sorted(p.name for p in files.directory.iterdir()) == [
        "ca.key", "ca.pem", "clients", "server.key", "server.pem",
    ]  # fmt: skip


def test_init_is_idempotent_and_reports_names_the_kept_certificate_lacks(
    files: TlsFiles,
) -> None:
    init_tls(files, extra_names=["cp.example.com"])
    before = {p: p.read_bytes() for p in files.directory.iterdir()}
    again = init_tls(files, extra_names=["cp.example.com"])
    assert not again.ca_created and not again.server_created and again.missing_names == ()
    assert {p: p.read_bytes() for p in files.directory.iterdir()} == before

    asked = init_tls(files, extra_names=["new.example.com"])
    assert not asked.server_created and asked.missing_names == ("new.example.com",)
    assert {p: p.read_bytes() for p in files.directory.iterdir()} == before


def test_renewing_the_server_certificate_keeps_the_ca_and_the_old_names(
    files: TlsFiles,
) -> None:
    init_tls(files, extra_names=["cp.example.com"])
    ca, old_key = files.ca_cert.read_bytes(), files.server_key.read_bytes()
    renewed = init_tls(files, extra_names=["new.example.com"], renew_server=True)
    assert renewed.server_created and not renewed.ca_created
    assert files.ca_cert.read_bytes() == ca
    assert files.server_key.read_bytes() != old_key
    for name in ("cp.example.com", "new.example.com", "localhost"):
        _verify_server(files, name)
    assert _mode(files.server_key) == 0o600


def test_half_a_ca_is_refused_rather_than_replaced(files: TlsFiles) -> None:
    init_tls(files)
    files.ca_key.unlink()
    with pytest.raises(ConfigError, match="half of the CA"):
        init_tls(files)


def test_bad_extra_names_are_refused(files: TlsFiles) -> None:
    with pytest.raises(ConfigError, match="not a host name"):
        init_tls(files, extra_names=["bad name"])


def test_client_certificate_is_for_client_auth_named_after_the_agent(files: TlsFiles) -> None:
    with pytest.raises(ConfigError, match="keys init"):
        issue_client_cert(files, "web-1")
    init_tls(files)
    cert_path, _ = issue_client_cert(files, "web-1")
    cert = load_certificate(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    assert certificate_names(cert) == ["web-1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verifier = (
        PolicyBuilder().store(Store([load_certificate(files.ca_cert)])).build_client_verifier()
    )
    verified = verifier.verify(cert, [])
    assert verified.chain[-1] == load_certificate(files.ca_cert)

    with pytest.raises(ConfigError, match="exists already"):
        issue_client_cert(files, "web-1")
    issue_client_cert(files, "web-1", overwrite=True)
    for bad in ("", "a/b", "..", "x y"):
        with pytest.raises(ConfigError):
            issue_client_cert(files, bad)


def test_the_grpc_endpoint_serves_the_configured_pair_else_the_generated_one(
    tmp_path: Path, files: TlsFiles
) -> None:
    data_dir = files.directory.parent
    assert resolve_grpc_server_files(None, None, data_dir) is None
    init_tls(files)
    assert resolve_grpc_server_files(None, None, data_dir) == (
        files.server_cert,
        files.server_key,
    )
    mine = (tmp_path / "mine.pem", tmp_path / "mine.key")
    assert resolve_grpc_server_files(*mine, data_dir) == mine
    with pytest.raises(ConfigError, match="go together"):
        resolve_grpc_server_files(mine[0], None, data_dir)


def test_keys_init_cli_creates_everything_once_and_client_cert_issues(tmp_path: Path) -> None:
    runner = CliRunner()
    data_dir = tmp_path / "data"
    args = ["keys", "init", "--data-dir", str(data_dir), "--san", "cp.example.com"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    files = TlsFiles.of(data_dir)
    assert "TLS CA created" in first.output and str(files.ca_cert) in first.output
    assert "--tls-ca" in first.output
    # The secrets key too: a deployment copies the keys directory to every instance before
    # any of them seals a secret (docs/deployment.md).
    secrets_key = data_dir / "keys" / "secrets.key"
    assert "secrets key created" in first.output and secrets_key.exists()
    sealed = secrets_key.read_bytes()
    before = files.server_cert.read_bytes()
    second = runner.invoke(app, [*args[:4], "--san", "other.example.com"])
    assert second.exit_code == 0, second.output
    assert "already exists" in second.output and "--renew-server" in second.output
    assert files.server_cert.read_bytes() == before
    assert secrets_key.read_bytes() == sealed
    renew = runner.invoke(app, [*args, "--renew-server"])
    assert renew.exit_code == 0 and files.server_cert.read_bytes() != before

    issued = runner.invoke(app, ["keys", "client-cert", "web-1", "--data-dir", str(data_dir)])
    assert issued.exit_code == 0, issued.output
    assert files.client_cert("web-1").exists() and "--tls-cert" in issued.output
    twice = runner.invoke(app, ["keys", "client-cert", "web-1", "--data-dir", str(data_dir)])
    assert twice.exit_code == 2 and "exists already" in twice.output


# RabbitMQ over amqps:// ----------------------------------------------------------------


def test_amqp_context_only_when_tls_files_are_set(files: TlsFiles) -> None:
    init_tls(files)
    assert amqp_ssl_context("amqps://u:p@mq:5671/") is None
    assert amqp_ssl_context("amqp://u:p@localhost/") is None
    context = amqp_ssl_context("amqps://u:p@mq:5671/vhost", files.ca_cert)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    ca_subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert any(s.get("commonName", "").startswith("opsplane CA") for s in ca_subjects)


def test_amqp_tls_files_need_amqps_and_are_not_given_twice(files: TlsFiles) -> None:
    init_tls(files)
    with pytest.raises(ConfigError, match="amqps://"):
        amqp_ssl_context("amqp://u:p@mq/", files.ca_cert)
    with pytest.raises(ConfigError, match="not both"):
        amqp_ssl_context("amqps://u:p@mq/?cafile=/etc/ca.pem", files.ca_cert)
    with pytest.raises(ConfigError, match="go together"):
        amqp_ssl_context("amqps://u:p@mq/", files.ca_cert, cert=files.server_cert)
    with pytest.raises(ConfigError, match="cannot set up TLS"):
        amqp_ssl_context("amqps://u:p@mq/", files.directory / "missing.pem")


def test_client_context_loads_a_client_certificate_and_refuses_a_mismatched_key(
    files: TlsFiles,
) -> None:
    init_tls(files)
    cert, key = issue_client_cert(files, "web-1")
    client_ssl_context(files.ca_cert, cert, key)
    with pytest.raises(ConfigError, match="cannot set up TLS"):
        client_ssl_context(files.ca_cert, cert, files.server_key)


def _agent_config(tmp_path: Path, url: str, **tls: Any) -> AgentConfig:
    key, _ = load_or_create_private_key(tmp_path / "cp.key")
    return AgentConfig(
        name="mq-agent",
        state_dir=tmp_path / "state",
        amqp_url=url,
        control_plane_key=public_key_text(key.public_key()),
        reconnect_initial=0.05,
        reconnect_max=0.1,
        **tls,
    )


def test_agent_config_checks_its_tls_settings(tmp_path: Path, files: TlsFiles) -> None:
    init_tls(files)
    cert, key = issue_client_cert(files, "mq-agent")
    _agent_config(tmp_path, "amqps://u:p@mq/", amqp_tls_ca=files.ca_cert)
    _agent_config(
        tmp_path, "amqps://u:p@mq/", amqp_tls_ca=files.ca_cert, amqp_tls_cert=cert,
        amqp_tls_key=key,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="amqps://"):
        _agent_config(tmp_path, "amqp://u:p@127.0.0.1/", amqp_tls_ca=files.ca_cert)
    with pytest.raises(ConfigError, match="go together"):
        _agent_config(tmp_path, "amqps://u:p@mq/", amqp_tls_cert=cert)
    with pytest.raises(ConfigError, match="tls_server_name needs tls_ca"):
        AgentConfig(server="127.0.0.1:1", name="a", tls_server_name="cp.example.com")
    AgentConfig(server="127.0.0.1:1", name="a", tls_ca=files.ca_cert, tls_server_name="x")


class _Handler:
    def hello(self) -> Any:
        raise AssertionError("never connected")


async def test_agent_and_server_hand_the_context_to_aio_pika(
    tmp_path: Path, files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    init_tls(files)
    seen: list[dict[str, Any]] = []
    called = asyncio.Event()

    async def refuse(url: str, **kwargs: Any) -> Any:
        seen.append({"url": url, **kwargs})
        called.set()
        raise ConnectionRefusedError("no broker in a unit test")

    monkeypatch.setattr(aio_pika, "connect", refuse)
    monkeypatch.setattr(aio_pika, "connect_robust", refuse)
    url = "amqps://u:p@mq.example.com:5671/"
    config = _agent_config(tmp_path, url, amqp_tls_ca=files.ca_cert)
    key, _ = load_or_create_private_key(tmp_path / "agent.key")
    link = AgentAmqpLink(config, _Handler(), signing_key=key)  # type: ignore[arg-type]
    running = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(called.wait(), WAIT)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert seen[0]["url"] == url and isinstance(seen[0]["ssl_context"], ssl.SSLContext)

    seen.clear()
    context = amqp_ssl_context(url, files.ca_cert)
    server = ServerAmqpLink(
        url, signing_key=key, heartbeat_interval=1, offline_after_missed=3, ssl_context=context
    )
    with pytest.raises(ConfigError, match="cannot reach RabbitMQ"):
        await server.start(None)  # type: ignore[arg-type]
    assert seen[0]["ssl_context"] is context


async def _tls_listener(files: TlsFiles) -> tuple[asyncio.Server, int, asyncio.Event]:
    """A TLS listener with the server certificate that notes a completed handshake, then
    hangs up (it speaks no AMQP)."""
    handshakes = asyncio.Event()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.server_cert, files.server_key)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshakes.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_context)
    return server, server.sockets[0].getsockname()[1], handshakes


@pytest.mark.parametrize("trusted", [True, False])
async def test_aio_pika_verifies_the_broker_with_the_context(
    tmp_path: Path, files: TlsFiles, trusted: bool
) -> None:
    init_tls(files)
    other = TlsFiles(tmp_path / "other")
    init_tls(other)
    server, port, handshakes = await _tls_listener(files)
    url = f"amqps://guest:guest@localhost:{port}/"
    context = amqp_ssl_context(url, (files if trusted else other).ca_cert)
    try:
        with pytest.raises(Exception) as raised:
            await aio_pika.connect(url, ssl_context=context, timeout=WAIT)
    finally:
        server.close()
        await server.wait_closed()
    failure = repr(raised.value) + repr(raised.value.__cause__)
    if trusted:
        assert handshakes.is_set()
        assert "CERTIFICATE_VERIFY_FAILED" not in failure
    else:
        assert not handshakes.is_set()
        assert "CERTIFICATE_VERIFY_FAILED" in failure or "certificate verify failed" in failure
