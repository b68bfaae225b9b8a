"""The ``opsplane`` command: one Typer app, one module per verb group.

The client verbs (``run``, ``hosts``, …) are imported only when invoked (cli/lazy.py), and the
control plane's commands here import the settings and the server inside their bodies: starting
``opsplane run`` must not pay for the server, the ORM or the verbs it does not run
(docs/scale.md, "CLI start-up").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from opsplane.cli.lazy import LazyGroup, LazyVerb
from opsplane.cli.options import RUN_CONTEXT_SETTINGS, ClientOptions
from opsplane.cli.starting import (
    configure_logging_or_exit,
    settings_or_exit,
    start_control_plane,
)
from opsplane.domain.errors import ConfigError

if TYPE_CHECKING:
    pass


def _group(module: str, help: str) -> LazyVerb:
    return LazyVerb(f"opsplane.cli.{module}", "app", help)


class _Verbs(LazyGroup):
    lazy = {
        "run": LazyVerb(
            "opsplane.cli.run",
            "run_command",
            "Run a command on hosts and stream every host's output live.",
            RUN_CONTEXT_SETTINGS,
        ),
        "push": LazyVerb(
            "opsplane.cli.run",
            "push_command",
            "Copy a file or a directory (recursively) to SSH hosts and gRPC agents.",
        ),
        "hosts": _group("hosts", "List and inspect hosts"),
        "tasks": _group("tasks", "List, inspect, cancel and follow tasks"),
        "users": _group("users", "Add, list and change users (admin)"),
        "tokens": _group("tokens", "Create, list and revoke API tokens (admin)"),
        "agents": _group("agents", "Enroll, list and revoke agents (admin)"),
        "audit": _group("audit", "Read, export and verify the audit trail (admin)"),
        "scripts": _group("scripts", "Approve seed-003 scripts by content hash"),
        "templates": _group("templates", "List, show, create and launch job templates"),
        "schedules": _group("schedules", "Schedule templates: cron or interval, history"),
        "config": _group(
            "config_cmd", "Effective settings (with their sources) and their reference"
        ),
        "doctor": LazyVerb(
            "opsplane.cli.doctor",
            "doctor",
            "Check the database, RabbitMQ, keys, certificates, clock and disk.",
        ),
        "systemd-unit": LazyVerb(
            "opsplane.cli.units",
            "systemd_unit",
            "Print a systemd unit for the server, an agent or a worker.",
        ),
        "catalog-service": _group(
            "catalog_service", "Seed 004's celery-service: `run` takes its flags and CS_* variables"
        ),
    }
    order = ("run", "push", "server", "demo", "agent", "worker", *lazy, "db", "keys")


app = typer.Typer(
    cls=_Verbs,
    no_args_is_help=True,
    help="opsplane: run a command on one server or ten thousand and watch every host live.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="OPSPLANE_URL", help="API address the client verbs talk to")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(envvar="OPSPLANE_TOKEN", help="API token (Bearer)")
    ] = None,
) -> None:
    ctx.obj = ClientOptions(url=url.rstrip("/"), token=token)


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="OPSPLANE_CONFIG_FILE", help="YAML settings file")
]
ListenOpt = Annotated[str | None, typer.Option(help="HTTP API address HOST:PORT [127.0.0.1:8000]")]
GrpcListenOpt = Annotated[
    str | None, typer.Option(help="gRPC agent endpoint HOST:PORT [127.0.0.1:50051]")
]
DataDirOpt = Annotated[Path | None, typer.Option(help="data directory (database, logs, keys)")]
DatabaseUrlOpt = Annotated[
    str | None, typer.Option(help="SQLAlchemy URL [sqlite in the data directory]")
]
# The broker a seed-002 agent on this machine talks to (RabbitMQ's own default account).
SEED002_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
AmqpUrlOpt = Annotated[
    str | None, typer.Option(help="RabbitMQ URL: enables the RabbitMQ link (seed 002)")
]
CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog",
        "--external-task-config",
        help="seed 004 catalog of external tasks (YAML) [env OPSPLANE_CATALOG, CS_EXTERNAL_TASK]",
    ),
]
CatalogCollectDirOpt = Annotated[
    Path | None, typer.Option(help="where collected catalog scripts live [collect/ by the catalog]")
]
CatalogLogsDirOpt = Annotated[
    Path | None, typer.Option(help="where catalog <name>.log files go [<data dir>/logs]")
]
CatalogRetentionOpt = Annotated[
    float | None, typer.Option(help="seconds a finished async catalog session is kept [3600]")
]
ScriptDirOpt = Annotated[
    list[Path] | None,
    typer.Option("--script-dir", help="seed 003: POST /tasks runs scripts from here (repeatable)"),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar="OPSPLANE_LOG_FORMAT",
        help="text, or json: one object per line with task_id/run_id/host where one applies",
    ),
]


@app.command()
def server(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    grpc_listen: GrpcListenOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    amqp_url: AmqpUrlOpt = None,
    catalog: CatalogOpt = None,
    catalog_collect_dir: CatalogCollectDirOpt = None,
    catalog_logs_dir: CatalogLogsDirOpt = None,
    catalog_session_retention: CatalogRetentionOpt = None,
    script_dir: ScriptDirOpt = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="certificate (PEM): serve the API over HTTPS")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the HTTPS certificate's key")] = None,
    compat_anonymous: Annotated[
        list[str] | None,
        typer.Option(
            "--compat-anonymous",
            help="seed000, seed003 or seed004 (repeatable): let that seed API's clients call "
            "without a token, from loopback (docs/security.md)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """Start the control plane: the REST API and the gRPC agent endpoint."""
    start_control_plane(
        "server",
        verbose,
        log_format,
        tls_cert=tls_cert,
        tls_key=tls_key,
        config_file=config,
        listen=listen,
        grpc_listen=grpc_listen,
        data_dir=data_dir,
        database_url=database_url,
        amqp_url=amqp_url,
        catalog=catalog,
        catalog_collect_dir=catalog_collect_dir,
        catalog_logs_dir=catalog_logs_dir,
        catalog_session_retention=catalog_session_retention,
        script_dirs=script_dir or None,
        compat_anonymous=compat_anonymous or None,
    )


@app.command()
def demo(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    grpc_listen: GrpcListenOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    amqp_url: AmqpUrlOpt = None,
    catalog: CatalogOpt = None,
    catalog_collect_dir: CatalogCollectDirOpt = None,
    catalog_logs_dir: CatalogLogsDirOpt = None,
    catalog_session_retention: CatalogRetentionOpt = None,
    script_dir: ScriptDirOpt = None,
    seed002: Annotated[
        bool,
        typer.Option(
            "--seed002",
            help="also let agents written from seed 002 alone join over RabbitMQ on loopback: "
            f"the RabbitMQ link (--amqp-url, default {SEED002_AMQP_URL}) with "
            "require_enrollment off (a warning is printed; docs/compat.md)",
        ),
    ] = False,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """Start the control plane on SQLite plus three local agents: demo-1, demo-2 (group web)
    and demo-3 (group db). Ctrl-C stops everything."""
    if seed002:
        amqp_url = amqp_url or SEED002_AMQP_URL
    start_control_plane(
        "demo",
        verbose,
        log_format,
        require_enrollment=False if seed002 else None,
        config_file=config,
        listen=listen,
        grpc_listen=grpc_listen,
        data_dir=data_dir,
        database_url=database_url,
        amqp_url=amqp_url,
        catalog=catalog,
        catalog_collect_dir=catalog_collect_dir,
        catalog_logs_dir=catalog_logs_dir,
        catalog_session_retention=catalog_session_retention,
        script_dirs=script_dir or None,
    )


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
def agent(ctx: typer.Context) -> None:
    """Start an agent: dial the control plane (or join RabbitMQ with --amqp-url), run what it
    sends, stream results back. `opsplane agent --help` lists its flags."""
    # The agent's flags live in cli/agent_main.py, which `opsplane agent` reaches without
    # this app (cli/entry.py); this verb serves `opsplane --url … agent …`.
    from opsplane.cli.agent_main import main as agent_main

    agent_main(ctx.args, prog="opsplane agent")


@app.command()
def worker(
    amqp_url: Annotated[
        str, typer.Option("--amqp-url", envvar="OPSPLANE_AMQP_URL", help="RabbitMQ URL")
    ],
    known_hosts: Annotated[
        Path | None,
        typer.Option(help="OpenSSH known_hosts checked on every hop [~/.ssh/known_hosts]"),
    ] = None,
    trust_on_first_use: Annotated[
        bool, typer.Option(help="accept and record unknown host keys (never changed ones)")
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, help="SSH runs executed at once (= prefetch)")
    ] = 10,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
) -> None:
    """Run SSH work for a control plane with ssh_workers: true (docs/ssh.md)."""
    import asyncio

    from opsplane.transport.ssh import HostKeyPolicy, SshExecutor
    from opsplane.transport.ssh.worker import SshWorker

    configure_logging_or_exit(verbose, log_format)
    policy = HostKeyPolicy(known_hosts, trust_on_first_use)
    the_worker = SshWorker(
        amqp_url, SshExecutor(policy, max_parallel=concurrency), concurrency=concurrency
    )
    try:
        asyncio.run(the_worker.run_forever())
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        pass


db_app = typer.Typer(no_args_is_help=True)
app.add_typer(db_app, name="db", help="The control plane's database")


@db_app.command("backup")
def db_backup(
    target: Annotated[Path, typer.Argument(help="the new backup file")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Copy the embedded SQLite database to TARGET while the server runs (SQLite's online
    backup; MySQL and PostgreSQL: their own tools, docs/operations.md)."""
    from opsplane.store.backup import backup_sqlite, sqlite_path

    settings = settings_or_exit(config_file=config, data_dir=data_dir, database_url=database_url)
    try:
        pages = backup_sqlite(sqlite_path(settings.effective_database_url), target)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"backed up {pages} pages to {target}")


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None
) -> None:
    """Apply every pending schema migration (the server also does this at start-up)."""
    import asyncio

    from opsplane.store.database import create_engine, masked_url
    from opsplane.store.migrate import upgrade_to_head

    settings = settings_or_exit(config_file=config, data_dir=data_dir, database_url=database_url)
    url = settings.effective_database_url

    async def _upgrade() -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(_upgrade())
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"database at {masked_url(url)} is at the newest schema")


keys_app = typer.Typer(no_args_is_help=True)
app.add_typer(
    keys_app, name="keys", help="The control plane's command-signing key and TLS certificates"
)


@keys_app.command("init")
def keys_init(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san",
            metavar="NAME",
            help="another DNS name or IP address agents reach the gRPC endpoint by (repeatable)",
        ),
    ] = None,
    renew_server: Annotated[
        bool,
        typer.Option(help="issue a new gRPC server certificate (same CA: agents keep theirs)"),
    ] = False,
) -> None:
    """Create, once, the control plane's Ed25519 signing key (its public key, printed, is what
    RabbitMQ agents pin with --control-plane-key) and a small CA with a gRPC server
    certificate under <data dir>/tls (docs/tls.md)."""
    from opsplane.security.secrets import ensure_secret_key
    from opsplane.security.signing import load_or_create_private_key, public_key_text
    from opsplane.security.tls import TlsFiles, init_tls

    settings = settings_or_exit(config_file=config, data_dir=data_dir)
    try:
        key, created = load_or_create_private_key(settings.signing_key_path)
        secrets_created = ensure_secret_key(settings.secret_key_path)
        tls = init_tls(
            TlsFiles.of(settings.data_dir), extra_names=san or (), renew_server=renew_server
        )
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    verb = "created" if created else "already exists"
    typer.echo(f"signing key {verb}: {settings.signing_key_path}", err=True)
    verb = "created" if secrets_created else "already exists"
    typer.echo(f"secrets key {verb}: {settings.secret_key_path}", err=True)
    files = tls.files
    typer.echo(
        f"TLS CA {'created' if tls.ca_created else 'already exists'}: {files.ca_cert} "
        f"(key {files.ca_key}, mode 0600)",
        err=True,
    )
    typer.echo(
        f"gRPC server certificate {'created' if tls.server_created else 'already exists'}: "
        f"{files.server_cert}, valid until {tls.server_expires:%Y-%m-%d}, for "
        f"{', '.join(tls.server_names)}",
        err=True,
    )
    if tls.missing_names:
        typer.secho(
            f"  it lacks {', '.join(tls.missing_names)}: add with `opsplane keys init "
            f"--renew-server{''.join(f' --san {n}' for n in tls.missing_names)}`",
            fg="yellow",
            err=True,
        )
    typer.echo(
        "  the gRPC endpoint serves it unless grpc_tls_cert/grpc_tls_key are set (restart the "
        f"server); copy {files.ca_cert} to each agent and start it with\n"
        f"  opsplane agent --server HOST:PORT --tls-ca /path/to/ca.pem",
        err=True,
    )
    typer.echo(f"public key (also in {settings.signing_key_path.with_suffix('.pub')}):", err=True)
    typer.echo(public_key_text(key.public_key()))


@keys_app.command("client-cert")
def keys_client_cert(
    name: Annotated[str, typer.Argument(help="the agent's name (its --name)")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing certificate of that name")
    ] = False,
) -> None:
    """Issue a client certificate (1 year) for the agent NAME, signed by the control plane's CA,
    for mutual TLS (grpc_tls_client_ca). The control plane accepts it only from an agent of that
    name."""
    from opsplane.security.tls import TlsFiles, issue_client_cert

    settings = settings_or_exit(config_file=config, data_dir=data_dir)
    files = TlsFiles.of(settings.data_dir)
    try:
        cert, key = issue_client_cert(files, name, overwrite=overwrite)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"client certificate: {cert}", err=True)
    typer.echo(f"key (mode 0600): {key}", err=True)
    typer.echo(
        f"copy both and {files.ca_cert} to the agent (keep the key 0600) and start it with\n"
        f"  opsplane agent --name {name} --server HOST:PORT --tls-ca ca.pem "
        f"--tls-cert {cert.name} --tls-key {key.name}",
        err=True,
    )


def main() -> None:
    app()
