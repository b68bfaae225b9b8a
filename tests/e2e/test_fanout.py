"""A real control plane and three real agents over gRPC on loopback."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import processes_with
from tests.e2e.fleet import Fleet, wait_for


def test_command_fans_out_to_every_agent_with_per_host_output(fleet: Fleet) -> None:
    task = fleet.create_task("echo out; echo err >&2", all=True)
    done = fleet.wait_task_done(task["id"])
    assert done["status"] == "succeeded"
    assert done["counts"]["succeeded"] == 3
    runs = fleet.runs(task["id"])
    assert set(runs) == {"web-1", "web-2", "db-1"}
    for run in runs.values():
        assert (run["status"], run["exit_code"], run["stdout"], run["stderr"]) == (
            "succeeded",
            0,
            "out\n",
            "err\n",
        )
        assert run["duration_ms"] is not None and run["log_path"]


def test_each_host_reports_its_own_exit_code(fleet: Fleet) -> None:
    # Each agent runs in its own working directory, so the same command exits differently.
    for name, code in (("web-1", "0"), ("web-2", "4"), ("db-1", "0")):
        (fleet.root / "work" / name / "code").write_text(code)
    task = fleet.create_task("exit $(cat code)", all=True)
    assert fleet.wait_task_done(task["id"])["status"] == "failed"
    runs = fleet.runs(task["id"])
    assert {h: (r["status"], r["exit_code"]) for h, r in runs.items()} == {
        "web-1": ("succeeded", 0),
        "web-2": ("failed", 4),
        "db-1": ("succeeded", 0),
    }
    assert runs["web-2"]["error"] == "exit code 4"


def test_group_targeting_selects_only_members(fleet: Fleet) -> None:
    task = fleet.create_task("true", groups=["web"])
    assert task["counts"]["total"] == 2
    fleet.wait_task_done(task["id"])
    assert set(fleet.runs(task["id"])) == {"web-1", "web-2"}


def test_timeout_kills_the_whole_process_group(fleet: Fleet) -> None:
    marker = f"1000.{uuid.uuid4().int % 10**6}"
    task = fleet.create_task(f"sleep {marker} & sleep {marker}", timeout=1, hosts=["web-1"])
    done = fleet.wait_task_done(task["id"])
    run = fleet.runs(task["id"])["web-1"]
    assert (done["status"], run["status"]) == ("failed", "timed_out")
    wait_for(lambda: not processes_with(f"sleep {marker}"), 10, "no orphaned sleep")


def test_cancel_stops_a_running_command(fleet: Fleet) -> None:
    marker = f"1000.{uuid.uuid4().int % 10**6}"
    task = fleet.create_task(f"sleep {marker}", hosts=["db-1"])
    wait_for(lambda: fleet.runs(task["id"])["db-1"]["status"] == "running", 10, "run started")
    with fleet.client() as client:
        response = client.post(f"/api/v1/tasks/{task['id']}/cancel")
    assert response.status_code == 202
    done = fleet.wait_task_done(task["id"])
    assert done["status"] == "canceled"
    assert fleet.runs(task["id"])["db-1"]["status"] == "canceled"
    assert not processes_with(f"sleep {marker}")
    with fleet.client() as client:
        assert client.post(f"/api/v1/tasks/{task['id']}/cancel").status_code == 409


def _read_events(
    fleet: Fleet, task_id: str, last_event_id: str | None = None
) -> list[dict[str, object]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, object]] = []
    url = f"{fleet.url}/api/v1/tasks/{task_id}/events"
    headers.update(fleet.auth_headers)
    with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        current: dict[str, object] = {}
        for line in response.iter_lines():
            if line.startswith("id:"):
                current["id"] = line[3:].strip()
            elif line.startswith("event:"):
                current["event"] = line[6:].strip()
            elif line.startswith("data:"):
                current["data"] = json.loads(line[5:].strip())
            elif line == "" and "event" in current:
                current["at"] = time.monotonic()
                events.append(current)
                current = {}
    return events


def test_sse_delivers_output_before_the_run_ends_and_resumes_without_gaps(fleet: Fleet) -> None:
    task = fleet.create_task("echo first; sleep 2; echo second", hosts=["web-2"])
    events = _read_events(fleet, task["id"])
    kinds = [(e["event"], e["data"].get("data") or e["data"].get("status")) for e in events]  # type: ignore[union-attr]
    first = kinds.index(("output", "first\n"))
    finished = kinds.index(("run", "succeeded"))
    assert first < kinds.index(("output", "second\n")) < finished
    # "first" reached the client about two seconds before the run ended: it was live.
    assert events[finished]["at"] - events[first]["at"] > 1.0  # type: ignore[operator]
    ids = [int(e["id"]) for e in events]  # type: ignore[call-overload]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[-1]["event"] == "task" and events[-1]["data"]["status"] == "succeeded"  # type: ignore[index]
    # After the end: the whole history again, and a resume gives exactly the rest.
    assert [e["id"] for e in _read_events(fleet, task["id"])] == [e["id"] for e in events]
    middle = events[first]["id"]
    resumed = _read_events(fleet, task["id"], last_event_id=str(middle))
    assert [e["id"] for e in resumed] == [e["id"] for e in events[first + 1 :]]


def test_full_output_is_archived_while_the_row_keeps_head_and_tail(fleet: Fleet) -> None:
    task = fleet.create_task("seq 1 40000", hosts=["web-1"])
    fleet.wait_task_done(task["id"])
    run = fleet.runs(task["id"])["web-1"]
    assert run["truncated"] is True
    assert run["stdout"].startswith("1\n2\n") and run["stdout"].endswith("39999\n40000\n")
    with fleet.client() as client:
        log = client.get(f"/api/v1/tasks/{task['id']}/runs/{run['id']}/log").text
    assert log == "".join(f"{i}\n" for i in range(1, 40001))
    assert Path(run["log_path"]).read_text() == log


def test_hosts_report_heartbeat_metrics_and_filter(fleet: Fleet) -> None:
    with fleet.client() as client:
        page = client.get("/api/v1/hosts", params={"group": "web"}).json()
        assert page["total"] == 2 and {h["name"] for h in page["items"]} == {"web-1", "web-2"}

        def reported_metrics() -> dict[str, Any] | None:
            host: dict[str, Any] = client.get("/api/v1/hosts/db-1").json()
            return host if host["cpu_usage"] is not None else None

        host = wait_for(reported_metrics, 15, "a heartbeat with metrics")
        assert host["status"] == "online" and host["groups"] == ["db"] and host["memory_usage"] > 0
        assert (
            client.get("/api/v1/hosts", params={"status": "online", "size": 1}).json()["total"] == 3
        )
        assert client.get("/api/v1/hosts/nope").status_code == 404


def test_tasks_list_pages_and_filters(fleet: Fleet) -> None:
    created = [fleet.create_task("true", hosts=["web-1"]) for _ in range(3)]
    for task in created:
        fleet.wait_task_done(task["id"])
    with fleet.client() as client:
        page = client.get(
            "/api/v1/tasks", params={"size": 2, "page": 1, "status": "succeeded"}
        ).json()
        assert len(page["items"]) == 2 and page["total"] >= 3
        assert all(t["status"] == "succeeded" for t in page["items"])
        assert page["items"][0]["id"] == created[-1]["id"]  # newest first
        assert client.get("/api/v1/tasks", params={"status": "bogus"}).status_code == 422


def test_bad_input_gets_a_4xx_with_a_reason(fleet: Fleet) -> None:
    with fleet.client() as client:
        cases = [
            ({"command": "ls", "targets": {"hosts": ["ghost"]}}, 422, "ghost"),
            ({"command": "ls", "targets": {"groups": ["nobody"]}}, 422, "nobody"),
            ({"command": "", "targets": {"all": True}}, 422, "command"),
            ({"command": "   ", "targets": {"all": True}}, 422, "empty"),
            ({"command": "ls", "targets": {"all": True}, "timeout": -1}, 422, "timeout"),
            ({"command": "ls", "targets": {}}, 422, "select nothing"),
            ({"command": "ls"}, 422, "targets"),
        ]
        for body, status, words in cases:
            response = client.post("/api/v1/tasks", json=body)
            assert response.status_code == status, (body, response.text)
            assert words in response.text, (body, response.text)
        malformed = client.post(
            "/api/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422
        assert client.get(f"/api/v1/tasks/{uuid.uuid4()}").status_code == 404
        assert client.get(f"/api/v1/tasks/{uuid.uuid4()}/events").status_code == 404
        events = client.get("/api/v1/tasks/x/events", headers={"Last-Event-ID": "abc"})
        assert events.status_code in (404, 422)


def test_idempotency_key_returns_the_same_task(fleet: Fleet) -> None:
    body = {"command": "true", "targets": {"hosts": ["web-1"]}}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    with fleet.client() as client:
        first = client.post("/api/v1/tasks", json=body, headers=key).json()
        second = client.post("/api/v1/tasks", json=body, headers=key).json()
    assert first["id"] == second["id"]


def test_create_then_start_later(fleet: Fleet) -> None:
    with fleet.client() as client:
        task = client.post(
            "/api/v1/tasks",
            json={"command": "true", "targets": {"hosts": ["web-1"]}, "start": False},
        ).json()
        assert task["status"] == "pending"
        assert client.post(f"/api/v1/tasks/{task['id']}/start").json()["status"] in (
            "running",
            "succeeded",
        )
        assert client.post(f"/api/v1/tasks/{task['id']}/start").status_code == 409
    assert fleet.wait_task_done(task["id"])["status"] == "succeeded"


def test_health_readiness_and_openapi(fleet: Fleet) -> None:
    with fleet.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        assert "/api/v1/tasks/{task_id}/events" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


def test_fleet_stream_sends_host_changes_and_summary(fleet: Fleet) -> None:
    seen: dict[str, object] = {}
    with (
        httpx.Client(timeout=15, headers=fleet.auth_headers) as client,
        client.stream("GET", f"{fleet.url}/api/v1/fleet/events") as response,
    ):
        assert response.status_code == 200
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                seen.setdefault(event, json.loads(line[5:]))
            if "host" in seen and "summary" in seen:
                break
    host, summary = seen["host"], seen["summary"]
    assert isinstance(host, dict) and host["status"] == "online" and host["cpu_usage"] is not None
    assert isinstance(summary, dict) and summary["online"] == 3 and summary["total"] == 3
    with fleet.client() as client:
        assert client.get("/api/v1/fleet/summary").json()["online"] == 3


def test_host_history_endpoints_and_resume_by_query_parameter(fleet: Fleet) -> None:
    task = fleet.create_task("echo history", hosts=["db-1"])
    fleet.wait_task_done(task["id"])
    with fleet.client() as client:
        beats = client.get("/api/v1/hosts/db-1/heartbeats", params={"hours": 1}).json()["items"]
        assert beats and beats[0]["cpu_usage"] is not None
        runs = client.get("/api/v1/hosts/db-1/runs", params={"size": 5}).json()
        assert runs["items"][0]["task_id"] == task["id"]
        assert runs["items"][0]["command"] == "echo history" and runs["total"] >= 1
        assert client.get("/api/v1/hosts/ghost/runs").status_code == 404
    events = _read_events(fleet, task["id"])
    url = f"{fleet.url}/api/v1/tasks/{task['id']}/events"
    with fleet.client() as client:
        body = client.get(url, params={"last_event_id": events[0]["id"]}).text
    assert f"id: {events[0]['id']}\r\n" not in body and f"id: {events[-1]['id']}" in body
