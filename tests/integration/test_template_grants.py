"""Who may launch a template where (issue 20): the permission matrix. An operator runs on its
groups; a grant lets a user (a viewer too) launch one template on the granted groups and
nothing else — no arbitrary command, no other template."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.test_templates_api import RESTART_WEB, _token, api

OTHER = {**RESTART_WEB, "name": "other-job"}
ON_WEB = {"params": {"mode": "soft"}, "targets": {"groups": ["web"]}}
ON_DB = {"params": {"mode": "soft"}, "targets": {"groups": ["db"]}}
RAW_TASK = {"command": "id", "targets": {"groups": ["web"]}}

# user -> (role, operator groups, granted groups of restart-web)
USERS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "viewer-granted": ("viewer", None, ["web"]),
    "viewer-plain": ("viewer", None, []),
    "op-web": ("operator", ["web"], []),
    "op-db-granted-web": ("operator", ["db"], ["web"]),
}
# (user, what) -> expected status
MATRIX: dict[tuple[str, str], int] = {
    ("viewer-granted", "launch web"): 201,
    ("viewer-granted", "launch db"): 403,
    ("viewer-granted", "launch other template"): 403,
    ("viewer-granted", "raw task"): 403,
    ("viewer-plain", "launch web"): 403,
    ("viewer-plain", "raw task"): 403,
    ("op-web", "launch web"): 201,
    ("op-web", "launch db"): 403,
    ("op-web", "launch other template"): 201,
    ("op-web", "raw task"): 201,
    ("op-db-granted-web", "launch web"): 201,
    ("op-db-granted-web", "launch db"): 201,
    ("op-db-granted-web", "launch other template"): 403,  # its own groups: db only
    ("admin", "launch web"): 201,
    ("admin", "launch db"): 201,
}


async def _do(client: httpx.AsyncClient, what: str, headers: dict[str, str]) -> int:
    if what == "raw task":
        answer = await client.post("/api/v1/tasks", json=RAW_TASK, headers=headers)
    elif what == "launch other template":
        answer = await client.post(
            "/api/v1/templates/other-job/launch", json=ON_WEB, headers=headers
        )
    else:
        body = ON_WEB if what == "launch web" else ON_DB
        answer = await client.post(
            "/api/v1/templates/restart-web/launch", json=body, headers=headers
        )
    if answer.status_code == 403:
        assert answer.json()["detail"], answer.text
    return answer.status_code


async def test_the_permission_matrix_of_template_launches(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, _link, client):
        for body in (RESTART_WEB, OTHER):
            assert (await client.post("/api/v1/templates", json=body)).status_code == 201
        headers: dict[str, dict[str, str]] = {"admin": {}}
        for user, (role, groups, granted) in USERS.items():
            token = await _token(client, user, role, groups)
            headers[user] = {"Authorization": f"Bearer {token}"}
            if granted:
                answer = await client.post(
                    f"/api/v1/users/{user}/template-grants",
                    json={"template": "restart-web", "groups": granted},
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["groups"] == granted
        found = {key: await _do(client, key[1], headers[key[0]]) for key in MATRIX}
        assert found == MATRIX


async def test_a_grant_is_given_listed_and_taken_back_by_an_admin_only(tmp_path: Path) -> None:
    async with api(tmp_path) as (_app, _link, client):
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        token = await _token(client, "v", "viewer")
        viewer = {"Authorization": f"Bearer {token}"}
        grant = {"template": "restart-web", "groups": ["web", "db"]}
        refused = await client.post("/api/v1/users/v/template-grants", json=grant, headers=viewer)
        assert refused.status_code == 403
        assert (await client.post("/api/v1/users/v/template-grants", json=grant)).status_code == 200
        listed = (await client.get("/api/v1/users/v/template-grants")).json()["items"]
        assert listed == [{"user": "v", "template": "restart-web", "groups": ["db", "web"]}]
        assert await _do(client, "launch db", viewer) == 201
        taken = await client.delete(
            "/api/v1/users/v/template-grants/restart-web", params={"group": "db"}
        )
        assert taken.json()["groups"] == ["web"]
        assert await _do(client, "launch db", viewer) == 403
        assert await _do(client, "launch web", viewer) == 201
        unknown = await client.post(
            "/api/v1/users/v/template-grants", json={**grant, "template": "nope"}
        )
        assert unknown.status_code == 404
        nobody = await client.post("/api/v1/users/nobody/template-grants", json=grant)
        assert nobody.status_code == 404


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_a_grant_follows_the_user_into_its_tokens(tmp_path: Path, role: str) -> None:
    async with api(tmp_path) as (_app, _link, client):
        assert (await client.post("/api/v1/templates", json=RESTART_WEB)).status_code == 201
        groups = ["db"] if role == "operator" else None
        token = await _token(client, "u", role, groups)
        headers = {"Authorization": f"Bearer {token}"}
        assert await _do(client, "launch web", headers) == 403
        grant = {"template": "restart-web", "groups": ["web"]}
        assert (await client.post("/api/v1/users/u/template-grants", json=grant)).status_code == 200
        assert await _do(client, "launch web", headers) == 201
