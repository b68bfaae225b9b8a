"""``opsplane scripts``: approve seed-003 scripts by content hash (docs/remoterun.md, "Pinning").

These verbs work on the control plane's own files, not through the API: they read the
settings (``--config``, ``--data-dir``, ``--script-dir``, as the server takes them) and write
``<data dir>/script-pins.yaml``, which the server reads again at every ``POST /tasks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from opsplane.config import Settings, load_settings
from opsplane.domain.errors import ConfigError, OpsplaneError

if TYPE_CHECKING:
    from opsplane.remoterun.scripts import ScriptDirs, ScriptPins

app = typer.Typer(
    no_args_is_help=True,
    help="Approve seed-003 scripts by content hash: a changed script is refused until "
    "approved again.",
)

PathsArg = Annotated[
    list[str],
    typer.Argument(
        help="scripts: a file path, or as POST /tasks names them (/scripts/x.sh, x.sh)",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="OPSPLANE_CONFIG_FILE", help="YAML settings file")
]
DataDirOpt = Annotated[Path | None, typer.Option(help="data directory (the pins file is here)")]
ScriptDirOpt = Annotated[
    list[Path] | None,
    typer.Option("--script-dir", help="the server's script directories (repeatable)"),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


def _settings(
    config: Path | None, data_dir: Path | None, script_dir: list[Path] | None
) -> Settings:
    try:
        return load_settings(config_file=config, data_dir=data_dir, script_dirs=script_dir or None)
    except ConfigError as e:
        raise _fail(str(e)) from e


def _dirs(settings: Settings) -> ScriptDirs:
    # Imported when used: the server side of scripts is slow to import, and `opsplane`'s
    # other verbs need none of it.
    from opsplane.remoterun.scripts import ScriptDirs

    try:
        dirs = ScriptDirs(settings.script_dirs)
    except ConfigError as e:
        raise _fail(str(e)) from e
    if not dirs:
        raise _fail(
            "no script directory is configured: give the server's --script-dir (or --config)"
        )
    return dirs


def _resolve(dirs: ScriptDirs, given: str) -> Path:
    """The real path of a script the server may run, however it was named."""
    # A path to an existing file, from here (./backup.sh, ../scripts/x.sh), is taken as a
    # file; anything else as POST /tasks would name it.
    local = Path(given).expanduser()
    name = str(local.resolve()) if local.is_file() else given
    try:
        return dirs.resolve(name)
    except OpsplaneError as e:
        raise _fail(str(e), 1) from e


def _pins(settings: Settings) -> ScriptPins:
    from opsplane.remoterun.scripts import ScriptPins

    return ScriptPins(settings.data_dir)


def _pin_key(settings: Settings, given: str) -> str:
    """The pins-file key of a script that may be gone or no longer runnable."""
    from opsplane.remoterun.scripts import ScriptDirs

    try:
        dirs = ScriptDirs(settings.script_dirs)
        local = Path(given).expanduser()
        return str(dirs.resolve(str(local.resolve()) if local.is_file() else given))
    except OpsplaneError:
        return str(Path(given).expanduser().resolve())


@app.command("approve")
def approve(
    paths: PathsArg,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    script_dir: ScriptDirOpt = None,
) -> None:
    """Pin each script to its current content: print "<sha256>  <path>" and write it into
    <data dir>/script-pins.yaml. Until approved again, a script whose content changed is
    refused."""
    settings = _settings(config, data_dir, script_dir)
    dirs = _dirs(settings)
    scripts = [_resolve(dirs, given) for given in paths]
    pins = _pins(settings)
    try:
        done = pins.approve(scripts)
    except (ConfigError, OSError) as e:
        raise _fail(str(e)) from e
    for script, digest, previous in done:
        typer.echo(f"{digest}  {script}")
        if previous is None:
            note = "approved"
        elif previous == digest:
            note = "already approved"
        else:
            note = f"approved again (was {previous[:12]}…)"
        typer.echo(f"{note}: {script}", err=True)
    typer.echo(f"pins: {pins.path}", err=True)


@app.command("revoke")
def revoke(
    paths: PathsArg,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    script_dir: ScriptDirOpt = None,
) -> None:
    """Remove the pins of these scripts (named as for approve, or by the path list shows).
    With script_pins_required they are then refused; without, they run unchecked."""
    settings = _settings(config, data_dir, script_dir)
    pins = _pins(settings)
    keys = [_pin_key(settings, given) for given in paths]
    try:
        removed = pins.revoke(keys)
    except (ConfigError, OSError) as e:
        raise _fail(str(e)) from e
    for key in keys:
        typer.echo(f"{'revoked' if key in removed else 'not pinned'}: {key}")
    if len(removed) < len(keys):
        raise typer.Exit(1)


@app.command("list")
def list_pins(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Every pinned script with its state: ok, changed (refused until approved again) or
    missing. Exits 1 when any is not ok."""
    from opsplane.remoterun.scripts import file_sha256

    settings = _settings(config, data_dir, None)
    pins = _pins(settings)
    try:
        entries = pins.load()
    except ConfigError as e:
        raise _fail(str(e)) from e
    bad = 0
    for path, digest in entries.items():
        try:
            state = "ok" if file_sha256(Path(path)) == digest else "changed"
        except OSError:
            state = "missing"
        bad += state != "ok"
        typer.echo(f"{state:<8} {digest[:12]}…  {path}")
    if not entries:
        typer.echo(f"no pins in {pins.path}", err=True)
    if bad:
        raise typer.Exit(1)
