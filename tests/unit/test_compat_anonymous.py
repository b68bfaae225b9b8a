"""Who an unauthenticated call to a seed API's route is (security.anonymous), and the settings
that configure it: the network check, the seed check, the marker, the validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opsplane.config import load_settings
from opsplane.domain.errors import ConfigError
from opsplane.security.anonymous import AnonymousAccess, from_browser
from opsplane.security.roles import Role


def _access(**overrides: Any) -> AnonymousAccess:
    given: dict[str, Any] = {
        "name": "legacy",
        "role": "operator",
        "groups": ["control-plane"],
        "networks": ["127.0.0.0/8", "::1"],
    }
    given.update(overrides)
    seeds = given.pop("seeds", ["seed003", "seed004"])
    return AnonymousAccess.build(seeds, **given)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("::2", False),
        ("fe80::1%eth0", False),
        (None, False),
        ("", False),
        ("not-an-address", False),
    ],
)
def test_only_sources_inside_the_default_networks_may_be_anonymous(
    source: str | None, allowed: bool
) -> None:
    assert _access().allows_source(source) is allowed


def test_listed_networks_replace_loopback() -> None:
    access = _access(networks=["10.0.0.0/8", "fd00::/8"])
    assert access.allows_source("10.20.30.40") and access.allows_source("fd00::5")
    assert not access.allows_source("127.0.0.1") and not access.allows_source("::1")
    assert not _access(networks=[]).allows_source("127.0.0.1")


def test_the_principal_is_named_marked_and_limited_to_its_seeds() -> None:
    access = _access()
    principal = access.principal_for("seed004", "127.0.0.1")
    assert principal is not None
    assert principal.name == "legacy" and principal.anonymous is True
    assert principal.via == "anonymous:seed004"
    assert principal.the_role is Role.OPERATOR
    assert principal.allowed_groups == frozenset({"control-plane"})
    assert access.principal_for("seed000", "127.0.0.1") is None  # not listed
    assert access.principal_for(None, "127.0.0.1") is None  # not a seed route
    assert access.principal_for("seed004", "10.0.0.1") is None  # not from loopback
    viewer = _access(role="viewer").principal_for("seed003", "::1")
    assert viewer is not None and viewer.allowed_groups == frozenset()


def test_a_browsers_call_is_never_anonymous() -> None:
    # Any page the operator visits could make one to a loopback port (a cross-site form, DNS
    # rebinding); browsers mark their requests with Origin or Sec-Fetch-*, scripts never do.
    for headers in (
        {"Origin": "http://evil.example"},
        {"sec-fetch-site": "cross-site"},
        {"Sec-Fetch-Mode": "no-cors"},
    ):
        assert from_browser(headers), headers
    assert not from_browser({"User-Agent": "curl/8.5.0", "Content-Type": "text/plain"})
    assert _access().principal_for("seed004", "127.0.0.1", browser=True) is None


def test_one_warning_line_per_opened_seed() -> None:
    lines = _access(seeds=["seed000", "seed003", "seed004"]).warnings()
    assert len(lines) == 3
    assert all("WITHOUT credentials" in line and "'legacy'" in line for line in lines)
    assert "/api/ssh/task" in lines[0] and "POST /tasks" in lines[1] and "/list" in lines[2]


def test_the_settings_are_off_by_default_and_validated(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.compat_anonymous == []
    assert settings.compat_anonymous_role == "operator"
    assert settings.compat_anonymous_networks == ["127.0.0.0/8", "::1"]
    given = load_settings(data_dir=tmp_path, compat_anonymous=["seed004", "seed003", "seed004"])
    assert given.compat_anonymous == ["seed003", "seed004"]
    bad: list[dict[str, Any]] = [
        {"compat_anonymous": ["seed001"]},
        {"compat_anonymous": ["seed004"], "compat_anonymous_role": "root"},
        {"compat_anonymous_networks": ["10.0.0.0/33"]},
        {"compat_anonymous_networks": ["localhost"]},
        {"compat_anonymous_principal": "two words"},
        {"compat_anonymous_principal": ""},
        {"compat_anonymous": ["seed004"], "compat_anonymous_groups": []},
        {"compat_anonymous_groups": [" "]},
    ]
    for overrides in bad:
        with pytest.raises(ConfigError):
            load_settings(data_dir=tmp_path, **overrides)
    # An admin or viewer principal needs no groups: its role decides alone.
    admin = load_settings(
        data_dir=tmp_path,
        compat_anonymous=["seed000"],
        compat_anonymous_role="admin",
        compat_anonymous_groups=[],
    )
    assert admin.compat_anonymous_groups == []


def test_the_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSPLANE_COMPAT_ANONYMOUS", '["seed000"]')
    monkeypatch.setenv("OPSPLANE_COMPAT_ANONYMOUS_NETWORKS", '["192.0.2.0/24"]')
    settings = load_settings(data_dir=tmp_path)
    assert settings.compat_anonymous == ["seed000"]
    assert settings.compat_anonymous_networks == ["192.0.2.0/24"]
