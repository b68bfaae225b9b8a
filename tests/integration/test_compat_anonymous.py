"""Unchanged seed clients (issue 16 item 6), against a real server on loopback (uvicorn in the
test's loop, real engine on SQLite): the seeds' own calls without a token work only under
``compat_anonymous``, as the named principal with its role and groups, only from the listed
networks, audited as anonymous; the token is also accepted as the HTTP Basic password and as
``X-Api-Key``; opsplane's own API is never anonymous."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import free_port, serving

CATALOG = Path(__file__).parents[1] / "fixtures" / "catalog" / "catalog.yaml"
# What curl -d sends: the seeds' clients do not say the body is JSON.
CURL = {"Content-Type": "application/x-www-form-urlencoded"}
SEED003_BODY = {"script_path": "/scripts/backup.sh", "params": {"dir": "/data"}, "priority": 1}


@asynccontextmanager
async def served(tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    port = free_port()
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    backup = scripts / "backup.sh"
    backup.write_text('#!/bin/sh\necho "backing up $PARAM_DIR"\n')
    backup.chmod(0o755)
    app = create_app(
        load_settings(
            data_dir=tmp_path / "data",
            listen=f"127.0.0.1:{port}",
            grpc_listen=f"127.0.0.1:{free_port()}",
            bootstrap_admin_token=ADMIN_TOKEN,
            catalog=CATALOG,
            script_dirs=[scripts],
            **settings,
        )
    )
    async with serving(app, port):
        yield f"http://127.0.0.1:{port}"


def _anonymous(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30.0)


def _admin(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30.0, headers=ADMIN_HEADERS)


async def _audit(url: str, actor: str) -> list[dict[str, Any]]:
    async with _admin(url) as admin:
        answer = await admin.get("/api/v1/audit", params={"actor": actor, "size": 100})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def _basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


async def _wait_seed003(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            task: dict[str, Any] = (await client.get(f"/tasks/{task_id}")).json()
            if task["status"] not in ("pending", "running"):
                return task
            await asyncio.sleep(0.1)


async def test_without_the_setting_every_seed_route_answers_401_to_a_call_without_a_token(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as url, _anonymous(url) as client:
        calls = [
            ("GET", "/list", None),
            ("POST", "/sync/tendb-cluster/demo1", b'["123", "456"]'),
            ("POST", "/tendb-cluster/demo1", b'["123", "456"]'),
            ("POST", "/async/query", None),
            ("GET", "/tasks/x", None),
            ("GET", "/api/ssh/task/x", None),
        ]
        for method, path, body in calls:
            answer = await client.request(method, path, content=body, headers=CURL)
            assert answer.status_code == 401, f"{method} {path}: {answer.text}"
        assert (await client.post("/tasks", json=SEED003_BODY)).status_code == 401
        # Without the setting an unknown seed-000 id is a 404, as before.
        async with _admin(url) as admin:
            assert (await admin.get("/api/ssh/task/no-such-task")).status_code == 404


async def test_seed004s_curl_examples_without_a_token_run_as_the_named_principal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opsplane.app_factory")
    settings = {"compat_anonymous": ["seed004"], "compat_anonymous_principal": "legacy-cli"}
    async with served(tmp_path, **settings) as url, _anonymous(url) as client:
        warned = [r.getMessage() for r in caplog.records if "compat_anonymous" in r.getMessage()]
        assert len(warned) == 1 and "seed004" in warned[0] and "legacy-cli" in warned[0], warned
        # curl -XPOST http://localhost/tendb-cluster/demo1 -d '["123", "456"]'
        short = await client.post("/tendb-cluster/demo1", content=b'["123", "456"]', headers=CURL)
        assert short.json() == {"code": 0, "data": "hello aaa bbb 123 456", "msg": ""}, short.text
        sync = await client.post("/sync/tendb-cluster/demo1", content=b'["1"]', headers=CURL)
        assert sync.json() == {"code": 0, "data": "hello aaa bbb 1", "msg": ""}, sync.text
        started = await client.post("/async/tendb-cluster/demo1", content=b"[]", headers=CURL)
        assert started.status_code == 200 and started.json()["code"] == 0, started.text
        # curl -XPOST /async/query: every session
        query = await client.post("/async/query")
        assert query.status_code == 200 and query.json()["code"] == 0, query.text
        listed = await client.get("/list")
        assert listed.status_code == 200 and listed.json()["code"] == 0

        # Only seed 004 is open: seed 003 and opsplane's own API still need a token.
        assert (await client.post("/tasks", json=SEED003_BODY)).status_code == 401
        assert (await client.get("/api/v1/tasks")).status_code == 401
        body = {"command": "true", "targets": {"all": True}}
        assert (await client.post("/api/v1/tasks", json=body)).status_code == 401
        # A browser is never anonymous: a page's cross-site form to a loopback port, or a page
        # of a rebound DNS name, would otherwise run the catalog as this principal.
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "same-origin"}):
            forged = await client.post(
                "/tendb-cluster/demo1", content=b'["1"]', headers={**CURL, **headers}
            )
            assert forged.status_code == 401 and forged.json()["code"] == 1, forged.text
        # A wrong credential is a 401, never a fallback to the anonymous principal.
        for headers in ({"X-Api-Key": "ops_wrong"}, _basic("x", "ops_wrong")):
            wrong = await client.get("/list", headers=headers)
            assert wrong.status_code == 401 and wrong.json()["code"] == 1, wrong.text

        records = await _audit(url, "legacy-cli")
        runs = [r for r in records if r["action"] == "catalog.run"]
        assert len(runs) == 3, records
        for record in runs:
            assert record["role"] == "operator"
            assert record["detail"]["anonymous"] is True, record
            assert record["detail"]["via"] == "anonymous:seed004", record
        async with _admin(url) as admin:
            tasks = (await admin.get("/api/v1/tasks")).json()["items"]
        assert {task["created_by"] for task in tasks} == {"legacy-cli"}


async def test_seed003_and_seed000_without_a_token_under_an_admin_principal(
    tmp_path: Path,
) -> None:
    settings = {
        "compat_anonymous": ["seed000", "seed003"],
        "compat_anonymous_principal": "seed-scripts",
        "compat_anonymous_role": "admin",
    }
    async with served(tmp_path, **settings) as url, _anonymous(url) as client:
        # Seed 003's example body, as its clients POST it.
        created = await client.post("/tasks", json=SEED003_BODY)
        assert created.status_code == 201, created.text
        task = await _wait_seed003(client, created.json()["id"])
        assert task["status"] == "success", task
        # GET /tasks/{id}/logs, the seed's SSE stream: the archived line, then the end.
        lines: list[str] = []
        async with asyncio.timeout(30), client.stream("GET", f"/tasks/{task['id']}/logs") as logs:
            assert logs.status_code == 200
            async for line in logs.aiter_lines():
                lines.append(line)
                if line.startswith("event: end"):
                    break
        assert "data: backing up /data" in lines, lines
        # Seed 000: the request is taken (its one target is a closed port: that run fails).
        request = {"targets": [f"tester@127.0.0.1:{free_port()}"], "commands": ["echo hello"]}
        ssh = await client.post("/api/ssh/task", json=request)
        assert ssh.status_code == 201, ssh.text
        assert (await client.get(f"/api/ssh/task/{ssh.json()['task_id']}")).status_code == 200
        # An id the seed's Celery backend never saw is PENDING, as it answers.
        unknown = await client.get("/api/ssh/task/no-such-task")
        assert unknown.json() == {"task_id": "no-such-task", "status": "PENDING"}
        upload = await client.get("/api/upload/task/no-such-task")
        assert upload.json() == {"task_id": "no-such-task", "status": "PENDING"}
        # Seed 004 is not open; opsplane's own API never is.
        assert (await client.get("/list")).status_code == 401
        assert (await client.get("/api/v1/hosts")).status_code == 401

        records = await _audit(url, "seed-scripts")
        created_records = [r for r in records if r["action"] == "task.create"]
        assert {r["detail"]["api"] for r in created_records} == {"seed000", "seed003"}
        assert all(r["detail"]["anonymous"] is True for r in created_records), created_records
        assert all(r["role"] == "admin" for r in created_records)


async def test_a_viewer_principal_reads_but_may_not_run(tmp_path: Path) -> None:
    settings = {
        "compat_anonymous": ["seed003", "seed004"],
        "compat_anonymous_principal": "watcher",
        "compat_anonymous_role": "viewer",
    }
    async with served(tmp_path, **settings) as url, _anonymous(url) as client:
        assert (await client.get("/list")).status_code == 200
        assert (await client.post("/async/query")).status_code == 200
        refused = await client.post("/sync/tendb-cluster/demo1", content=b"[]", headers=CURL)
        assert refused.status_code == 403 and refused.json()["code"] == 1, refused.text
        assert (await client.post("/tasks", json=SEED003_BODY)).status_code == 403
        denied = [r for r in await _audit(url, "watcher") if r["outcome"] == "denied"]
        assert len(denied) == 2, denied
        assert all(r["detail"]["anonymous"] is True for r in denied)


async def test_an_operator_principal_runs_only_on_its_groups(tmp_path: Path) -> None:
    settings = {"compat_anonymous": ["seed004"], "compat_anonymous_groups": ["web"]}
    async with served(tmp_path, **settings) as url, _anonymous(url) as client:
        # Catalog scripts run on the control plane's own host, group control-plane.
        refused = await client.post("/sync/tendb-cluster/demo1", content=b"[]", headers=CURL)
        assert refused.status_code == 403 and "control-plane" in refused.json()["msg"]


async def test_a_source_outside_the_listed_networks_is_not_anonymous(tmp_path: Path) -> None:
    settings = {
        "compat_anonymous": ["seed003", "seed004"],
        "compat_anonymous_networks": ["10.0.0.0/8"],
    }
    async with served(tmp_path, **settings) as url, _anonymous(url) as client:
        assert (await client.get("/list")).status_code == 401
        short = await client.post("/tendb-cluster/demo1", content=b'["1"]', headers=CURL)
        assert short.status_code == 401 and short.json()["code"] == 1
        # Still refused before the body is read: malformed JSON is a 401, not a 422.
        broken = await client.post(
            "/tasks", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 401, broken.text


async def test_the_token_is_accepted_as_basic_password_and_as_x_api_key(tmp_path: Path) -> None:
    async with served(tmp_path) as url, _anonymous(url) as client:
        for headers in (_basic("anyone", ADMIN_TOKEN), _basic("", ADMIN_TOKEN)):
            answer = await client.get("/api/v1/tasks", headers=headers)
            assert answer.status_code == 200, answer.text
        answer = await client.get("/api/v1/tasks", headers={"X-Api-Key": ADMIN_TOKEN})
        assert answer.status_code == 200, answer.text
        # The seeds' routes too, with their literal calls.
        sync = await client.post(
            "/sync/tendb-cluster/demo1",
            content=b'["123", "456"]',
            headers={**CURL, "X-Api-Key": ADMIN_TOKEN},
        )
        assert sync.json()["data"] == "hello aaa bbb 123 456", sync.text
        created = await client.post("/tasks", json=SEED003_BODY, headers=_basic("ci", ADMIN_TOKEN))
        assert created.status_code == 201, created.text
        # Basic is for scripts: a browser resends cached Basic credentials on its own.
        from_a_page = {**_basic("anyone", ADMIN_TOKEN), "Sec-Fetch-Mode": "navigate"}
        assert (await client.get("/api/v1/tasks", headers=from_a_page)).status_code == 401
        refused = [
            _basic("anyone", "ops_wrong"),
            _basic(ADMIN_TOKEN, ""),
            {"Authorization": "Basic not-base64!"},
            {"X-Api-Key": "ops_wrong"},
            {"X-Api-Key": ""},
            {"X-Api-Key": ADMIN_TOKEN, **ADMIN_HEADERS},  # two credentials: which counts?
        ]
        for headers in refused:
            answer = await client.get("/api/v1/tasks", headers=headers)
            assert answer.status_code == 401, f"{headers}: {answer.text}"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        # Refused before the body is read, in every form.
        broken = await client.post(
            "/api/v1/tasks",
            content=b"{not json",
            headers={"Content-Type": "application/json", "X-Api-Key": "ops_wrong"},
        )
        assert broken.status_code == 401, broken.text
