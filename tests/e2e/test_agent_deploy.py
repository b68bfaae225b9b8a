"""``opsplane agents deploy|upgrade`` end to end: three loopback sshd hosts (no systemd) become
enrolled agents with one command, a second deploy changes nothing, an upgrade whose canary fails
its self-check stops there, and a good upgrade restarts every agent; each host's line is printed
as it finishes; a host whose python3 cannot load the bundle's compiled dependencies gets a venv
from a pushed wheelhouse. Real sshd, real processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsplane.agentdeploy.bundle import Bundle
from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import Fleet, free_port
from tests.e2e.test_cli import opsplane
from tests.integration.sshd import SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")
# OPSPLANE_DEPLOY_TEST_HOSTS=10 measures a larger deployment (docs/operations.md).
TARGETS = tuple(
    f"web-{i}" for i in range(1, int(os.environ.get("OPSPLANE_DEPLOY_TEST_HOSTS", "3")) + 1)
)
# Hosts share this many sshd daemons (each host its own directory), so that 50 hosts need not
# be 50 daemons: OPSPLANE_DEPLOY_TEST_DAEMONS=10.
DAEMONS = tuple(
    f"sshd-{i}"
    for i in range(int(os.environ.get("OPSPLANE_DEPLOY_TEST_DAEMONS", str(len(TARGETS)))))
)
# The host of the venv fallback, in a group of its own.
VENV_HOST = "venv-1"


def _daemon(lab: SshLab, host: str) -> str:
    index = TARGETS.index(host) if host in TARGETS else 0
    return lab.daemons[DAEMONS[index % len(DAEMONS)]].address


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(DAEMONS)
        yield the_lab


@pytest.fixture(scope="module")
def remote_base() -> Iterator[Path]:
    base = Path(f"/tmp/opsplane-deploy-{uuid.uuid4().hex[:8]}")
    yield base
    # The supervised agents outlive their SSH sessions by design: stop exactly ours.
    for pidfile in base.glob("*/supervisor.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while list(base.glob("*/supervisor.pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("deploy-fleet")
    known = lab.known_hosts(root / "known_hosts", lab.daemons.values())
    config = root / "opsplane.yaml"
    config.write_text(f"ssh_known_hosts: {known}\n")
    the_fleet = Fleet(root, server_env={"OPSPLANE_REQUIRE_ENROLLMENT": "true"})
    try:
        the_fleet.start_server("--config", str(config))
        for name in (*TARGETS, VENV_HOST):
            added = opsplane(
                the_fleet, "hosts", "add", name,
                "--ssh", f"{lab.user.name}@{_daemon(lab, name)}",
                "--key-file", str(lab.client_key_path),
                "--group", "venv" if name == VENV_HOST else "web",
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
        yield the_fleet
    finally:
        the_fleet.stop()


def _roll(
    fleet: Fleet, verb: str, base: Path, *extra: str, group: str = "web"
) -> tuple[int, dict[str, Any]]:
    """Run ``opsplane agents VERB --json``: one JSON line per host as it finishes, then the
    report (returned, with ``live``: per host line, whether the CLI was still running, i.e.
    still waiting for other hosts, when the line was read)."""
    env = {**os.environ, "OPSPLANE_URL": fleet.url, "OPSPLANE_TOKEN": ADMIN_TOKEN}
    command = [
        sys.executable, "-m", "opsplane", "agents", verb, "--group", group,
        "--remote-dir", str(base), "--json", *extra,
    ]  # fmt: skip
    lines: list[dict[str, Any]] = []
    read_at: list[float] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as cli:
        assert cli.stdout is not None and cli.stderr is not None
        try:
            for text in cli.stdout:  # ends when the CLI does: bounded by its wait below
                lines.append(json.loads(text))
                read_at.append(time.monotonic())
            code = cli.wait(timeout=600)
        finally:
            if cli.poll() is None:
                cli.kill()
        errors = cli.stderr.read()
    assert lines and lines[-1]["type"] == "report", errors
    report = lines[-1]
    hosts = [line for line in lines[:-1] if line["type"] == "host"]
    assert sorted(h["host"] for h in hosts) == sorted(r["host"] for r in report["results"])
    # How long before the report each host's line was read: printed as it finished, not at the end.
    report["ahead"] = [read_at[-1] - at for at in read_at[:-1]]
    report["order"] = [h["host"] for h in hosts]
    return code, report


def _cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user + system, its waited-for children included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {r["host"]: r["outcome"] for r in report["results"]}


def _answers(fleet: Fleet, group: str = "web") -> dict[str, str]:
    result = opsplane(fleet, "run", "--group", group, "--json", "--", "echo hi from $(pwd)")
    return {run["host"]: run["status"] for run in json.loads(result.stdout)["runs"]}


@pytest.fixture(scope="module")
def deployed(fleet: Fleet, remote_base: Path) -> dict[str, Any]:
    assert fleet.server is not None
    before = _cpu_seconds(fleet.server.pid)
    code, report = _roll(fleet, "deploy", remote_base)
    report["cpu"] = _cpu_seconds(fleet.server.pid) - before
    assert code == 0, report
    return report


def test_deploy_turns_ssh_hosts_into_enrolled_agents_under_a_supervisor(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any]
) -> None:
    print(
        f"deploy of {len(TARGETS)} hosts ({len(DAEMONS)} sshd): {deployed['seconds']} s, "
        f"control plane {deployed['cpu']:.1f} CPU-s (the bundle's build included)"
    )
    assert _outcomes(deployed) == dict.fromkeys(TARGETS, "deployed")
    for result in deployed["results"]:
        # No systemd on these hosts: the fallback is said, per host.
        assert result["supervisor"] == "process"
        assert (result["install"], result["shown"]) == ("zipapp", "deployed (zipapp)")
        assert "systemd is not running" in result["detail"]
        assert (remote_base / result["host"] / "supervisor.pid").is_file()
    host = fleet.host("web-1")
    assert host is not None and host["link"] == "grpc" and host["status"] == "online"
    with fleet.client() as client:
        agents = {a["name"]: a for a in client.get("/api/v1/agents").json()["items"]}
        params = {"action": "agent.deploy"}
        (record, *_) = client.get("/api/v1/audit", params=params).json()["items"]
    assert record["detail"]["results"] == dict.fromkeys(TARGETS, "deployed")
    assert {n: agents[n]["groups"] for n in TARGETS} == {n: ["web"] for n in TARGETS}
    assert _answers(fleet) == dict.fromkeys(TARGETS, "succeeded")


def test_a_second_deploy_changes_nothing(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any]
) -> None:
    pids = {n: (remote_base / n / "agent.pid").read_text() for n in TARGETS}
    code, report = _roll(fleet, "deploy", remote_base)
    assert code == 0 and _outcomes(report) == dict.fromkeys(TARGETS, "current")
    assert report["digest"] == deployed["digest"]
    assert {n: (remote_base / n / "agent.pid").read_text() for n in TARGETS} == pids
    # Other settings for the agents (here the API's URL, spelled otherwise) are applied: the
    # same bundle, restarted on its new agent.env. One host at a time: each host's line comes
    # as it is done, well before the report.
    code, report = _roll(
        fleet, "deploy", remote_base, "--api-url", fleet.url + "/", "--parallel", "1"
    )
    assert code == 0 and _outcomes(report) == dict.fromkeys(TARGETS, "deployed")
    assert all(r["detail"].startswith("reconfigured") for r in report["results"])
    assert report["order"] == [r["host"] for r in report["results"]]
    assert report["ahead"][0] >= sum(r["seconds"] for r in report["results"][1:]) * 0.8
    assert (remote_base / "web-1" / "agent.env").read_text().count(fleet.url + "/") == 1
    assert _answers(fleet) == dict.fromkeys(TARGETS, "succeeded")


def test_the_cli_prints_each_host_as_it_finishes_then_a_summary(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any]
) -> None:
    # As the second deploy left them (its --api-url): nothing to do.
    result = opsplane(
        fleet, "agents", "deploy", "--group", "web", "--remote-dir", str(remote_base),
        "--api-url", fleet.url + "/", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in TARGETS:
        assert any(
            line.startswith(f"{name}  already current") for line in result.stdout.splitlines()
        ), result.stdout
    assert f"{len(TARGETS)} already current · bundle {deployed['digest'][:12]}" in result.stderr


def test_an_unreachable_host_fails_with_the_reason(
    fleet: Fleet, lab: SshLab, remote_base: Path
) -> None:
    added = opsplane(
        fleet, "hosts", "add", "gone-1", "--ssh", f"{lab.user.name}@127.0.0.1:{free_port()}",
        "--key-file", str(lab.client_key_path),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    result = opsplane(
        fleet, "agents", "deploy", "--host", "gone-1", "--remote-dir", str(remote_base),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "gone-1" in result.stdout and "failed" in result.stdout
    assert "probe failed" in result.stdout and "refused" in result.stdout.lower()


def _variant(fleet: Fleet, tmp_path: Path, name: str, init: str | None) -> Path:
    """A copy of the control plane's bundle whose zipapp differs: ``init`` replaces
    ``opsplane/__init__.py`` (None: only an extra file, a working bundle)."""
    (source,) = (fleet.data_dir / "agent-bundles").glob("*/manifest.json")
    source = source.parent
    target = tmp_path / name
    shutil.copytree(source, target)
    pyz = target / "opsplane.pyz"
    with zipfile.ZipFile(source / "opsplane.pyz") as old, zipfile.ZipFile(pyz, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if init is not None and item.filename == "opsplane/__init__.py":
                data = init.encode()
            new.writestr(item, data)
        new.writestr("opsplane/VARIANT", name)
    return target


def test_an_upgrade_stops_when_its_canary_fails_and_leaves_the_agents_running(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any], tmp_path: Path
) -> None:
    broken = _variant(fleet, tmp_path, "broken", 'raise ImportError("broken bundle")\n')
    code, report = _roll(fleet, "upgrade", remote_base, "--canary", "1", "--bundle", str(broken))
    assert code == 1
    outcomes = _outcomes(report)
    assert outcomes == {n: "failed" if n == "web-1" else "skipped" for n in TARGETS}
    failed = report["results"][0]
    assert "self-check" in failed["detail"] and "broken bundle" in failed["detail"]
    assert all("canary failed" in r["detail"] for r in report["results"][1:])
    # The old agents were never stopped: still current, still answering.
    digests = {(remote_base / n / "current" / "digest").read_text().strip() for n in TARGETS}
    assert digests == {deployed["digest"]}
    assert _answers(fleet) == dict.fromkeys(TARGETS, "succeeded")
    # Without a canary, one host at a time: the upgrade stops once more than 1 failed.
    code, report = _roll(
        fleet, "upgrade", remote_base, "--canary", "0", "--max-errors", "1", "--parallel", "1",
        "--bundle", str(broken),
    )  # fmt: skip
    assert code == 1
    assert _outcomes(report) == {
        n: "failed" if n in ("web-1", "web-2") else "skipped" for n in TARGETS
    }
    assert "max errors" in report["results"][-1]["detail"]


def test_an_upgrade_restarts_every_agent_on_the_new_bundle(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any], tmp_path: Path
) -> None:
    pids = {n: (remote_base / n / "agent.pid").read_text() for n in TARGETS}
    good = _variant(fleet, tmp_path, "good", None)
    # A command still running when web-1's new bundle is unpacked (right before its restart)
    # finishes first: the restart loses no work.
    unpacked = remote_base / "web-1" / "releases" / Bundle.load(good).digest[:16]
    command = f"until [ -d {unpacked} ]; do sleep 0.1; done; sleep 2; echo drained"
    with fleet.client() as client:
        body = {"command": command, "targets": {"groups": ["web"]}, "timeout": 120}
        task = client.post("/api/v1/tasks", json=body).json()
    assert fleet.server is not None
    before = _cpu_seconds(fleet.server.pid)
    code, report = _roll(fleet, "upgrade", remote_base, "--canary", "1", "--bundle", str(good))
    cpu = _cpu_seconds(fleet.server.pid) - before
    print(f"upgrade of {len(TARGETS)} hosts: {report['seconds']} s, control plane {cpu:.1f} CPU-s")
    assert code == 0, report
    assert fleet.wait_task_done(task["id"])["status"] == "succeeded"
    assert {r["stdout"] for r in fleet.runs(task["id"]).values()} == {"drained\n"}
    assert _outcomes(report) == dict.fromkeys(TARGETS, "deployed")
    assert all(r["detail"].startswith("upgraded") for r in report["results"])
    for name in TARGETS:
        assert (remote_base / name / "current" / "digest").read_text().strip() == report["digest"]
        assert (remote_base / name / "agent.pid").read_text() != pids[name]
    assert _answers(fleet) == dict.fromkeys(TARGETS, "succeeded")


def test_a_supervised_agent_that_dies_is_restarted(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any]
) -> None:
    pidfile = remote_base / "web-2" / "agent.pid"
    before = int(pidfile.read_text())
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text and int(text) != before:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the supervisor did not restart the agent")


# pip installing some twenty wheels on a loaded 2-core machine: minutes, not seconds.
@pytest.mark.timeout(600)
def test_a_host_whose_python_cannot_load_the_bundle_gets_a_venv_from_a_wheelhouse(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any], tmp_path: Path
) -> None:
    home = remote_base / VENV_HOST
    # Forced (--install venv, or the agent_deploy_install setting).
    code, report = _roll(fleet, "deploy", remote_base, "--install", "venv", group="venv")
    assert code == 0, report
    (result,) = report["results"]
    assert (result["install"], result["shown"]) == ("venv", "deployed (venv)"), result
    (ready,) = home.glob("venv-*/ready")
    assert f"{ready.parent}/bin/python" in (home / "run-agent.sh").read_text()
    assert (home / "current" / "pythonpath").read_text().strip().endswith("opsplane.pyz")
    assert not list(home.glob("wheelhouse-*"))  # removed once installed
    assert _answers(fleet, "venv") == {VENV_HOST: "succeeded"}
    # Found: a bundle whose compiled dependencies are for another Python (as its manifest
    # says) cannot run there, and the host's python3 has none of its own: the venv it is.
    other = _variant(fleet, tmp_path, "other-python", None)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "cache_tag": "cpython-399"}))
    code, report = _roll(
        fleet, "upgrade", remote_base, "--canary", "0", "--bundle", str(other), group="venv"
    )
    assert code == 0, report
    (result,) = report["results"]
    assert result["shown"] == "deployed (venv)" and result["detail"].startswith("upgraded")
    assert "cannot load the bundle's compiled dependencies" in result["detail"]
    assert list(home.glob("venv-*/ready")) == [ready]  # the same requirements: reused
    assert _answers(fleet, "venv") == {VENV_HOST: "succeeded"}
    # Found later: the ABI and platform match, but a compiled module does not load there (as
    # with wheels for a newer glibc than the host's): the bundle's own check of its
    # dependencies fails, and the venv takes over.
    glibc = _variant(fleet, tmp_path, "old-glibc", None)
    _break_site_module(glibc, "grpc/__init__.py", "version `GLIBC_2.99' not found")
    code, report = _roll(
        fleet, "upgrade", remote_base, "--canary", "0", "--bundle", str(glibc), group="venv"
    )
    assert code == 0, report
    (result,) = report["results"]
    assert result["shown"] == "deployed (venv)", result
    assert "do not load there" in result["detail"] and "GLIBC_2.99" in result["detail"]
    assert list(home.glob("venv-*/ready")) == [ready]
    assert _answers(fleet, "venv") == {VENV_HOST: "succeeded"}


def _break_site_module(bundle: Path, member: str, error: str) -> None:
    """Make one module of the bundle's site raise ImportError(``error``) when imported."""
    source = bundle / "site.tar.gz"
    broken = bundle / "site.broken.tar.gz"
    with tarfile.open(source) as old, tarfile.open(broken, "w:gz") as new:
        for info in old.getmembers():
            data = old.extractfile(info) if info.isfile() else None
            if info.name == member:
                payload = f"raise ImportError({error!r})\n".encode()
                info.size = len(payload)
                new.addfile(info, io.BytesIO(payload))
            else:
                new.addfile(info, data)
    broken.replace(source)
