"""``opsplane tasks``: list tasks; ``show``, ``cancel``, ``rerun`` and ``logs`` one of them."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

import typer
from rich.text import Text

from opsplane.cli.client import ApiClient, ApiError, Json
from opsplane.cli.live import (
    run_note,
)
from opsplane.cli.output import (
    dump_json,
    host_style,
    make_console,
    now_utc,
    print_error,
    reporting_errors,
    status_style,
)
from opsplane.cli.run import client_options, follow_task, submit_and_follow
from opsplane.cli.tables import (
    interrupted_message,
    runs_table,
    summary_line,
    task_detail,
    task_wall_time,
    tasks_table,
)
from opsplane.domain.states import TaskStatus

app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="List tasks, or show, cancel, re-run or read the logs of one.",
)


class RerunSubset(StrEnum):
    failed = "failed"
    undeliverable = "undeliverable"
    timed_out = "timed_out"
    unsuccessful = "unsuccessful"
    all = "all"


TaskId = Annotated[str, typer.Argument(metavar="ID", help="The task's id.")]


@app.callback(invoke_without_command=True)
def list_tasks(
    ctx: typer.Context,
    status: Annotated[
        TaskStatus | None,
        typer.Option("--status", help="Only tasks with this status.", case_sensitive=False),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only tasks with this name.")] = None,
    page: Annotated[int, typer.Option("--page", min=1, help="The page to show.")] = 1,
    size: Annotated[int, typer.Option("--size", min=1, help="Tasks per page.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
) -> None:
    """List tasks, newest first: id, name, status, run counts, age and duration."""
    if ctx.invoked_subcommand is not None:
        return
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.list_tasks(
            status=status.value if status else None, name=name, page=page, size=size
        )
    if as_json:
        typer.echo(dump_json(result))
        return
    items = [t for t in result.get("items", []) if isinstance(t, dict)]
    total = result.get("total")
    if not items:
        err.print(Text("no tasks match" if page == 1 else f"no tasks on page {page}", style="dim"))
        return
    out.print(tasks_table(items, now_utc()))
    if isinstance(total, int):
        pages = max(math.ceil(total / max(size, 1)), 1)
        caption = f"page {page} of {pages} · {total} task{'' if total == 1 else 's'}"
        out.print(Text(caption, style="dim"))


@app.command("show")
def show_task(
    ctx: typer.Context,
    task_id: TaskId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the task and its runs.")] = False,
) -> None:
    """Show a task in detail, with the runs on each host."""
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        task = api.get_task(task_id)
        runs = api.list_runs(task_id)
    if as_json:
        typer.echo(dump_json({"task": task, "runs": runs}))
        return
    out.print(task_detail(task, now_utc()))
    if runs:
        out.print()
        out.print(runs_table(runs))


@app.command("cancel")
def cancel_task(
    ctx: typer.Context,
    task_id: TaskId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the task as JSON.")] = False,
) -> None:
    """Cancel a task: its pending runs never start, running ones are stopped."""
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        task = api.cancel_task(task_id)
    if as_json:
        typer.echo(dump_json(task))
        return
    status = str(task.get("status", "?"))
    out.print(
        Text.assemble(
            f"cancel requested for task {task.get('id', task_id)}; its status is ",
            (status, status_style(status)),
        ),
        soft_wrap=True,
    )


@app.command("rerun")
def rerun_task(
    ctx: typer.Context,
    task_id: TaskId,
    only: Annotated[
        RerunSubset,
        typer.Option("--only", help="Which hosts: those whose latest run ended so."),
    ] = RerunSubset.failed,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print nothing live; print the task and its runs as JSON."),
    ] = False,
) -> None:
    """Run an ended task again on some of its hosts and follow it live.

    Example: opsplane tasks rerun 0193… --only failed   (failed includes lost runs)
    """
    submit_and_follow(ctx, lambda api: api.rerun_task(task_id, only.value), as_json=as_json)


def log_header(run: Json) -> Text:
    """``==> web-1 <==  succeeded`` (with attempt and exit code when telling)."""
    host = str(run.get("host", "?"))
    attempt = run.get("attempt")
    status = str(run.get("status", "?"))
    extra = f" (attempt {attempt})" if isinstance(attempt, int) and attempt > 1 else ""
    return Text.assemble(
        ("==> ", "dim"),
        (host, f"bold {host_style(host)}"),
        extra,
        (" <==", "dim"),
        "  ",
        (run_note(run), status_style(status)),
    )


@app.command("logs")
def task_logs(
    ctx: typer.Context,
    task_id: TaskId,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Stream the output live until the task ends; exit 0 only if it succeeded.",
        ),
    ] = False,
) -> None:
    """Print each host's output: the archived logs, or live with --follow."""
    out = make_console()
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        if follow:
            try:
                task = follow_task(api, api.get_task(task_id), out=out, err=err)
            except KeyboardInterrupt:
                err.print()
                print_error(err, interrupted_message(task_id))
                raise typer.Exit(130) from None
            out.print(summary_line(task, task_wall_time(task)), soft_wrap=True)
            raise typer.Exit(0 if task.get("status") == "succeeded" else 1)
        api.get_task(task_id)  # a clear "not found" before anything else
        runs = sorted(
            api.list_runs(task_id),
            key=lambda r: (str(r.get("host", "")), r.get("attempt") or 0),
        )
        if not runs:
            err.print(Text("this task has no runs", style="dim"))
        for index, run in enumerate(runs):
            if index:
                out.print()
            out.print(log_header(run), soft_wrap=True)
            try:
                log = api.get_run_log(task_id, str(run.get("id")))
            except ApiError as exc:
                if exc.status_code != 404:
                    raise
                log = ""
            if log:
                typer.echo(log, nl=not log.endswith("\n"))
            else:
                out.print(Text("(no output)", style="dim"))
