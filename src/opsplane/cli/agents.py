"""``opsplane agents``: enrollment tokens, enrolled agents, revocation (admin)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import ApiClient, CliError, Json
from opsplane.cli.output import (
    dump_json,
    make_console,
    reporting_errors,
)
from opsplane.cli.run import client_options
from opsplane.domain.errors import InvalidInput
from opsplane.security.tokens import parse_duration

app = typer.Typer(no_args_is_help=True, help="Enroll, list and revoke agents (admin).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("token")
def create_enrollment_token(
    ctx: typer.Context,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", "-g", help="A group the agent may join (repeatable)."),
    ] = None,
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 24h, 90m, 7d.")] = "24h",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The one host name the agent may enroll as (needed for a name already in "
            "the inventory, e.g. to re-enroll a revoked agent).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrollment token and print it, once. The agent enrolled with it may
    join only the given groups, and with --name only as that host (without it, only under a
    name not yet in the inventory): opsplane agent --enroll TOKEN --api-url URL …"""
    err = make_console(stderr=True)
    with reporting_errors(err):
        try:
            lifetime = parse_duration(expires)
        except InvalidInput as e:
            raise CliError(f"--expires: {e}") from e
        if lifetime is None:
            raise CliError("--expires: an enrollment token must expire")
        body: Json = {"groups": list(group or []), "expires_in": int(lifetime.total_seconds())}
        if name is not None:
            body["name"] = name
        with ApiClient(client_options(ctx)) as api:
            created = api.create_enrollment_token(body)
    if as_json:
        typer.echo(dump_json(created))
        return
    groups = ", ".join(created.get("groups") or []) or "no groups"
    bound = f" named {created['name']}" if created.get("name") else ""
    err.print(
        f"enrollment token for one agent{bound} ({groups}), usable until "
        f"{created.get('expires_at')}. "
        "It is shown this once:",
        soft_wrap=True,
    )
    typer.echo(str(created.get("token")))


@app.command("list")
def list_agents(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Enrolled agents, with their groups and whether they were revoked."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        agents = api.list_agents()
    if as_json:
        typer.echo(dump_json({"items": agents}))
        return
    if not agents:
        err.print(Text("no enrolled agents", style="dim"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "GROUPS", "ENROLLED", "STATUS", "KEY"):
        table.add_column(column, no_wrap=column != "GROUPS")
    for agent in agents:
        revoked = agent.get("revoked_at")
        table.add_row(
            str(agent.get("name")),
            ", ".join(agent.get("groups") or []) or "-",
            str(agent.get("enrolled_at"))[:19].replace("T", " "),
            Text("revoked", style="red") if revoked else Text("enrolled", style="green"),
            str(agent.get("public_key"))[:12] + "…",
        )
    make_console().print(table)


@app.command("revoke")
def revoke_agent(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The agent's name.")],
) -> None:
    """Revoke an agent: its connection and every message it signs are refused."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        agent = api.revoke_agent(name)
    err.print(f"agent {agent.get('name')} revoked")


GroupOpt = Annotated[
    str | None, typer.Option("--group", "-g", help="The group whose SSH hosts get the agent.")
]
HostOpt = Annotated[list[str] | None, typer.Option("--host", help="A host, by name (repeatable).")]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="The gRPC endpoint HOST:PORT as the hosts reach it [the control plane's grpc_listen]",
    ),
]
ApiUrlOpt = Annotated[
    str | None,
    typer.Option("--api-url", help="The API as the hosts reach it, to enroll [--url's]"),
]
RemoteDirOpt = Annotated[
    str | None,
    typer.Option(
        "--remote-dir",
        help="Base directory on the hosts [/opt/opsplane-agent for root, else "
        "~/.opsplane-agent]; each agent lives in <base>/<host name>.",
    ),
]
BundleOpt = Annotated[
    str | None,
    typer.Option("--bundle", help="A bundle directory on the control plane [its own install]."),
]
ParallelOpt = Annotated[int, typer.Option("--parallel", help="Hosts worked on at once.")]
InstallOpt = Annotated[
    str | None,
    typer.Option(
        "--install",
        help="How hosts get the agent's dependencies: auto (the bundle's where they load, "
        "else the host python3's, else a venv made by pip), zipapp or venv "
        "[the agent_deploy_install setting].",
    ),
]


@app.command("deploy")
def deploy_agents(
    ctx: typer.Context,
    group: GroupOpt = None,
    host: HostOpt = None,
    server: ServerOpt = None,
    api_url: ApiUrlOpt = None,
    remote_dir: RemoteDirOpt = None,
    bundle: BundleOpt = None,
    parallel: ParallelOpt = 20,
    install: InstallOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deploy the agent over SSH to SSH hosts (opsplane hosts add … --ssh): push the bundle,
    enroll it under the host's name and groups, start it (systemd, else a supervised process)
    and wait until it is online. A host already running this bundle is left alone."""
    body = _body(ctx, group, host, server, api_url, remote_dir, bundle, parallel, install)
    _roll(ctx, body, as_json, upgrade=False)


@app.command("upgrade")
def upgrade_agents(
    ctx: typer.Context,
    group: GroupOpt = None,
    host: HostOpt = None,
    canary: Annotated[
        int, typer.Option("--canary", help="Hosts upgraded first, alone; a failure stops all.")
    ] = 1,
    max_errors: Annotated[
        int, typer.Option("--max-errors", help="Failures tolerated before stopping.")
    ] = 0,
    server: ServerOpt = None,
    api_url: ApiUrlOpt = None,
    remote_dir: RemoteDirOpt = None,
    bundle: BundleOpt = None,
    parallel: ParallelOpt = 20,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            help="Seconds each restart waits for the host's runs in flight to end.",
        ),
    ] = 300.0,
    install: InstallOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the deployed agents with the control plane's version (or --bundle): the canary
    hosts first, then the rest. Each host's new bundle is unpacked and self-checked beside the
    running agent; then its runs in flight are waited for, and the agent is stopped (SIGTERM)
    and started on the new bundle."""
    body = _body(ctx, group, host, server, api_url, remote_dir, bundle, parallel, install)
    body.update(canary=canary, max_errors=max_errors, drain_timeout=drain_timeout)
    _roll(ctx, body, as_json, upgrade=True)


def _body(
    ctx: typer.Context,
    group: str | None,
    hosts: list[str] | None,
    server: str | None,
    api_url: str | None,
    remote_dir: str | None,
    bundle: str | None,
    parallel: int,
    install: str | None,
) -> Json:
    body: Json = {"group": group, "hosts": list(hosts or []), "parallel": parallel}
    for key, value in (
        ("server", server), ("remote_dir", remote_dir), ("bundle", bundle), ("api_url", api_url),
        ("install", install),
    ):  # fmt: skip
        if value:
            body[key] = value
    return body


_STYLES = {"deployed": "green", "current": "cyan", "failed": "red", "skipped": "yellow"}


def _roll(ctx: typer.Context, body: Json, as_json: bool, *, upgrade: bool) -> None:
    """Each host's line as it finishes (a JSON line with --json), then the summary (the
    report as the last JSON line)."""
    err = make_console(stderr=True)
    out = make_console()
    results: list[Json] = []
    report: Json = {}
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        for line in api.deploy_agents_streamed(body, upgrade=upgrade):
            kind = line.pop("type", "")
            if kind == "error":
                raise CliError(str(line.get("detail")))
            if kind == "report":
                report = line
                if as_json:
                    typer.echo(_one_line({"type": "report", **report}))
                continue
            results.append(line)
            if as_json:
                typer.echo(_one_line({"type": "host", **line}))
            else:
                out.print(_host_line(line), soft_wrap=True)
    if not as_json:
        counts: dict[str, int] = {}
        for result in results:
            counts[_shown(result)] = counts.get(_shown(result), 0) + 1
        summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no host"
        err.print(
            f"{summary} · bundle {str(report.get('digest'))[:12]} · {report.get('seconds')} s"
        )
    if any(r.get("outcome") in ("failed", "skipped") for r in results):
        raise typer.Exit(1)


def _one_line(value: Json) -> str:
    return json.dumps(value, separators=(",", ":"))


def _shown(result: Json) -> str:
    outcome = str(result.get("outcome"))
    return str(result.get("shown") or ("already current" if outcome == "current" else outcome))


def _host_line(result: Json) -> Text:
    line = Text()
    line.append(f"{result.get('host')}  ", style="bold")
    line.append(_shown(result), style=_STYLES.get(str(result.get("outcome")), ""))
    line.append(f"  {float(result.get('seconds') or 0):.1f}s  {result.get('detail')}")
    return line
