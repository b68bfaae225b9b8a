"""What a command inherits from the process that spawns it: an allow-list, never credentials."""

from __future__ import annotations

import pytest

from opsplane.agent import AgentConfig
from opsplane.config import load_settings
from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.execution import Outcome, ProcessRun, check_passthrough, child_environment

PARENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TZ": "UTC",
    "USER": "root",
    "SHELL": "/bin/bash",
    "OPSPLANE_TOKEN": "ops_secret",
    "OPSPLANE_BOOTSTRAP_ADMIN_TOKEN": "bootstrap-secret-123",
    "OPSPLANE_DATABASE_URL": "postgresql://u:pw@db/opsplane",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "HTTP_PROXY": "http://proxy:3128",
    "CORP_A": "a",
    "CORP_B": "b",
}


def test_only_the_allow_list_of_the_parent_passes() -> None:
    env = child_environment(parent=PARENT)
    assert env == {
        key: PARENT[key]
        for key in ("PATH", "HOME", "LANG", "LC_ALL", "LC_TIME", "TZ", "USER", "SHELL")
    }


def test_the_task_has_the_last_word_and_may_set_any_name() -> None:
    env = child_environment(
        {"PATH": "/opt/bin", "OPSPLANE_RUN": "mine"},
        identity_env={"HOME": "/nonexistent", "USER": "nobody"},
        parent=PARENT,
    )
    assert (env["PATH"], env["HOME"], env["USER"]) == ("/opt/bin", "/nonexistent", "nobody")
    assert env["OPSPLANE_RUN"] == "mine"  # set by the task, not inherited
    assert "OPSPLANE_TOKEN" not in env


def test_passthrough_extends_the_list_by_name_and_by_prefix() -> None:
    env = child_environment(parent=PARENT, passthrough=("HTTP_PROXY", "CORP_*"))
    assert (env["HTTP_PROXY"], env["CORP_A"], env["CORP_B"]) == ("http://proxy:3128", "a", "b")
    assert "AWS_SECRET_ACCESS_KEY" not in env


@pytest.mark.parametrize(
    "name", ["OPSPLANE_TOKEN", "OPSPLANE_*", "OPS*", "*", "", "1ABC", "A-B", "A B"]
)
def test_passthrough_refuses_opsplane_names_and_non_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="env_passthrough"):
        check_passthrough([name])
    with pytest.raises(ConfigError, match="env_passthrough"):
        AgentConfig(name="env-host", env_passthrough=(name,))
    with pytest.raises(ConfigError, match="env_passthrough"):
        load_settings(env_passthrough=[name])


async def test_a_process_never_sees_opsplane_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSPLANE_TOKEN", "ops_must_not_leak")
    monkeypatch.setenv("CORP_SETTING", "visible")
    monkeypatch.setenv("OTHER_SECRET", "hidden")
    run = ProcessRun("env", timeout=10, env={"TASK_VAR": "set"}, env_passthrough=("CORP_*",))
    result = await run.run()
    assert result.outcome is Outcome.SUCCEEDED
    lines = set(result.stdout.splitlines())
    assert {"TASK_VAR=set", "CORP_SETTING=visible"} <= lines
    assert "ops_must_not_leak" not in result.stdout
    assert "hidden" not in result.stdout
