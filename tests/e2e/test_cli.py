"""The ``opsplane`` client verbs against a real control plane and real agents."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import Fleet


def opsplane(fleet: Fleet, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OPSPLANE_URL": fleet.url,
        "OPSPLANE_TOKEN": ADMIN_TOKEN,
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "opsplane", *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip


def test_run_prints_each_hosts_output_prefixed_then_a_summary(fleet: Fleet) -> None:
    result = opsplane(fleet, "run", "--all", "--", "echo hello; echo warn >&2")
    assert result.returncode == 0, result.stderr
    for host in ("web-1", "web-2", "db-1"):
        # Prefixes are padded to the longest host name so that output lines up.
        assert re.search(rf"^{host} *\| hello$", result.stdout, re.MULTILINE), result.stdout
        assert re.search(rf"^{host} *! warn$", result.stderr, re.MULTILINE), result.stderr
    assert "succeeded" in result.stdout and "3 succeeded" in result.stdout


def test_run_exits_non_zero_when_a_host_fails_and_json_is_machine_readable(fleet: Fleet) -> None:
    result = opsplane(fleet, "run", "--group", "web", "--json", "--", "exit 5")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["task"]["status"] == "failed"
    assert sorted((r["host"], r["exit_code"]) for r in document["runs"]) == [
        ("web-1", 5),
        ("web-2", 5),
    ]


def test_run_with_host_and_timeout(fleet: Fleet) -> None:
    result = opsplane(fleet, "run", "--host", "db-1", "--timeout", "1", "--json", "--", "sleep 30")
    assert result.returncode == 1
    assert json.loads(result.stdout)["runs"][0]["status"] == "timed_out"


def test_run_without_targets_or_with_unknown_host_says_why(fleet: Fleet) -> None:
    no_targets = opsplane(fleet, "run", "--", "true")
    assert no_targets.returncode == 2 and "--host" in no_targets.stderr
    unknown = opsplane(fleet, "run", "--host", "ghost", "--", "true")
    assert unknown.returncode == 2 and "ghost" in unknown.stderr
    assert "Traceback" not in no_targets.stderr + unknown.stderr


def test_hosts_and_tasks_verbs(fleet: Fleet) -> None:
    hosts = opsplane(fleet, "hosts")
    assert hosts.returncode == 0
    assert (
        all(name in hosts.stdout for name in ("web-1", "web-2", "db-1"))
        and "online" in hosts.stdout
    )
    ran = json.loads(
        opsplane(fleet, "run", "--host", "web-1", "--json", "--", "echo logged").stdout
    )
    task_id = ran["task"]["id"]
    listing = opsplane(fleet, "tasks")
    assert listing.returncode == 0 and task_id in listing.stdout
    shown = opsplane(fleet, "tasks", "show", task_id)
    assert shown.returncode == 0 and "web-1" in shown.stdout and "succeeded" in shown.stdout
    logs = opsplane(fleet, "tasks", "logs", task_id)
    assert logs.returncode == 0 and "logged" in logs.stdout
    follow = opsplane(fleet, "tasks", "logs", task_id, "--follow")
    assert follow.returncode == 0 and "logged" in follow.stdout


def test_tasks_cancel_from_the_cli(fleet: Fleet) -> None:
    task = fleet.create_task("sleep 30", hosts=["web-2"])
    result = opsplane(fleet, "tasks", "cancel", task["id"])
    assert result.returncode == 0, result.stderr
    assert fleet.wait_task_done(task["id"])["status"] == "canceled"


def test_cli_reports_an_unreachable_api_without_a_traceback(fleet: Fleet) -> None:
    env = {**os.environ, "OPSPLANE_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "opsplane", "hosts"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert (
        result.returncode == 2
        and "cannot reach" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_run_with_retries_and_a_rerun_of_the_failed_hosts(fleet: Fleet, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    flaky = f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; [ "$n" -ge 1 ]'
    retried = opsplane(fleet, "run", "--host", "db-1", "--retries", "2", "--json", "--", flaky)
    assert retried.returncode == 0, retried.stderr
    runs = json.loads(retried.stdout)["runs"]
    assert sorted((r["attempt"], r["status"]) for r in runs) == [(1, "failed"), (2, "succeeded")]

    # Each agent runs in its own work directory, so $PWD tells the hosts apart.
    failing = opsplane(
        fleet, "run", "--group", "web", "--json", "--", 'case "$PWD" in */web-2) exit 4;; esac'
    )
    assert failing.returncode == 1
    task_id = json.loads(failing.stdout)["task"]["id"]
    again = opsplane(fleet, "tasks", "rerun", task_id, "--only", "failed", "--json")
    assert again.returncode == 1, again.stderr
    document = json.loads(again.stdout)
    assert [r["host"] for r in document["runs"]] == ["web-2"]
    assert document["task"]["rerun_of"] == task_id


def test_bad_pacing_options_are_refused_with_the_reason(fleet: Fleet) -> None:
    result = opsplane(fleet, "run", "--all", "--max-errors", "150%", "--", "true")
    assert result.returncode != 0 and "max_errors" in result.stderr, result.stderr
    then_alone = opsplane(fleet, "run", "--all", "--then", "2", "--", "true")
    assert then_alone.returncode == 2 and "--canary" in then_alone.stderr


def test_secret_env_reaches_the_command_from_the_callers_environment(fleet: Fleet) -> None:
    os.environ["OPSPLANE_TEST_SECRET"] = "s3cret-value"
    try:
        result = opsplane(
            fleet, "run", "--host", "db-1", "--env", "MODE=check",
            "--secret-env", "OPSPLANE_TEST_SECRET", "--json", "--",
            '[ "$OPSPLANE_TEST_SECRET" = s3cret-value ] && echo "match $MODE"',
        )  # fmt: skip
    finally:
        del os.environ["OPSPLANE_TEST_SECRET"]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runs"][0]["stdout"] == "match check\n"
    missing = opsplane(
        fleet, "run", "--host", "db-1", "--secret-env", "NOT_SET_ANYWHERE", "--", "true"
    )
    assert missing.returncode == 2 and "--secret-env" in missing.stderr


def test_hosts_remove_forgets_several_hosts_and_says_why_it_kept_the_others(fleet: Fleet) -> None:
    added = opsplane(fleet, "hosts", "add", "cli-rm-ssh", "--ssh", "ops@127.0.0.1:2")
    assert added.returncode == 0, added.stderr
    removed = opsplane(fleet, "hosts", "remove", "cli-rm-ssh", "no-such-host", "web-1")
    assert removed.returncode == 2, removed
    assert removed.stdout.strip() == "removed cli-rm-ssh"
    assert "no-such-host: host no-such-host not found" in removed.stderr
    assert "web-1" in removed.stderr and "stop (or revoke) its agent" in removed.stderr
    assert fleet.host("cli-rm-ssh") is None and fleet.host_status("web-1") == "online"


def test_run_as_reaches_the_task_and_the_agent_and_a_bad_name_is_refused(fleet: Fleet) -> None:
    own = pwd.getpwuid(os.geteuid()).pw_name  # the fleet's agents run as this test does
    result = opsplane(fleet, "run", "--host", "db-1", "--run-as", own, "--json", "--", "id -un")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["task"]["run_as"] == own
    assert document["runs"][0]["stdout"] == f"{own}\n"
    bad = opsplane(fleet, "run", "--host", "db-1", "--run-as", "root; id", "--", "true")
    assert bad.returncode != 0 and "is not a user name" in bad.stderr, bad.stderr
