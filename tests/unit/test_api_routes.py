"""Every route of the API, enumerated from the OpenAPI schema, refuses anonymous and
under-privileged callers: real tokens against a real engine on SQLite, served by a real
uvicorn server in the test's event loop (so that the live streams answer like any route)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from opsplane.api.deps import SAFE_METHODS
from opsplane.app_factory import create_app
from opsplane.config import load_settings
from opsplane.security.roles import Permission
from opsplane.transport.base import AgentHello
from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import free_port, serving

CATALOG = Path(__file__).parents[1] / "fixtures" / "catalog" / "catalog.yaml"
# The only routes anyone may call. /metrics too while metrics_public is set (the default).
# Enrollment's credential is the one-time token in its body.
PUBLIC = {"/healthz", "/readyz", "/api/v1/auth/login", "/api/v1/agents/enroll"}
POST_ONLY = {"/api/v1/auth/login", "/api/v1/agents/enroll"}
PUBLIC_METRICS = "/metrics"
# POST routes a viewer may call: they only read, or end the caller's own web session.
# A template launch is decided per template (a viewer with a grant may launch it): 403 or
# not comes from the service, after the route (tests/integration/test_template_grants.py).
VIEWER_MAY_POST = {"/api/v1/auth/logout", "/async/query", "/api/v1/templates/{name}/launch"}
# The seeds' routes, the only ones compat_anonymous may open (docs/security.md).
SEED_ROUTES = {
    "/api/ssh/task", "/api/ssh/task/{task_id}", "/api/upload/task", "/api/upload/task/{task_id}",
    "/tasks", "/tasks/{task_id}", "/tasks/{task_id}/logs",
    "/list", "/sync/{cluster_type}/{name}", "/async/{cluster_type}/{name}", "/async/query",
    "/async/kill", "/{cluster_type}/{name}",
}  # fmt: skip
# The policy, pinned: whatever else changes, these need exactly this.
PINNED = {
    ("POST", "/api/v1/tasks"): Permission.RUN,
    ("POST", "/api/v1/tasks/{task_id}/start"): Permission.RUN,
    ("POST", "/api/v1/tasks/{task_id}/cancel"): Permission.RUN,
    ("POST", "/api/v1/tasks/{task_id}/rerun"): Permission.RUN,
    ("POST", "/sync/{cluster_type}/{name}"): Permission.RUN,
    ("POST", "/async/{cluster_type}/{name}"): Permission.RUN,
    ("POST", "/async/kill"): Permission.RUN,
    ("POST", "/{cluster_type}/{name}"): Permission.RUN,
    ("POST", "/api/v1/templates"): Permission.ADMIN,
    ("PUT", "/api/v1/templates/{name}"): Permission.ADMIN,
    ("DELETE", "/api/v1/templates/{name}"): Permission.ADMIN,
    ("GET", "/api/v1/users/{user}/template-grants"): Permission.ADMIN,
    ("POST", "/api/v1/users/{user}/template-grants"): Permission.ADMIN,
    ("DELETE", "/api/v1/users/{user}/template-grants/{template}"): Permission.ADMIN,
    ("POST", "/api/v1/schedules"): Permission.RUN,
    ("PATCH", "/api/v1/schedules/{schedule_id}"): Permission.RUN,
    ("DELETE", "/api/v1/schedules/{schedule_id}"): Permission.RUN,
    ("GET", "/api/v1/users"): Permission.ADMIN,
    ("POST", "/api/v1/users"): Permission.ADMIN,
    ("GET", "/api/v1/users/{name}"): Permission.ADMIN,
    ("PATCH", "/api/v1/users/{name}"): Permission.ADMIN,
    ("GET", "/api/v1/tokens"): Permission.ADMIN,
    ("POST", "/api/v1/tokens"): Permission.ADMIN,
    ("POST", "/api/v1/tokens/{token_id}/revoke"): Permission.ADMIN,
    ("GET", "/api/v1/audit"): Permission.ADMIN,
    ("GET", "/api/v1/agents"): Permission.ADMIN,
    ("POST", "/api/v1/agents/tokens"): Permission.ADMIN,
    ("POST", "/api/v1/agents/{name}/revoke"): Permission.ADMIN,
    ("GET", "/api/v1/audit/verify"): Permission.ADMIN,
}


@dataclass
class Served:
    url: str
    app: FastAPI

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30.0)

    async def token(self, **body: Any) -> str:
        async with self.client(ADMIN_TOKEN) as admin:
            answer = await admin.post("/api/v1/tokens", json=body)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])


@asynccontextmanager
async def served(tmp_path: Path, **extra: Any) -> AsyncIterator[Served]:
    port = free_port()
    settings = load_settings(
        data_dir=tmp_path,
        listen=f"127.0.0.1:{port}",
        grpc_listen=f"127.0.0.1:{free_port()}",
        bootstrap_admin_token=ADMIN_TOKEN,
        catalog=CATALOG,
        **extra,
    )
    app = create_app(settings)
    async with serving(app, port):
        engine = app.state.engine
        # Hosts as agents register them (no agent process: runs to them end undeliverable).
        await engine.host_connected(AgentHello(hostname="web-1", link="grpc", groups=("web",)))
        await engine.host_connected(AgentHello(hostname="db-1", link="grpc", groups=("db",)))
        yield Served(f"http://127.0.0.1:{port}", app)


async def _routes(api: Served) -> list[tuple[str, str]]:
    async with api.client() as anonymous:
        answer = await anonymous.get("/openapi.json")
    assert answer.status_code == 200  # the schema is documentation, not data: public
    routes = [
        (method.upper(), path)
        for path, methods in answer.json()["paths"].items()
        for method in methods
        if path not in PUBLIC and path != PUBLIC_METRICS
    ]
    assert len(routes) >= 30, routes
    return routes


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@dataclass
class Answer:
    status_code: int
    text: str
    headers: httpx.Headers


async def _status(client: httpx.AsyncClient, method: str, path: str) -> Answer:
    """The answer, with its body unless it is a live stream (those never end by themselves)."""
    async with client.stream(method, _url(path), json={}) as answer:
        streaming = answer.headers.get("content-type", "").startswith("text/event-stream")
        text = "" if streaming else (await answer.aread()).decode(errors="replace")
        return Answer(answer.status_code, text, answer.headers)


async def test_every_route_refuses_anonymous_and_unknown_callers(tmp_path: Path) -> None:
    async with served(tmp_path) as api:
        routes = await _routes(api)
        async with api.client() as anonymous, api.client("ops_no-such-token") as unknown:
            for method, path in routes:
                for client in (anonymous, unknown):
                    answer = await _status(client, method, path)
                    assert answer.status_code == 401, f"{method} {path}: {answer.status_code}"
                    assert answer.headers["www-authenticate"].startswith("Bearer"), path
            # A cookie that is no session is no login either.
            anonymous.cookies.set("opsplane_session", "forged")
            assert (await anonymous.get("/api/v1/hosts")).status_code == 401
            for path in PUBLIC - POST_ONLY:
                assert (await anonymous.get(path)).status_code == 200, path


async def test_compat_anonymous_opens_the_seed_routes_and_no_other(tmp_path: Path) -> None:
    # Every seed API opened, to a viewer principal (it can change nothing while probed).
    seeds = ["seed000", "seed003", "seed004"]
    settings = {"compat_anonymous": seeds, "compat_anonymous_role": "viewer"}
    async with served(tmp_path, **settings) as api, api.client() as anonymous:
        routes = await _routes(api)
        assert {path for _method, path in routes} >= SEED_ROUTES
        for method, path in routes:
            answer = await _status(anonymous, method, path)
            where = f"{method} {path}: {answer.status_code} {answer.text[:200]}"
            if path in SEED_ROUTES:
                assert answer.status_code != 401 and answer.status_code < 500, where
            else:
                assert answer.status_code == 401, where


async def test_a_viewer_reads_everything_and_changes_nothing(tmp_path: Path) -> None:
    async with served(tmp_path) as api:
        viewer = await api.token(role="viewer", name="viewer")
        async with api.client(viewer) as client:
            for method, path in await _routes(api):
                answer = await _status(client, method, path)
                where = f"{method} {path}: {answer.status_code} {answer.text[:200]}"
                assert answer.status_code < 500, where
                if method in SAFE_METHODS:
                    # Reads are open to viewers, except the admin's (users, tokens, audit).
                    admin_only = PINNED.get((method, path)) is Permission.ADMIN
                    assert (answer.status_code == 403) == admin_only, where
                elif path in VIEWER_MAY_POST:
                    assert answer.status_code != 403, where
                else:
                    assert answer.status_code == 403 and "may not do this" in answer.text, where


async def test_an_operator_is_refused_only_what_needs_an_admin(tmp_path: Path) -> None:
    async with served(tmp_path) as api:
        operator = await api.token(role="operator", all_groups=True, name="operator")
        async with api.client(operator) as client:
            routes = await _routes(api)
            for method, path in PINNED:
                assert (method, path) in routes, f"{method} {path} is gone"
            for method, path in routes:
                answer = await _status(client, method, path)
                where = f"{method} {path}: {answer.status_code} {answer.text[:200]}"
                assert answer.status_code < 500, where
                if PINNED.get((method, path)) is Permission.ADMIN:
                    assert answer.status_code == 403, where
                elif PINNED.get((method, path)) is Permission.RUN:
                    assert answer.status_code != 403, where
                if answer.status_code == 403:
                    # Routes that declare nothing and change state are admin-only (api.deps).
                    assert "needs the admin role" in answer.text, where


async def test_an_operator_runs_only_on_its_groups_and_the_refusal_names_the_hosts(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as api:
        operator = await api.token(role="operator", groups=["web"], name="web only")
        async with api.client(operator) as client, api.client(ADMIN_TOKEN) as admin:
            for targets in ({"groups": ["db"]}, {"all": True}, {"hosts": ["web-1", "db-1"]}):
                body = {"command": "true", "targets": targets}
                refused = await client.post("/api/v1/tasks", json=body)
                assert refused.status_code == 403, refused.text
                detail = refused.json()["detail"]
                assert "db-1" in detail and "web-1" not in detail, detail
            body = {"command": "true", "targets": {"groups": ["web"]}}
            assert (await client.post("/api/v1/tasks", json=body)).status_code == 201
            # An admin's task on db: the operator may neither start nor cancel it.
            body = {"command": "true", "targets": {"groups": ["db"]}, "start": False}
            on_db = (await admin.post("/api/v1/tasks", json=body)).json()["id"]
            for action in ("start", "cancel"):
                answer = await client.post(f"/api/v1/tasks/{on_db}/{action}")
                assert answer.status_code == 403 and "db-1" in answer.text, answer.text
            # Catalog scripts run on the control plane's own host, group control-plane.
            sync = await client.post("/sync/tendb-cluster/demo1", json=["a"])
            assert sync.status_code == 403
            assert sync.json()["code"] == 1 and "control-plane" in sync.json()["msg"]
            started = await admin.post("/async/tendb-cluster/sleeper", json=["30"])
            session = {"session_id": started.json()["data"]}
            kill = await client.post("/async/kill", json=session)
            assert kill.status_code == 403 and kill.json()["code"] == 1, kill.text
            assert (await admin.post("/async/kill", json=session)).status_code == 200
            # Every refusal is in the audit trail, before anything ran.
            audit = await admin.get("/api/v1/audit", params={"action": "task", "size": 100})
            denied = [r for r in audit.json()["items"] if r["outcome"] == "denied"]
            assert len(denied) == 5, denied


async def test_metrics_need_a_token_when_not_configured_public(tmp_path: Path) -> None:
    # No lifespan: the refusal comes before any engine work.
    app = create_app(load_settings(data_dir=tmp_path, metrics_public=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")


async def test_numbers_out_of_range_are_refused_not_a_server_error(tmp_path: Path) -> None:
    # Found by the fuzz pass (tests/fuzz): each was a 500 (an OverflowError) before.
    async with served(tmp_path) as api, api.client(ADMIN_TOKEN) as admin:
        paged = ("/api/v1/tasks", "/api/v1/audit", "/api/v1/hosts", "/api/v1/hosts/web-1/runs")
        for path in paged:
            answer = await admin.get(path, params={"page": 2**64})
            assert answer.status_code == 422 and "page" in answer.text, f"{path}: {answer.text}"
            last = await admin.get(path, params={"page": 1_000_000_000})
            assert last.status_code == 200 and last.json()["items"] == [], f"{path}: {last.text}"
        body = {"role": "viewer", "expires_in": 10**20}
        answer = await admin.post("/api/v1/tokens", json=body)
        assert answer.status_code == 422, answer.text
        assert "expires_in is at most" in answer.json()["detail"], answer.text
        body["expires_in"] = 100 * 365 * 24 * 3600
        assert (await admin.post("/api/v1/tokens", json=body)).status_code == 201
