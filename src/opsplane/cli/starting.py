"""Starting the control plane from the CLI: settings from flags, logging, then the server or
the demo. Its own module so that ``opsplane server`` (cli/main.py) and seed 004's
``catalog-service run`` (cli/catalog_service.py) share it without importing each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from opsplane.domain.errors import ConfigError

if TYPE_CHECKING:
    from opsplane.config import Settings


def settings_or_exit(**flags: object) -> Settings:
    from opsplane.config import load_settings

    try:
        return load_settings(**flags)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def configure_logging_or_exit(verbose: bool, log_format: str) -> None:
    from opsplane.cli.logs import configure_logging

    try:
        configure_logging(verbose, log_format)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e


def start_control_plane(
    mode: str, verbose: bool, log_format: str = "text", **flags: object
) -> None:
    """Build the settings from ``flags`` (None: not given) and run the server or the demo."""
    from opsplane.cli import processes

    settings = settings_or_exit(**flags)
    configure_logging_or_exit(verbose, log_format)
    if not settings.require_enrollment:
        typer.secho(
            "warning: require_enrollment is off: any agent that reaches the agent endpoint or "
            "the broker can register a host and report results unsigned (docs/security.md)",
            fg="yellow",
            err=True,
        )
    try:
        if mode == "demo":
            processes.run_demo(settings)
        else:
            processes.serve(settings)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
