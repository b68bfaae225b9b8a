"""``opsplane schedules``: launch a template on a cron expression or an interval; pause,
resume, and read what each due time became (docs/templates.md)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import ApiClient, CliError, Json
from opsplane.cli.output import dump_json, make_console, reporting_errors
from opsplane.cli.run import client_options
from opsplane.cli.templates import GroupOpt, HostOpt, JsonOpt, ParamOpt, parse_params, seg, targets

app = typer.Typer(
    no_args_is_help=True, help="Schedule templates: cron or interval, pause, history."
)

ScheduleId = Annotated[str, typer.Argument(metavar="ID", help="The schedule's id.")]


def _items(result: Json | None) -> list[Json]:
    return [i for i in (result or {}).get("items", []) if isinstance(i, dict)]


def _when(schedule: Json) -> str:
    if schedule.get("cron"):
        return f"cron {schedule['cron']} ({schedule.get('timezone')})"
    return f"every {schedule.get('interval_seconds')}s"


@app.command("list")
def list_schedules(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the schedules: id, template, when, policies, next fire time."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.call("GET", "/schedules")
    if as_json:
        typer.echo(dump_json(result))
        return
    items = _items(result)
    if not items:
        err.print(Text("no schedules: opsplane schedules create TEMPLATE --every 60", "dim"))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "TEMPLATE", "WHEN", "MISFIRE", "OVERLAP", "NEXT"):
        table.add_column(column, no_wrap=True)
    for item in items:
        upcoming = item.get("next_fire_times") or []
        table.add_row(
            str(item["id"]),
            str(item["template"]),
            _when(item),
            str(item["misfire"]),
            str(item["overlap"]),
            "paused" if item.get("paused") else (str(upcoming[0]) if upcoming else "-"),
        )
    make_console().print(table)


@app.command("create")
def create_schedule(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="The template to launch.")],
    cron: Annotated[
        str | None, typer.Option("--cron", help='5 fields, e.g. "*/5 * * * *".')
    ] = None,
    timezone: Annotated[str, typer.Option("--tz", help="IANA time zone of --cron.")] = "UTC",
    every: Annotated[int | None, typer.Option("--every", help="Every N seconds.")] = None,
    param: ParamOpt = None,
    host: HostOpt = None,
    group: GroupOpt = None,
    misfire: Annotated[str, typer.Option("--misfire", help="skip or run_once.")] = "skip",
    misfire_window: Annotated[
        int, typer.Option("--misfire-window", help="run_once: seconds late it may still run.")
    ] = 3600,
    overlap: Annotated[str, typer.Option("--overlap", help="skip or queue.")] = "skip",
) -> None:
    """Schedule a template; prints the schedule's id and its next fire times."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        if (cron is None) == (every is None):
            raise CliError("give one of --cron and --every")
        body: Json = {
            "template": template,
            "params": parse_params(param),
            "cron": cron,
            "timezone": timezone,
            "interval_seconds": every,
            "misfire": misfire,
            "misfire_window": misfire_window,
            "overlap": overlap,
        }
        chosen = targets(host, group)
        if chosen is not None:
            body["targets"] = chosen
        with ApiClient(client_options(ctx)) as api:
            result = api.call("POST", "/schedules", body=body)
    assert result is not None
    out = make_console()
    out.print(str(result["id"]))
    for moment in result.get("next_fire_times") or []:
        out.print(Text(f"  next: {moment}", "dim"))


def _pause(ctx: typer.Context, schedule_id: str, paused: bool) -> None:
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.call("PATCH", f"/schedules/{seg(schedule_id)}", body={"paused": paused})
    assert result is not None
    make_console().print(f"schedule {result['id']} {'paused' if paused else 'resumed'}")


@app.command("pause")
def pause_schedule(ctx: typer.Context, schedule_id: ScheduleId) -> None:
    """Stop launching until resumed."""
    _pause(ctx, schedule_id, True)


@app.command("resume")
def resume_schedule(ctx: typer.Context, schedule_id: ScheduleId) -> None:
    """Launch again from the next due time after now (paused-over ones are not caught up)."""
    _pause(ctx, schedule_id, False)


@app.command("delete")
def delete_schedule(ctx: typer.Context, schedule_id: ScheduleId) -> None:
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        api.call("DELETE", f"/schedules/{seg(schedule_id)}")
    make_console().print(f"schedule {schedule_id} deleted")


@app.command("history")
def schedule_history(
    ctx: typer.Context,
    schedule_id: ScheduleId,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """What each due time became: launched (and the task's status), skipped, missed, error."""
    err = make_console(stderr=True)
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.call("GET", f"/schedules/{seg(schedule_id)}/history", params={"limit": limit})
    if as_json:
        typer.echo(dump_json(result))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("DUE", "OUTCOME", "TASK", "STATUS", "DETAIL"):
        table.add_column(column, no_wrap=column != "DETAIL")
    for fire in _items(result):
        table.add_row(
            str(fire["due_at"]),
            str(fire["outcome"]),
            str(fire.get("task_id") or "-"),
            str(fire.get("task_status") or "-"),
            str(fire.get("detail") or ""),
        )
    make_console().print(table)
