"""The control plane's own small certificate authority, and TLS settings turned into contexts.

``opsplane keys init`` creates, under ``<data dir>/tls/``:

- ``ca.pem`` / ``ca.key``: a self-signed CA (ECDSA P-256, 10 years) that agents pin with
  ``--tls-ca``; it signs nothing but opsplane's own certificates;
- ``server.pem`` / ``server.key``: the gRPC endpoint's certificate (1 year), for ``localhost``,
  ``127.0.0.1``, ``::1``, this machine's host name and any ``--san`` given;
- ``clients/<name>.pem`` / ``.key``: client certificates for mutual TLS, one per agent, issued
  by ``opsplane keys client-cert NAME``.

P-256 rather than Ed25519: gRPC's TLS stack (BoringSSL) and most RabbitMQ/Erlang builds accept
ECDSA P-256 everywhere, Ed25519 certificates not reliably. Private keys are written with mode
0600, never overwritten in place (a renewal writes new files and renames them over the old).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.domain.targeting import check_host_name

CA_VALIDITY: Final = dt.timedelta(days=3650)
SERVER_VALIDITY: Final = dt.timedelta(days=365)
CLIENT_VALIDITY: Final = dt.timedelta(days=365)
# Certificates start a little in the past, so that a peer whose clock is slightly behind
# does not find them "not yet valid".
_BACKDATE: Final = dt.timedelta(minutes=5)
_ORGANIZATION: Final = "opsplane"
# URL query parameters aiormq reads TLS files from; settings and these must not both be given.
_AMQP_TLS_QUERY: Final = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile"})


@dataclass(frozen=True)
class TlsFiles:
    """Where the control plane's CA and certificates live: ``<data dir>/tls``."""

    directory: Path

    @classmethod
    def of(cls, data_dir: Path) -> TlsFiles:
        return cls(data_dir / "tls")

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.directory / "clients" / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.directory / "clients" / f"{name}.key"


@dataclass(frozen=True)
class TlsInit:
    """What :func:`init_tls` did."""

    files: TlsFiles
    ca_created: bool
    server_created: bool
    # The names the server certificate is valid for (the existing one's, if it was kept).
    server_names: tuple[str, ...]
    server_expires: dt.datetime
    # Names asked for that the kept server certificate lacks (renew it to add them).
    missing_names: tuple[str, ...] = ()


def default_server_names(extra: Iterable[str] = ()) -> list[str]:
    """``localhost``, the loopback addresses, this machine's names, then ``extra``; no
    duplicates, in that order."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(), *extra]
    seen: list[str] = []
    for name in names:
        name = name.strip()
        if name and name.lower() not in {s.lower() for s in seen}:
            seen.append(name)
    return seen


def init_tls(
    files: TlsFiles,
    *,
    extra_names: Sequence[str] = (),
    renew_server: bool = False,
    now: dt.datetime | None = None,
) -> TlsInit:
    """Create the CA and the gRPC server certificate unless they exist (idempotent).

    An existing CA is always kept: agents pin it. An existing server certificate is kept
    unless ``renew_server``; then a new key and certificate for the default names, the old
    certificate's names and ``extra_names`` replace it (the CA, and so every agent's
    ``--tls-ca``, stays the same).
    """
    now = now or dt.datetime.now(dt.UTC)
    for name in extra_names:
        _check_name(name)
    ca_cert, ca_key, ca_created = _load_or_create_ca(files, now)
    wanted = default_server_names(extra_names)
    existing = _exists_pair(files.server_cert, files.server_key)
    if existing and not ca_created:
        cert = load_certificate(files.server_cert)
        names = tuple(certificate_names(cert))
        if not renew_server:
            missing = tuple(n for n in wanted if _normal(n) not in {_normal(x) for x in names})
            return TlsInit(files, False, False, names, cert.not_valid_after_utc, missing)
        # A renewal keeps the names the certificate had: agents still dial them.
        wanted = default_server_names([*extra_names, *names])
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf_builder(ca_cert, key, common_name=socket.gethostname() or "localhost", now=now)
    cert = (
        builder.not_valid_after(now + SERVER_VALIDITY)
        .add_extension(_alt_names(wanted), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(files.server_cert, files.server_key, cert, key)
    return TlsInit(files, ca_created, True, tuple(wanted), cert.not_valid_after_utc)


def issue_client_cert(
    files: TlsFiles,
    name: str,
    *,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """A client certificate for the agent called ``name`` (CN and DNS name ``name``), signed
    by the CA; returns the certificate's and the key's paths. With mutual TLS the control
    plane accepts it only from an agent of that name."""
    try:
        check_host_name(name)
    except InvalidInput as e:
        raise ConfigError(str(e)) from e
    if name in {".", ".."} or (len(name) > 64 and not _is_dns_name(name)):
        # The name is the certificate's common name (64 characters at most) or a DNS name.
        raise ConfigError(f"cannot issue a certificate for the agent name {name!r}")
    if not _exists_pair(files.ca_cert, files.ca_key):
        raise ConfigError(f"no CA in {files.directory}: run `opsplane keys init` first")
    cert_path, key_path = files.client_cert(name), files.client_key(name)
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise ConfigError(f"{cert_path} exists already (--overwrite issues a new one)")
    now = now or dt.datetime.now(dt.UTC)
    ca_cert, ca_key = load_certificate(files.ca_cert), _load_key(files.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf_builder(ca_cert, key, common_name=name[:64], now=now)
    san: list[x509.GeneralName] = []
    if _is_dns_name(name):
        san.append(x509.DNSName(name))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = (
        builder.not_valid_after(now + CLIENT_VALIDITY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the certificate {path}: {e}") from e


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses of a certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def resolve_grpc_server_files(
    cert: Path | None, key: Path | None, data_dir: Path
) -> tuple[Path, Path] | None:
    """The certificate and key the gRPC endpoint serves: the configured pair, else the one
    ``keys init`` generated (if any), else None (plaintext)."""
    if (cert is None) != (key is None):
        raise ConfigError("grpc_tls_cert and grpc_tls_key go together")
    if cert is not None and key is not None:
        return cert, key
    files = TlsFiles.of(data_dir)
    if files.server_cert.exists():
        if not files.server_key.exists():
            raise ConfigError(f"{files.server_cert} exists without {files.server_key}")
        return files.server_cert, files.server_key
    return None


def client_ssl_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context (TLS 1.2 or newer) that verifies the server and its host name
    against ``ca`` (the system's CAs without it) and presents ``cert``/``key`` if given."""
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate and its key go together")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot set up TLS: {e}") from e
    return context


def amqp_ssl_context(
    url: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """The SSLContext for aio-pika's ``connect(..., ssl_context=)`` from the amqp_tls_*
    settings, or None when none is set (aiormq then verifies an ``amqps://`` server against
    the system's CAs, or the URL's own ``?cafile=…&certfile=…&keyfile=…``)."""
    if ca is None and cert is None and key is None:
        return None
    parts = urlsplit(url)
    if parts.scheme != "amqps":
        raise ConfigError("a RabbitMQ CA or client certificate needs an amqps:// URL")
    given = {name for name, _ in parse_qsl(parts.query)} & _AMQP_TLS_QUERY
    if given:
        # aiormq ignores the URL's files once it is handed a context: refuse rather than
        # silently drop half of the configuration.
        in_url = ", ".join(sorted(given))
        raise ConfigError(
            f"give RabbitMQ's TLS files either as settings or in the URL ({in_url}), not both"
        )
    return client_ssl_context(ca, cert, key)


def _load_or_create_ca(
    files: TlsFiles, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    if _exists_pair(files.ca_cert, files.ca_key):
        return load_certificate(files.ca_cert), _load_key(files.ca_key), False
    if files.ca_cert.exists() or files.ca_key.exists():
        raise ConfigError(
            f"{files.directory} holds only half of the CA (ca.pem and ca.key go together); "
            "restore the missing file, or move the directory away to start a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"opsplane CA {socket.gethostname()}"[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(files.ca_cert, files.ca_key, cert, key)
    return cert, key, True


def _leaf_builder(
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    now: dt.datetime,
) -> x509.CertificateBuilder:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # ECDSA keys sign (the handshake, or certificates for the CA); they never encipher.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


def _check_name(name: str) -> None:
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    if not _is_dns_name(name):
        raise ConfigError(f"not a host name or IP address for a certificate: {name!r}")


def _is_dns_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label.isascii()
        and all(c.isalnum() or c in "-_*" for c in label)
        and not label.startswith("-")
        for label in labels
    )


def _normal(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower().rstrip(".")


def _exists_pair(cert: Path, key: Path) -> bool:
    return cert.exists() and key.exists()


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the private key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} does not hold an ECDSA private key")
    return key


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """Write the key (0600) and the certificate (0644), each to a new file renamed into place,
    the key first: a reader never sees a half-written file or a key readable by others."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(key_path, pem_key, 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600 whatever the umask; the final mode is set before the rename.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
