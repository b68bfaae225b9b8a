"""The ``opsplane`` command: one Typer app, one module per verb group."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Annotated

import typer

from opsplane.cli import hosts, run, tasks
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
app.add_typer(hosts.app, name="hosts", help="List and inspect hosts")
app.add_typer(tasks.app, name="tasks", help="List, inspect, cancel and follow tasks")

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
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _settings(**flags: object) -> Settings:
    try:
        return load_settings(**flags)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def _start_control_plane(
    mode: str,
    config: Path | None,
    listen: str | None,
    grpc_listen: str | None,
    data_dir: Path | None,
    database_url: str | None,
    verbose: bool,
) -> None:
    from opsplane.cli import processes

    settings = _settings(
        config_file=config,
        listen=listen,
        grpc_listen=grpc_listen,
        data_dir=data_dir,
        database_url=database_url,
    )
    processes.configure_logging(verbose)
    if mode == "demo":
        processes.run_demo(settings)
    else:
        processes.serve(settings)


@app.command()
def server(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    grpc_listen: GrpcListenOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Start the control plane: the REST API and the gRPC agent endpoint."""
    _start_control_plane("server", config, listen, grpc_listen, data_dir, database_url, verbose)


@app.command()
def demo(
    config: ConfigOpt = None,
    listen: ListenOpt = None,
    grpc_listen: GrpcListenOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Start the control plane on SQLite plus three local agents: demo-1, demo-2 (group web)
    and demo-3 (group db). Ctrl-C stops everything."""
    _start_control_plane("demo", config, listen, grpc_listen, data_dir, database_url, verbose)


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
    verbose: VerboseOpt = False,
) -> None:
    """Start an agent: dial the control plane, run what it sends, stream results back."""
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
        )
        if state_dir is not None:
            config = dataclasses.replace(config, state_dir=state_dir)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    configure_logging(verbose)
    run_agent(config)


def main() -> None:
    app()
