"""Pinned scripts through the API of an in-process control plane: seed 003's ``POST /tasks``
with pins approved by ``opsplane scripts approve``, and seed 004's catalog with ``sha256``.
A pinned script runs from its verified copy; a changed one is refused with the expected and
actual hash, and nothing runs; approving the new content lets it run again."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner, Result

from opsplane.app_factory import create_app
from opsplane.cli.main import app as cli
from opsplane.config import load_settings
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import free_port

# Each run leaves a mark, so that "nothing ran" is a fact, not an absence of news.
V1 = '#!/bin/sh\necho v1 >> "$MARKS"\necho "v1 $0 $OPSPLANE_SCRIPT_PATH"\n'
V2 = '#!/bin/sh\necho v2 >> "$MARKS"\necho "v2 $0 $OPSPLANE_SCRIPT_PATH"\n'


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@asynccontextmanager
async def _client(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        load_settings(
            data_dir=tmp_path / "data",
            grpc_listen=f"127.0.0.1:{free_port()}",
            bootstrap_admin_token=ADMIN_TOKEN,
            # Scripts inherit only allowed variables of the control plane's environment.
            env_passthrough=["MARKS"],
            **settings,
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=ADMIN_HEADERS, timeout=30
        ) as client,
    ):
        yield client


async def _task_count(client: httpx.AsyncClient) -> int:
    response = await client.get("/api/v1/tasks")
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


async def _run(client: httpx.AsyncClient, script_path: str) -> dict[str, Any]:
    """Submit a seed-003 task and wait for its end: the seed's view and its output."""
    response = await client.post("/tasks", json={"script_path": script_path})
    assert response.status_code == 201, response.text
    task_id = response.json()["id"]
    async with asyncio.timeout(30):
        while (task := (await client.get(f"/tasks/{task_id}")).json())["status"] in (  # noqa: ASYNC110
            "pending",
            "running",
        ):
            await asyncio.sleep(0.05)
    (run,) = (await client.get(f"/api/v1/tasks/{task_id}/runs?output=true")).json()["items"]
    return {**task, "stdout": run["stdout"]}


def _scripts_cli(tmp_path: Path, scripts: Path, verb: str, *paths: str) -> Result:
    options = ["--data-dir", str(tmp_path / "data"), "--script-dir", str(scripts)]
    return CliRunner().invoke(cli, ["scripts", verb, *paths, *options])


def _approve(tmp_path: Path, scripts: Path, *paths: str) -> str:
    result = _scripts_cli(tmp_path, scripts, "approve", *paths)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "scripts"
    directory.mkdir()
    _write(directory / "backup.sh", V1)
    _write(directory / "other.sh", V1)
    monkeypatch.setenv("MARKS", str(tmp_path / "marks"))
    return directory.resolve()  # as pins and messages name it


@pytest.fixture
def collect(tmp_path: Path) -> Path:
    directory = tmp_path / "collect"
    directory.mkdir()
    _write(directory / "job.sh", V1)
    return directory.resolve()


def _marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks"
    return path.read_text().split() if path.exists() else []


async def test_a_pinned_script_runs_a_changed_one_is_refused_until_approved_again(
    tmp_path: Path, scripts: Path
) -> None:
    script = scripts / "backup.sh"
    printed = _approve(tmp_path, scripts, "/scripts/backup.sh")
    assert printed == f"{_sha(V1)}  {script}\n"

    async with _client(tmp_path, script_dirs=[scripts]) as client:
        task = await _run(client, "/scripts/backup.sh")
        assert task["status"] == "success", task
        # It ran from the verified copy, which knows where it came from.
        copy = tmp_path / "data" / "verified-scripts" / _sha(V1) / "backup.sh"
        assert task["stdout"] == f"v1 {copy} {script}\n"
        assert _marks(tmp_path) == ["v1"]

        _write(script, V2)
        before = await _task_count(client)
        refused = await client.post("/tasks", json={"script_path": "/scripts/backup.sh"})
        assert refused.status_code == 409, refused.text
        detail = refused.json()["detail"]
        assert "script '/scripts/backup.sh' changed since it was approved" in detail
        assert f"expected sha256 {_sha(V1)[:12]}…, found {_sha(V2)[:12]}…" in detail
        assert f"opsplane scripts approve {script}" in detail
        # Nothing ran, and no task was even created.
        assert await _task_count(client) == before
        assert _marks(tmp_path) == ["v1"]

        # Approved again (while the server runs): the new content runs.
        assert _approve(tmp_path, scripts, str(script)).startswith(_sha(V2))
        task = await _run(client, "backup.sh")
        assert task["status"] == "success" and task["stdout"].startswith("v2 "), task
        assert _marks(tmp_path) == ["v1", "v2"]

        # Unpinned scripts still run in place while pins are not required.
        task = await _run(client, "other.sh")
        assert task["stdout"] == f"v1 {scripts / 'other.sh'} \n"


async def test_with_pins_required_an_unpinned_script_is_refused(
    tmp_path: Path, scripts: Path
) -> None:
    _approve(tmp_path, scripts, "backup.sh")
    async with _client(tmp_path, script_dirs=[scripts], script_pins_required=True) as client:
        refused = await client.post("/tasks", json={"script_path": "other.sh"})
        assert refused.status_code == 409, refused.text
        assert "not approved and script_pins_required is on" in refused.json()["detail"]
        assert await _task_count(client) == 0
        assert (await _run(client, "backup.sh"))["status"] == "success"
    assert _marks(tmp_path) == ["v1"]


def test_approve_refuses_what_the_server_would_not_run(tmp_path: Path, scripts: Path) -> None:
    outside = _write(tmp_path / "outside.sh", V1)
    result = _scripts_cli(tmp_path, scripts, "approve", str(outside))
    assert result.exit_code == 1
    assert "outside the script directories" in result.output
    assert not (tmp_path / "data" / "script-pins.yaml").exists()


def test_list_shows_changed_scripts(tmp_path: Path, scripts: Path) -> None:
    _approve(tmp_path, scripts, "backup.sh", "other.sh")
    _write(scripts / "other.sh", V2)
    result = CliRunner().invoke(cli, ["scripts", "list", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert f"ok       {_sha(V1)[:12]}…  {scripts / 'backup.sh'}" in result.stdout
    assert f"changed  {_sha(V1)[:12]}…  {scripts / 'other.sh'}" in result.stdout


def _catalog(tmp_path: Path, sha256: str) -> Path:
    entry = {
        "name": "pinned",
        "cluster_type": "test",
        "language": "sh",
        "executable": "job.sh",
        "collected": True,
        "sha256": sha256,
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump([entry]))
    return path


async def test_a_catalog_entry_whose_script_changed_is_refused_until_its_sha256_is_updated(
    tmp_path: Path, scripts: Path, collect: Path
) -> None:
    job = collect / "job.sh"
    async with _client(tmp_path, catalog=_catalog(tmp_path, _sha(V1))) as client:
        answer = (await client.post("/sync/test/pinned")).json()
        copy = tmp_path / "data" / "verified-scripts" / _sha(V1) / "job.sh"
        assert answer == {"code": 0, "data": f"v1 {copy} {job}", "msg": ""}

        _write(job, V2)
        before = await _task_count(client)
        for mode in ("sync", "async"):
            refused = await client.post(f"/{mode}/test/pinned")
            assert refused.status_code == 422, refused.text
            body = refused.json()
            assert body["code"] == 1 and body["data"] == ""
            assert f"catalog task test/pinned: script {job} changed" in body["msg"]
            assert f"expected sha256 {_sha(V1)[:12]}…, found {_sha(V2)[:12]}…" in body["msg"]
        assert await _task_count(client) == before
        assert _marks(tmp_path) == ["v1"]

    # Approving the change is a new sha256 in the catalog (and a restart).
    async with _client(tmp_path, catalog=_catalog(tmp_path, _sha(V2))) as client:
        answer = (await client.post("/sync/test/pinned")).json()
        assert answer["code"] == 0 and answer["data"].startswith("v2 "), answer
    assert _marks(tmp_path) == ["v1", "v2"]
