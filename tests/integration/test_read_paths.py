"""List endpoints page in SQL (issue 15, read paths): keyset cursors with no duplicates or gaps
while rows are added, filters combined with cursors, the offset pages kept, a bad cursor
refused with a clear 422, and a task's runs without their output unless asked for. Every
database backend."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from opsplane.engine.core import Engine
from opsplane.store.tables import HostRow, RunRow, TaskRow
from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api

GROUPS = ("web", "db", "cache")
MAX_PAGES = 200  # every walk below is bounded


@pytest.fixture
async def api(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with admin_api(tmp_path, database_url=database_url) as (app, client):
        client.headers.update(ADMIN_HEADERS)
        yield app.state.engine, client


def host_row(i: int, *, prefix: str = "node") -> dict[str, Any]:
    return {
        "name": f"{prefix}-{i:04d}",
        "link": "grpc",
        # Two groups each, one of them a name that is a prefix of another (web / webx).
        "groups": [GROUPS[i % 3], "webx" if i % 5 == 0 else "other"],
        "labels": {"rack": f"r{i % 4}"},
        "status": "offline" if i % 4 == 0 else "online",
        "created_at": datetime.now(UTC),
    }


async def add_rows(engine: Engine, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    async with engine.sessions() as session:
        await session.execute(insert(table), list(rows))
        await session.commit()


async def walk(
    client: httpx.AsyncClient,
    path: str,
    params: dict[str, Any],
    *,
    between: Any = None,
) -> list[dict[str, Any]]:
    """Every item of a list, a cursor at a time; ``between(n)`` runs after page n."""
    items: list[dict[str, Any]] = []
    cursor = None
    for number in range(MAX_PAGES):
        answer = await client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
        if between is not None:
            await between(number)
    raise AssertionError(f"{path} did not end in {MAX_PAGES} pages")


async def test_host_pages_have_no_duplicates_or_gaps_while_hosts_are_added(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, client = api
    await add_rows(engine, HostRow.__table__, [host_row(i) for i in range(0, 300, 2)])
    added: list[str] = []

    async def insert_some(number: int) -> None:
        # Odd numbers: among the names already listed and among those still to come.
        odd = [1 + 2 * number, 201 + 4 * number, 203 + 4 * number]
        rows = [host_row(i) for i in odd if i < 300]
        added.extend(row["name"] for row in rows)
        await add_rows(engine, HostRow.__table__, rows)

    names = [
        h["name"] for h in await walk(client, "/api/v1/hosts", {"size": 17}, between=insert_some)
    ]
    assert len(names) == len(set(names)), "a host came twice"
    assert names == sorted(names)
    originals = {f"node-{i:04d}" for i in range(0, 300, 2)}
    assert originals <= set(names), f"missing: {sorted(originals - set(names))[:5]}"
    # A host added behind the cursor is simply not on this walk; one added ahead of it is.
    assert set(names) - originals <= set(added)
    assert set(added) & set(names), "no host added ahead of the cursor was listed"


async def test_host_filters_combine_with_cursors(api: tuple[Engine, httpx.AsyncClient]) -> None:
    engine, client = api
    rows = [host_row(i) for i in range(120)] + [host_row(i, prefix="edge") for i in range(30)]
    await add_rows(engine, HostRow.__table__, rows)

    def expected(status: str | None, group: str | None, name: str | None) -> list[str]:
        return sorted(
            r["name"]
            for r in rows
            if (status is None or r["status"] == status)
            and (group is None or group in r["groups"])
            and (name is None or r["name"].startswith(name))
        )

    cases: list[dict[str, Any]] = [
        {"group": "web"},
        {"group": "webx", "status": "online"},
        {"status": "offline", "name": "edge"},
        {"group": "db", "status": "online", "name": "node-00"},
        {"group": "nope"},
        {"name": "edge-002"},
        {"name": "%"},  # a LIKE wildcard is a literal character here
        {"name": "node\x00"},  # no stored name holds a NUL (and PostgreSQL refuses one)
        {"group": "w\x00eb"},
    ]
    for params in cases:
        got = [h["name"] for h in await walk(client, "/api/v1/hosts", {**params, "size": 7})]
        want = expected(params.get("status"), params.get("group"), params.get("name"))
        assert got == want, params
        first = (await client.get("/api/v1/hosts", params={**params, "size": 7})).json()
        assert first["total"] == len(want), params


async def test_offset_pages_are_kept_and_agree_with_the_cursor_walk(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, client = api
    await add_rows(engine, HostRow.__table__, [host_row(i) for i in range(95)])
    walked = [h["name"] for h in await walk(client, "/api/v1/hosts", {"size": 10, "group": "db"})]
    paged: list[str] = []
    for number in range(1, 20):
        body = (
            await client.get("/api/v1/hosts", params={"page": number, "size": 10, "group": "db"})
        ).json()
        assert body["page"] == number and body["size"] == 10 and body["total"] == len(walked)
        if not body["items"]:
            assert body["next_cursor"] is None
            break
        paged.extend(h["name"] for h in body["items"])
    assert paged == walked
    # An offset page hands out a cursor too: the walk goes on from it.
    second = (await client.get("/api/v1/hosts", params={"page": 2, "size": 10})).json()
    after = (
        await client.get("/api/v1/hosts", params={"cursor": second["next_cursor"], "size": 10})
    ).json()
    third = (await client.get("/api/v1/hosts", params={"page": 3, "size": 10})).json()
    assert [h["name"] for h in after["items"]] == [h["name"] for h in third["items"]]


async def test_a_bad_cursor_is_refused_with_a_clear_422(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, client = api
    await add_rows(engine, HostRow.__table__, [host_row(i) for i in range(5)])
    task_cursor = base64.urlsafe_b64encode(b'["tasks","2030-01-01T00:00:00+00:00","x"]').decode()
    bad = {
        "not base64": "%%%",
        "not json": base64.urlsafe_b64encode(b"hello").decode(),
        "another list's": base64.urlsafe_b64encode(b'["host-runs","x"]').decode(),
        "wrong shape": base64.urlsafe_b64encode(b'["hosts",1]').decode(),
        "nul in a key": base64.urlsafe_b64encode(b'["hosts","a\\u0000b"]').decode(),
    }
    for what, cursor in bad.items():
        for path in ("/api/v1/hosts", "/api/v1/tasks", "/api/v1/audit", "/api/v1/users"):
            answer = await client.get(path, params={"cursor": cursor})
            assert answer.status_code == 422, (what, path, answer.text)
            assert "cursor" in answer.json()["detail"], (what, path, answer.text)
            assert "Traceback" not in answer.text
    good = (await client.get("/api/v1/hosts", params={"size": 2})).json()["next_cursor"]
    both = await client.get("/api/v1/hosts", params={"cursor": good, "page": 2})
    assert both.status_code == 422 and "either cursor or page" in both.text
    # A tasks cursor handed to hosts names the list it belongs to.
    tasks = await client.get("/api/v1/hosts", params={"cursor": task_cursor})
    assert "(hosts)" in tasks.json()["detail"]


def run_rows(task_id: str, hosts: int, *, started: datetime) -> list[dict[str, Any]]:
    statuses = ("succeeded", "failed", "succeeded", "timed_out")
    rows = []
    for i in range(hosts):
        for attempt in (1, 2) if i % 10 == 0 else (1,):
            rows.append({
                "id": f"{task_id[-12:]}-run-{i:04d}-{attempt}",
                "task_id": task_id,
                "host": f"node-{i:04d}",
                "attempt": attempt,
                "status": statuses[i % 4],
                "exit_code": 0,
                "stdout": f"out of {i}/{attempt}\n" * 50,
                "stderr": f"err of {i}",
                "superseded": attempt == 1 and i % 10 == 0,
                "updated_at": started,
            })  # fmt: skip
    return rows


async def add_task(engine: Engine, task_id: str, hosts: int, at: datetime) -> None:
    task = {
        "id": task_id, "name": f"task {task_id[:8]}", "command": "echo", "targets": {"all": True},
        "timeout": 60, "status": "succeeded", "created_at": at, "counts": {},
    }  # fmt: skip
    await add_rows(engine, TaskRow.__table__, [task])
    await add_rows(engine, RunRow.__table__, run_rows(task_id, hosts, started=at))


async def test_runs_of_a_task_page_without_output_unless_asked(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, client = api
    task_id = "0190aaaa-0000-7000-8000-000000000001"
    await add_task(engine, task_id, 45, datetime.now(UTC))
    path = f"/api/v1/tasks/{task_id}/runs"

    first = (await client.get(path, params={"size": 10})).json()
    assert first["total"] == 50 and len(first["items"]) == 10
    assert all(run["stdout"] is None and run["stderr"] is None for run in first["items"])
    # Counts by status, every attempt, whatever the page.
    statuses = Counter(row["status"] for row in run_rows(task_id, 45, started=datetime.now(UTC)))
    assert first["summary"] == dict(statuses)

    runs = await walk(client, path, {"size": 7})
    assert [(r["host"], r["attempt"]) for r in runs] == sorted(
        (r["host"], r["attempt"]) for r in runs
    )
    assert len({r["id"] for r in runs}) == 50
    assert all(r["stdout"] is None for r in runs)

    with_output = await walk(client, path, {"size": 7, "output": "true"})
    assert [r["id"] for r in with_output] == [r["id"] for r in runs]
    assert (
        with_output[0]["stdout"] == "out of 0/1\n" * 50 and with_output[0]["stderr"] == "err of 0"
    )

    host_runs = "/api/v1/hosts/node-0010/runs"
    await add_rows(engine, HostRow.__table__, [host_row(10)])
    runs_of_host = (await client.get(host_runs)).json()["items"]
    assert len(runs_of_host) == 2 and runs_of_host[0]["command"] == "echo"
    assert all(run["stdout"] is None and run["stderr"] is None for run in runs_of_host)
    answer = await client.get(host_runs, params={"output": "true"})
    outputs = {run["stdout"] for run in answer.json()["items"]}
    assert outputs == {"out of 10/1\n" * 50, "out of 10/2\n" * 50}

    failed = await walk(client, path, {"size": 3, "status": "failed"})
    assert len(failed) == statuses["failed"] and {r["status"] for r in failed} == {"failed"}
    assert (await client.get(path, params={"status": "nonsense"})).status_code == 422
    assert (await client.get("/api/v1/tasks/nope/runs")).status_code == 404


async def test_every_list_endpoint_walks_by_cursor_to_the_same_rows_as_one_big_page(
    api: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, client = api
    now = datetime.now(UTC)
    await add_rows(engine, HostRow.__table__, [host_row(i) for i in range(30)])
    # Tasks created at the same instant in pairs: the id breaks the tie.
    for n in range(12):
        await add_task(
            engine, f"0190aaaa-0000-7000-8000-{n:012d}", 3, now - timedelta(seconds=n // 2)
        )
    await add_rows(engine, RunRow.__table__, [
        {"id": f"0190bbbb-{n:04d}", "task_id": "0190aaaa-0000-7000-8000-000000000000",
         "host": "node-0007", "attempt": 1, "status": "succeeded", "updated_at": now}
        for n in range(9)
    ])  # fmt: skip
    for n in range(5):
        answer = await client.post(
            "/api/v1/users", json={"name": f"user{n}", "role": "viewer", "password": "x" * 12}
        )
        assert answer.status_code == 201, answer.text
        answer = await client.post("/api/v1/tokens", json={"name": f"token{n}", "role": "viewer"})
        assert answer.status_code == 201, answer.text

    lists = {
        "/api/v1/hosts": "name",
        "/api/v1/tasks": "id",
        "/api/v1/hosts/node-0007/runs": "id",
        "/api/v1/audit": "id",
        "/api/v1/users": "name",
        "/api/v1/tokens": "id",
        "/api/v1/agents": "name",
    }
    for path, key in lists.items():
        whole = (await client.get(path, params={"size": 500})).json()
        assert whole["next_cursor"] is None, path
        walked = await walk(client, path, {"size": 2})
        assert [item[key] for item in walked] == [item[key] for item in whole["items"]], path
    tasks = (await client.get("/api/v1/tasks", params={"size": 500})).json()["items"]
    keys = [(t["created_at"], t["id"]) for t in tasks]
    assert keys == sorted(keys, reverse=True)
