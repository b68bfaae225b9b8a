"""``opsplane hosts``: list the fleet; ``opsplane hosts show NAME``: one host in detail."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.text import Text

from opsplane.cli.client import ApiClient
from opsplane.cli.output import (
    dump_json,
    host_detail,
    hosts_caption,
    hosts_table,
    make_console,
    now_utc,
    reporting_errors,
)
from opsplane.cli.run import client_options


class HostStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="List the hosts, or show one of them.",
)


@app.callback(invoke_without_command=True)
def list_hosts(
    ctx: typer.Context,
    group: Annotated[
        str | None, typer.Option("--group", "-g", help="Only the hosts of this group.")
    ] = None,
    status: Annotated[
        HostStatus | None,
        typer.Option("--status", help="Only hosts with this status.", case_sensitive=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hosts as JSON.")] = False,
) -> None:
    """List the hosts: status, link, groups, CPU, memory, load and when each was last seen."""
    if ctx.invoked_subcommand is not None:
        return
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        hosts = api.list_all_hosts(group=group, status=status.value if status else None)
    if as_json:
        typer.echo(dump_json({"items": hosts, "total": len(hosts)}))
        return
    if not hosts:
        err.print(Text("no hosts match", style="dim"))
        return
    out.print(hosts_table(hosts, now_utc()))
    out.print(Text(hosts_caption(hosts), style="dim"))


@app.command("show")
def show_host(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The host's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the host as JSON.")] = False,
) -> None:
    """Show one host in detail."""
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        host = api.get_host(name)
    if as_json:
        typer.echo(dump_json(host))
        return
    out.print(host_detail(host, now_utc()))
