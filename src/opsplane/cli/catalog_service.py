"""``opsplane catalog-service run``: seed 004's ``celery-service run``, flag for flag.

A deployment script written for the seed (``celery-service run --address … --db-…``, or its
``CS_*`` variables) starts opsplane's control plane with each value mapped to opsplane's own
setting (docs/compat.md, seed 004). A flag with no opsplane meaning is accepted with a warning
that says what opsplane does instead; none is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from opsplane.domain.errors import ConfigError

# The seed's default catalog file; used only when it exists (the seed would refuse to start).
SEED_DEFAULT_CATALOG = Path("/external-tasks.yaml")

app = typer.Typer(
    no_args_is_help=True,
    help="Seed 004's celery-service: `run` takes its flags and CS_* variables (docs/compat.md)",
)


@dataclass(frozen=True)
class SeedFlags:
    """What ``celery-service run`` was given (None: not given)."""

    external_task_config: Path | None = None
    log_console: bool | None = None
    address: str | None = None
    db_address: str | None = None
    db_user: str | None = None
    db_password: str | None = field(default=None, repr=False)
    db_name: str | None = None


def to_settings(flags: SeedFlags) -> tuple[dict[str, Any], list[str]]:
    """The opsplane setting overrides for the seed's flags, and the warnings to print.

    - ``--address`` → ``listen``; Go's ``:80`` (every interface) is ``0.0.0.0:80``.
    - ``--db-address/--db-user/--db-password/--db-name`` → ``database_url``
      ``mysql+asyncmy://user:password@address/name`` (the seed's result database is MySQL);
      opsplane keeps all of its state there, not only results. Address and name go together.
    - ``--external-task-config`` → ``catalog``.
    - ``--[no-]log-console``: opsplane's server log always goes to stderr; per-task logs go to
      ``<logs dir>/<name>.log`` either way. ``--no-log-console`` is accepted with a warning.
    """
    settings: dict[str, Any] = {}
    warnings: list[str] = []
    if flags.address is not None:
        address = flags.address.strip()
        settings["listen"] = f"0.0.0.0{address}" if address.startswith(":") else address
    db = (flags.db_address, flags.db_user, flags.db_password, flags.db_name)
    if any(value for value in db):
        if not flags.db_address or not flags.db_name:
            raise ConfigError(
                "--db-address and --db-name go together (CS_DB_ADDRESS, CS_DB_NAME): they make "
                "opsplane's database URL; give both, or neither for the default SQLite database"
            )
        credentials = ""
        if flags.db_user:
            credentials = quote(flags.db_user, safe="")
            if flags.db_password:
                credentials += ":" + quote(flags.db_password, safe="")
            credentials += "@"
        elif flags.db_password:
            raise ConfigError("--db-password needs --db-user (CS_DB_USER)")
        settings["database_url"] = (
            f"mysql+asyncmy://{credentials}{flags.db_address}/{quote(flags.db_name, safe='')}"
        )
        warnings.append(
            f"--db-*: opsplane keeps all of its state (tasks, runs, sessions, users, audit) in "
            f"the database {flags.db_name} on {flags.db_address}, not only results"
        )
    if flags.external_task_config is not None:
        settings["catalog"] = flags.external_task_config
    if flags.log_console is False:
        warnings.append(
            "--no-log-console: opsplane has no server log file; its log still goes to stderr "
            "(per-task logs are written to <logs dir>/<name>.log either way)"
        )
    return settings, warnings


@app.command(
    "run",
    context_settings={"help_option_names": ["--help", "-h", "--help-long", "--help-man"]},
)
def run(
    external_task_config: Annotated[
        Path | None,
        typer.Option(
            "--external-task-config",
            envvar="CS_EXTERNAL_TASK",
            help=f"external tasks (the catalog); default {SEED_DEFAULT_CATALOG} when it exists",
        ),
    ] = None,
    log_console: Annotated[
        bool | None,
        typer.Option(
            "--log-console/--no-log-console",
            envvar="CS_LOG_CONSOLE",
            help="print log to console (opsplane always does: stderr)",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", envvar="CS_ADDRESS", help="service listen address (opsplane's listen)"
        ),
    ] = None,
    db_address: Annotated[
        str | None,
        typer.Option("--db-address", envvar="CS_DB_ADDRESS", help="MySQL HOST:PORT"),
    ] = None,
    db_user: Annotated[
        str | None, typer.Option("--db-user", envvar="CS_DB_USER", help="MySQL user")
    ] = None,
    db_password: Annotated[
        str | None,
        typer.Option("--db-password", envvar="CS_DB_PASSWORD", help="MySQL password"),
    ] = None,
    db_name: Annotated[
        str | None, typer.Option("--db-name", envvar="CS_DB_NAME", help="MySQL database name")
    ] = None,
    # kingpin's --no-help: accepted, means nothing.
    _no_help: Annotated[bool, typer.Option("--no-help", hidden=True)] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="OPSPLANE_CONFIG_FILE", help="opsplane YAML settings"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Start the control plane as seed 004's `celery-service run` would start its service.

    Every other opsplane setting still comes from OPSPLANE_* variables or --config.
    """
    from opsplane.cli.starting import start_control_plane

    flags = SeedFlags(
        external_task_config=external_task_config,
        log_console=log_console,
        address=address,
        db_address=db_address,
        db_user=db_user,
        db_password=db_password,
        db_name=db_name,
    )
    try:
        overrides, warnings = to_settings(flags)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    if "catalog" not in overrides and SEED_DEFAULT_CATALOG.is_file():
        from opsplane.cli.starting import settings_or_exit

        # The seed's default file, unless OPSPLANE_CATALOG or the YAML file names one.
        if settings_or_exit(config_file=config).catalog is None:
            overrides["catalog"] = SEED_DEFAULT_CATALOG
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    start_control_plane("server", verbose, config_file=config, **overrides)
