"""In CI every service-backed test runs or fails: a missing service, tool or user never skips."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import LOCAL_SERVICES, unavailable

ROOT = Path(__file__).resolve().parents[2]


def test_the_ci_script_exports_ci_true_and_lets_it_be_overridden() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in script
    shown = subprocess.run(
        ["bash", "-c", 'export CI="${CI:-true}"; echo "$CI"'],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert shown.stdout.strip() == "true"


def test_something_missing_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required: CI=true"):
        unavailable("rabbitmqctl cannot talk to the broker here")
    monkeypatch.setenv("CI", "false")
    monkeypatch.delenv("OPSPLANE_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception):
        unavailable("rabbitmqctl cannot talk to the broker here")


def test_tools_and_users_are_checked_like_services() -> None:
    # The tests that once skipped on their own even under CI=true now go through the markers.
    assert {"rabbitmqctl", "root", "nobody", "sshd"} <= set(LOCAL_SERVICES)
    for name in ("root", "nobody"):
        problem = LOCAL_SERVICES[name]()
        assert problem is None or isinstance(problem, str)
