"""The agent's own policy: deny/allow patterns over command text, and the run_as user."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import pytest

from opsplane.agent import AgentConfig
from opsplane.agent.policy import (
    CommandPolicy,
    RunAsPolicy,
    RunAsRefused,
    command_text,
    resolve_run_as,
    working_dir,
)
from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.domain.tasks import check_run_as
from opsplane.execution import Identity
from tests.conftest import unavailable

RM_ROOT = r"rm\s+-rf\s+/"


def _config(tmp_path: Path, **fields: object) -> AgentConfig:
    return AgentConfig(name="h", state_dir=tmp_path, **fields)  # type: ignore[arg-type]


def test_without_patterns_every_command_may_run() -> None:
    policy = CommandPolicy()
    assert not policy.active
    assert policy.refusal("rm -rf /") is None


def test_a_deny_pattern_matches_anywhere_and_names_itself_in_the_refusal() -> None:
    policy = CommandPolicy(deny=[RM_ROOT])
    assert policy.active
    expected = r"refused by the agent's deny rule 'rm\s+-rf\s+/'"
    assert policy.refusal("rm -rf /") == expected
    assert policy.refusal("cd /tmp && rm  -rf /var/lib/x") == expected
    assert policy.refusal("rm -rf ./build") is None
    assert policy.refusal("ls /") is None


def test_the_first_matching_deny_pattern_is_the_one_named() -> None:
    policy = CommandPolicy(deny=["shutdown", "reboot"])
    refusal = policy.refusal("reboot; shutdown -h now")
    assert refusal == "refused by the agent's deny rule 'shutdown'"
    assert policy.refusal("sudo reboot") == "refused by the agent's deny rule 'reboot'"


def test_an_allow_pattern_must_match_the_whole_command() -> None:
    policy = CommandPolicy(allow=["uptime", r"systemctl status [\w.-]+"])
    assert policy.refusal("uptime") is None
    assert policy.refusal("systemctl status nginx.service") is None
    # A prefix is not enough: otherwise allowing uptime would allow anything after it.
    refusal = policy.refusal("uptime; rm -rf /tmp/x")
    assert refusal == (
        "refused by the agent's allow list: the command matches none of "
        r"'uptime', 'systemctl status [\w.-]+'"
    )
    assert policy.refusal("systemctl stop nginx") is not None
    # "." does not cross a newline, so a second line is not smuggled past ".*".
    assert CommandPolicy(allow=["echo .*"]).refusal("echo hi\nreboot") is not None


def test_a_long_allow_list_is_abbreviated_in_the_refusal() -> None:
    policy = CommandPolicy(allow=[f"cmd{n}" for n in range(8)])
    refusal = policy.refusal("other")
    assert refusal is not None
    assert refusal.endswith("'cmd3', 'cmd4' and 3 more")
    assert "'cmd5'" not in refusal


def test_deny_wins_over_allow() -> None:
    policy = CommandPolicy(deny=["--force"], allow=["git push.*"])
    assert policy.refusal("git push origin main") is None
    assert policy.refusal("git push --force") == "refused by the agent's deny rule '--force'"


def test_an_argv_is_matched_as_its_shell_quoted_join() -> None:
    assert command_text("echo a  b") == "echo a  b"
    assert command_text(["echo", "a b", "it's"]) == "echo 'a b' 'it'\"'\"'s'"
    policy = CommandPolicy(deny=[RM_ROOT], allow=[r"/opt/scripts/[\w.]+( [\w=-]+)*"])
    assert policy.refusal(["rm", "-rf", "/"]) is not None
    assert policy.refusal(["/opt/scripts/backup.sh", "--full"]) is None
    # Matched as "/opt/scripts/backup.sh 'x; reboot'": the quotes are part of the text.
    assert policy.refusal(["/opt/scripts/backup.sh", "x; reboot"]) is not None


@pytest.mark.parametrize("kind", ["deny", "allow"])
def test_an_invalid_pattern_is_a_config_error_naming_it(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{kind} pattern '\[a-' is not a valid regular"):
        CommandPolicy(**{kind: ["ok", "[a-"]})


@pytest.mark.parametrize("kind", ["deny", "allow"])
def test_an_empty_pattern_is_a_config_error(kind: str) -> None:
    with pytest.raises(ConfigError, match=f"{kind} pattern must not be empty"):
        CommandPolicy(**{kind: [""]})


def test_agent_config_checks_its_patterns_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deny pattern '\\(' is not a valid regular expression"):
        _config(tmp_path, deny=("(",))
    with pytest.raises(ConfigError, match="allow pattern"):
        _config(tmp_path, allow=("*",))


def test_agent_config_keeps_patterns_as_tuples(tmp_path: Path) -> None:
    config = _config(tmp_path, deny=["a", "b"], allow="uptime")
    assert config.deny == ("a", "b")
    assert config.allow == ("uptime",)  # one pattern, not one per character
    assert (_config(tmp_path).deny, _config(tmp_path).allow, _config(tmp_path).run_as) == (
        (),
        (),
        None,
    )


def test_run_as_resolves_a_name_or_a_uid() -> None:
    me = pwd.getpwuid(os.geteuid())
    by_name = resolve_run_as(me.pw_name)
    assert (by_name.name, by_name.uid, by_name.gid) == (me.pw_name, me.pw_uid, me.pw_gid)
    assert me.pw_gid in by_name.groups
    assert resolve_run_as(str(me.pw_uid)) == by_name
    assert by_name.env() == {"HOME": me.pw_dir, "USER": me.pw_name, "LOGNAME": me.pw_name}


def test_run_as_an_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_as: no user 'no-such-user-x9' on this host"):
        _config(tmp_path, run_as="no-such-user-x9")
    with pytest.raises(ConfigError, match="run_as: no user with uid 3999999 on this host"):
        resolve_run_as("3999999")
    with pytest.raises(ConfigError, match="run_as must name a user"):
        _config(tmp_path, run_as="")


def test_without_root_run_as_may_only_name_the_agents_own_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        unavailable("no user 'nobody' on this host")
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    with pytest.raises(ConfigError, match="run_as '0' needs the agent to run as root"):
        resolve_run_as("0")
    assert resolve_run_as("nobody").uid == nobody.pw_uid


def test_commands_go_through_the_switch_helper_unless_already_that_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc = Identity(name="svc", uid=4321, gid=4320, groups=(4320, 27), home="/")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    argv = svc.argv_for(["/bin/sh", "-c", "id"])
    assert argv[0] == sys.executable and argv[1:4] == ["-I", "-S", "-c"]
    assert argv[5:] == ["4321", "4320", "4320,27", "/bin/sh", "-c", "id"]
    # Unprivileged it could not call setgroups even to keep its groups: nothing to switch.
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    assert svc.argv_for(["/bin/sh", "-c", "id"]) == ["/bin/sh", "-c", "id"]


def test_commands_start_in_the_users_home_or_at_the_root(tmp_path: Path) -> None:
    identity = Identity(name="svc", uid=4321, gid=4321, groups=(), home=str(tmp_path))
    assert working_dir(identity) == str(tmp_path)
    gone = Identity(name="svc", uid=4321, gid=4321, groups=(), home=str(tmp_path / "nope"))
    assert working_dir(gone) == "/"


# -- accounts a command asks for (seed 002's ``user``, a task's run_as) ------------------


def _identity(name: str) -> Identity:
    try:
        return Identity.lookup(name)
    except LookupError:
        unavailable(f"no user {name!r} on this host")


def test_asking_for_no_account_or_the_default_one_runs_as_the_default() -> None:
    own = os.geteuid()
    plain = RunAsPolicy(own_uid=own, root=own == 0)
    assert plain.identity_for("") is None
    assert plain.identity_for(pwd.getpwuid(own).pw_name) is None
    assert plain.identity_for(str(own)) is None
    nobody = _identity("nobody")
    configured = RunAsPolicy(default=nobody, own_uid=0, root=True)
    assert configured.identity_for("") == nobody
    assert configured.identity_for("nobody") == nobody


def test_a_root_agent_without_run_as_switches_to_the_account_asked_for() -> None:
    nobody = _identity("nobody")
    assert RunAsPolicy(own_uid=0, root=True).identity_for("nobody") == nobody


def test_a_non_root_agent_refuses_any_other_account() -> None:
    _identity("nobody")
    policy = RunAsPolicy(own_uid=4242, root=False)
    with pytest.raises(RunAsRefused) as refused:
        policy.identity_for("nobody")
    assert str(refused.value) == (
        "run-as nobody refused: the agent is not root (uid 4242) and runs commands only as its "
        "own account; not executed"
    )


def test_a_configured_run_as_is_the_only_account_unless_others_are_allowed() -> None:
    nobody, root = _identity("nobody"), _identity("root")
    policy = RunAsPolicy(default=nobody, own_uid=0, root=True)
    with pytest.raises(RunAsRefused, match=r"runs commands as nobody only \(its run_as\)"):
        policy.identity_for("root")
    allowed = RunAsPolicy(default=nobody, allowed=frozenset({"root"}), own_uid=0, root=True)
    assert allowed.identity_for("root") == root
    # An allowed account still needs root to switch to.
    unprivileged = RunAsPolicy(allowed=frozenset({"nobody"}), own_uid=4242, root=False)
    with pytest.raises(RunAsRefused, match="is not root"):
        unprivileged.identity_for("nobody")


def test_an_allow_list_refuses_accounts_not_on_it_and_unknown_names() -> None:
    _identity("nobody")
    policy = RunAsPolicy(allowed=frozenset({"daemon"}), own_uid=0, root=True)
    with pytest.raises(RunAsRefused, match=r"not in the agent's allowed_run_as \(daemon\)"):
        policy.identity_for("nobody")
    for name in ("no-such-user-here", "a\x00b"):
        with pytest.raises(RunAsRefused, match="no such user on this host; not executed"):
            policy.identity_for(name)
    # The refusal quotes at most 64 characters of the name it was sent.
    with pytest.raises(RunAsRefused) as refused:
        policy.identity_for("x" * 1000)
    assert "x" * 65 not in str(refused.value)


def test_allowed_run_as_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed_run_as: no user 'no-such-user-here'"):
        _config(tmp_path, allowed_run_as=["no-such-user-here"])
    config = _config(tmp_path, allowed_run_as="root")
    assert config.allowed_run_as == ("root",)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="allowed_run_as 'root' needs the agent to run"):
            _config(tmp_path, allowed_run_as=["root"])


def test_a_tasks_run_as_must_be_a_user_name() -> None:
    for good in ("deploy", "_svc", "john.doe", "www-data", "a" * 32, "Admin1"):
        assert check_run_as(good) == good
    for bad in ("", "1000", "-u", ".x", "a" * 33, "root; id", "a b", "$(id)", "x\n", "ü"):
        with pytest.raises(InvalidInput, match="is not a user name"):
            check_run_as(bad)
