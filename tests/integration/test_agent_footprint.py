"""What ``opsplane agent`` loads: only the agent, its one link, and their libraries — nothing of
the control plane or of the client CLI (docs/scale.md, "Agent footprint"). An idle agent used
to hold 121 MiB and spend 2 s of CPU importing the server's stack before it dialed."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsplane.agent.config import AgentConfig
from opsplane.cli import agent_main
from opsplane.security.tls import TlsFiles, init_tls
from tests.e2e.fleet import free_port

# Modules an agent must never import: the control plane (engine, store, API, its settings),
# the ORM, the web stack, the client verbs and their output, Typer (it validates with
# pydantic), and importlib.metadata (60 ms of CPU for the version string).
FORBIDDEN = (
    "opsplane.engine",
    "opsplane.store",
    "opsplane.api",
    "opsplane.config",
    "opsplane.cli.main",
    "opsplane.cli.client",
    "opsplane.cli.processes",
    "opsplane.security.tls",
    "sqlalchemy",
    "alembic",
    "starlette",
    "fastapi",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "rich",
    "typer",
    "click",
    "httpx",
    "yaml",
    "aio_pika",
    "asyncssh",
    "importlib.metadata",
    # ~1 MiB each: SSH key formats and every cipher; shutil and its compression modules.
    "cryptography.hazmat.primitives.serialization",
    "tempfile",
)
# A gRPC agent has its TLS from grpcio; Python's ssl maps the system OpenSSL (4 MiB). (Its
# blocked ``import ssl`` shows in the list; ``_ssl``, which only ssl imports, must not.)
FORBIDDEN_ON_GRPC = (*FORBIDDEN, "_ssl")
WAIT = 60.0


def _modules_of_a_running_agent(tmp_path: Path, *flags: str, until: str) -> set[str]:
    """Every module an ``opsplane agent`` process imported by the time its log says ``until``
    (``python -X importtime`` lists each import on stderr)."""
    log = tmp_path / "agent.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    with log.open("wb") as err:
        agent = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "opsplane", "agent",
             "--name", "footprint", "--state-dir", str(tmp_path / "state"), *flags],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while until not in log.read_text(errors="replace"):
            assert agent.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"no {until!r} in the agent's log"
            time.sleep(0.1)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=WAIT)
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _forbidden(modules: set[str], forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_grpc_agent_imports_nothing_of_the_control_plane_or_the_cli(
    tmp_path: Path, tls: bool
) -> None:
    flags: tuple[str, ...] = ()
    if tls:
        files = init_tls(TlsFiles.of(tmp_path / "cp")).files
        flags = ("--tls-ca", str(files.ca_cert))
    # Nobody listens on the port: the agent gets as far as dialing, and says it cannot reach.
    port = free_port()
    modules = _modules_of_a_running_agent(
        tmp_path, "--server", f"127.0.0.1:{port}", *flags, until="cannot reach"
    )
    assert "grpc" in modules and "opsplane.agent.grpc_link" in modules  # it did dial
    assert _forbidden(modules, FORBIDDEN_ON_GRPC) == []


@pytest.mark.service("rabbitmq")
def test_an_amqp_agent_imports_nothing_of_the_control_plane_or_the_cli(
    tmp_path: Path,
) -> None:
    from opsplane.security.signing import load_or_create_private_key, public_key_text

    key, _ = load_or_create_private_key(tmp_path / "cp.key")
    # A port nobody listens on: the agent tries to connect and says it cannot.
    modules = _modules_of_a_running_agent(
        tmp_path,
        "--amqp-url",
        f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        "--control-plane-key",
        public_key_text(key.public_key()),
        until="reconnecting in",
    )
    assert "aio_pika" in modules and "opsplane.agent.amqp_link" in modules
    # Nor the other link: Backoff and LinkHandler live in agent/link.py, not in grpc_link.
    assert _forbidden(modules, ("grpc", "opsplane.agent.grpc_link")) == []
    # aio-pika is its link (and reads its version with importlib.metadata, and uses tempfile);
    # the TLS helpers (with cryptography's serialization) build its amqps:// SSL context.
    allowed = (
        "aio_pika",
        "importlib.metadata",
        "tempfile",
        "opsplane.security.tls",
        "cryptography.hazmat.primitives.serialization",
    )
    assert [m for m in _forbidden(modules) if not m.startswith(allowed)] == []


def test_the_full_app_and_the_fast_path_take_the_same_agent_flags() -> None:
    def opsplane(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "opsplane", *args],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )

    fast = opsplane("agent", "--help")
    full = opsplane("--url", "http://127.0.0.1:9", "agent", "--help")
    assert fast.returncode == full.returncode == 0, fast.stderr + full.stderr
    assert fast.stdout == full.stdout
    for flag in ("--server", "--enroll", "--amqp-url", "--deny", "--run-as", "--tls-ca"):
        assert flag in fast.stdout
    bad = opsplane("agent", "--label", "novalue")
    assert bad.returncode == 2
    assert "error: --label wants KEY=VALUE, got 'novalue'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_agent_flags_default_to_their_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSPLANE_AGENT_NAME", "from-env")
    monkeypatch.setenv("OPSPLANE_AGENT_SERVER", "127.0.0.1:7777")
    monkeypatch.setenv("OPSPLANE_AGENT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OPSPLANE_AGENT_HEARTBEAT_INTERVAL", "2.5")
    args = agent_main.parser().parse_args(["--label", "rack=7", "--group", "web"])
    config = agent_main.config_from(args)
    assert (config.name, config.server, config.state_dir) == (
        "from-env",
        "127.0.0.1:7777",
        tmp_path / "state",
    )
    assert config.heartbeat_interval == 2.5
    assert config.labels == {"rack": "7"} and config.groups == ("web",)
    # A flag beats its variable.
    assert agent_main.parser().parse_args(["--name", "flag"]).name == "flag"


def test_the_version_an_agent_reports_is_the_installed_one() -> None:
    # One source (opsplane.__version__), read by packaging and by the agent without
    # importlib.metadata.
    assert AgentConfig(name="v").version == importlib.metadata.version("opsplane")
