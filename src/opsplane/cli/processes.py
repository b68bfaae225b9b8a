"""The verbs that start processes: ``server``, ``agent`` and ``demo``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import cast

import httpx
import typer
import uvicorn
from fastapi import FastAPI

from opsplane.app_factory import create_app, warm_up
from opsplane.config import Settings, split_host_port
from opsplane.domain.errors import ConfigError
from opsplane.engine.core import Engine
from opsplane.security.agents import AgentRegistry
from opsplane.security.service import SecurityService
from opsplane.security.tls import TlsFiles

DEMO_AGENTS = (("demo-1", "web"), ("demo-2", "web"), ("demo-3", "db"))

# The control plane's collector thresholds (CPython's defaults: 700, 10, 10). A broadcast keeps
# every run's row, event and command alive for its transaction; with the defaults they were
# promoted into the oldest generation and set off full collections, each walking every object
# of every open stream: 9 during one 5,000-host broadcast, about half of the control plane's
# CPU for it; none with these (docs/scale.md, Fan-out).
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """The server's garbage collector: collect the young less often (``GC_THRESHOLDS``), and
    move what start-up left (modules, classes, the app) out of every later collection;
    ``gc.collect()`` first, so that no garbage is frozen with them."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


class _Server(uvicorn.Server):
    """On Ctrl-C, stops the demo's agents first, so they leave while the server still listens
    instead of reconnecting to a server that is going away."""

    def __init__(self, config: uvicorn.Config, engine: Engine, enrolled: AgentRegistry) -> None:
        super().__init__(config)
        self.engine = engine
        self.enrolled = enrolled
        self.agents: list[subprocess.Popen[bytes]] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        super().handle_exit(sig, frame)


def _uvicorn_server(settings: Settings) -> _Server:
    host, port = split_host_port(settings.listen)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together (HTTPS for the API)")
    app = create_app(settings)
    # HTTPS when tls_cert/tls_key are set (docs/tls.md); uvicorn loads them at start.
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="on", log_config=None, access_log=False,
        ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
    )  # fmt: skip
    return _Server(config, app.state.engine, app.state.agents)


async def _start_engine(server: _Server) -> None:
    """Start the engine before uvicorn (whose lifespan then finds it started), so that an
    unreachable database or broker is one ConfigError line, not a startup traceback."""
    try:
        await server.engine.start()
    except BaseException:
        await server.engine.stop()
        raise
    await prepare_to_serve(cast(FastAPI, server.config.app))


async def prepare_to_serve(app: FastAPI) -> None:
    """Work that would otherwise stop the event loop while the server serves, done once
    before it does (docs/reliability.md, scenario 8): the routing FastAPI builds on a first
    request (``warm_up``), and the start-up heap taken out of the garbage collector's sight.

    Start-up leaves some 170,000 objects that live as long as the process (modules, routes and
    their validators, SQLAlchemy's and gRPC's own). Every full collection walked all of them:
    0.1-0.3 s of event loop on 2 cores, 0.7 s when they were busy, each time allocation
    triggered one (every few seconds under an output flood). Frozen, they are
    never walked again; a full collection walks only what was made since (``tune_gc``, which
    also spaces young collections out: docs/scale.md, the broadcast and the collector)."""
    await warm_up(app)
    tune_gc()


async def _serve(server: _Server) -> None:
    await _start_engine(server)
    await server.serve()


def serve(settings: Settings) -> None:
    """Run the control plane until interrupted."""
    server = _uvicorn_server(settings)
    asyncio.run(_serve(server))
    if not server.started:
        raise typer.Exit(1)


def run_demo(settings: Settings) -> None:
    """The control plane plus three local agents (separate processes), until Ctrl-C."""
    asyncio.run(_demo(settings))


async def _demo(settings: Settings) -> None:
    server = _uvicorn_server(settings)
    await _start_engine(server)
    # Before serving: the bootstrap token from the environment (if any) first, then the demo's
    # own admin, so that no "initial admin token" file is written for the demo.
    security: SecurityService = cast(FastAPI, server.config.app).state.security
    await security.bootstrap(generate=False)
    credentials = await security.ensure_demo_admin()
    serving = asyncio.create_task(server.serve())
    url = f"{'https' if settings.tls_cert else 'http'}://{settings.listen}"
    if not await _wait_ready(url, serving):
        with contextlib.suppress(BaseException):
            await serving
        raise typer.Exit(1)
    agents = [
        _spawn_agent(
            settings, name, group, await _enrollment(server.enrolled, settings, name, group), url
        )
        for name, group in DEMO_AGENTS
    ]
    server.agents = agents
    typer.echo(
        f"\nopsplane demo is running\n"
        f"  web page         : {url}   (log in as {credentials.name}, "
        f"password {credentials.password})\n"
        f"  API              : {url}   (OpenAPI: {url}/docs)\n"
        f"  agent endpoint   : {settings.grpc_listen}\n"
        f"  agents           : {', '.join(f'{n} ({g})' for n, g in DEMO_AGENTS)}\n"
        f"{_seed002_line(settings)}"
        f"  data directory   : {settings.data_dir}\n"
        f"  credentials      : {credentials.path} (yours only; reused on the next start)\n\n"
        f"Try, in another terminal:\n"
        f"  export OPSPLANE_TOKEN={credentials.token}\n"
        f"  opsplane hosts\n"
        f"  opsplane run --all -- 'uname -a; echo done'\n"
        f"  opsplane run --group web -- 'for i in 1 2 3; do echo tick $i; sleep 1; done'\n\n"
        f"Press Ctrl-C to stop.\n"
    )
    try:
        await serving
    finally:
        await asyncio.to_thread(_stop_agents, agents)


def _seed002_line(settings: Settings) -> str:
    """The banner's line for agents written from seed 002 (``demo --seed002``), if any."""
    if settings.amqp_url is None or settings.require_enrollment:
        return ""
    from opsplane.transport.amqp.link import mask_url

    return (
        f"  seed-002 agents  : {mask_url(settings.amqp_url)} (sys_cmd_exchange, "
        "sys_result_exchange, sys_monitor_exchange; unenrolled agents accepted)\n"
    )


async def _wait_ready(url: str, serving: asyncio.Task[None], within: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    # Our own listener, asked only whether it is up: its certificate (maybe for another name
    # than the listen address) needs no check here.
    async with httpx.AsyncClient(verify=False) as client:
        while loop.time() < deadline and not serving.done():
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz", timeout=2.0)).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    return False


def _agent_state_dir(settings: Settings, name: str) -> Path:
    return Path(settings.data_dir) / "agents" / name


async def _enrollment(
    agents: AgentRegistry, settings: Settings, name: str, group: str
) -> str | None:
    """A one-time token for a demo agent that has not enrolled yet (None: it has)."""
    from opsplane.agent.enroll import enrolled

    if enrolled(_agent_state_dir(settings, name)) is not None:
        return None
    # Bound to the agent's name: the demo's host may already be in the inventory (an earlier
    # demo in this data directory), and then only a token issued for its name enrolls it.
    created = await agents.create_token([group], created_by="demo", name=name)
    return created.secret


def _spawn_agent(
    settings: Settings, name: str, group: str, token: str | None, api_url: str
) -> subprocess.Popen[bytes]:
    state_dir = _agent_state_dir(settings, name)
    argv = [
        sys.executable, "-m", "opsplane", "agent",
        "--server", settings.grpc_listen,
        "--name", name,
        "--group", group,
        "--label", "env=demo",
        "--state-dir", str(state_dir),
    ]  # fmt: skip
    tls = TlsFiles.of(settings.data_dir)
    if settings.grpc_tls_cert is None and tls.server_cert.exists():
        # The endpoint serves the certificate `opsplane keys init` made (docs/tls.md).
        argv += ["--tls-ca", str(tls.ca_cert)]
    if token is not None:
        # Demo agents enroll like any other (docs/security.md), on their first start.
        argv += ["--enroll", token, "--api-url", api_url]
    return subprocess.Popen(argv, env=os.environ.copy())


def _stop_agents(agents: list[subprocess.Popen[bytes]]) -> None:
    for agent in agents:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
    for agent in agents:
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
