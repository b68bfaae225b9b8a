"""Seed 000's ad-hoc targets on a real control plane (uvicorn in the test's loop, real sshd, an
API token): a request's targets run its commands through the bastion, and then stay out of
every later fleet-wide task (issue 16 item 8)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import free_port, serving
from tests.integration.sshd import HOST, SshLab, ssh_lab

pytestmark = pytest.mark.service("sshd")


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with ssh_lab() as the_lab:
        the_lab.start(["bastion"], forwarding=True)
        the_lab.start(["adhoc-target", "inventory-target"])
        yield the_lab


@asynccontextmanager
async def control_plane(
    lab: SshLab, root: Path, headers: dict[str, str] | None = None, **extra: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A control plane and a client of it: an admin's unless ``headers`` says otherwise."""
    port = free_port()
    settings = load_settings(
        data_dir=root,
        listen=f"127.0.0.1:{port}",
        grpc_listen=f"127.0.0.1:{free_port()}",
        bootstrap_admin_token=ADMIN_TOKEN,
        ssh_known_hosts=lab.known_hosts(root / "known_hosts", lab.daemons.values()),
        **extra,
    )
    app = create_app(settings)
    async with (
        serving(app, port),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers=ADMIN_HEADERS if headers is None else headers,
            timeout=30.0,
        ) as client,
    ):
        yield client


async def _poll(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            answer: dict[str, Any] = (await client.get(path)).json()
            if answer.get("status") != "PENDING":
                return answer
            await asyncio.sleep(0.1)


async def _hosts_of_new_task(client: httpx.AsyncClient, targets: dict[str, Any]) -> set[str]:
    created = await client.post("/api/v1/tasks", json={"command": "true", "targets": targets})
    assert created.status_code == 201, created.text
    runs = await client.get(f"/api/v1/tasks/{created.json()['id']}/runs?output=true")
    return {run["host"] for run in runs.json()["items"]}


async def test_adhoc_targets_run_the_request_and_join_no_later_fleet_wide_task(
    lab: SshLab, tmp_path: Path
) -> None:
    key = str(lab.client_key_path)
    bastion = lab.daemons["bastion"]
    adhoc = lab.daemons["adhoc-target"]
    inventory = f"inv-{uuid.uuid4().hex[:6]}"
    async with control_plane(lab, tmp_path) as client:
        added = await client.post("/api/v1/hosts", json={
            "name": inventory, "ssh": f"{lab.user.name}@{lab.daemons['inventory-target'].address}",
            "key_file": key, "groups": ["web"],
        })  # fmt: skip
        assert added.status_code == 201 and added.json()["adhoc"] is False, added.text
        # The seed's request: POST /api/ssh/task {"proxy_host": …, "targets": […], "commands": […]}
        request = {
            "proxy_host": HOST, "proxy_port": bastion.port, "proxy_username": lab.user.name,
            "proxy_key_file": key,
            "targets": [{"host": HOST, "port": adhoc.port, "username": lab.user.name,
                         "key_file": key}],
            "commands": ["echo hello"],
        }  # fmt: skip
        created = await client.post("/api/ssh/task", json=request)
        assert created.status_code == 201, created.text
        answer = await _poll(client, f"/api/ssh/task/{created.json()['task_id']}")
        assert answer["status"] == "SUCCESS", answer
        (result,) = answer["results"]
        assert result["stdout"] == "hello\n" and result["success"] is True
        target = result["host"]
        assert target == f"{lab.user.name}@{HOST}:{adhoc.port}"

        # `all`, a group, a label: the ad-hoc target is in none of them.
        assert await _hosts_of_new_task(client, {"all": True}) == {inventory}
        for targets in ({"groups": ["adhoc"]}, {"labels": {"registered_by": "seed000-api"}}):
            body = {"command": "true", "targets": targets}
            refused = await client.post("/api/v1/tasks", json=body)
            assert refused.status_code == 422, refused.text
            assert "selected by name only" in refused.text, refused.text
        # Its name still selects it.
        assert await _hosts_of_new_task(client, {"hosts": [target]}) == {target}
        # The inventory does not list it unless asked.
        listed = (await client.get("/api/v1/hosts")).json()["items"]
        assert [host["name"] for host in listed] == [inventory]
        every = (await client.get("/api/v1/hosts", params={"adhoc": "true"})).json()["items"]
        shown = {host["name"]: (host["adhoc"], host["groups"]) for host in every}
        assert shown == {inventory: (False, ["web"]), target: (True, ["adhoc"])}

        # A later request to the same target keeps it ad hoc; an operator's `hosts add` of
        # the same name makes it an inventory host, which `all` then selects.
        again = await client.post("/api/ssh/task", json=request)
        assert (await _poll(client, f"/api/ssh/task/{again.json()['task_id']}"))["status"] == (
            "SUCCESS"
        )
        assert await _hosts_of_new_task(client, {"all": True}) == {inventory}
        promoted = await client.post("/api/v1/hosts", json={
            "name": target, "ssh": f"{lab.user.name}@{adhoc.address}", "key_file": key,
            "groups": ["web"],
        })  # fmt: skip
        assert promoted.status_code == 201 and promoted.json()["adhoc"] is False, promoted.text
        assert await _hosts_of_new_task(client, {"all": True}) == {inventory, target}
        assert await _hosts_of_new_task(client, {"groups": ["web"]}) == {inventory, target}
        # An inventory host named in a seed-000 request stays in the inventory.
        third = await client.post("/api/ssh/task", json=request)
        assert (await _poll(client, f"/api/ssh/task/{third.json()['task_id']}"))["status"] == (
            "SUCCESS"
        )
        host = (await client.get(f"/api/v1/hosts/{target}")).json()
        assert (host["adhoc"], host["groups"]) == (False, ["web"])


async def test_an_unknown_task_id_is_404_not_pending(lab: SshLab, tmp_path: Path) -> None:
    # The seed's Celery backend answers PENDING for any id it never saw; opsplane answers 404
    # (docs/compat.md, seed 000).
    async with control_plane(lab, tmp_path) as client:
        for path in ("/api/ssh/task", "/api/upload/task"):
            answer = await client.get(f"{path}/{uuid.uuid4()}")
            assert answer.status_code == 404, answer.text


async def test_the_seeds_request_without_a_token_runs_under_compat_anonymous(
    lab: SshLab, tmp_path: Path
) -> None:
    # Issue 16 item 6: an unchanged seed-000 client sends no token.
    key = str(lab.client_key_path)
    bastion = lab.daemons["bastion"]
    adhoc = lab.daemons["adhoc-target"]
    request = {
        "proxy_host": HOST, "proxy_port": bastion.port, "proxy_username": lab.user.name,
        "proxy_key_file": key,
        "targets": [{"host": HOST, "port": adhoc.port, "username": lab.user.name,
                     "key_file": key}],
        "commands": ["echo hello"],
    }  # fmt: skip
    settings = {
        "compat_anonymous": ["seed000"],
        "compat_anonymous_principal": "celery-client",
        "compat_anonymous_role": "admin",
    }
    async with control_plane(lab, tmp_path, headers={}, **settings) as client:
        created = await client.post("/api/ssh/task", json=request)
        assert created.status_code == 201, created.text
        answer = await _poll(client, f"/api/ssh/task/{created.json()['task_id']}")
        assert answer["status"] == "SUCCESS", answer
        assert answer["results"][0]["stdout"] == "hello\n"
        # An id never seen: PENDING, as the seed's Celery backend answers.
        unknown = await client.get(f"/api/ssh/task/{uuid.uuid4()}")
        assert unknown.status_code == 200 and unknown.json()["status"] == "PENDING"
        # opsplane's own API is never anonymous.
        assert (await client.get("/api/v1/tasks")).status_code == 401
        audit = await client.get(
            "/api/v1/audit", params={"actor": "celery-client"}, headers=ADMIN_HEADERS
        )
        (record,) = [r for r in audit.json()["items"] if r["action"] == "task.create"]
        assert record["detail"]["anonymous"] is True and record["detail"]["api"] == "seed000"
        assert record["detail"]["via"] == "anonymous:seed000"
