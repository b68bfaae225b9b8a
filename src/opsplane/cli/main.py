"""The ``opsplane`` command: one Typer app, one module per verb group."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Annotated

import typer

from opsplane.cli import audit, hosts, run, tasks, tokens, users
from opsplane.cli.client import ClientOptions
from opsplane.config import DEFAULT_GRPC_LISTEN, Settings, load_settings
from opsplane.domain.errors import ConfigError

app = typer.Typer(
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


app.command("run", context_settings=run.CONTEXT_SETTINGS)(run.run_command)
app.command("push")(run.push_command)
app.add_typer(hosts.app, name="hosts", help="List and inspect hosts")
app.add_typer(tasks.app, name="tasks", help="List, inspect, cancel and follow tasks")
app.add_typer(users.app, name="users", help="Add, list and change users (admin)")
app.add_typer(tokens.app, name="tokens", help="Create, list and revoke API tokens (admin)")
app.add_typer(audit.app, name="audit", help="Read, export and verify the audit trail (admin)")

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


def _settings(**flags: object) -> Settings:
    try:
        return load_settings(**flags)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def _start_control_plane(mode: str, verbose: bool, **flags: object) -> None:
    from opsplane.cli import processes

    settings = _settings(**flags)
    processes.configure_logging(verbose)
    try:
        if mode == "demo":
            processes.run_demo(settings)
        else:
            processes.serve(settings)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


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
    verbose: VerboseOpt = False,
) -> None:
    """Start the control plane: the REST API and the gRPC agent endpoint."""
    _start_control_plane(
        "server",
        verbose,
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
    verbose: VerboseOpt = False,
) -> None:
    """Start the control plane on SQLite plus three local agents: demo-1, demo-2 (group web)
    and demo-3 (group db). Ctrl-C stops everything."""
    _start_control_plane(
        "demo",
        verbose,
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


@app.command()
def agent(
    server_address: Annotated[
        str,
        typer.Option("--server", envvar="OPSPLANE_AGENT_SERVER", help="control plane HOST:PORT"),
    ] = DEFAULT_GRPC_LISTEN,
    name: Annotated[
        str | None, typer.Option(envvar="OPSPLANE_AGENT_NAME", help="host name [hostname]")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="group membership (repeatable)")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable)")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(envvar="OPSPLANE_AGENT_STATE_DIR", help="durable spool of runs and results"),
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA certificate: connect with TLS, verifying the server")
    ] = None,
    allow_plaintext: Annotated[
        bool, typer.Option(help="allow plaintext to a non-loopback server (trusted networks)")
    ] = False,
    amqp_url: Annotated[
        str | None,
        typer.Option(
            "--amqp-url",
            envvar="OPSPLANE_AGENT_AMQP_URL",
            help="RabbitMQ URL (amqp://, amqps://): use the RabbitMQ link; --server is unused",
        ),
    ] = None,
    control_plane_key: Annotated[
        str | None,
        typer.Option(
            "--control-plane-key",
            envvar="OPSPLANE_AGENT_CONTROL_PLANE_KEY",
            help="the control plane's public key (base64, or a file): required with --amqp-url",
        ),
    ] = None,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            "--heartbeat-interval",
            envvar="OPSPLANE_AGENT_HEARTBEAT_INTERVAL",
            help="seconds between heartbeats on RabbitMQ; must match the control plane's",
        ),
    ] = 10.0,
    replay_window: Annotated[
        float,
        typer.Option(
            "--replay-window",
            envvar="OPSPLANE_AGENT_REPLAY_WINDOW",
            help="refuse RabbitMQ commands whose timestamp is further off than this (seconds)",
        ),
    ] = 300.0,
    verbose: VerboseOpt = False,
) -> None:
    """Start an agent: dial the control plane (or join RabbitMQ with --amqp-url), run what it
    sends, stream results back."""
    from opsplane.agent.config import AgentConfig
    from opsplane.agent.daemon import run_agent
    from opsplane.cli.processes import configure_logging

    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.secho(f"error: --label wants KEY=VALUE, got {item!r}", fg="red", err=True)
            raise typer.Exit(2)
        labels[key] = value
    try:
        config = AgentConfig(
            server=server_address,
            name=name or socket.gethostname(),
            groups=tuple(group or ()),
            labels=labels,
            tls_ca=tls_ca,
            allow_plaintext=allow_plaintext,
            amqp_url=amqp_url or None,
            control_plane_key=control_plane_key or None,
            heartbeat_interval=heartbeat_interval,
            replay_window=replay_window,
        )
        if state_dir is not None:
            config = dataclasses.replace(config, state_dir=state_dir)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    configure_logging(verbose)
    try:
        run_agent(config)
    except ConfigError as e:  # e.g. an unreadable agent key or a state dir in use
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


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
) -> None:
    """Run SSH work for a control plane with ssh_workers: true (docs/ssh.md)."""
    import asyncio

    from opsplane.cli.processes import configure_logging
    from opsplane.transport.ssh import HostKeyPolicy, SshExecutor
    from opsplane.transport.ssh.worker import SshWorker

    configure_logging(verbose)
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


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None
) -> None:
    """Apply every pending schema migration (the server also does this at start-up)."""
    import asyncio

    from opsplane.store.database import create_engine, masked_url
    from opsplane.store.migrate import upgrade_to_head

    settings = _settings(config_file=config, data_dir=data_dir, database_url=database_url)
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
app.add_typer(keys_app, name="keys", help="The control plane's command-signing key")


@keys_app.command("init")
def keys_init(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Create the control plane's Ed25519 signing key (once) and print its public key, which
    every RabbitMQ agent pins with --control-plane-key."""
    from opsplane.security.signing import load_or_create_private_key, public_key_text

    settings = _settings(config_file=config, data_dir=data_dir)
    key, created = load_or_create_private_key(settings.signing_key_path)
    verb = "created" if created else "already exists"
    typer.echo(f"signing key {verb}: {settings.signing_key_path}", err=True)
    typer.echo(f"public key (also in {settings.signing_key_path.with_suffix('.pub')}):", err=True)
    typer.echo(public_key_text(key.public_key()))


def main() -> None:
    app()
