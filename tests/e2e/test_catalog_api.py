"""Seed 004's routes on a real server process over loopback: the paths, bodies and envelopes
exactly as the seed's clients see them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.conftest import processes_with
from tests.e2e.fleet import child_env, free_port, wait_for
from tests.integration.databases import throwaway_database

ROOT = Path(__file__).parents[2]
CATALOG = ROOT / "tests" / "fixtures" / "catalog" / "catalog.yaml"
# What curl -d sends: the seed's clients do not say the body is JSON.
CURL = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, headers=ADMIN_HEADERS)


def _launch(root: Path, catalog: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "opsplane", "server",
        "--listen", f"127.0.0.1:{port}", "--grpc-listen", f"127.0.0.1:{free_port()}",
        "--data-dir", str(root / "data"), "--external-task-config", str(catalog), *extra,
    ]  # fmt: skip
    with (root / "server.log").open("ab") as log:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env()
        )
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("catalog")
    process, url = _launch(root, CATALOG)
    the_server = Server(url, root / "data", process)
    try:
        with the_server.client() as client:

            def ready() -> bool:
                log = (root / "server.log").read_text()
                assert process.poll() is None, log
                with contextlib.suppress(httpx.HTTPError):
                    return client.get("/readyz").status_code == 200
                return False

            wait_for(ready, 60, "the catalog server to be ready")
        yield the_server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _post(client: httpx.Client, path: str, body: bytes | None = None) -> tuple[int, Any]:
    response = client.post(path, content=body, headers=CURL if body is not None else None)
    return response.status_code, response.json()


def test_list_shows_every_route_in_the_seeds_shape(server: Server) -> None:
    with server.client() as client:
        answer = client.get("/list").json()
    assert answer["code"] == 0 and answer["msg"] == ""
    routes = answer["data"]
    assert routes[:2] == [
        {"method": "POST", "path": "/sync/tendb-cluster/demo1"},
        {"method": "POST", "path": "/async/tendb-cluster/demo1"},
    ]
    assert {"method": "POST", "path": "/sync/tendb-ha/counter"} in routes
    assert {"method": "POST", "path": "/sync/sqlsvr/demopython"} in routes
    assert routes[-3:] == [
        {"method": "POST", "path": "/async/kill"},
        {"method": "POST", "path": "/async/query"},
        {"method": "GET", "path": "/list"},
    ]


def test_sync_runs_the_seeds_example_and_answers_with_the_envelope(server: Server) -> None:
    with server.client() as client:
        ok = _post(client, "/sync/tendb-cluster/demo1", b'["123", "456"]')
        failed = _post(client, "/sync/tendb-cluster/demo2", b'["fail"]')
        counted = _post(client, "/sync/tendb-ha/counter", b'{"count": 2}')
    assert ok == (200, {"code": 0, "data": "hello aaa bbb 123 456", "msg": ""})
    assert failed == (200, {"code": 1, "data": "sh got: fail", "msg": "sh failing as asked"})
    assert counted == (200, {"code": 0, "data": "counted to 2", "msg": ""})
    log = (server.data_dir / "logs" / "demo1.log").read_text()
    assert "POST /sync/tendb-cluster/demo1" in log and "stdout| hello aaa bbb 123 456" in log


def test_a_catalog_script_never_sees_the_bootstrap_admin_token(server: Server) -> None:
    # Issue 14, hole 4: the seed's demo1 runs `sh -c "echo hello aaa bbb <body…>"`, so a body
    # naming a variable reads it from the environment the server gives its scripts.
    body = b'["[$OPSPLANE_BOOTSTRAP_ADMIN_TOKEN]", "[$PATH]"]'
    with server.client() as client:
        status, answer = _post(client, "/sync/tendb-cluster/demo1", body)
    assert status == 200 and answer["code"] == 0, answer
    assert answer["data"] == f"hello aaa bbb [] [{os.environ['PATH']}]"
    assert ADMIN_TOKEN not in answer["data"]


def test_async_session_is_queried_and_is_a_task_in_the_api(server: Server) -> None:
    with server.client() as client:
        status, started = _post(client, "/async/tendb-cluster/demo1", b'["x"]')
        assert status == 200 and started["code"] == 0 and started["msg"] == ""
        session_id = started["data"]

        def finished() -> dict[str, Any] | None:
            _, answer = _post(client, "/async/query", b'{"session_id": "%s"}' % session_id.encode())
            return answer if answer["data"][0]["done"] else None

        one = wait_for(finished, 15, "the session to be done")
        assert one["code"] == 0 and one["msg"] == ""
        # A list, as the seed's upstream answers, holding that one session.
        assert one["data"] == [
            {
                "id": session_id,
                "message": "hello aaa bbb x",
                "error": "",
                "done": True,
                "start_at": one["data"][0]["start_at"],
            }
        ]
        assert datetime.fromisoformat(one["data"][0]["start_at"]).tzinfo is not None
        # No body: every session.
        status, every = _post(client, "/async/query")
        assert status == 200 and every["code"] == 0 and one["data"][0] in every["data"]
        task = client.get(f"/api/v1/tasks/{session_id}").json()
        assert task["kind"] == "script" and task["status"] == "succeeded"


def test_kill_ends_the_process_group_and_the_session_says_so(server: Server) -> None:
    marker = f"53.{os.getpid()}"  # unique to this test run: a sleep of 53.<pid> seconds
    with server.client() as client:
        _, started = _post(client, "/async/tendb-cluster/sleeper", f'["{marker}"]'.encode())
        session_id = started["data"]
        wait_for(lambda: len(processes_with(marker)) >= 3, 15, "the sleeper to start")
        body = b'{"session_id": "%s"}' % session_id.encode()
        status, killed = _post(client, "/async/kill", body)
        assert status == 200 and killed["code"] == 0, killed
        assert killed["data"]["done"] is True and "killed" in killed["data"]["error"]
        _, queried = _post(client, "/async/query", body)
        assert queried["data"][0]["error"] == killed["data"]["error"]
    wait_for(lambda: not _alive(marker), 15, "no sleeper process left")


def _alive(marker: str) -> list[psutil.Process]:
    alive = []
    for process in processes_with(marker):
        with contextlib.suppress(psutil.NoSuchProcess):  # reaped while we looked
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/sync/tendb-cluster/nope", b"[]", 404, "no catalog task tendb-cluster/nope"),
        ("/async/TendbCluster/demo1", b"[]", 404, "no catalog task"),
        ("/sync/tendb-cluster/demo1", b"not json", 400, "body is not valid JSON"),
        ("/sync/tendb-cluster/demo1", b'{"a": 1}', 422, "JSON array of strings"),
        ("/async/tendb-cluster/demo1", b"[1, 2]", 422, "JSON array of strings"),
        ("/async/query", b"[", 400, "body is not valid JSON"),
        ("/async/kill", b"", 422, "body must name the session"),
        ("/async/kill", b'{"session_id": "nope"}', 404, "no session 'nope'"),
    ],
)
def test_errors_are_envelopes_with_code_1_and_a_matching_status(
    server: Server, path: str, body: bytes, status: int, message: str
) -> None:
    with server.client() as client:
        got_status, answer = _post(client, path, body)
    assert got_status == status
    assert answer["code"] == 1 and answer["data"] == "" and message in answer["msg"], answer


def test_a_bad_catalog_refuses_to_start_naming_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: broken\n  cluster_type: redis\n  language: ruby\n  executable: x\n")
    process, _ = _launch(tmp_path, bad)
    assert process.wait(timeout=60) == 2
    output = (tmp_path / "server.log").read_text()
    assert f"error: catalog {bad}: entry #1 ('broken'): language must be one of" in output
    assert "collected is required (true or false)" in output and "Traceback" not in output


async def test_every_catalog_route_refuses_anonymous_callers_in_the_seeds_envelope(
    tmp_path: Path,
) -> None:
    # No lifespan runs: the refusal comes before any engine or database work.
    app = create_app(load_settings(data_dir=tmp_path, catalog=CATALOG))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = [await client.get("/list")]
        for path in ("/sync/a/b", "/async/a/b", "/async/query", "/async/kill"):
            answers.append(await client.post(path, json={}))
    for answer in answers:
        assert answer.status_code == 401, answer.request.url
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["code"] == 1 and "authentication required" in answer.json()["msg"]


# Seed 004's own example entry, with the language its prose allows besides sh: ``shell``.
SEED_CATALOG = """\
- name: demo1
  cluster_type: TendbCluster
  language: shell
  executable: echo hello
  args: ["aaa", "bbb"]
  collected: false
"""


@pytest.mark.service("mariadb")
async def test_a_celery_service_deployment_starts_opsplane_and_the_seeds_curl_calls_work(
    tmp_path: Path,
) -> None:
    # The seed's deployment, unchanged but for the program's name: its flags and CS_*
    # variables, its result database on MariaDB, its catalog with `language: shell`.
    async with throwaway_database("mariadb", tmp_path) as url:
        await asyncio.to_thread(_seed_deployment, tmp_path, url.rsplit("/", 1)[1])
        # Everything went to the seed's database: the call is a task there.
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                names = set((await connection.execute(text("SELECT name FROM tasks"))).scalars())
        finally:
            await engine.dispose()
    assert "catalog /sync/tendb-cluster/demo1" in names, names


def _seed_deployment(tmp_path: Path, database: str) -> None:
    catalog = tmp_path / "e.yaml"
    catalog.write_text(SEED_CATALOG)
    port = free_port()
    argv = [
        sys.executable, "-m", "opsplane", "catalog-service", "run",
        "--address", f"127.0.0.1:{port}", "--no-log-console",
        "--db-address", "127.0.0.1:3306", "--db-name", database,
    ]  # fmt: skip
    env = child_env(
        CS_EXTERNAL_TASK=str(catalog),
        CS_DB_USER="root",
        OPSPLANE_DATA_DIR=str(tmp_path / "data"),
        OPSPLANE_GRPC_LISTEN=f"127.0.0.1:{free_port()}",
    )
    log_path = tmp_path / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30.0, headers=ADMIN_HEADERS) as client:

            def ready() -> bool:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    return client.get("/readyz").status_code == 200
                return False

            wait_for(ready, 60, "the catalog service to be ready")
            # curl -XPOST http://localhost/tendb-cluster/demo1 -d '["123", "456"]'
            short = _post(client, "/tendb-cluster/demo1", b'["123", "456"]')
            assert short == (200, {"code": 0, "data": "hello aaa bbb 123 456", "msg": ""})
            assert _post(client, "/sync/tendb-cluster/demo1", b'["123", "456"]') == short
            # The short URL answers only for catalog entries, and never for other routes.
            missing = _post(client, "/tendb-cluster/nope", b"[]")
            assert missing[0] == 404 and missing[1]["code"] == 1, missing
            assert client.get("/list").json()["code"] == 0
            # /async/query answers a list: one session, all of them, or none.
            _, started = _post(client, "/async/tendb-cluster/demo1", b'["x"]')
            session_id = started["data"]
            body = b'{"session_id": "%s"}' % session_id.encode()

            def done() -> dict[str, Any] | None:
                answer = _post(client, "/async/query", body)[1]
                return answer if answer["data"] and answer["data"][0]["done"] else None

            one = wait_for(done, 15, "the session to be done")
            assert [s["id"] for s in one["data"]] == [session_id]
            assert one["data"][0]["message"] == "hello aaa bbb x"
            unknown = _post(client, "/async/query", b'{"session_id": "no-such-session"}')
            assert unknown == (200, {"code": 0, "data": [], "msg": ""})
            # What opsplane does not share with the seed: no anonymous caller.
            assert httpx.post(f"{base}/tendb-cluster/demo1", content=b"[]").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "warning: --no-log-console" in output and "Traceback" not in output, output


def test_the_seeds_curl_call_without_a_token_under_compat_anonymous(tmp_path: Path) -> None:
    # Issue 16 item 6: `opsplane server --compat-anonymous seed004` lets the seed's unchanged
    # curl in from loopback, as the principal seed-client, warned at start and audited.
    process, url = _launch(tmp_path, CATALOG, "--compat-anonymous", "seed004")
    log_path = tmp_path / "server.log"
    try:
        with httpx.Client(base_url=url, timeout=30.0) as anonymous:

            def ready() -> bool:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    return anonymous.get("/readyz").status_code == 200
                return False

            wait_for(ready, 60, "the server to be ready")
            # curl -XPOST http://localhost/tendb-cluster/demo1 -d '["123", "456"]'
            short = _post(anonymous, "/tendb-cluster/demo1", b'["123", "456"]')
            assert short == (200, {"code": 0, "data": "hello aaa bbb 123 456", "msg": ""})
            assert anonymous.get("/list").json()["code"] == 0
            assert anonymous.get("/api/v1/tasks").status_code == 401
            with httpx.Client(base_url=url, timeout=30.0, headers=ADMIN_HEADERS) as admin:
                params = {"actor": "seed-client", "action": "catalog.run"}
                (record,) = admin.get("/api/v1/audit", params=params).json()["items"]
        assert record["detail"]["anonymous"] is True, record
        assert record["detail"]["via"] == "anonymous:seed004", record
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    warnings = [line for line in log_path.read_text().splitlines() if "compat_anonymous:" in line]
    assert len(warnings) == 1, warnings
    assert "seed004" in warnings[0] and "WITHOUT credentials" in warnings[0], warnings
