"""``opsplane doctor``: what stands between this control plane's settings and a working
service, one line per check, each ok / warn / fail with the fix (issue 18, docs/operations.md).

Checks only read: nothing here creates a key, a table or an exchange.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from opsplane.config import Settings
from opsplane.domain.addresses import mask_url
from opsplane.domain.errors import ConfigError
from opsplane.security.tls import TlsFiles, load_certificate
from opsplane.store.database import create_engine, masked_url
from opsplane.store.migrate import schema_revisions

Level = Literal["ok", "warn", "fail"]
LEVELS: tuple[Level, ...] = ("ok", "warn", "fail")

# A certificate this close to its end is a warning; a clock this far off the database's too.
CERT_WARN_BEFORE = timedelta(days=30)
CLOCK_WARN = timedelta(seconds=2)
CLOCK_FAIL = timedelta(seconds=30)
# Free space in the data directory (logs and the SQLite database grow there).
DISK_WARN_BYTES = 1024**3
DISK_FAIL_BYTES = 100 * 1024**2
# Each check that talks to a service gives up after this long.
SERVICE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    detail: str
    hint: str = ""


def worst(findings: list[Finding]) -> Level:
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


async def examine(settings: Settings) -> list[Finding]:
    """Every check, in the order an operator fixes things."""
    findings = await _database(settings)
    findings.append(await _bounded("rabbitmq", lambda: _rabbitmq(settings)))
    findings += _keys(settings)
    findings += _certificates(settings)
    findings.append(_disk(settings.data_dir))
    return findings


async def _bounded(check: str, run: Callable[[], Awaitable[Finding]]) -> Finding:
    try:
        return await asyncio.wait_for(run(), SERVICE_TIMEOUT)
    except TimeoutError:
        return Finding(check, "fail", f"no answer within {SERVICE_TIMEOUT:g}s", "is it running?")


async def _database(settings: Settings) -> list[Finding]:
    url = settings.effective_database_url
    where = masked_url(url)
    if _sqlite_file_missing(url):
        # Connecting would create it: the doctor only reads.
        return [
            Finding("database", "warn", f"{where} does not exist yet", "the server creates it"),
            _clock(None),
        ]
    engine = create_engine(url)
    try:
        current, head = await asyncio.wait_for(schema_revisions(engine), SERVICE_TIMEOUT)
        skew = await asyncio.wait_for(_clock_skew(engine), SERVICE_TIMEOUT)
    except TimeoutError:
        return [Finding("database", "fail", f"{where}: no answer", "is the server running?")]
    except Exception as e:  # any driver's error: the point is to say it, not to crash
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Finding("database", "fail", f"{where}: {reason}", "check database_url")]
    finally:
        await engine.dispose()
    if current == head:
        schema = Finding("database", "ok", f"{where}, schema at {head} (the newest)")
    elif current is None:
        schema = Finding(
            "database",
            "warn",
            f"{where} has no opsplane schema yet",
            "the server creates it at start, or run `opsplane db upgrade`",
        )
    else:
        schema = Finding(
            "database",
            "fail",
            f"{where}: schema at {current}, this opsplane's newest is {head}",
            "run `opsplane db upgrade` (or upgrade opsplane if the database is newer)",
        )
    return [schema, _clock(skew)]


def _sqlite_file_missing(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists()


async def _clock_skew(engine: AsyncEngine) -> timedelta | None:
    """Database time minus ours; None where they are the same clock (SQLite)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return None
    query = "SELECT UTC_TIMESTAMP(6)" if dialect in ("mysql", "mariadb") else "SELECT now()"
    async with engine.connect() as connection:
        before = datetime.now(UTC)
        theirs: datetime = (await connection.execute(text(query))).scalar_one()
        after = datetime.now(UTC)
    if theirs.tzinfo is None:
        theirs = theirs.replace(tzinfo=UTC)
    return theirs - (before + (after - before) / 2)


def _clock(skew: timedelta | None) -> Finding:
    if skew is None:
        return Finding("clock", "ok", "the database is on this machine's clock (SQLite)")
    text_ = f"{skew.total_seconds():+.3f}s against the database"
    hint = "run an NTP client (chrony, systemd-timesyncd) on both machines"
    if abs(skew) >= CLOCK_FAIL:
        return Finding("clock", "fail", text_, hint)
    if abs(skew) >= CLOCK_WARN:
        return Finding("clock", "warn", text_, hint)
    return Finding("clock", "ok", text_)


async def _rabbitmq(settings: Settings) -> Finding:
    if settings.amqp_url is None:
        return Finding(
            "rabbitmq", "ok", "not configured (amqp_url unset): the RabbitMQ link is off"
        )
    import aio_pika

    from opsplane.security.tls import amqp_ssl_context
    from opsplane.transport.amqp import messages as m

    where = mask_url(settings.amqp_url)
    try:
        connection = await aio_pika.connect(
            settings.amqp_url,
            ssl_context=amqp_ssl_context(
                settings.amqp_url,
                settings.amqp_tls_ca,
                settings.amqp_tls_cert,
                settings.amqp_tls_key,
            ),
            timeout=SERVICE_TIMEOUT,
        )
    except Exception as e:
        return Finding("rabbitmq", "fail", f"{where}: {e or type(e).__name__}", "check amqp_url")
    missing = []
    try:
        for name in (m.CMD_EXCHANGE, m.RESULT_EXCHANGE, m.MONITOR_EXCHANGE):
            # A passive declare closes its channel when the exchange is missing: one each.
            channel = await connection.channel()
            try:
                await channel.get_exchange(name, ensure=True)
            except aio_pika.exceptions.ChannelClosed:
                missing.append(name)
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    if missing:
        return Finding(
            "rabbitmq",
            "warn",
            f"{where}: exchanges missing: {', '.join(missing)}",
            "the server declares them at start; start it once",
        )
    return Finding("rabbitmq", "ok", f"{where}, exchanges present")


def _keys(settings: Settings) -> list[Finding]:
    found = []
    for what, path in (
        ("signing key", settings.signing_key_path),
        ("secrets key", settings.secret_key_path),
    ):
        if not path.exists():
            found.append(
                Finding(
                    "keys", "warn", f"{what} {path} is missing", "the server creates it at start"
                )
            )
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            found.append(
                Finding(
                    "keys",
                    "fail",
                    f"{what} {path} is readable by others (mode {mode:04o})",
                    f"chmod 600 {path}",
                )
            )
        else:
            found.append(Finding("keys", "ok", f"{what} {path} (mode {mode:04o})"))
    return found


def _certificates(settings: Settings) -> list[Finding]:
    tls = TlsFiles.of(settings.data_dir)
    paths = {
        "CA": tls.ca_cert,
        "gRPC server certificate": settings.grpc_tls_cert or tls.server_cert,
        "HTTPS certificate": settings.tls_cert,
    }
    found = []
    now = datetime.now(UTC)
    for what, path in paths.items():
        if path is None or not path.exists():
            continue
        try:
            ends = load_certificate(path).not_valid_after_utc
        except ConfigError as e:
            found.append(Finding("tls", "fail", str(e), "replace the file"))
            continue
        left = ends - now
        detail = f"{what} {path} valid until {ends:%Y-%m-%d}"
        if left <= timedelta(0):
            found.append(
                Finding(
                    "tls",
                    "fail",
                    f"{what} {path} expired on {ends:%Y-%m-%d}",
                    "opsplane keys init --renew-server (or a new certificate)",
                )
            )
        elif left < CERT_WARN_BEFORE:
            found.append(
                Finding(
                    "tls",
                    "warn",
                    f"{detail} ({left.days} days left)",
                    "opsplane keys init --renew-server (or a new certificate)",
                )
            )
        else:
            found.append(Finding("tls", "ok", detail))
    if not found:
        found.append(Finding("tls", "ok", "no certificates configured (loopback plaintext)"))
    return found


def _disk(data_dir: Path) -> Finding:
    where = (
        data_dir
        if data_dir.exists()
        else next((p for p in data_dir.parents if p.exists()), Path("/"))
    )
    free = shutil.disk_usage(where).free
    detail = f"{free / 1024**3:.1f} GiB free at {where}"
    hint = "free space, or lower log_retention_days / log_retention_bytes"
    if free < DISK_FAIL_BYTES:
        return Finding("disk", "fail", detail, hint)
    if free < DISK_WARN_BYTES:
        return Finding("disk", "warn", detail, hint)
    return Finding("disk", "ok", detail)
