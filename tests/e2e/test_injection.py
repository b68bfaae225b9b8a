"""Injection sentinels (issue 14, "Tests"): shell-injection payloads through every
operator-controlled field that is not a command, against a real control plane, an enrolled
gRPC agent, a real sshd, a seed-004 catalog and a seed-003 script directory.

Each payload creates a file of its own if anything ever hands it to a shell (or to a program
as an option): an absolute path in a directory of this test, and for the relative forms a
name in the working directory of whichever process would run it (control plane, agent, SSH
user). After every request has been answered (and every task it created has ended), none of
those files exists, and no request was answered with a 5xx.

The one deliberate exception is seed 004's ``sh``/``bash`` catalog entries: the seed's rule
is ``sh -c "<executable> <args…> <body…>"``, so a body string *is* shell text there
(docs/catalog.md, "Shell entries pass the request's arguments through the shell"). That
contract is checked as such at the end; ``binary``, ``python`` and ``perl`` entries never go
through a shell, and each body string arrives as exactly one argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.e2e.fleet import Fleet, child_env, wait_for
from tests.e2e.test_cli import opsplane
from tests.integration.sshd import SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")

ROOT = Path(__file__).parents[2]
CATALOG = ROOT / "tests" / "fixtures" / "catalog" / "catalog.yaml"
AGENT = "inj-agent"
SSH_HOST = "inj-ssh"
ECHO_PARAMS = '#!/bin/sh\nprintf "%s|" "$PARAM_X" "$PARAM_Y"\n'
TERMINAL = {"succeeded", "failed", "canceled", "timed_out"}
SEED_TERMINAL = {"success", "failed", "timeout", "canceled"}


@dataclass
class Sentinels:
    """Payloads, each creating its own file if executed; and where those files would land."""

    directory: Path
    # Working directories of the processes that could run a relative payload.
    cwds: list[Path]
    mark: str = field(default_factory=lambda: f"inj{uuid.uuid4().hex[:8]}")
    relative: list[str] = field(default_factory=list)

    def payloads(self, tag: str) -> list[str]:
        """One payload per shell construct (and an option injection), for field ``tag``."""

        def path(i: int) -> Path:
            return self.directory / f"{self.mark}-{tag}-{i}"

        name = f"{self.mark}-{tag}-rel"
        self.relative.append(name)
        return [
            f";touch {path(1)}",
            f"$(touch {path(2)})",
            f"`touch {path(3)}`",
            f"|touch {path(4)}",
            f"&&touch {path(5)}",
            f"'$(touch {path(6)})'",
            f'"$(touch {path(7)})"',
            f"x\ntouch {path(8)}\n",
            f"--output={path(9)}",
            f"x;touch${{IFS}}{path(10)}",
            f"; touch {name}",
        ]

    def fired(self) -> list[str]:
        found = [str(p) for p in self.directory.iterdir()]
        found += [str(cwd / n) for cwd in self.cwds for n in self.relative if (cwd / n).exists()]
        return found


@dataclass
class Setup:
    fleet: Fleet
    lab: SshLab
    sentinels: Sentinels
    scripts: Path
    upload_root: Path
    remote_dir: Path
    ssh_target: dict[str, Any]
    statuses: list[tuple[str, int]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seed_tasks: list[str] = field(default_factory=list)

    def send(
        self, method: str, path: str, *, expect: set[int] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request as the admin; record its status (never 5xx) and what it started."""
        with self.fleet.client() as client:
            response = client.request(method, path, **kwargs)
        self.statuses.append((f"{method} {path}", response.status_code))
        assert response.status_code < 500, (path, kwargs, response.text)
        if expect is not None:
            assert response.status_code in expect, (path, kwargs, response.text)
        return response

    def task(self, body: dict[str, Any], **kw: Any) -> httpx.Response:
        response = self.send("POST", "/api/v1/tasks", json=body, **kw)
        if response.status_code == 201:
            self.tasks.append(response.json()["id"])
        return response

    def wait_all(self, timeout: float = 40.0) -> None:
        """Every task started here ends (bounded), so that nothing runs after the check."""
        deadline = time.monotonic() + timeout
        pending = [(f"/api/v1/tasks/{t}", TERMINAL) for t in self.tasks]
        pending += [(f"/tasks/{t}", SEED_TERMINAL) for t in self.seed_tasks]
        with self.fleet.client() as client:
            for path, ends in pending:

                def ended(path: str = path, ends: set[str] = ends) -> bool:
                    return client.get(path).json()["status"] in ends

                wait_for(ended, max(1.0, deadline - time.monotonic()), f"{path} to end")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("injection")
    (root / "sentinels").mkdir()
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "echo_params.sh").write_text(ECHO_PARAMS)
    (scripts / "echo_params.sh").chmod(0o755)
    upload_root = root / "uploads"
    upload_root.mkdir()
    (upload_root / "file.txt").write_text("payload file\n")
    with ssh_lab() as lab:
        (daemon,) = lab.start([SSH_HOST])
        known = lab.known_hosts(root / "known_hosts", [daemon])
        config = root / "opsplane.yaml"
        config.write_text(
            f"ssh_known_hosts: {known}\nupload_roots: [{upload_root}]\n"
            f"ssh_user: {lab.user.name}\nssh_key_file: {lab.client_key_path}\n"
            f"script_dirs: [{scripts}]\ncatalog: {CATALOG}\n"
        )
        fleet = Fleet(root / "fleet", server_env={"OPSPLANE_REQUIRE_ENROLLMENT": "true"})
        fleet.root.mkdir()
        cwds = [Path.cwd(), fleet.root / "work" / AGENT, lab.user.home, root, fleet.data_dir]
        sentinels = Sentinels(root / "sentinels", cwds)
        remote_dir = lab.user_dir(sentinels.mark)
        try:
            fleet.start_server("--config", str(config))
            with fleet.client() as client:
                answer = client.post("/api/v1/agents/tokens", json={"groups": ["inj"]})
            assert answer.status_code == 201, answer.text
            enroll = ("--enroll", answer.json()["token"], "--api-url", fleet.url)
            fleet.start_agent(AGENT, "inj", extra_args=enroll)
            fleet.wait_online(AGENT)
            added = opsplane(
                fleet, "hosts", "add", SSH_HOST, "--ssh",
                f"{lab.user.name}@{daemon.address}", "--group", "inj",
                "--key-file", str(lab.client_key_path),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            target = {"host": "127.0.0.1", "port": daemon.port, "username": lab.user.name}
            yield Setup(fleet, lab, sentinels, scripts, upload_root, remote_dir, target)
        finally:
            fleet.stop()


def test_no_field_but_the_command_reaches_a_shell(setup: Setup) -> None:
    s, p = setup, setup.sentinels.payloads
    both = [AGENT, SSH_HOST]

    # A misconfigured agent: run_as is checked at start, never run (the agent exits 2).
    run_as = " ".join(p("runas"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "opsplane", "agent", "--server", s.fleet.grpc,
         "--name", "inj-runas", "--run-as", run_as,
         "--state-dir", str(s.fleet.root / "agents" / "inj-runas")],
        cwd=s.fleet.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
    )  # fmt: skip

    # Task name, description, env and secret_env values, on the agent and over SSH; the
    # plain values arrive verbatim.
    env_values = p("env-value")
    for i, (name, text, secret) in enumerate(
        zip(p("task-name"), p("task-description"), p("secret-value"), strict=True)
    ):
        body = {
            "command": "env", "targets": {"hosts": both}, "name": name, "description": text,
            "env": {f"INJ_{j}": v for j, v in enumerate(env_values)},
            "secret_env": {"INJ_SECRET": secret}, "timeout": 30,
        }  # fmt: skip
        s.task(body, expect={201})
        if i == 0:
            env_task = s.tasks[-1]
    # Environment names, target names, groups and labels: refused or matching nothing.
    for tag, make in (
        ("env-name", lambda v: {"env": {v: "x"}}),
        ("secret-name", lambda v: {"secret_env": {v: "x"}}),
        ("target-host", lambda v: {"targets": {"hosts": [v]}}),
        ("target-group", lambda v: {"targets": {"groups": [v]}}),
        ("label-key", lambda v: {"targets": {"labels": {v: "x"}}}),
        ("label-value", lambda v: {"targets": {"labels": {"role": v}}}),
    ):
        for value in p(tag):
            s.task({"command": "true", "targets": {"hosts": both}, **make(value)})
    # A task's run_as (seed 002's user) is a plain user name or nothing: refused.
    for value in p("task-run-as"):
        s.task({"command": "true", "targets": {"hosts": both}, "run_as": value}, expect={422})

    # Labels given on `opsplane hosts add`: stored, matched, never executed.
    labels = p("cli-label")
    args = [arg for i, v in enumerate(labels) for arg in ("--label", f"k{i}={v}")]
    added = opsplane(s.fleet, "hosts", "add", "inj-labelled", "--ssh", "127.0.0.1:1", *args)
    assert added.returncode == 0, added.stderr
    labelled = s.send("GET", "/api/v1/hosts/inj-labelled", expect={200}).json()
    assert labelled["labels"] == {f"k{i}": v for i, v in enumerate(labels)}
    s.task({"command": "true", "targets": {"labels": {"k0": labels[0]}}}, expect={201})
    # Registering SSH hosts with hostile fields.
    for tag in ("host-name", "host-ssh", "host-key", "host-bastion", "host-group"):
        for value in p(tag):
            body: dict[str, Any] = {"name": f"h-{uuid.uuid4().hex[:6]}", "ssh": "127.0.0.1:1"}
            key = {"host-name": "name", "host-ssh": "ssh", "host-key": "key_file",
                   "host-bastion": "bastion", "host-group": "groups"}[tag]  # fmt: skip
            body[key] = [value] if key == "groups" else value
            s.send("POST", "/api/v1/hosts", json=body)

    # Uploads: paths on both sides (SFTP, never a shell).
    for value in p("upload-local"):
        upload = {"local_path": value, "remote_path": str(s.remote_dir / "a")}
        s.task({"kind": "upload", "upload": upload, "targets": {"hosts": [SSH_HOST]}})
    for value in p("upload-remote"):
        upload = {"local_path": str(s.upload_root / "file.txt"),
                  "remote_path": f"{s.remote_dir}/{value}"}  # fmt: skip
        s.task({"kind": "upload", "upload": upload, "targets": {"hosts": [SSH_HOST]}})

    # Seed 000: every field but the commands, on a command and an upload, to the real sshd.
    key = str(s.lab.client_key_path)
    for tag, make in (
        ("seed000-user", lambda v: {"targets": [{**s.ssh_target, "username": v, "key_file": key}]}),
        ("seed000-key", lambda v: {"targets": [{**s.ssh_target, "key_file": v}]}),
        ("seed000-host", lambda v: {"targets": [{"host": v}, v]}),
        ("seed000-proxy", lambda v: {"targets": [s.ssh_target], "proxy_host": v,
                                     "proxy_username": v, "proxy_key_file": v}),
    ):  # fmt: skip
        for value in p(tag):
            for path, extra in (
                ("/api/ssh/task", {"commands": ["true"]}),
                ("/api/upload/task", {"local_path": value, "remote_path": value}),
            ):
                answer = s.send("POST", path, json={"timeout": 10, **make(value), **extra})
                if answer.status_code == 201:
                    s.tasks.append(answer.json()["task_id"])

    # Seed 003: params (names and values) and script_path.
    values = p("param-value")
    for x, y in zip(values, reversed(values), strict=True):
        seed = {"script_path": "echo_params.sh", "params": {"x": x, "Y": y}}
        answer = s.send("POST", "/tasks", json=seed, expect={201})
        s.seed_tasks.append(answer.json()["id"])
    for value in p("param-name"):
        s.send("POST", "/tasks", json={"script_path": "echo_params.sh", "params": {value: "1"}})
    for value in p("script-path"):
        s.send("POST", "/tasks", json={"script_path": value})
        s.send("POST", "/tasks", json={"script_path": f"echo_params.sh{value}"})

    # Seed 004: binary, python and perl entries take each body string as one argument.
    # (The envelope's data is the output's last line: the multi-line payload is checked apart.)
    body_args = p("catalog-binary")
    one_line = [a for a in body_args if "\n" not in a]
    for args in (body_args, one_line):
        ran = s.send("POST", "/sync/tendb-cluster/demo3", json=args, expect={200}).json()
        assert ran["code"] == 0, ran
    assert ran["data"] == "binary argv: [first] [second] " + " ".join(f"[{a}]" for a in one_line)
    python_args = p("catalog-python")
    ran = s.send("POST", "/sync/sqlsvr/demopython", json=python_args, expect={200}).json()
    assert ran["code"] == 0, ran
    ran = s.send("POST", "/sync/redis/demoperl", json=p("catalog-perl"), expect={200}).json()
    assert ran["code"] == 0, ran
    session = s.send("POST", "/async/tendb-cluster/demo3", json=p("catalog-async"), expect={200})
    for value in p("catalog-route"):
        s.send("POST", f"/sync/{quote(value, safe='')}/demo1", json=[])
        s.send("POST", f"/async/tendb-cluster/{quote(value, safe='')}", json=[])
        s.send("POST", "/async/query", json={"session_id": value})
        s.send("POST", "/async/kill", json={"session_id": value})

    # Users, API tokens, enrollment tokens and enrollment names.
    for value in p("user"):
        user = {"name": value, "role": "operator", "groups": [value], "password": value * 2}
        s.send("POST", "/api/v1/users", json=user)
    for value in p("token"):
        s.send("POST", "/api/v1/tokens", json={"name": value, "role": "operator",
                                               "groups": [value]})  # fmt: skip
    for value in p("enroll"):
        made = s.send("POST", "/api/v1/agents/tokens", json={"groups": [value], "name": value})
        token = made.json().get("token", "enr_nope") if made.status_code == 201 else "enr_nope"
        fresh = s.send("POST", "/api/v1/agents/tokens", json={"groups": ["inj"]}).json()["token"]
        key = "A" * 43 + "="
        s.send("POST", "/api/v1/agents/enroll", json={"token": token, "name": value,
                                                      "public_key": key})  # fmt: skip
        s.send("POST", "/api/v1/agents/enroll", json={"token": fresh, "name": value,
                                                      "public_key": key})  # fmt: skip

    s.wait_all()
    session_id = session.json()["data"]
    wait_for(
        lambda: s.send("POST", "/async/query", json={"session_id": session_id}).json()["data"][0][
            "done"
        ],
        15,
        "the async catalog session to end",
    )
    assert agent.wait(timeout=30) == 2

    # The environment values arrived as data, byte for byte, on the agent and over SSH.
    with s.fleet.client() as client:
        runs = client.get(f"/api/v1/tasks/{env_task}/runs?output=true").json()["items"]
    assert {r["host"] for r in runs} == set(both)
    for run in runs:
        assert run["status"] == "succeeded", (
            run["host"],
            run["error"],
            run["stderr"][-300:],
            run["exit_code"],
        )
        for j, value in enumerate(env_values):
            assert f"INJ_{j}={value}\n" in run["stdout"], (run["host"], value)
    # Seed 003 params too.
    with s.fleet.client() as client:
        for task_id in s.seed_tasks:
            (run,) = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
            assert run["status"] == "succeeded", (
                run["host"],
                run["error"],
                run["stderr"][-300:],
                run["exit_code"],
            )

    assert s.sentinels.fired() == []
    assert all(code < 500 for _, code in s.statuses)
    assert len(s.statuses) > 200


def test_shell_catalog_entries_are_shell_text_by_the_seeds_contract(
    setup: Setup, tmp_path: Path
) -> None:
    # The one documented exception: seed 004 joins an sh entry's body into `sh -c "…"`.
    contract = tmp_path / "contract"
    body = [f";touch {contract}"]
    ran = setup.send("POST", "/sync/tendb-cluster/demo1", json=body, expect={200}).json()
    assert ran["code"] == 0 and ran["data"].startswith("hello aaa bbb"), ran
    assert contract.exists()
    # The same string to the binary entry is one argument, and nothing runs.
    binary = tmp_path / "binary"
    ran = setup.send("POST", "/sync/tendb-cluster/demo3", json=[f";touch {binary}"]).json()
    assert ran["data"] == f"binary argv: [first] [second] [;touch {binary}]"
    assert not binary.exists()
    assert os.listdir(setup.sentinels.directory) == []
