"""Seed 003's routes on a real server process over loopback: ``POST /tasks`` with the seed's
example body, ``GET /tasks/{id}`` in the seed's statuses, ``GET /tasks/{id}/logs`` as Server-Sent
Events (live, resumed with Last-Event-ID, replayed from the archive once finished), scripts
confined to ``--script-dir``, params as environment variables, secrets redacted, and the run's
archived log downloaded with HTTP ranges."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import Fleet, free_port, wait_for

SEED_BODY = {"script_path": "/scripts/backup.sh", "params": {"dir": "/data"}, "priority": 1}
SECRET = "hunter2"

BACKUP = """#!/bin/sh
echo "backing up $PARAM_DIR"
echo "all params: $PARAMS_JSON"
printf 'db pass'; sleep 0.3; printf 'word=%s\\n' "$(printf hunter; printf 2)"
sleep 0.2
echo "token=abc123" >&2
sleep 0.2
for i in 1 2 3 4 5; do echo "line $i"; sleep 0.2; done
sleep 1
echo done
"""
EXPECTED_LINES = [
    "backing up /data",
    'all params: {"dir":"/data"}',
    "db password=[REDACTED]",
    "token=[REDACTED]",
    *(f"line {i}" for i in range(1, 6)),
    "done",
]


def _script(path: Path, text: str, mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remoterun")
    scripts = root / "scripts"
    (scripts / "tools").mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    _script(scripts / "backup.sh", BACKUP)
    _script(scripts / "tools" / "echo_params.sh", '#!/bin/sh\nprintf "%s|" "$PARAM_X" "$PARAM_Y"\n')
    _script(scripts / "sleeper.sh", "#!/bin/sh\nsleep 30\n")
    _script(scripts / "fails.sh", "#!/bin/sh\necho broken >&2\nexit 3\n")
    _script(scripts / "show_env.sh", "#!/bin/sh\nenv\n")
    _script(scripts / "not_executable.sh", "#!/bin/sh\necho no\n", mode=0o644)
    _script(scripts / "world_writable.sh", "#!/bin/sh\necho no\n", mode=0o757)
    _script(outside / "evil.sh", "#!/bin/sh\necho escaped\n")
    (scripts / "escape.sh").symlink_to(outside / "evil.sh")
    (scripts / "escape_dir").symlink_to(outside)
    (scripts / "inside_link.sh").symlink_to(scripts / "tools" / "echo_params.sh")
    return scripts


@pytest.fixture(scope="module")
def fleet(scripts: Path) -> Iterator[Fleet]:
    # A variable the control plane lets through to scripts (env_passthrough), and one it does not.
    server_env = {
        "OPSPLANE_ENV_PASSTHROUGH": '["CORP_*"]',
        "CORP_PROXY": "http://proxy.corp:3128",
        "DB_PASSWORD": "not-for-scripts",
    }
    the_fleet = Fleet(scripts.parent / "fleet", server_env=server_env)
    the_fleet.root.mkdir()
    try:
        the_fleet.start_server("--script-dir", str(scripts))
        yield the_fleet
    finally:
        the_fleet.stop()


def _submit(fleet: Fleet, body: dict[str, Any]) -> str:
    with fleet.client() as client:
        response = client.post("/tasks", json=body)
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"id"}
    return str(response.json()["id"])


def _seed_task(fleet: Fleet, task_id: str) -> dict[str, Any]:
    with fleet.client() as client:
        response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _wait_seed_done(fleet: Fleet, task_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = _seed_task(fleet, task_id)
        return task if task["status"] not in ("pending", "running") else None

    return wait_for(ended, 30, f"seed task {task_id} to end")


def _events(
    fleet: Fleet, task_id: str, last_id: str | None = None, stop_after: int | None = None
) -> list[tuple[str, str, str]]:
    """(id, event, data) of the log stream, until it ends or ``stop_after`` lines."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got: list[tuple[str, str, str]] = []
    with (
        fleet.client() as client,
        connect_sse(client, "GET", f"/tasks/{task_id}/logs", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            got.append((sse.id, sse.event, sse.data))
            if sse.event == "end" or (stop_after is not None and len(got) >= stop_after):
                break
    return got


def test_the_seeds_example_runs_live_resumes_and_replays_from_the_archive(fleet: Fleet) -> None:
    task_id = _submit(fleet, SEED_BODY)
    # Live: the first three lines while the script is still running.
    first = _events(fleet, task_id, stop_after=3)
    assert [data for _, _, data in first] == EXPECTED_LINES[:3]
    assert _seed_task(fleet, task_id)["status"] == "running"
    # Reconnect with the last id: the rest, no gap, no duplicate, then the end.
    rest = _events(fleet, task_id, last_id=first[-1][0])
    assert [data for _, event, data in rest if event == "message"] == EXPECTED_LINES[3:]
    assert rest[-1][1:] == ("end", "success")
    live = first + rest
    # Finished: the same lines with the same ids, read back from the archive.
    replay = _events(fleet, task_id)
    assert replay == live
    ids = [event_id for event_id, _, _ in live]
    assert len(set(ids)) == len(ids)

    task = _wait_seed_done(fleet, task_id)
    assert task["status"] == "success" and task["opsplane_status"] == "succeeded"
    assert task["script_path"] == "/scripts/backup.sh"
    assert task["params"] == {"dir": "/data"} and task["priority"] == 1
    assert task["exit_code"] == 0 and task["error"] is None
    assert task["created_at"] <= task["updated_at"]
    archive = Path(task["logs_path"])
    assert archive.is_file() and archive.is_relative_to(fleet.data_dir)
    assert SECRET not in archive.read_text()

    # The same task in opsplane's own API: a script task on the control plane's host.
    with fleet.client() as client:
        assert client.get(f"/api/v1/tasks/{task_id}").json()["kind"] == "script"
        (run,) = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
    assert SECRET not in run["stdout"] + run["stderr"]
    assert "db password=[REDACTED]" in run["stdout"] and run["stderr"] == "token=[REDACTED]\n"


def test_the_run_log_downloads_with_ranges(fleet: Fleet) -> None:
    task_id = _submit(fleet, SEED_BODY)
    _wait_seed_done(fleet, task_id)
    with fleet.client() as client:
        (run,) = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
        url = f"/api/v1/runs/{run['id']}/log"
        whole = client.get(url)
        head = client.get(url, headers={"Range": "bytes=0-9"})
        tail = client.get(url, headers={"Range": "bytes=-5"})
        middle = client.get(url, headers={"Range": "bytes=10-"})
        beyond = client.get(url, headers={"Range": f"bytes={len(whole.content)}-"})
        several = client.get(url, headers={"Range": "bytes=0-1,4-5"})
        missing = client.get("/api/v1/runs/no-such-run/log")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert whole.text.splitlines() == EXPECTED_LINES
    assert f'filename="{run["id"]}.log"' in whole.headers["content-disposition"]
    assert (head.status_code, head.content) == (206, whole.content[:10])
    assert head.headers["content-range"] == f"bytes 0-9/{len(whole.content)}"
    assert (tail.status_code, tail.content) == (206, b"done\n")
    assert (middle.status_code, middle.content) == (206, whole.content[10:])
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(whole.content)}"
    assert (several.status_code, several.content) == (200, whole.content)
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("script_path", "status", "detail"),
    [
        ("../outside/evil.sh", 422, "must not contain '..'"),
        ("/scripts/../outside/evil.sh", 422, "must not contain '..'"),
        ("/etc/passwd", 422, "outside the script directories"),
        ("/bin/sh", 422, "outside the script directories"),
        ("escape.sh", 422, "leads outside its script directory"),
        ("/scripts/escape_dir/evil.sh", 422, "leads outside its script directory"),
        ("not_executable.sh", 422, "is not executable"),
        ("world_writable.sh", 422, "writable by everyone"),
        ("tools", 422, "not a regular file"),
        ("/scripts/nope.sh", 404, "no script '/scripts/nope.sh'"),
        ("", 422, "script_path"),
    ],
)
def test_scripts_outside_the_directories_are_refused(
    fleet: Fleet, script_path: str, status: int, detail: str
) -> None:
    with fleet.client() as client:
        response = client.post("/tasks", json={"script_path": script_path})
    assert response.status_code == status, response.text
    assert detail in str(response.json()["detail"])


def test_every_spelling_of_a_script_inside_works(fleet: Fleet, scripts: Path) -> None:
    for path in ("tools/echo_params.sh", "/scripts/tools/echo_params.sh",
                 str(scripts / "tools" / "echo_params.sh"), "inside_link.sh"):  # fmt: skip
        task = _wait_seed_done(fleet, _submit(fleet, {"script_path": path}))
        assert task["status"] == "success", (path, task)


def test_params_are_environment_variables_never_shell_text(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = {"x": f"$(touch {marker})", "Y": f"`touch {marker}`; touch {marker}"}
    task_id = _submit(fleet, {"script_path": "tools/echo_params.sh", "params": hostile})
    task = _wait_seed_done(fleet, task_id)
    assert task["status"] == "success"
    with fleet.client() as client:
        (run,) = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
    assert run["stdout"] == f"{hostile['x']}|{hostile['Y']}|"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"script_path": "backup.sh", "params": {"1bad": "x"}}, "param name '1bad'"),
        ({"script_path": "backup.sh", "params": {"a": "1", "A": "2"}}, "names ignore case"),
        ({"script_path": "backup.sh", "surprise": 1}, "Extra inputs are not permitted"),
        ({"params": {}}, "Field required"),
        ({"script_path": "backup.sh", "timeout": 0}, "greater than 0"),
    ],
)
def test_bad_bodies_are_422_with_a_clear_detail(
    fleet: Fleet, body: dict[str, Any], detail: str
) -> None:
    with fleet.client() as client:
        response = client.post("/tasks", json=body)
    assert response.status_code == 422
    assert detail in str(response.json()["detail"])


def test_seed_statuses_for_failure_and_timeout_and_unknown_ids(fleet: Fleet) -> None:
    failed = _wait_seed_done(fleet, _submit(fleet, {"script_path": "fails.sh", "retry": 3}))
    assert failed["status"] == "failed" and failed["exit_code"] == 3 and failed["retry"] == 3
    slow = _submit(fleet, {"script_path": "sleeper.sh", "timeout": 1})
    assert _wait_seed_done(fleet, slow)["status"] == "timeout"
    assert _events(fleet, slow)[-1][1:] == ("end", "timeout")
    with fleet.client() as client:
        assert client.get("/tasks/nope").status_code == 404
        assert client.get("/tasks/nope/logs").status_code == 404
        bad_cursor = client.get(f"/tasks/{slow}/logs", headers={"Last-Event-ID": "x"})
    assert bad_cursor.status_code == 422 and "Last-Event-ID" in bad_cursor.json()["detail"]


def test_a_script_never_sees_the_control_planes_tokens(fleet: Fleet) -> None:
    # Issue 14, hole 4: the server holds OPSPLANE_BOOTSTRAP_ADMIN_TOKEN (tests.e2e.fleet).
    task_id = _submit(fleet, {"script_path": "show_env.sh", "params": {"who": "me"}})
    assert _wait_seed_done(fleet, task_id)["status"] == "success"
    with fleet.client() as client:
        (run,) = client.get(f"/api/v1/tasks/{task_id}/runs?output=true").json()["items"]
    lines = set(run["stdout"].splitlines())
    assert ADMIN_TOKEN not in run["stdout"]
    assert "not-for-scripts" not in run["stdout"]
    assert not any(line.startswith("OPSPLANE_") for line in lines)
    assert {"PARAM_WHO=me", "CORP_PROXY=http://proxy.corp:3128", f"PATH={os.environ['PATH']}"} <= (
        lines
    )


def test_an_idempotency_key_returns_the_first_task(fleet: Fleet) -> None:
    key = {"Idempotency-Key": f"remoterun-{os.getpid()}"}
    with fleet.client() as client:
        first = client.post("/tasks", json={"script_path": "fails.sh"}, headers=key).json()
        second = client.post("/tasks", json={"script_path": "fails.sh"}, headers=key).json()
    assert first == second


async def test_without_script_directories_post_says_how_to_enable_it(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, grpc_listen=f"127.0.0.1:{free_port()}", bootstrap_admin_token=ADMIN_TOKEN
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        response = await client.post("/tasks", json=SEED_BODY, headers=ADMIN_HEADERS)
    assert response.status_code == 503
    assert "--script-dir" in response.json()["detail"]
