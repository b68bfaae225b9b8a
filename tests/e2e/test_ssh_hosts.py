"""Agentless hosts end to end: registered through the CLI behind a bastion, mixed with an agent
in one task, a directory pushed by SFTP, and seed 000's API. Real sshd, real processes."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Fleet, wait_for
from tests.e2e.test_cli import opsplane
from tests.integration.sshd import HOST, SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")
TARGETS = ("ssh-1", "ssh-2", "ssh-3")
# Where the mixed push lands: SSH targets (the test user) and an agent (root) share this
# machine's disk, so a directory both may write.
PUSH_ROOT = Path(f"/tmp/opsplane-e2e-push-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(["bastion"], forwarding=True)
        the_lab.start(TARGETS)
        yield the_lab


@pytest.fixture(scope="module")
def fleet(lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("ssh-fleet")
    known = lab.known_hosts(root / "known_hosts", lab.daemons.values())
    (root / "uploads").mkdir()
    config = root / "opsplane.yaml"
    # Seed 000's rule: the config file gives defaults (user, key), requests override them.
    config.write_text(
        f"ssh_known_hosts: {known}\nupload_roots: [{root / 'uploads'}]\n"
        f"ssh_user: {lab.user.name}\nssh_key_file: {lab.client_key_path}\n"
        f"ssh_group_bastions: {{edge: '{lab.user.name}@{lab.daemons['bastion'].address}'}}\n"
    )
    the_fleet = Fleet(root)
    try:
        the_fleet.start_server("--config", str(config))
        the_fleet.start_agent("agent-1", "mixed")
        # An agent that takes uploads under PUSH_ROOT (docs/filepush.md). The SSH targets
        # share this machine's disk: the agent sees its own directory there (a bind mount in a
        # mount namespace of its own), so each side's files can be checked.
        PUSH_ROOT.mkdir()
        shutil.chown(PUSH_ROOT, lab.user.name)
        (root / "agent-2-view").mkdir()
        bind = f'mount --bind {root / "agent-2-view"} {PUSH_ROOT} && exec "$@"'
        the_fleet.start_agent(
            "agent-2",
            "pushmix",
            extra_args=("--upload-root", str(PUSH_ROOT)),
            wrap=("unshare", "-m", "--propagation", "private", "sh", "-c", bind, "sh"),
        )
        the_fleet.wait_online("agent-1", "agent-2")
        # Every test finds the SSH targets in the inventory, whichever runs first (xdist does
        # not keep a module's order); the first test adds them again from the CLI.
        for name in TARGETS:
            _add(the_fleet, lab, name, "--group", "mixed", "--group", "sshweb")
        yield the_fleet
    finally:
        the_fleet.stop()
        shutil.rmtree(PUSH_ROOT, ignore_errors=True)


def _add(fleet: Fleet, lab: SshLab, name: str, *extra: str) -> None:
    key = str(lab.client_key_path)
    result = opsplane(
        fleet, "hosts", "add", name,
        "--ssh", f"{lab.user.name}@{lab.daemons[name].address}",
        "--bastion", f"{lab.user.name}@{lab.daemons['bastion'].address}",
        "--key-file", key, "--bastion-key-file", key, *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_ssh_hosts_added_from_the_cli_run_through_the_bastion_beside_an_agent(
    fleet: Fleet, lab: SshLab
) -> None:
    for name in TARGETS:
        _add(fleet, lab, name, "--group", "mixed", "--group", "sshweb")
    assert fleet.host("ssh-1")["link"] == "ssh"  # type: ignore[index]
    before = lab.daemons["bastion"].count("direct-tcpip")
    result = opsplane(fleet, "run", "--group", "mixed", "--json", "--", "echo via-$(id -un)")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    runs = {run["host"]: run for run in document["runs"]}
    assert set(runs) == {*TARGETS, "agent-1"}
    for name in TARGETS:
        assert runs[name]["stdout"] == f"via-{lab.user.name}\n"
    # Every SSH target was reached through the bastion's direct-tcpip channels.
    assert lab.daemons["bastion"].count("direct-tcpip") >= before + len(TARGETS)


def test_failures_are_per_host_and_timeouts_kill(fleet: Fleet, lab: SshLab) -> None:
    result = opsplane(
        fleet, "run", "--group", "sshweb", "--timeout", "1", "--json", "--",
        'case "$(cat /proc/sys/kernel/hostname)" in *) sleep 5;; esac',
    )  # fmt: skip
    runs = json.loads(result.stdout)["runs"]
    assert result.returncode == 1 and {r["status"] for r in runs} == {"timed_out"}


def test_push_copies_a_directory_to_every_host(fleet: Fleet, lab: SshLab) -> None:
    source = fleet.root / "uploads" / "site"
    (source / "css").mkdir(parents=True)
    (source / "index.html").write_text("<h1>hi</h1>")
    (source / "css" / "a.css").write_text("b{}")
    remote = f"{lab.user.home}/pushed-{uuid.uuid4().hex[:8]}"
    result = opsplane(fleet, "push", str(source), remote, "--group", "sshweb", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    for run in json.loads(result.stdout)["runs"]:
        assert run["status"] == "succeeded"
        assert set(run["stdout"].split()) == {f"{remote}/index.html", f"{remote}/css/a.css"}
    assert (Path(remote) / "css" / "a.css").read_text() == "b{}"


def test_push_to_ssh_hosts_and_an_agent_has_one_result_shape(fleet: Fleet, lab: SshLab) -> None:
    _add(fleet, lab, "ssh-1", "--group", "mixed", "--group", "sshweb", "--group", "pushmix")
    source = fleet.root / "uploads" / "conf.txt"
    source.write_text("a=1\n")
    remote = f"{PUSH_ROOT}/conf.txt"
    result = opsplane(fleet, "push", str(source), remote, "--group", "pushmix", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {run["host"]: run for run in json.loads(result.stdout)["runs"]}
    assert set(runs) == {"ssh-1", "agent-2"}
    assert runs["ssh-1"]["stdout"] == f"{remote}\n"
    assert runs["agent-2"]["stdout"] == f"{remote}\n"
    assert Path(remote).read_text() == "a=1\n"
    assert (fleet.root / "agent-2-view" / "conf.txt").read_text() == "a=1\n"
    again = opsplane(fleet, "push", str(source), remote, "--group", "pushmix", "--json")
    runs = {run["host"]: run for run in json.loads(again.stdout)["runs"]}
    assert runs["agent-2"]["stdout"] == f"unchanged {remote}\n"


def test_push_chown_gives_files_to_a_user_on_ssh_hosts(fleet: Fleet, lab: SshLab) -> None:
    """``--chown USER[:GROUP]`` (issue 19): the lab's SSH login is not root, so it may give
    files to itself and is refused, per file and saying why, anyone else."""
    source = fleet.root / "uploads" / "owned.txt"
    source.write_text("x\n")
    remote = f"{lab.user.home}/chown-{uuid.uuid4().hex[:8]}.txt"
    mine = opsplane(
        fleet, "push", str(source), remote, "--host", "ssh-1", "--chown", lab.user.name, "--json"
    )
    assert mine.returncode == 0, mine.stdout + mine.stderr
    assert Path(remote).stat().st_uid == lab.user.uid
    theirs = opsplane(fleet, "push", str(source), remote, "--host", "ssh-1", "--chown", "root:")
    assert theirs.returncode == 1
    assert "the SSH login is not root" in theirs.stdout + theirs.stderr
    bad = opsplane(fleet, "push", str(source), remote, "--host", "ssh-1", "--chown", ":")
    assert bad.returncode == 2 and "--chown wants USER" in bad.stderr


def test_push_refuses_paths_outside_the_upload_roots_and_agents_without_roots(
    fleet: Fleet,
) -> None:
    outside = opsplane(fleet, "push", "/etc/passwd", "/tmp/x", "--host", "ssh-1")
    assert outside.returncode == 2 and "upload root" in outside.stderr
    to_agent = opsplane(fleet, "push", str(fleet.root / "uploads"), "/tmp/x", "--host", "agent-1")
    assert to_agent.returncode == 1, to_agent.stdout + to_agent.stderr
    assert "accepts no uploads" in to_agent.stdout + to_agent.stderr


def _poll(fleet: Fleet, path: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        with fleet.client() as client:
            answer: dict[str, Any] = client.get(path).json()
        return None if answer["status"] == "PENDING" else answer

    return wait_for(done, 30, path)


def test_seed_000_ssh_and_upload_api(fleet: Fleet, lab: SshLab) -> None:
    bastion = lab.daemons["bastion"]
    key = str(lab.client_key_path)
    common = {
        "proxy_host": HOST, "proxy_port": bastion.port, "proxy_username": lab.user.name,
        "proxy_key_file": key,
    }  # fmt: skip
    targets = [
        {
            "host": HOST,
            "port": lab.daemons["ssh-2"].port,
            "username": lab.user.name,
            "key_file": key,
        },
        f"{lab.user.name}@{HOST}:{lab.daemons['ssh-3'].port}",
    ]
    with fleet.client() as client:
        body = {**common, "targets": targets, "commands": ["echo one", "exit 3"]}
        created = client.post("/api/ssh/task", json=body)
        assert created.status_code == 201, created.text
        task_id = created.json()["task_id"]
    answer = _poll(fleet, f"/api/ssh/task/{task_id}")
    assert answer["status"] == "FAILURE" and answer["task_id"] == task_id
    by_command = {(r["command"], r["exit_code"], r["success"]) for r in answer["results"]}
    assert by_command == {("echo one", 0, True), ("exit 3", 3, False)}
    assert len(answer["results"]) == 4 and all(r["host"] for r in answer["results"])
    # The request's targets are ad hoc: `opsplane hosts` lists them only with --adhoc.
    adhoc = {r["host"] for r in answer["results"]}
    listed = opsplane(fleet, "hosts", "--json")
    assert listed.returncode == 0, listed.stderr
    assert not adhoc & {h["name"] for h in json.loads(listed.stdout)["items"]}
    every = json.loads(opsplane(fleet, "hosts", "--adhoc", "--json").stdout)["items"]
    assert {h["name"] for h in every if h["adhoc"]} >= adhoc

    (fleet.root / "uploads" / "one.txt").write_text("1")
    remote = f"{lab.user.home}/up-{uuid.uuid4().hex[:8]}"
    with fleet.client() as client:
        created = client.post("/api/upload/task", json={
            **common, "targets": targets[1:], "local_path": str(fleet.root / "uploads" / "one.txt"),
            "remote_path": remote,
        })  # fmt: skip
        assert created.status_code == 201, created.text
        upload_id = created.json()["task_id"]
        bad = client.post("/api/ssh/task", json={"targets": [], "commands": ["x"]})
        assert bad.status_code == 422
    answer = _poll(fleet, f"/api/upload/task/{upload_id}")
    assert answer["status"] == "SUCCESS", answer
    assert answer["results"][0]["uploaded"] == [remote] and answer["results"][0]["failed"] == []


def test_inventory_file_group_bastion_default_and_label_targeting(
    fleet: Fleet, lab: SshLab
) -> None:
    key = str(lab.client_key_path)
    inventory = fleet.root / "inventory.yaml"
    entries = [
        {"name": f"inv-{name}", "ssh": f"{lab.user.name}@{lab.daemons[name].address}",
         "key_file": key, "bastion_key_file": key, "groups": ["edge"],
         "labels": {"tier": "front" if name != "ssh-3" else "back"}}
        for name in TARGETS
    ]  # fmt: skip
    inventory.write_text(json.dumps(entries))  # JSON is YAML
    result = opsplane(fleet, "hosts", "import", str(inventory))
    assert result.returncode == 0, result.stderr
    # No bastion in the entries: the group "edge" default chain applies.
    assert fleet.host("inv-ssh-1")["ssh"]["bastions"].endswith(str(lab.daemons["bastion"].port))  # type: ignore[index]
    run = opsplane(fleet, "run", "--label", "tier=front", "--json", "--", "echo labelled")
    assert run.returncode == 0, run.stdout + run.stderr
    hosts = {r["host"] for r in json.loads(run.stdout)["runs"]}
    assert hosts == {"inv-ssh-1", "inv-ssh-2"}
    bad = opsplane(fleet, "run", "--label", "tier=nowhere", "--", "true")
    assert bad.returncode == 2 and "no host carries" in bad.stderr
