"""The pure rules of the security model: groups, roles, durations and the audit hash chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opsplane.domain.access import check_hosts_allowed, hosts_outside
from opsplane.domain.errors import Forbidden, InvalidInput
from opsplane.domain.targeting import HostRef
from opsplane.security.audit import GENESIS, AuditEntry, chain_hash, document, verify_chain
from opsplane.security.roles import Permission, Principal, Role, authorize, normalize_groups
from opsplane.security.tokens import new_token, parse_duration, same_secret, secret_hash

HOSTS = [HostRef("web-1", ("web",)), HostRef("both-1", ("web", "db")), HostRef("db-1", ("db",))]


def test_a_host_is_inside_a_grant_when_any_of_its_groups_is_granted() -> None:
    assert hosts_outside(None, HOSTS) == []
    assert hosts_outside(frozenset({"web"}), HOSTS) == ["db-1"]
    assert hosts_outside(frozenset(), HOSTS) == ["both-1", "db-1", "web-1"]
    check_hosts_allowed(frozenset({"web", "db"}), HOSTS)


def test_a_refusal_names_the_hosts_and_counts_the_rest() -> None:
    many = [HostRef(f"db-{i:03d}", ("db",)) for i in range(25)]
    with pytest.raises(Forbidden) as refused:
        check_hosts_allowed(frozenset({"web"}), many)
    message = str(refused.value)
    assert "(web)" in message and "db-000" in message and "db-019" in message
    assert "db-020" not in message and message.endswith("and 5 more")


def test_roles_include_the_ones_below_and_only_operators_are_limited_by_groups() -> None:
    viewer = Principal("v", Role.VIEWER)
    operator = Principal("o", "operator", groups=frozenset({"web"}))
    admin = Principal("a", Role.ADMIN, groups=frozenset({"ignored"}))
    assert [viewer.can(p) for p in Permission] == [True, False, False]
    assert [operator.can(p) for p in Permission] == [True, True, False]
    assert [admin.can(p) for p in Permission] == [True, True, True]
    assert (viewer.allowed_groups, operator.allowed_groups, admin.allowed_groups) == (
        frozenset(),
        frozenset({"web"}),
        None,
    )
    with pytest.raises(Forbidden, match="needs the admin role"):
        authorize(operator, Permission.ADMIN)
    with pytest.raises(InvalidInput, match="at least one group"):
        normalize_groups(Role.OPERATOR, [])
    assert normalize_groups(Role.OPERATOR, ["web", " db", "web"]) == ["db", "web"]
    assert normalize_groups(Role.VIEWER, ["web"]) is None


def test_tokens_are_random_prefixed_and_compared_by_hash() -> None:
    token = new_token()
    assert token.startswith("ops_") and len(token) == 4 + 43 and token != new_token()
    assert same_secret(token, secret_hash(token)) and not same_secret(
        token + "x", secret_hash(token)
    )
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("never") is None
    with pytest.raises(InvalidInput):
        parse_duration("soon")


def _chain(count: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    prev = GENESIS
    at = datetime(2030, 1, 1, tzinfo=UTC)
    for i in range(1, count + 1):
        entry = AuditEntry(actor="a", role="admin", action="task.create", detail={"n": i})
        doc = document(entry, i, at + timedelta(seconds=i))
        doc["prev_hash"], doc["hash"] = prev, chain_hash(prev, doc)
        prev = doc["hash"]
        docs.append(doc)
    return docs


def test_the_chain_names_edited_missing_and_reordered_records() -> None:
    docs = _chain(5)
    assert verify_chain(docs, 5, docs[-1]["hash"]).ok
    edited = [dict(d) for d in docs]
    edited[1]["detail"] = {"n": 99}
    assert verify_chain(edited).problems == ["record 2 was edited: it no longer matches its hash"]
    # Edited and re-hashed: the next record no longer follows it.
    rehashed = [dict(d) for d in docs]
    rehashed[1]["hash"] = chain_hash(rehashed[1]["prev_hash"], rehashed[1] | {"actor": "m"})
    rehashed[1]["actor"] = "m"
    report = verify_chain(rehashed)
    assert report.first_bad_id == 3 and "does not follow record 2" in report.problems[0]
    assert verify_chain(docs[:2] + docs[3:]).problems[0] == "record 3 missing: deleted"
    tail = verify_chain(docs[:3], 5, docs[-1]["hash"])
    assert tail.problems == ["records 4-5 missing: deleted from the end"]
    swapped = verify_chain([docs[0], docs[2], docs[1]])
    assert not swapped.ok and swapped.first_bad_id == 2
