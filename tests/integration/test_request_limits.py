"""Requests are bounded and strangers are refused before their input is looked at (issue 13
defect 2, issue 14 item 6): a 422 shows a little of the input, never all of it; an anonymous
request gets its 401 before its body is parsed; a body past ``max_request_bytes`` is a 413."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.auth import ADMIN_HEADERS
from tests.integration.apps import WEB_1, admin_api

MIB = 1024 * 1024


async def test_a_422_shows_a_little_of_a_long_input_not_all_of_it(tmp_path: Path) -> None:
    command = "x" * (MIB + MIB // 2)  # past the 1,000,000 characters a command may have
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        body = {"command": command, "targets": {"hosts": ["web-1"]}}
        answer = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
    assert answer.status_code == 422
    assert len(answer.content) < 4096, len(answer.content)
    (problem,) = answer.json()["detail"]
    assert problem["loc"] == ["body", "command"]
    assert problem["input"].startswith("xxxx") and problem["input"].endswith("characters)")


async def test_a_422_lists_twenty_problems_then_counts_the_rest(tmp_path: Path) -> None:
    env = {f"1BAD{i}": "v" for i in range(500)}  # 500 names that are not variable names
    targets = {"hosts": ["web-1"], "labels": {f"k{i}": "v" * 300 for i in range(150)}}
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        body = {"command": "true", "targets": targets, "env": env, "timeout": "x" * 5000}
        answer = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert len(answer.content) < 32 * 1024
    assert len(detail) <= 21
    assert all(len(json.dumps(problem)) < 1200 for problem in detail)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/tasks"),
        ("POST", "/api/v1/users"),
        ("POST", "/api/v1/hosts"),
        ("POST", "/tasks"),
        ("POST", "/api/ssh/task"),
    ],
)
async def test_an_anonymous_request_is_refused_before_its_body_is_parsed(
    tmp_path: Path, method: str, path: str
) -> None:
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        for headers in ({}, {"Authorization": "Bearer ops_not-a-token"}):
            answer = await client.request(
                method,
                path,
                content=b"{not json",
                headers={**headers, "Content-Type": "application/json"},
            )
            assert answer.status_code == 401, answer.text
            assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_an_anonymous_catalog_call_gets_its_401_in_the_seed_envelope(tmp_path: Path) -> None:
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        answer = await client.post("/sync/any/thing", content=b"[not json")
    assert answer.status_code == 401
    assert answer.json()["code"] == 1 and answer.json()["data"] == ""


async def test_public_routes_stay_public(tmp_path: Path) -> None:
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        # Login and enrollment read their body themselves: a bad one is theirs to refuse.
        login = await client.post("/api/v1/auth/login", content=b"{not json")
        assert login.status_code == 422
        enroll = await client.post("/api/v1/agents/enroll", content=b"{not json")
        assert enroll.status_code == 422
        # An authenticated caller still gets the 422 of a malformed body.
        bad = await client.post(
            "/api/v1/tasks",
            content=b"{not json",
            headers={**ADMIN_HEADERS, "Content-Type": "application/json"},
        )
        assert bad.status_code == 422


async def test_a_private_metrics_endpoint_needs_a_caller(tmp_path: Path) -> None:
    async with admin_api(tmp_path, connected=[WEB_1], metrics_public=False) as (_app, client):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=ADMIN_HEADERS)).status_code == 200


async def test_a_body_past_the_limit_is_refused_with_413(tmp_path: Path) -> None:
    big = json.dumps({"command": "x" * (3 * MIB), "targets": {"all": True}}).encode()
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        headers = {**ADMIN_HEADERS, "Content-Type": "application/json"}
        declared = await client.post("/api/v1/tasks", content=big, headers=headers)
        # Refused on its Content-Length, before a byte is read (FastAPI's own plain answer).
        assert declared.status_code == 413 and len(declared.content) < 500

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for start in range(0, len(big), 64 * 1024):
                yield big[start : start + 64 * 1024]

        streamed = await client.post("/api/v1/tasks", content=chunks(), headers=headers)
        assert streamed.status_code == 413
        assert "max_request_bytes" in streamed.json()["detail"]
        # A stranger is told to authenticate first.
        anonymous = await client.post("/api/v1/tasks", content=chunks())
        assert anonymous.status_code == 401
        # Seed 004's routes answer in their envelope.
        catalog = await client.post("/async/kill", content=chunks(), headers=ADMIN_HEADERS)
        assert catalog.status_code == 413 and catalog.json()["code"] == 1


async def test_too_many_targets_are_a_short_422(tmp_path: Path) -> None:
    hosts = [f"h{i}" for i in range(10_001)]
    async with admin_api(tmp_path, connected=[WEB_1]) as (_app, client):
        body = {"command": "true", "targets": {"hosts": hosts}}
        answer = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        assert answer.status_code == 422
        assert "10000" in answer.text and len(answer.content) < 2048
        # Within the bound, unknown names are named ten at a time.
        body = {"command": "true", "targets": {"hosts": hosts[:10_000]}}
        answer = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        assert answer.status_code == 422
        assert answer.json()["detail"].endswith("and 9,990 more")


async def test_a_store_failure_while_authenticating_is_not_blamed_on_the_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    async with admin_api(tmp_path, connected=[WEB_1]) as (app, client):

        async def unreachable(*_args: Any) -> Any:
            raise OperationalError("SELECT", {}, Exception("database went away"))

        monkeypatch.setattr(app.state.security, "authenticate_token", unreachable)
        body = {"command": "true", "targets": {"hosts": ["web-1"]}}
        # Not FastAPI's 400 "error parsing the body": the store's 503, as on any route.
        response = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith("database unavailable")
