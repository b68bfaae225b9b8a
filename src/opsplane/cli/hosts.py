"""``opsplane hosts``: list the fleet; ``show NAME``: one host in detail; ``add``/``import``:
agentless hosts; ``remove NAME...``: forget hosts."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.text import Text

from opsplane.cli.client import ApiClient, ApiError
from opsplane.cli.output import (
    dump_json,
    make_console,
    now_utc,
    reporting_errors,
)
from opsplane.cli.run import client_options
from opsplane.cli.tables import (
    host_detail,
    hosts_caption,
    hosts_table,
)


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
    adhoc: Annotated[
        bool,
        typer.Option(
            "--adhoc", help="Also the ad-hoc SSH targets of seed-000 requests (group adhoc)."
        ),
    ] = False,
) -> None:
    """List the hosts: status, link, groups, CPU, memory, load and when each was last seen.

    Ad-hoc SSH targets that seed-000 requests brought are not inventory hosts: shown with
    --adhoc only."""
    if ctx.invoked_subcommand is not None:
        return
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        hosts = api.list_all_hosts(
            group=group, status=status.value if status else None, adhoc=adhoc
        )
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


@app.command("add")
def add_host(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The host's name in opsplane.")],
    ssh: Annotated[
        str | None, typer.Option("--ssh", help="[user@]address[:port] to log in to.")
    ] = None,
    link: Annotated[
        str,
        typer.Option(
            "--link",
            help="ssh (agentless, needs --ssh) or amqp (a RabbitMQ agent's host: its groups "
            "and labels, for agents whose heartbeat names none, such as seed 002's).",
        ),
    ] = "ssh",
    bastion: Annotated[
        str, typer.Option("--bastion", help="Jump host chain: ops@edge:22[,ops@inner].")
    ] = "",
    key_file: Annotated[
        str | None, typer.Option("--key-file", help="Private key (default: ssh-agent, ~/.ssh).")
    ] = None,
    bastion_key_file: Annotated[
        str | None, typer.Option("--bastion-key-file", help="Private key for the bastions.")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="Group membership (repeatable).")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Register an agentless host reached over SSH (optionally through bastions), or with
    --link amqp the groups and labels of a RabbitMQ agent's host."""
    err = make_console(stderr=True)
    if link not in ("ssh", "amqp"):
        raise typer.BadParameter(f"--link is ssh or amqp, not {link!r}", ctx=ctx)
    if (link == "ssh") != bool(ssh):
        wanted = "--link ssh needs --ssh" if link == "ssh" else "--link amqp takes no --ssh"
        raise typer.BadParameter(wanted, ctx=ctx)
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--label wants KEY=VALUE, got {item!r}", ctx=ctx)
        labels[key] = value
    body: dict[str, object] = {"name": name, "groups": list(group or []), "labels": labels}
    if link == "amqp":
        body["link"] = link
    else:
        body |= {"ssh": ssh, "bastion": bastion, "key_file": key_file,
                 "bastion_key_file": bastion_key_file}  # fmt: skip
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        host = api.add_ssh_host(body)
    if link == "amqp":
        typer.echo(f"added {host.get('name')} (amqp, groups: {','.join(group or []) or '-'})")
    else:
        typer.echo(f"added {host.get('name')} (ssh {ssh}{' via ' + bastion if bastion else ''})")


@app.command("remove")
def remove_hosts(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="The hosts to forget.")],
) -> None:
    """Forget hosts (admin): their rows and heartbeat history; their past runs stay. A connected
    agent, or a host with runs waiting or in flight, is refused: stop or revoke the agent, or
    cancel those tasks, first. An agent that connects later registers again."""
    err = make_console(stderr=True)
    failed = 0
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        for name in names:
            try:
                api.remove_host(name)
            except ApiError as e:
                if e.status_code >= 500 or e.status_code in (401, 403):
                    raise
                err.print(f"{name}: {e}")
                failed += 1
                continue
            typer.echo(f"removed {name}")
    if failed:
        raise typer.Exit(2)


@app.command("import")
def import_hosts(
    ctx: typer.Context,
    inventory: Annotated[
        Path, typer.Argument(metavar="FILE", help="YAML list of SSH hosts.", exists=True)
    ],
) -> None:
    """Register every host of an inventory file: a YAML list of entries with the fields of
    `hosts add` (name, ssh, bastion, key_file, bastion_key_file, groups, labels; `link: amqp`
    for a RabbitMQ agent's host, with name, groups and labels only)."""
    err = make_console(stderr=True)
    try:
        entries = yaml.safe_load(inventory.read_text())
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"{inventory} is not YAML: {e}", ctx=ctx) from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise typer.BadParameter(f"{inventory} must hold a list of host entries", ctx=ctx)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        for number, entry in enumerate(entries, start=1):
            try:
                api.add_ssh_host(entry)
            except ApiError as e:
                err.print(f"entry #{number} ({entry.get('name', '?')}): {e}")
                raise typer.Exit(2) from e
    typer.echo(f"registered {len(entries)} hosts from {inventory}")
