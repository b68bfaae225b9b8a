from __future__ import annotations

import time

import pytest

from opsplane.domain.errors import InvalidInput
from opsplane.domain.targeting import HostRef, Targets, normalize_names, resolve_targets
from opsplane.domain.tasks import TaskRequest

FLEET = [HostRef("web-1", ("web",)), HostRef("web-2", ("web", "prod")), HostRef("db-1", ("db",))]


def test_all_selects_every_known_host_once_and_sorted() -> None:
    assert resolve_targets(Targets(all=True, hosts=("web-1",)), FLEET) == ["db-1", "web-1", "web-2"]


def test_groups_and_hosts_combine() -> None:
    assert resolve_targets(Targets(groups=("web",), hosts=("db-1",)), FLEET) == [
        "db-1",
        "web-1",
        "web-2",
    ]
    assert resolve_targets(Targets(groups=("prod",)), FLEET) == ["web-2"]


def test_unknown_host_is_an_error_naming_it() -> None:
    with pytest.raises(InvalidInput, match=r"unknown host.*nope"):
        resolve_targets(Targets(hosts=("web-1", "nope")), FLEET)


def test_unknown_group_is_an_error_naming_it() -> None:
    with pytest.raises(InvalidInput, match=r"unknown group.*cache"):
        resolve_targets(Targets(groups=("cache",)), FLEET)


def test_empty_selector_and_empty_fleet_are_errors() -> None:
    with pytest.raises(InvalidInput, match="select nothing"):
        resolve_targets(Targets(), FLEET)
    with pytest.raises(InvalidInput, match="fleet is empty"):
        resolve_targets(Targets(all=True), [])


def test_names_are_stripped_deduplicated_and_never_blank() -> None:
    assert normalize_names([" a", "a", "b "], "host") == ("a", "b")
    with pytest.raises(InvalidInput, match="blank"):
        normalize_names(["a", "  "], "host")


@pytest.mark.parametrize(
    ("command", "timeout", "message"),
    [("", None, "empty"), ("   ", None, "empty"), ("ls", 0, "positive"), ("ls", -5, "positive"),
     ("ls", 10**9, "at most"), ("a\x00b", None, "NUL")],
)  # fmt: skip
def test_bad_requests_are_rejected_with_a_reason(
    command: str, timeout: int | None, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        TaskRequest(command=command, targets=Targets(all=True), timeout=timeout).validated(600)


def test_a_request_gets_the_default_timeout_and_a_name_from_its_command() -> None:
    request = TaskRequest(command="uptime\nwho", targets=Targets(all=True)).validated(42)
    assert request.timeout == 42
    assert request.name == "uptime"


def test_host_names_refuse_control_characters_whitespace_and_wildcards() -> None:
    from opsplane.domain.targeting import check_host_name

    assert check_host_name("web-1.example.org") == "web-1.example.org"
    for bad in ("", "a b", "a\x00b", "a\nb", "cmd.*", "a#b", "a/b", "x" * 256):
        with pytest.raises(InvalidInput):
            check_host_name(bad)


def test_labels_select_hosts_carrying_every_given_label() -> None:
    fleet = [
        HostRef("a", ("web",), {"tier": "front", "dc": "x"}),
        HostRef("b", ("web",), {"tier": "front", "dc": "y"}),
        HostRef("c", ("db",), {"tier": "back"}),
    ]
    assert resolve_targets(Targets(labels={"tier": "front"}), fleet) == ["a", "b"]
    assert resolve_targets(Targets(labels={"tier": "front", "dc": "y"}), fleet) == ["b"]
    assert resolve_targets(Targets(labels={"tier": "back"}, hosts=("a",)), fleet) == ["a", "c"]
    with pytest.raises(InvalidInput, match=r"no host carries all of the labels dc=z"):
        resolve_targets(Targets(labels={"dc": "z"}), fleet)


def test_a_hundred_thousand_names_are_normalized_in_linear_time() -> None:
    # De-duplicating with a list took 73 s for 100,000 names, on the event loop.
    names = [f"host-{i}" for i in range(100_000)] * 2
    started = time.process_time()
    assert len(normalize_names(names, "host")) == 100_000
    assert time.process_time() - started < 5  # well under a second on an idle core


def test_many_groups_over_a_big_fleet_resolve_in_one_pass() -> None:
    fleet = [HostRef(f"h-{i}", (f"g-{i % 1000}",)) for i in range(100_000)]
    groups = tuple(f"g-{i}" for i in range(1000))
    started = time.process_time()
    assert len(resolve_targets(Targets(groups=groups), fleet)) == 100_000
    assert time.process_time() - started < 5  # one scan per group took minutes


def test_an_unknown_name_error_names_a_few_not_all() -> None:
    missing = tuple(f"nope-{i:06}" for i in range(50_000))
    with pytest.raises(InvalidInput) as error:
        resolve_targets(Targets(hosts=missing), FLEET)
    message = str(error.value)
    assert message.startswith("unknown host(s): nope-000000, nope-000001")
    assert message.endswith("and 49,990 more") and len(message) < 1000


def test_adhoc_hosts_are_selected_by_their_name_only() -> None:
    # Issue 16 item 8: a seed-000 request's targets never join `all`, a group or a label.
    fleet = [
        HostRef("web-1", ("web",), {"tier": "front"}),
        HostRef("ops@10.0.0.9:22", ("adhoc",), {"tier": "front"}, adhoc=True),
    ]
    assert resolve_targets(Targets(all=True), fleet) == ["web-1"]
    assert resolve_targets(Targets(labels={"tier": "front"}), fleet) == ["web-1"]
    assert resolve_targets(Targets(hosts=("ops@10.0.0.9:22",)), fleet) == ["ops@10.0.0.9:22"]
    with pytest.raises(InvalidInput, match="selected by name only"):
        resolve_targets(Targets(groups=("adhoc",)), fleet)
