"""``opsplane agents deploy`` and ``upgrade``: turn SSH hosts into enrolled agents, and replace
their agent version, over the SSH link (docs/operations.md, "Deploying agents").

Per host, in order: probe (one command: python3, its ABI, what runs there now); if the same
bundle already runs and the host is online, nothing else ("current"); otherwise upload the
bundle into a new release directory and self-check it there (the running agent untouched, so a
broken bundle stops here), stop the running agent (SIGTERM: it drains), point ``current`` at
the release, enroll if needed (a one-time token bound to the host's name and groups), start it
(a systemd unit where systemd runs, else a supervised process) and wait until it is online.

The host's row stays, and becomes the agent's host (its runs go to the agent) while keeping its
SSH access for later upgrades (``HostService.hand_to_agent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from shlex import quote as _q
from typing import TYPE_CHECKING, cast

from opsplane.agentdeploy import remote
from opsplane.agentdeploy.bundle import Bundle, build_bundle, build_wheelhouse
from opsplane.domain.errors import InvalidInput, OpsplaneError
from opsplane.domain.records import HostRecord
from opsplane.engine.changes import Changes
from opsplane.engine.hosts import HostService
from opsplane.engine.leases import Lease
from opsplane.execution import Outcome
from opsplane.security.agents import AgentRegistry
from opsplane.transport.base import SSH_LINK, Link

if TYPE_CHECKING:  # the SSH link needs the optional asyncssh
    from opsplane.transport.ssh import SshLink, SshTarget

log = logging.getLogger(__name__)

DEPLOYED, CURRENT, FAILED, SKIPPED = "deployed", "current", "failed", "skipped"
AGENT_LINK = "grpc"
_TOKEN_LIFETIME = timedelta(minutes=15)
# The lease on a host under deployment (one per host, in the database: two instances sharing it
# never work on one host at once). Renewed every third of its life while the host is worked on;
# an instance that dies mid-deploy frees its hosts once it has expired.
_LEASE_TTL = 60.0
_LEASE_PREFIX = "agent-deploy:"
# How the agent's dependencies reach a host: the bundle's own (zipapp + site), the host
# python3's, or a venv made there by pip (the fallback for compiled ones that do not load).
INSTALL_MODES = ("auto", "zipapp", "venv")


def lease_name(host: str) -> str:
    """The lease of a host under deployment; leases' names hold 64 characters."""
    name = _LEASE_PREFIX + host
    if len(name) <= 64:
        return name
    return _LEASE_PREFIX + hashlib.sha256(host.encode()).hexdigest()[: 64 - len(_LEASE_PREFIX)]


@dataclass(frozen=True)
class DeployRequest:
    """Which hosts (a group and/or names), where their agents dial (``server``: the gRPC
    endpoint as the hosts reach it; ``api_url``: the API, to enroll), and how."""

    server: str
    api_url: str
    group: str | None = None
    hosts: tuple[str, ...] = ()
    remote_dir: str | None = None
    bundle: str | None = None  # a bundle directory on the control plane; default: this install
    parallel: int = 20
    online_timeout: float = 90.0
    # How long a restart waits for the runs in flight on the host to end.
    drain_timeout: float = 300.0
    created_by: str = "admin"
    # upgrade only
    canary: int = 0
    max_errors: int = 0
    # auto: the bundle's zipapp and site where the host's python3 loads them, else the host
    # python3's own dependencies, else a venv; zipapp or venv force one.
    install: str = ""  # "" : the deployer's (the agent_deploy_install setting)


@dataclass
class HostResult:
    host: str
    outcome: str
    detail: str
    supervisor: str = ""  # "systemd", "process", or "" when nothing was started
    seconds: float = 0.0
    # How the agent's dependencies are installed: "zipapp" (the bundle's), "system" (the host
    # python3's), "venv" (pip into a venv there), or "" when nothing was installed.
    install: str = ""

    @property
    def shown(self) -> str:
        """The outcome as the CLI prints it: ``deployed (venv)``, ``already current``."""
        if self.outcome == CURRENT:
            return "already current"
        return f"{self.outcome} ({self.install})" if self.install else self.outcome


@dataclass
class DeployReport:
    digest: str
    results: list[HostResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(r.outcome == FAILED for r in self.results)


def agent_server_address(grpc_listen: str, api_host: str | None) -> str:
    """Where agents dial by default: the gRPC listen address, with the API's host name in
    place of a wildcard (0.0.0.0, ::), which no agent can dial."""
    host, sep, port = grpc_listen.rpartition(":")
    if sep and host.strip("[]") in ("0.0.0.0", "::", "") and api_host:
        return f"{api_host}:{port}"
    return grpc_listen


class _Failed(Exception):
    """One host's deployment failed; the message says why."""


OnResult = Callable[[HostResult], None]


class AgentDeployer:
    def __init__(
        self,
        hosts: HostService,
        agents: AgentRegistry,
        ssh: Link | None,
        bundle_cache: Path,
        *,
        write: Callable[[], AbstractAsyncContextManager[Changes]] | None = None,
        instance: str = "",
        install: str = "auto",
        index_url: str = "",
    ) -> None:
        self._hosts = hosts
        self._agents = agents
        self._ssh = cast("SshLink", ssh) if ssh is not None else None
        self._bundle_cache = bundle_cache
        self._bundle_lock = asyncio.Lock()
        self._wheel_lock = asyncio.Lock()
        # Hosts a deploy or upgrade of this instance is working on: a second one is refused
        # here, and across instances by the host's lease (``write``: the engine's).
        self._working: set[str] = set()
        self._write = write
        self._instance = instance
        self.install = install
        self.index_url = index_url

    async def bundle(self, path: str | None = None) -> Bundle:
        """The bundle to push: ``path``'s, or this installation's (built once, cached)."""
        async with self._bundle_lock:
            if path:
                return await asyncio.to_thread(Bundle.load, Path(path))
            return await asyncio.to_thread(build_bundle, self._bundle_cache)

    async def deploy(
        self, request: DeployRequest, on_result: OnResult | None = None
    ) -> DeployReport:
        """Deploy (or bring up to date) the agent on every selected host, in parallel;
        ``on_result`` hears each host's result as soon as it is known."""
        return await self._roll(request, on_result, upgrade=False)

    async def upgrade(
        self, request: DeployRequest, on_result: OnResult | None = None
    ) -> DeployReport:
        """Replace the agent where one was deployed: the ``canary`` first hosts alone (any of
        them failing stops everything), then the rest, stopping once more than
        ``max_errors`` failed."""
        return await self._roll(request, on_result, upgrade=True)

    async def check(self, request: DeployRequest) -> None:
        """Raise InvalidInput for a request that would deploy nowhere (before a streamed
        answer has begun, so that it can still be a 4xx)."""
        if self._ssh is None:
            raise InvalidInput("the SSH link is not available: pip install 'opsplane[ssh]'")
        if request.install and request.install not in INSTALL_MODES:
            raise InvalidInput(f"install must be one of {', '.join(INSTALL_MODES)}")
        await self._select(request)

    async def _roll(
        self, request: DeployRequest, on_result: OnResult | None, *, upgrade: bool
    ) -> DeployReport:
        started = time.monotonic()
        await self.check(request)
        hosts = await self._select(request)
        bundle = await self.bundle(request.bundle)
        report = DeployReport(bundle.digest)
        slots = asyncio.Semaphore(max(1, request.parallel))
        stop_reason: list[str] = []
        failures = 0

        def told(result: HostResult) -> HostResult:
            if on_result is not None:
                on_result(result)
            return result

        async def one(host: HostRecord) -> HostResult:
            nonlocal failures
            async with slots:
                if stop_reason:
                    return told(HostResult(host.name, SKIPPED, stop_reason[0]))
                result = await self._one(host, bundle, request, upgrade=upgrade)
                failures += result.outcome == FAILED
                if upgrade and failures > request.max_errors and not stop_reason:
                    stop_reason.append(
                        f"not upgraded: more than {request.max_errors} host(s) failed (max errors)"
                    )
            return told(result)

        rest = hosts
        if upgrade and request.canary > 0:
            canaries, rest = hosts[: request.canary], hosts[request.canary :]
            report.results += await asyncio.gather(*(one(h) for h in canaries))
            bad = [r for r in report.results if r.outcome == FAILED]
            if bad:
                why = f"not upgraded: the canary failed ({bad[0].host}: {bad[0].detail})"
                report.results += [told(HostResult(h.name, SKIPPED, why)) for h in rest]
                rest = []
        report.results += await asyncio.gather(*(one(h) for h in rest))
        report.seconds = time.monotonic() - started
        return report

    @asynccontextmanager
    async def guard(self, host: str) -> AsyncIterator[bool]:
        """Whether this deploy may work on ``host`` (no other one of this instance, nor of
        another instance on the same database, holds it), held for the block."""
        if host in self._working:
            yield False
            return
        self._working.add(host)
        lease: Lease | None = None
        renewing: asyncio.Task[None] | None = None
        try:
            if self._write is not None:
                lease = Lease(self._write, lease_name(host), holder=self._instance, ttl=_LEASE_TTL)
                if not await lease.claim():
                    lease = None
                    yield False
                    return
                renewing = asyncio.create_task(self._renew(lease))
            yield True
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            if lease is not None:
                try:
                    await asyncio.shield(lease.release())
                except Exception:  # it expires by itself
                    log.warning("could not release the lease on %s", host, exc_info=True)
            self._working.discard(host)

    @staticmethod
    async def _renew(lease: Lease) -> None:
        while True:
            await asyncio.sleep(_LEASE_TTL / 3)
            try:
                if not await lease.claim():
                    log.warning("lost the lease %s while deploying to it", lease.name)
            except Exception:  # a database outage: the next renewal tries again
                log.warning("could not renew the lease %s", lease.name, exc_info=True)

    async def _select(self, request: DeployRequest) -> list[HostRecord]:
        if not request.group and not request.hosts:
            raise InvalidInput("name a group or hosts to deploy to")
        candidates = await self._hosts.hosts_reachable_by_ssh()
        by_name = {h.name: h for h in candidates}
        missing = [n for n in request.hosts if n not in by_name]
        if missing:
            raise InvalidInput(
                f"no SSH access known for: {', '.join(missing)} (opsplane hosts add)"
            )
        chosen = [
            h
            for h in candidates
            if h.name in request.hosts or (request.group and request.group in (h.groups or []))
        ]
        if not chosen:
            raise InvalidInput(f"no host with SSH access in group {request.group}")
        return chosen

    async def _one(
        self, host: HostRecord, bundle: Bundle, request: DeployRequest, *, upgrade: bool
    ) -> HostResult:
        started = time.monotonic()
        async with self.guard(host.name) as mine:
            if not mine:
                return HostResult(
                    host.name, FAILED, "another deploy or upgrade of it is in progress "
                    "(on this control-plane instance or another one sharing its database)",
                )  # fmt: skip
            try:
                result = await self._deploy_host(host, bundle, request, upgrade=upgrade)
            except (_Failed, OpsplaneError) as e:
                result = HostResult(host.name, FAILED, str(e))
        result.seconds = round(time.monotonic() - started, 2)
        log.info("agent %s on %s: %s (%s)", result.outcome, host.name, result.detail,
                 f"{result.seconds}s")  # fmt: skip
        return result

    async def _deploy_host(
        self, host: HostRecord, bundle: Bundle, request: DeployRequest, *, upgrade: bool
    ) -> HostResult:
        assert self._ssh is not None
        name = host.name
        target = self._ssh.targets.get(name)
        if target is None:
            raise _Failed("no SSH access known for this host in this control plane")
        run = _Runner(self._ssh, target)
        probe = remote.Probe.parse(
            await run(remote.probe_command(request.remote_dir, name), "probe", within=60)
        )
        if upgrade and not probe.current:
            return HostResult(name, SKIPPED, "no agent deployed here yet: opsplane agents deploy")
        if not probe.python:
            raise _Failed("no python3 on the host's PATH")
        install, why = self._install_mode(probe, bundle, request)
        site = install == "zipapp"
        directory, python = probe.directory, probe.python
        settings = {
            "OPSPLANE_AGENT_SERVER": request.server,
            "OPSPLANE_AGENT_NAME": name,
            "OPSPLANE_AGENT_STATE_DIR": f"{directory}/state",
            "OPSPLANE_AGENT_API_URL": request.api_url,
        }
        same = (probe.current, probe.settings) == (bundle.digest, remote.env_file_digest(settings))
        if same and probe.running and await self._online(name):
            return HostResult(name, CURRENT, f"already current ({bundle.digest[:12]}, running)")
        if probe.current == bundle.digest and site and not probe.current_site:
            # This release fell back to the venv when it was unpacked (its site did not load
            # there) and has no site/ to run on: it keeps the venv.
            install, site = "venv", False
            why = "dependencies in a venv (the bundle's did not load here at its install)"
        if install == "venv":
            python = await self._venv(run, probe, bundle)
        if probe.current != bundle.digest:
            try:
                await self._unpack(run, directory, bundle, python, site=site)
            except _Failed as e:
                # The ABI and platform matched, but a compiled module does not load (an older
                # C library than the wheels', another CPU): the venv, where auto allows it.
                if not site or (request.install or self.install) != "auto":
                    raise
                if remote.SITE_UNUSABLE not in str(e):
                    raise
                reason = str(e).split(remote.SITE_UNUSABLE, 1)[1].strip()
                install, site = "venv", False
                why = f"dependencies in a venv: the bundle's do not load there ({reason})"
                python = await self._venv(run, probe, bundle)
                await self._unpack(run, directory, bundle, python, site=False)
        if probe.running:
            await self._drain(name, request.drain_timeout)
            await run(remote.stop_command(directory, systemd=self._systemd(probe)), "stop",
                      within=remote.STOP_WAIT + 30)  # fmt: skip
        await run(
            remote.configure_command(directory, python, bundle.digest, settings, site=site),
            "configure",
        )
        await self._hosts.hand_to_agent(name, AGENT_LINK)
        await self._enroll(run, host, probe, python, request)
        systemd = self._systemd(probe)
        await run(remote.start_command(directory, python, systemd=systemd), "start", within=60)
        if not await self._wait_online(name, request.online_timeout):
            tail = await run.output(f"tail -n 5 {_q(directory)}/agent.log")
            raise _Failed(
                f"started, but not online within {request.online_timeout:.0f}s; "
                f"agent.log ends: {tail.strip()[-500:]}"
            )
        how = (
            f"systemd unit {remote.UNIT_NAME}"
            if systemd
            else "supervised process (setsid restart loop, "
            f"{directory}/supervisor.pid): {self._why_not_systemd(probe)}"
        )
        if probe.current == bundle.digest:
            verb = "restarted" if same else "reconfigured"
        else:
            verb = "upgraded" if probe.current else "deployed"
        return HostResult(
            name, DEPLOYED, f"{verb} {bundle.digest[:12]}, online; runs as {how}; {why}",
            supervisor="systemd" if systemd else "process", install=install,
        )  # fmt: skip

    @staticmethod
    def _systemd(probe: remote.Probe) -> bool:
        return probe.systemd and probe.root

    @staticmethod
    def _why_not_systemd(probe: remote.Probe) -> str:
        if not probe.systemd:
            return "systemd is not running on the host (no /run/systemd/system)"
        return "the SSH user is not root, so no systemd unit could be installed"

    async def _unpack(
        self, run: _Runner, directory: str, bundle: Bundle, python: str, *, site: bool
    ) -> None:
        """Upload the bundle and unpack it beside the running agent, never over the release
        it runs from; self-checked there."""
        incoming = remote.incoming_dir(directory, bundle.digest)
        await run(f"mkdir -p {_q(incoming)}", "mkdir")
        for file in bundle.files if site else bundle.files[:1]:
            await run.upload(bundle.path / file, incoming + "/")
        await run(
            remote.install_command(directory, bundle.digest, python, site=site, ship_site=site),
            "self-check of the new bundle",
            within=300,
        )

    def _install_mode(
        self, probe: remote.Probe, bundle: Bundle, request: DeployRequest
    ) -> tuple[str, str]:
        """How the host gets the agent's dependencies, and why: the bundle's (same Python
        ABI and platform), the host python3's own, or a venv made there by pip."""
        wanted = request.install or self.install
        there = f"python3 there ({probe.cache_tag or '?'}, {probe.platform or '?'})"
        fits = bundle.has_site and (probe.cache_tag, probe.platform) == (
            bundle.cache_tag,
            bundle.platform,
        )
        if wanted == "venv":
            return "venv", "dependencies in a venv (install: venv)"
        if fits:
            return "zipapp", "dependencies from the bundle"
        if probe.system_dependencies:
            return "system", f"{there} has the dependencies itself"
        mismatch = (
            f"{there} cannot load the bundle's compiled dependencies (built for "
            f"{bundle.cache_tag}, {bundle.platform})"
        )
        if wanted == "zipapp":
            raise _Failed(
                f"{mismatch} and does not have its own (install: zipapp forbids the venv "
                "fallback): install grpcio, protobuf, cryptography, httpx and psutil for it "
                "(docs/operations.md, 'Deploying agents')"
            )
        return "venv", f"dependencies in a venv: {mismatch}"

    async def _venv(self, run: _Runner, probe: remote.Probe, bundle: Bundle) -> str:
        """Make (or reuse) the host's venv for the bundle's dependencies; its python."""
        if not bundle.distributions:
            raise _Failed("the bundle lists no distributions to install into a venv")
        requirements = bundle.distributions
        key = hashlib.sha256(
            "\n".join((probe.python, probe.cache_tag, *requirements)).encode()
        ).hexdigest()
        venv = remote.venv_dir(probe.directory, key)
        ready = await run.output(f"[ -f {_q(venv)}/ready ] && echo ready")
        wheelhouse = None
        if "ready" not in ready and not self.index_url:
            async with self._wheel_lock:  # one pip download per kind of host at a time
                try:
                    local = await asyncio.to_thread(
                        build_wheelhouse, self._bundle_cache / "wheelhouse", requirements,
                        probe.cache_tag, probe.platform, probe.libc,
                    )  # fmt: skip
                except OpsplaneError as e:
                    raise _Failed(f"wheelhouse: {e}") from e
            wheelhouse = f"{probe.directory}/wheelhouse-{key[:16]}"
            await run(f"mkdir -p {_q(probe.directory)}", "mkdir")
            await run.upload(local, wheelhouse)
        await run(
            remote.venv_command(
                probe.directory, probe.python, key, requirements,
                wheelhouse=wheelhouse, index_url=self.index_url or None,
            ),
            "venv",
            within=600,
        )  # fmt: skip
        return f"{venv}/bin/python"

    async def _enroll(
        self,
        run: _Runner,
        host: HostRecord,
        probe: remote.Probe,
        python: str,
        request: DeployRequest,
    ) -> None:
        identity = self._agents.identity(host.name)
        if probe.enrolled and identity is not None and not identity.revoked:
            return
        if identity is not None and not identity.revoked:
            # Enrolled, but the host lost its key: only a new enrollment brings it back.
            await self._agents.revoke(host.name, revoked_by=request.created_by)
        token = await self._agents.create_token(
            [g for g in host.groups or [] if g], created_by=request.created_by,
            lifetime=_TOKEN_LIFETIME, name=host.name,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="opsplane-enroll-") as scratch:
            path = Path(scratch) / "enroll.token"
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(token.secret)
            await run.upload(path, f"{probe.directory}/enroll.token")
        await run(
            remote.enroll_command(probe.directory, python, request.api_url, host.name),
            "enrollment",
            within=120,
        )

    async def _online(self, name: str) -> bool:
        try:
            host = await self._hosts.get_host(name)
        except OpsplaneError:
            return False
        return host.link != SSH_LINK and host.status == "online"

    async def _drain(self, name: str, within: float) -> None:
        """Wait until no run is in flight on the host, so that the restart loses no work (the
        agent's own SIGTERM would cancel and spool them)."""
        deadline = time.monotonic() + within
        while (busy := await self._hosts.runs_in_flight(name)) > 0:
            if time.monotonic() >= deadline:
                raise _Failed(
                    f"not restarted: {busy} run(s) still in flight after {within:.0f}s of "
                    "draining (the new bundle is unpacked; run again later)"
                )
            await asyncio.sleep(0.5)

    async def _wait_online(self, name: str, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await self._online(name):
                return True
            await asyncio.sleep(0.5)
        return False


class _Runner:
    """Commands and uploads on one host; a failure raises _Failed naming the step."""

    def __init__(self, link: SshLink, target: SshTarget) -> None:
        self._link = link
        self._target = target

    async def __call__(self, command: str, step: str, *, within: float = 120) -> str:
        result = await self._link.executor.run(self._target, command, timeout=within)
        if result.status != Outcome.SUCCEEDED:
            why = _last_line(result.stderr) or result.error or f"exit status {result.exit_code}"
            raise _Failed(f"{step} failed: {why}")
        return result.stdout

    async def output(self, command: str) -> str:
        result = await self._link.executor.run(self._target, command, timeout=30)
        return result.stdout

    async def upload(self, local: Path, remote_path: str) -> None:
        result = await self._link.executor.upload(self._target, local, remote_path, timeout=600)
        if result.status != Outcome.SUCCEEDED:
            why = result.error or "; ".join(f"{p}: {e}" for p, e in result.failed)
            raise _Failed(f"upload of {local.name} failed: {why}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
