"""``opsplane run``: run a command on hosts and watch every host's output live."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from opsplane.cli.client import ApiClient, ClientOptions, Json
from opsplane.cli.live import (
    LiveLine,
    LiveRenderer,
    render_live_line,
)
from opsplane.cli.options import RUN_CONTEXT_SETTINGS
from opsplane.cli.output import (
    dump_json,
    make_console,
    print_error,
    reporting_errors,
)
from opsplane.cli.tables import (
    interrupted_message,
    runs_table,
    summary_line,
    summary_runs,
)

#: Rows the summary table shows at most; beyond that only the runs that did not succeed.
SUMMARY_LIMIT = 100
CONTEXT_SETTINGS = RUN_CONTEXT_SETTINGS
#: Where the pacing options show in ``opsplane run --help``.
PACING = {"rich_help_panel": "Pacing", "show_default": False}


def client_options(ctx: typer.Context) -> ClientOptions:
    """The options the root callback stored; defaults when none were (e.g. in a bare app)."""
    obj = ctx.find_root().obj
    if isinstance(obj, ClientOptions):
        return obj
    return ClientOptions(url="http://127.0.0.1:8000", token=None)


def print_live(out: Console, err: Console, line: LiveLine, width: int) -> None:
    console = err if line.to_stderr else out
    console.print(render_live_line(line, width), soft_wrap=True)


def follow_task(
    api: ApiClient, task: Json, *, out: Console, err: Console, live: bool = True
) -> Json:
    """Follow the task's event stream until it ends; print its output when ``live``.

    Returns the task as the last event described it (terminal status). Lines still buffered
    are printed even when interrupted.
    """
    targets = task.get("targets") or {}
    renderer = LiveRenderer(str(h) for h in targets.get("hosts") or [])
    final = task
    try:
        for event in api.follow_events(str(task["id"])):
            if event.event == "task":
                final = event.data
            if live:
                for line in renderer.handle(event):
                    print_live(out, err, line, renderer.width)
    finally:
        if live:
            for line in renderer.finish():
                print_live(out, err, line, renderer.width)
    return final


def print_summary(out: Console, task: Json, runs: list[Json], wall_seconds: float | None) -> None:
    shown, hidden = summary_runs(runs, SUMMARY_LIMIT)
    out.print()
    if shown:
        out.print(runs_table(shown))
    if hidden:
        note = f"{hidden} succeeded run(s) not shown: opsplane tasks show {task.get('id')}"
        out.print(Text(note, style="dim"), soft_wrap=True)
    out.print(summary_line(task, wall_seconds), soft_wrap=True)


def run_command(
    ctx: typer.Context,
    command: Annotated[
        list[str],
        typer.Argument(
            metavar="COMMAND",
            help="The shell command; its words are joined with spaces. Put it after `--`.",
            show_default=False,
        ),
    ],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", "-H", help="Run on this host (repeatable).", show_default=False),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group", "-g", help="Run on the hosts of this group (repeatable).", show_default=False
        ),
    ] = None,
    all_hosts: Annotated[bool, typer.Option("--all", help="Run on every host.")] = False,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", "-l", help="Run on hosts carrying KEY=VALUE (repeatable: all must match)."
        ),
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option("--timeout", min=1, help="Seconds each host may run the command."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name for the task.")] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print nothing live; print the task and its runs as JSON."),
    ] = False,
    priority: Annotated[
        int | None,
        typer.Option("--priority", help="Higher goes first when capacity is short.", **PACING),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option("--retries", min=0, help="Attempts after a failed first one.", **PACING),
    ] = None,
    retry_backoff: Annotated[
        float | None,
        typer.Option("--retry-backoff", min=0, help="Seconds before a retry; doubles.", **PACING),
    ] = None,
    max_concurrency: Annotated[
        str | None,
        typer.Option("--max-concurrency", help="Hosts at once: N or N%.", **PACING),
    ] = None,
    max_errors: Annotated[
        str | None,
        typer.Option("--max-errors", help="Stop after N (or N%) errors.", **PACING),
    ] = None,
    canary: Annotated[
        int | None,
        typer.Option(
            "--canary", min=1, help="Run N hosts first; the rest if all succeed.", **PACING
        ),
    ] = None,
    then: Annotated[
        str | None,
        typer.Option("--then", help="After the canary, N or N% hosts at once.", **PACING),
    ] = None,
    deadline: Annotated[
        int | None,
        typer.Option("--deadline", min=1, help="Seconds the whole task may take.", **PACING),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="NAME=VALUE for the command (repeatable)."),
    ] = None,
    secret_env: Annotated[
        list[str] | None,
        typer.Option(
            "--secret-env",
            help="NAME=VALUE, or NAME to take $NAME from here: encrypted at rest, never shown.",
        ),
    ] = None,
    delivery_deadline: Annotated[
        int | None,
        typer.Option(
            "--delivery-deadline", min=0, help="Seconds to wait for offline hosts.", **PACING
        ),
    ] = None,
    run_as: Annotated[
        str | None,
        typer.Option(
            "--run-as",
            metavar="USER",
            help="Run as this account on each host (agents only; each agent decides whether "
            "it may).",
        ),
    ] = None,
) -> None:
    """Run a command on hosts and stream every host's output live.

    Example: opsplane run --group web -- 'uname -a; uptime'
    """
    hosts = list(host or [])
    groups = list(group or [])
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--label wants KEY=VALUE, got {item!r}", ctx=ctx)
        labels[key] = value
    if not (hosts or groups or all_hosts or labels):
        raise typer.BadParameter(
            "choose where to run: pass --host NAME, --group NAME, --label KEY=VALUE or --all",
            ctx=ctx,
            param_hint="'--host' / '--group' / '--all'",
        )
    command_text = " ".join(command).strip()
    if not command_text:
        raise typer.BadParameter("the command to run is empty", ctx=ctx, param_hint="'COMMAND...'")

    if then is not None and canary is None:
        raise typer.BadParameter("--then paces the rest after a --canary", ctx=ctx)
    pacing: Json = {
        "priority": priority,
        "retries": {"max_attempts": retries + 1, "backoff_seconds": retry_backoff or 0}
        if retries
        else None,
        "max_concurrency": max_concurrency,
        "max_errors": max_errors,
        "rollout": {"canary": canary, "then": then} if canary else None,
        "deadline": deadline,
        "delivery_deadline": delivery_deadline,
    }
    _submit_and_follow(
        ctx,
        command_text,
        hosts=hosts,
        groups=groups,
        all_hosts=all_hosts,
        timeout=timeout,
        name=name,
        as_json=as_json,
        labels=labels,
        extra={
            **{key: value for key, value in pacing.items() if value is not None},
            **({"run_as": run_as} if run_as is not None else {}),
            "env": _assignments(ctx, env or [], "--env"),
            "secret_env": _assignments(ctx, secret_env or [], "--secret-env", from_environ=True),
        },
    )


def _assignments(
    ctx: typer.Context, items: list[str], option: str, *, from_environ: bool = False
) -> dict[str, str]:
    """``NAME=VALUE`` pairs; with ``from_environ``, a bare ``NAME`` takes this process's
    ``$NAME``, so that a secret need not appear on a command line (or in ps)."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if not from_environ or name not in os.environ:
                wanted = (
                    "NAME=VALUE or NAME (set in your environment)"
                    if from_environ
                    else ("NAME=VALUE")
                )
                raise typer.BadParameter(f"{option} wants {wanted}, got {item!r}", ctx=ctx)
            value = os.environ[name]
        values[name] = value
    return values


def push_command(
    ctx: typer.Context,
    local_path: Annotated[
        str, typer.Argument(metavar="LOCAL", help="File or directory on the control plane host.")
    ],
    remote_path: Annotated[str, typer.Argument(metavar="REMOTE", help="Destination path.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", "-H", help="Copy to this host (repeatable).", show_default=False),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", "-g", help="Copy to the hosts of this group.", show_default=False),
    ] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", min=1, help="Seconds each host may take.")
    ] = None,
    chown: Annotated[
        str | None,
        typer.Option(
            "--chown",
            metavar="USER:GROUP",
            help="Give every file this owner and group (USER, USER:GROUP or :GROUP; "
            "names or numeric ids). Needs root on the host.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Copy a file or a directory (recursively) to SSH hosts and gRPC agents.

    SSH hosts get it over SFTP; gRPC agents in signed, checked chunks, written only under
    their --upload-root directories (docs/filepush.md).

    LOCAL is read by the control plane, from under its upload roots. Example:
    opsplane push ./site /srv/www --group web --chown www-data:www-data
    """
    hosts = list(host or [])
    groups = list(group or [])
    if not (hosts or groups):
        raise typer.BadParameter(
            "choose where to copy: pass --host NAME or --group NAME",
            ctx=ctx,
            param_hint="'--host' / '--group'",
        )
    source = str(Path(local_path).expanduser().absolute())
    upload = {"local_path": source, "remote_path": remote_path}
    if chown is not None:
        owner, _, file_group = chown.partition(":")
        if not (owner or file_group):
            raise typer.BadParameter(
                f"--chown wants USER, USER:GROUP or :GROUP, got {chown!r}", ctx=ctx
            )
        upload |= {"owner": owner, "group": file_group}
        upload = {key: value for key, value in upload.items() if value}
    _submit_and_follow(
        ctx,
        f"upload {source} -> {remote_path}",
        hosts=hosts,
        groups=groups,
        all_hosts=False,
        timeout=timeout,
        name=None,
        as_json=as_json,
        upload=upload,
    )


def _submit_and_follow(
    ctx: typer.Context,
    command_text: str,
    *,
    hosts: list[str],
    groups: list[str],
    all_hosts: bool,
    timeout: int | None,
    name: str | None,
    as_json: bool,
    upload: Mapping[str, str] | None = None,
    labels: dict[str, str] | None = None,
    extra: Json | None = None,
) -> None:
    submit_and_follow(
        ctx,
        lambda api: api.create_task(
            command_text,
            hosts=hosts,
            groups=groups,
            all_hosts=all_hosts,
            timeout=timeout,
            name=name,
            upload=upload,
            labels=labels,
            extra=extra,
        ),
        as_json=as_json,
    )


def submit_and_follow(
    ctx: typer.Context, submit: Callable[[ApiClient], Json], *, as_json: bool
) -> None:
    """Create a task with ``submit``, follow it live (unless JSON), summarize, exit 0 only on
    success."""
    out = make_console()
    err = make_console(stderr=True)
    options = client_options(ctx)
    started = time.monotonic()
    with reporting_errors(err), ApiClient(options) as api:
        try:
            task = submit(api)
        except KeyboardInterrupt:
            print_error(err, "interrupted")
            raise typer.Exit(130) from None
        task_id = str(task.get("id"))
        try:
            if not as_json:
                command_text = str(task.get("command", ""))
                err.print(Text(f"task {task_id} · {command_text}", style="dim"), soft_wrap=True)
            task = follow_task(api, task, out=out, err=err, live=not as_json)
            runs = api.list_runs(task_id)
        except KeyboardInterrupt:
            err.print()
            print_error(err, interrupted_message(task_id))
            raise typer.Exit(130) from None
    wall = time.monotonic() - started
    if as_json:
        typer.echo(dump_json({"task": task, "runs": runs}))
    else:
        print_summary(out, task, runs, wall)
    raise typer.Exit(0 if task.get("status") == "succeeded" else 1)
