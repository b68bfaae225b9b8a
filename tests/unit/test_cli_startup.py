"""What starting ``opsplane`` costs: the root app imports no verb's module, and a client verb
imports only its client's stack (docs/scale.md, "CLI start-up"). Importing every verb group, the
settings and cryptography used to take 0.5 s of CPU (2-4 s wall on a loaded machine) before
``opsplane run`` sent its request."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from opsplane.cli.main import _Verbs, app

# Nothing of the control plane, its libraries or its links: every client verb talks HTTP.
SERVER_SIDE = (
    "sqlalchemy",
    "alembic",
    "grpc",
    "aio_pika",
    "aiormq",
    "asyncssh",
    "uvicorn",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic_settings",
    "opsplane.engine",
    "opsplane.store",
    "opsplane.api",
    "opsplane.transport",
    "opsplane.config",
)
# What the root app alone (and `opsplane --help`) must not load either: the verbs' stacks.
VERB_SIDE = (
    "httpx",
    "httpcore",
    "cryptography",
    "yaml",
    "psutil",
    "opsplane.security",
    "opsplane.cli.client",
    "opsplane.cli.output",
    "opsplane.cli.run",
)


def _imported(code: str) -> set[str]:
    # A None entry is an import blocked on purpose (cli/__init__.py), not a module.
    listing = "print('\\n'.join(n for n, m in sys.modules.items() if m is not None))"
    probe = f"{code}\nimport sys\n{listing}"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(result.stdout.split())


def _hits(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_root_app_imports_no_verb_and_nothing_of_the_server() -> None:
    modules = _imported("import opsplane.cli.main")
    assert _hits(modules, SERVER_SIDE + VERB_SIDE) == []


def test_opsplane_help_lists_every_verb_without_importing_them() -> None:
    code = (
        "import sys\nfrom opsplane.cli.main import app\n"
        "sys.argv = ['opsplane', '--help']\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    modules = _imported(code)
    assert _hits(modules, SERVER_SIDE + VERB_SIDE) == []


def test_opsplane_run_imports_its_client_and_nothing_of_the_server() -> None:
    # Up to sending its request: the verb's module, as the root app resolves `run`.
    modules = _imported(
        "import typer\nfrom opsplane.cli.main import app\n"
        "group = typer.main.get_command(app)\n"
        "ctx = group.make_context('opsplane', ['run', 'true'])\n"
        "group.resolve_command(ctx, ['run', 'true'])"
    )
    assert "opsplane.cli.run" in modules and "httpx" in modules
    # Typer itself coerces a command's parameters with pydantic (not pydantic-settings).
    server_side = tuple(m for m in SERVER_SIDE if m != "pydantic")
    # click and pygments: httpx's own command-line tool (cli/__init__.py keeps it out).
    forbidden = (*server_side, "cryptography", "yaml", "psutil", "click", "pygments")
    assert _hits(modules, forbidden) == []


@pytest.mark.parametrize("name", list(_Verbs.lazy))
def test_each_lazy_verb_loads_and_is_listed_with_its_own_help(name: str) -> None:
    group = typer.main.get_command(app)
    ctx = group.make_context("opsplane", [name, "--help"], resilient_parsing=True)
    command = group.get_command(ctx, name)
    assert command is not None and command.name == name
    # The line `opsplane --help` shows without importing it is the verb's own first line.
    own = (command.help or "").strip().splitlines()[0]
    assert own.rstrip(".") == _Verbs.lazy[name].help.rstrip(".")
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"opsplane {name}" in result.output or f"root {name}" in result.output


def test_opsplane_help_lists_the_verbs_in_order_and_suggests_lazy_ones() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ")]
    names = [n for n in listed if n in set(typer.main.get_command(app).list_commands(None))]
    assert names[:6] == ["run", "push", "server", "demo", "agent", "worker"]
    assert set(names) >= set(_Verbs.lazy) | {"db", "keys"}
    typo = CliRunner().invoke(app, ["hostz"])
    assert typo.exit_code == 2
    assert "Did you mean 'hosts'?" in typo.output
