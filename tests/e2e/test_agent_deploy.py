"""``opsplane agents deploy|upgrade`` end to end: three loopback sshd hosts (no systemd) become
enrolled agents with one command, a second deploy changes nothing, an upgrade whose canary fails
its self-check stops there, and a good upgrade restarts every agent. Real sshd, real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsplane.agentdeploy.bundle import Bundle
from tests.e2e.fleet import Fleet, free_port
from tests.e2e.test_cli import opsplane
from tests.integration.sshd import SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")
# OPSPLANE_DEPLOY_TEST_HOSTS=10 measures a larger deployment (docs/operations.md).
TARGETS = tuple(
    f"web-{i}" for i in range(1, int(os.environ.get("OPSPLANE_DEPLOY_TEST_HOSTS", "3")) + 1)
)


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(TARGETS)
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
        for name in TARGETS:
            added = opsplane(
                the_fleet, "hosts", "add", name,
                "--ssh", f"{lab.user.name}@{lab.daemons[name].address}",
                "--key-file", str(lab.client_key_path), "--group", "web",
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
        yield the_fleet
    finally:
        the_fleet.stop()


def _roll(fleet: Fleet, verb: str, base: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = opsplane(
        fleet, "agents", verb, "--group", "web", "--remote-dir", str(base), "--json", *extra,
        timeout=300,
    )  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def _outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {r["host"]: r["outcome"] for r in report["results"]}


def _answers(fleet: Fleet) -> dict[str, str]:
    result = opsplane(fleet, "run", "--group", "web", "--json", "--", "echo hi from $(pwd)")
    return {run["host"]: run["status"] for run in json.loads(result.stdout)["runs"]}


@pytest.fixture(scope="module")
def deployed(fleet: Fleet, remote_base: Path) -> dict[str, Any]:
    code, report = _roll(fleet, "deploy", remote_base)
    assert code == 0, report
    return report


def test_deploy_turns_ssh_hosts_into_enrolled_agents_under_a_supervisor(
    fleet: Fleet, remote_base: Path, deployed: dict[str, Any]
) -> None:
    print(f"deploy of {len(TARGETS)} hosts: {deployed['seconds']} s")
    assert _outcomes(deployed) == dict.fromkeys(TARGETS, "deployed")
    for result in deployed["results"]:
        # No systemd on these hosts: the fallback is said, per host.
        assert result["supervisor"] == "process"
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
    # same bundle, restarted on its new agent.env.
    code, report = _roll(fleet, "deploy", remote_base, "--api-url", fleet.url + "/")
    assert code == 0 and _outcomes(report) == dict.fromkeys(TARGETS, "deployed")
    assert all(r["detail"].startswith("reconfigured") for r in report["results"])
    assert (remote_base / "web-1" / "agent.env").read_text().count(fleet.url + "/") == 1
    assert _answers(fleet) == dict.fromkeys(TARGETS, "succeeded")


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
    (source,) = (fleet.data_dir / "agent-bundles").iterdir()
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
    code, report = _roll(fleet, "upgrade", remote_base, "--canary", "1", "--bundle", str(good))
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
