"""``opsplane users``: add, list and change the users who log in to the web page (admin)."""

from __future__ import annotations

import sys
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
    reporting_errors,
)
from opsplane.cli.run import client_options
from opsplane.cli.templates import seg
from opsplane.security.roles import Role

app = typer.Typer(no_args_is_help=True, help="Add, list and change users (admin).")

GroupOpt = Annotated[
    list[str] | None,
    typer.Option("--group", "-g", help="Operators: a group they may run on (repeatable)."),
]
AllGroupsOpt = Annotated[
    bool, typer.Option("--all-groups", help="Operators: every group, present and future.")
]
PasswordStdinOpt = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def read_password(from_stdin: bool, *, required: bool) -> str | None:
    """The password from stdin (``--password-stdin``), or asked twice on a terminal."""
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CliError("--password-stdin: stdin held no password")
        return line
    if not required:
        return None
    if not sys.stdin.isatty():
        raise CliError("give the password with --password-stdin (stdin is not a terminal)")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def users_table(users: list[Json]) -> Table:
    now = now_utc()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "ROLE", "GROUPS", "PASSWORD", "STATUS", "LAST LOGIN"):
        table.add_column(column, no_wrap=column != "GROUPS")
    for user in users:
        groups = user.get("groups")
        table.add_row(
            str(user.get("name")),
            str(user.get("role")),
            ", ".join(groups) if groups else ("all" if user.get("role") == "operator" else "-"),
            "set" if user.get("has_password") else "none",
            Text("disabled", style="red") if user.get("disabled") else Text("enabled"),
            format_relative(user.get("last_login_at"), now)
            if user.get("last_login_at")
            else "never",
        )
    return table


@app.command("list")
def list_users(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the users: role, groups, whether they have a password, last login."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        users = api.list_users()
    if as_json:
        typer.echo(dump_json({"items": users}))
        return
    if not users:
        err.print(Text("no users yet: opsplane users add NAME --role admin", style="dim"))
        return
    make_console().print(users_table(users))


@app.command("add")
def add_user(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The user's login name.")],
    role: Annotated[Role, typer.Option("--role", "-r", help="viewer, operator or admin.")],
    group: GroupOpt = None,
    all_groups: AllGroupsOpt = False,
    password_stdin: PasswordStdinOpt = False,
    no_password: Annotated[
        bool, typer.Option("--no-password", help="No web login: the user works with tokens.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a user. The password is asked for (or read with --password-stdin) and stored only
    as an argon2id hash. An operator needs --group (or --all-groups)."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        password = None if no_password else read_password(password_stdin, required=True)
        body: Json = {
            "name": name,
            "role": role.value,
            "password": password,
            "groups": list(group) if group else None,
            "all_groups": all_groups,
        }
        with ApiClient(client_options(ctx)) as api:
            user = api.create_user(body)
    if as_json:
        typer.echo(dump_json(user))
        return
    err.print(f"user {user.get('name')} added ({user.get('role')})")


@app.command("set")
def set_user(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The user's login name.")],
    role: Annotated[Role | None, typer.Option("--role", "-r", help="A new role.")] = None,
    group: GroupOpt = None,
    all_groups: AllGroupsOpt = False,
    password_stdin: PasswordStdinOpt = False,
    password: Annotated[
        bool, typer.Option("--password", help="Set a new password (asked for).")
    ] = False,
    disabled: Annotated[
        bool | None,
        typer.Option("--disable/--enable", help="Disable (sessions end, tokens refused)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a user's role, groups, password, or disable it."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        body: Json = {"all_groups": all_groups}
        if role is not None:
            body["role"] = role.value
        if group:
            body["groups"] = list(group)
        if password or password_stdin:
            body["password"] = read_password(password_stdin, required=True)
        if disabled is not None:
            body["disabled"] = disabled
        with ApiClient(client_options(ctx)) as api:
            user = api.update_user(name, body)
    if as_json:
        typer.echo(dump_json(user))
        return
    err.print(f"user {user.get('name')} updated")


@app.command("grant-template")
def grant_template(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user.")],
    template: Annotated[str, typer.Argument(help="The template it may launch.")],
    group: Annotated[
        list[str], typer.Option("--group", "-g", help="On hosts of this group (repeatable).")
    ],
) -> None:
    """Let a user launch one template on hosts of these groups, whatever its role (a viewer
    with a grant runs that template and no other command)."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        grant = api.call(
            "POST",
            f"/users/{seg(name)}/template-grants",
            body={"template": template, "groups": list(group)},
        )
    assert grant is not None
    err.print(f"{name} may launch {template} on: {', '.join(grant['groups'])}")


@app.command("revoke-template")
def revoke_template(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user.")],
    template: Annotated[str, typer.Argument(help="The template.")],
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="Only these groups (repeatable).")
    ] = None,
) -> None:
    """Take back a user's grant for a template (all of it, or --group ones)."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        grant = api.call(
            "DELETE",
            f"/users/{seg(name)}/template-grants/{seg(template)}",
            params={"group": group},
        )
    left = ", ".join(grant["groups"]) if grant and grant.get("groups") else "none"
    err.print(f"{name}'s grant for {template}: {left}")
