"""``opsplane tokens``: create (shown once), list and revoke API tokens (admin)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import ApiClient, CliError, Json
from opsplane.cli.output import (
    dump_json,
    format_relative,
    make_console,
    now_utc,
    parse_time,
    reporting_errors,
)
from opsplane.cli.run import client_options
from opsplane.domain.errors import InvalidInput
from opsplane.security.roles import Role
from opsplane.security.tokens import parse_duration

app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API tokens (admin).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _when(value: object, now_text: str = "never") -> str:
    return format_relative(str(value), now_utc()) if value else now_text


def tokens_table(tokens: list[Json]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "ROLE", "GROUPS", "USER", "EXPIRES", "LAST USED", "STATUS"):
        table.add_column(column, no_wrap=column not in ("NAME", "GROUPS"))
    now = now_utc()
    for token in tokens:
        groups = token.get("groups")
        expires = token.get("expires_at")
        expires_at = parse_time(expires)
        if token.get("revoked_at"):
            status = Text("revoked", style="red")
        elif expires_at is not None and expires_at <= now:
            status = Text("expired", style="yellow")
        else:
            status = Text("active", style="green")
        table.add_row(
            str(token.get("id")),
            str(token.get("name")),
            str(token.get("role")),
            ", ".join(groups) if groups else ("all" if token.get("role") == "operator" else "-"),
            str(token.get("user") or "-"),
            str(expires)[:19].replace("T", " ") if expires else "never",
            _when(token.get("last_used_at")),
            status,
        )
    return table


@app.command("create")
def create_token(
    ctx: typer.Context,
    role: Annotated[Role, typer.Option("--role", "-r", help="viewer, operator or admin.")],
    group: Annotated[
        list[str] | None,
        typer.Option("--group", "-g", help="Operators: a group it may run on (repeatable)."),
    ] = None,
    all_groups: Annotated[
        bool, typer.Option("--all-groups", help="Operators: every group.")
    ] = False,
    expires: Annotated[
        str, typer.Option("--expires", help="Lifetime: 30d, 12h, 90m, 2w, or never.")
    ] = "30d",
    name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "",
    user: Annotated[str | None, typer.Option("--user", help="The user it acts for [you].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it, once: only its hash is kept. It never has more role or
    groups than the user it acts for."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        try:
            lifetime = parse_duration(expires)
        except InvalidInput as e:
            raise CliError(f"--expires: {e}") from e
        body: Json = {
            "name": name,
            "role": role.value,
            "groups": list(group) if group else None,
            "all_groups": all_groups,
            "expires_in": int(lifetime.total_seconds()) if lifetime is not None else None,
            "user": user,
        }
        with ApiClient(client_options(ctx)) as api:
            created = api.create_token(body)
    if as_json:
        typer.echo(dump_json(created))
        return
    groups = created.get("groups")
    scope = f" on {', '.join(groups)}" if groups else ""
    until = f"until {created.get('expires_at')}" if created.get("expires_at") else "no expiry"
    err.print(
        f"token {created.get('id')} ({created.get('name')}: {created.get('role')}{scope}, "
        f"{until}). It is shown this once:",
        soft_wrap=True,
    )
    # Alone on stdout, so that TOKEN=$(opsplane tokens create …) works.
    typer.echo(str(created.get("token")))


@app.command("list")
def list_tokens(
    ctx: typer.Context,
    include_inactive: Annotated[
        bool, typer.Option("--all", help="Also revoked and expired tokens.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List API tokens (never the tokens themselves)."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        tokens = api.list_tokens(include_inactive=include_inactive)
    if as_json:
        typer.echo(dump_json({"items": tokens}))
        return
    if not tokens:
        err.print(Text("no tokens", style="dim"))
        return
    make_console().print(tokens_table(tokens))


@app.command("revoke")
def revoke_token(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id.")],
) -> None:
    """Revoke a token: the next request with it is refused."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        token = api.revoke_token(token_id)
    err.print(f"token {token.get('id')} ({token.get('name')}) revoked")
