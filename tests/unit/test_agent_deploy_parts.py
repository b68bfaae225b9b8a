"""The pieces of ``opsplane agents deploy`` that need no host: the probe's parsing, the default
address agents dial, the shell it runs (valid sh), and the reproducible zipapp."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opsplane.agentdeploy import remote
from opsplane.agentdeploy.bundle import _write_pyz, wheel_platforms
from opsplane.agentdeploy.service import agent_server_address
from opsplane.domain.errors import ConfigError


def test_probe_reads_what_the_host_said() -> None:
    probe = remote.Probe.parse(
        "dir=/opt/opsplane-agent/web-1\nuid=0\npython=/usr/bin/python3\ncache_tag=cpython-311\n"
        "platform=linux-x86_64\nlibc=glibc 2.36\ndeps=no\ncurrent=abc\nsystemd=yes\n"
        "running=yes\n"
    )
    assert probe.libc == "glibc 2.36" and not probe.current_site
    assert remote.Probe.parse("current=abc\ncurrent_site=yes\n").current_site
    assert probe.directory == "/opt/opsplane-agent/web-1" and probe.root
    assert (probe.cache_tag, probe.platform, probe.current) == (
        "cpython-311",
        "linux-x86_64",
        "abc",
    )
    assert probe.systemd and probe.running and not probe.enrolled
    assert not probe.system_dependencies
    empty = remote.Probe.parse("dir=/x\nuid=1000\n")
    assert not empty.root and not empty.running and empty.python == ""


@pytest.mark.parametrize(
    ("listen", "api_host", "expected"),
    [
        ("0.0.0.0:50051", "cp.example", "cp.example:50051"),
        ("[::]:50051", "cp.example", "cp.example:50051"),
        ("10.0.0.1:50051", "cp.example", "10.0.0.1:50051"),
        ("0.0.0.0:50051", None, "0.0.0.0:50051"),
    ],
)
def test_agents_dial_the_grpc_address_with_the_apis_host_for_a_wildcard(
    listen: str, api_host: str | None, expected: str
) -> None:
    assert agent_server_address(listen, api_host) == expected


def test_every_remote_command_is_valid_sh() -> None:
    d, digest, py = "/opt/opsplane-agent/web 1", "ab" * 32, "/usr/bin/python3"
    commands = [
        remote.probe_command(None, "web-1"),
        remote.probe_command("agents", "web-1"),
        remote.install_command(d, digest, py, site=True, ship_site=True),
        remote.configure_command(d, py, digest, {"OPSPLANE_AGENT_NAME": "web 1"}, site=True),
        remote.enroll_command(d, py, "http://cp:8000", "web-1"),
        remote.start_command(d, py, systemd=False),
        remote.start_command(d, py, systemd=True),
        remote.stop_command(d, systemd=False),
        remote.runner_script(d, py),
        remote.configure_command(d, f"{d}/venv-0123/bin/python", digest, {}, site=False),
        remote.venv_command(d, py, digest, ("grpcio==1.0",), wheelhouse=f"{d}/w", index_url=None),
        remote.venv_command(d, py, digest, ("a==1",), wheelhouse=None, index_url="https://x/"),
    ]
    for command in commands:
        checked = subprocess.run(["sh", "-n"], input=command, text=True, capture_output=True)
        assert checked.returncode == 0, (command, checked.stderr)


def test_the_unit_runs_the_deployed_bundle_from_its_environment_file() -> None:
    unit = remote.systemd_unit("/opt/opsplane-agent/web-1", "/usr/bin/python3")
    assert "EnvironmentFile=/opt/opsplane-agent/web-1/agent.env\n" in unit
    assert "Environment=PYTHONPATH=/opt/opsplane-agent/web-1/current/opsplane.pyz:" in unit
    assert "ExecStart=/usr/bin/python3 -m opsplane agent" in unit


def test_the_zipapp_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    _write_pyz(tmp_path / "a.pyz")
    _write_pyz(tmp_path / "b.pyz")
    assert (tmp_path / "a.pyz").read_bytes() == (tmp_path / "b.pyz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.pyz") as archive:
        names = set(archive.namelist())
    assert {"__main__.py", "opsplane/__init__.py", "opsplane/agent/daemon.py"} <= names


def test_the_deployed_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "opsplane-agent.service"
    unit.write_text(remote.systemd_unit("/usr/bin", sys.executable))
    verdict = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in verdict.stderr.splitlines()
        # systemd before 254 does not know the growing restart delay (docs/operations.md)
        if line.strip()
        and "RestartSteps" not in line
        and "RestartMaxDelaySec" not in line
        # verify checks that the files named exist here: the bundle is not deployed here
        and "agent.env" not in line
    ]
    assert not problems, verdict.stderr


def test_the_wheelhouse_asks_for_every_tag_the_hosts_c_library_loads() -> None:
    tags = wheel_platforms("linux-x86_64", "glibc 2.36")
    assert tags[:2] == ["linux_x86_64", "manylinux_2_36_x86_64"]
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags
    old = wheel_platforms("linux-aarch64", "glibc 2.12")
    assert "manylinux2010_aarch64" in old and "manylinux2014_aarch64" not in old
    assert "musllinux_1_2_x86_64" in wheel_platforms("linux-x86_64", "musl 1.2")
    with pytest.raises(ConfigError, match="no wheelhouse"):
        wheel_platforms("macosx-14.0-arm64", "")
