"""The CLI's pure helpers: line splitting, prefixes, times, tables, error messages, SSE parsing.

No server: the event-stream tests use an in-memory ``httpx.MockTransport``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent
from rich.console import Console

from opsplane.cli.client import (
    ApiClient,
    ApiError,
    ApiUnreachable,
    ClientOptions,
    CliError,
    StreamEvent,
    error_message,
    format_detail,
    parse_event,
)
from opsplane.cli.live import (
    LineBuffer,
    LiveLine,
    LiveRenderer,
    clean_line,
    render_live_line,
    run_note,
)
from opsplane.cli.output import (
    HOST_PALETTE,
    counts_cell,
    counts_summary,
    format_duration,
    format_duration_ms,
    format_load,
    format_percent,
    format_relative,
    host_status_text,
    host_style,
    parse_time,
)
from opsplane.cli.tables import (
    hosts_table,
    interrupted_message,
    runs_table,
    summary_line,
    summary_runs,
    task_duration,
    tasks_table,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TASK_ID = "0190a1b2-c3d4-7e5f-8a9b-0123456789ab"


def render(renderable: Any, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def output(run_id: str, host: str, data: str, stream: str = "stdout", eid: int = 1) -> StreamEvent:
    return StreamEvent(
        id=eid,
        event="output",
        data={"run_id": run_id, "host": host, "stream": stream, "data": data},
    )


def run_event(run_id: str, host: str, status: str, **extra: Any) -> StreamEvent:
    data = {"run_id": run_id, "host": host, "status": status, "exit_code": None, "error": None}
    return StreamEvent(id=None, event="run", data={**data, **extra})


def task_json(status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "id": TASK_ID,
        "name": "deploy",
        "status": status,
        "created_at": "2025-03-01T11:59:00Z",
        "started_at": "2025-03-01T11:59:01Z",
        "finished_at": "2025-03-01T11:59:13.5Z",
        "counts": {"total": 3, "succeeded": 2, "failed": 1, "pending": 0},
    }
    return {**task, **extra}


# -- line splitting ---------------------------------------------------------------------------


def test_line_buffer_joins_chunks_into_lines_per_stream() -> None:
    buf = LineBuffer()
    assert buf.feed(("r1", "stdout"), "hel") == []
    assert buf.feed(("r2", "stdout"), "other\npart") == ["other"]
    assert buf.feed(("r1", "stdout"), "lo\nwor") == ["hello"]
    assert buf.feed(("r1", "stdout"), "ld\n\nx") == ["world", ""]
    assert sorted(buf.pending_keys()) == [("r1", "stdout"), ("r2", "stdout")]
    assert buf.flush(("r1", "stdout")) == ["x"]
    assert buf.flush(("r1", "stdout")) == []
    assert buf.flush_all() == [(("r2", "stdout"), "part")]
    assert buf.flush_all() == []


def test_line_buffer_emits_overlong_partial_lines() -> None:
    buf = LineBuffer(max_pending=4)
    assert buf.feed(("r", "stdout"), "abcdefgh") == ["abcdefgh"]
    assert buf.flush_all() == []


def test_clean_line_handles_crlf_and_carriage_returns() -> None:
    assert clean_line("done\r") == "done"
    assert clean_line("10%\r50%\r100%") == "100%"
    assert clean_line("plain") == "plain"


# -- live rendering ---------------------------------------------------------------------------


def test_live_renderer_prefixes_lines_and_flushes_a_run_when_it_ends() -> None:
    renderer = LiveRenderer(["web-1"])
    assert renderer.handle(output("r1", "web-1", "hello\nwor")) == [
        LiveLine("web-1", "stdout", "hello")
    ]
    assert renderer.handle(output("r1", "web-1", "oops", stream="stderr")) == []
    lines = renderer.handle(run_event("r1", "web-1", "failed", exit_code=3))
    assert lines == [
        LiveLine("web-1", "stdout", "wor"),
        LiveLine("web-1", "stderr", "oops"),
        LiveLine("web-1", "status", "failed (exit 3)", "red"),
    ]
    assert renderer.finish() == []


def test_live_renderer_is_quiet_about_successes_and_non_terminal_states() -> None:
    renderer = LiveRenderer()
    assert renderer.handle(run_event("r1", "a", "running")) == []
    assert renderer.handle(output("r1", "a", "x")) == []
    assert renderer.handle(run_event("r1", "a", "succeeded", exit_code=0)) == [
        LiveLine("a", "stdout", "x")
    ]
    assert renderer.handle(StreamEvent(id=9, event="task", data=task_json())) == []


def test_live_renderer_reports_undeliverable_runs_and_flushes_at_the_end() -> None:
    renderer = LiveRenderer()
    lines = renderer.handle(run_event("r9", "db-1", "undeliverable", error="host offline"))
    assert lines == [LiveLine("db-1", "status", "undeliverable: host offline", "red")]
    renderer.handle(output("r2", "web-22", "tail without newline"))
    assert renderer.finish() == [LiveLine("web-22", "stdout", "tail without newline")]
    assert renderer.width == len("web-22")


def test_live_renderer_width_is_capped() -> None:
    assert LiveRenderer(["x" * 100]).width == 32


def test_live_line_destinations() -> None:
    assert not LiveLine("h", "stdout", "x").to_stderr
    assert LiveLine("h", "stderr", "x").to_stderr
    assert LiveLine("h", "status", "x").to_stderr


def test_render_live_line_pads_the_host_and_marks_stderr() -> None:
    out = render_live_line(LiveLine("web-1", "stdout", "hello"), width=8)
    assert out.plain == "web-1    | hello"
    assert out.spans[0].style == host_style("web-1")
    err = render_live_line(LiveLine("web-1", "stderr", "boom"), width=5)
    assert err.plain == "web-1 ! boom"
    assert any(str(span.style) == "bold red" for span in err.spans)
    note = render_live_line(LiveLine("web-1", "status", "failed (exit 2)", "red"))
    assert note.plain == "web-1 » failed (exit 2)"


def test_render_live_line_keeps_brackets_literal_and_turns_ansi_into_styles() -> None:
    line = render_live_line(LiveLine("h", "stdout", "[bold]x[/] \x1b[31mred\x1b[0m"))
    assert line.plain == "h | [bold]x[/] red"
    assert "[bold]x[/]" in render(line)


def test_host_style_is_stable_and_from_the_palette() -> None:
    assert host_style("web-1") == host_style("web-1")
    assert host_style("web-1") in HOST_PALETTE
    assert len({host_style(f"host-{i}") for i in range(50)}) > 3


def test_run_note() -> None:
    assert run_note({"status": "timed_out", "exit_code": None, "error": None}) == "timed out"
    assert run_note({"status": "failed", "exit_code": 2, "error": "bad"}) == "failed (exit 2): bad"
    assert run_note({"status": "succeeded", "exit_code": 0}) == "succeeded"


# -- times and numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=0.3), "just now"),
        (timedelta(seconds=3), "3s ago"),
        (timedelta(seconds=59.9), "59s ago"),
        (timedelta(minutes=5, seconds=30), "5m ago"),
        (timedelta(hours=2, minutes=59), "2h ago"),
        (timedelta(days=3, hours=1), "3d ago"),
        (timedelta(seconds=-1), "just now"),
        (timedelta(seconds=-30), "in 30s"),
    ],
)
def test_format_relative(delta: timedelta, expected: str) -> None:
    assert format_relative(NOW - delta, NOW) == expected


def test_format_relative_accepts_iso_strings_and_none() -> None:
    assert format_relative("2025-03-01T11:59:57Z", NOW) == "3s ago"
    assert format_relative("2025-03-01T11:59:57+00:00", NOW) == "3s ago"
    assert format_relative("2025-03-01T11:59:57", NOW) == "3s ago"  # naive means UTC
    assert format_relative(None, NOW) == "never"
    assert format_relative("garbage", NOW) == "never"


def test_parse_time() -> None:
    assert parse_time("2025-03-01T12:00:00Z") == NOW
    assert parse_time("2025-03-01T13:00:00+01:00") == NOW
    assert parse_time(None) is None
    assert parse_time("") is None
    assert parse_time(12) is None


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "-"),
        (-1, "-"),
        (0, "0ms"),
        (0.0567, "57ms"),
        (1.234, "1.2s"),
        (59.94, "59.9s"),
        (125, "2m05s"),
        (3600 + 120 + 5, "1h02m"),
    ],
)
def test_format_duration(seconds: float | None, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_format_duration_ms_and_numbers() -> None:
    assert format_duration_ms(1234) == "1.2s"
    assert format_duration_ms(None) == "-"
    assert format_duration_ms(True) == "-"
    assert format_percent(12.46) == "12%"
    assert format_percent(3.14) == "3.1%"
    assert format_percent(None) == "-"
    assert format_load(0.4234) == "0.42"
    assert format_load("x") == "-"


def test_task_duration() -> None:
    assert task_duration(task_json(), NOW) == 12.5
    running = task_json("running", finished_at=None, started_at="2025-03-01T11:59:50Z")
    assert task_duration(running, NOW) == 10
    pending = task_json("pending", started_at=None, finished_at=None)
    assert task_duration(pending, NOW) is None


# -- counts, statuses, summaries --------------------------------------------------------------


def test_counts_summary_lists_non_zero_counts_in_order() -> None:
    counts = {"total": 6, "failed": 1, "succeeded": 3, "timed_out": 2, "pending": 0}
    assert counts_summary(counts) == "3 succeeded, 1 failed, 2 timed out"
    assert counts_summary({"total": 0}) == "no runs"


def test_counts_cell_is_ok_failed_total() -> None:
    counts = {"total": 10, "succeeded": 5, "failed": 1, "timed_out": 1, "lost": 1, "canceled": 2}
    assert counts_cell(counts).plain == "5/3/10"


def test_summary_line() -> None:
    line = summary_line(task_json("failed"), 12.5).plain
    assert line == f"✗ task {TASK_ID} failed · 3 hosts: 2 succeeded, 1 failed · 12.5s"
    assert summary_line(task_json(), None).plain.startswith(f"✓ task {TASK_ID} succeeded")


def test_summary_runs_keeps_failures_when_there_are_too_many() -> None:
    runs = [{"host": f"h{i}", "status": "succeeded"} for i in range(10)]
    runs.append({"host": "bad", "status": "failed"})
    assert summary_runs(runs, 20) == (runs, 0)
    assert summary_runs(runs, 5) == ([{"host": "bad", "status": "failed"}], 10)


def test_host_status_text() -> None:
    online = host_status_text("online")
    assert online.plain == "● online"
    assert all(str(span.style) == "green" for span in online.spans)
    assert host_status_text(None).plain == "● unknown"


def test_interrupted_message_says_how_to_cancel() -> None:
    assert f"opsplane tasks cancel {TASK_ID}" in interrupted_message(TASK_ID)


# -- tables -----------------------------------------------------------------------------------


def test_runs_table() -> None:
    runs = [
        {"host": "web-2", "attempt": 1, "status": "undeliverable", "exit_code": None,
         "duration_ms": None, "error": "host offline"},
        {"host": "web-1", "attempt": 1, "status": "succeeded", "exit_code": 0,
         "duration_ms": 56, "error": None},
    ]  # fmt: skip
    text = render(runs_table(runs))
    lines = [line.split() for line in text.splitlines()]
    assert lines[0] == ["HOST", "STATUS", "EXIT", "DURATION", "ERROR"]
    assert lines[1] == ["web-1", "succeeded", "0", "56ms"]
    assert lines[2] == ["web-2", "undeliverable", "-", "-", "host", "offline"]
    retried = [*runs, {"host": "web-2", "attempt": 2, "status": "failed", "exit_code": 1}]
    assert "TRY" in render(runs_table(retried))


def test_tasks_table_never_cuts_the_id() -> None:
    tasks = [
        task_json(name="a rather long task name that would like a lot of room", counts={}),
        task_json("running", finished_at=None, started_at="2025-03-01T11:59:58Z"),
    ]
    for width in (60, 80, 200):
        text = render(tasks_table(tasks, NOW), width=width)
        assert text.count(TASK_ID) == 2, text
    wide = render(tasks_table(tasks, NOW), width=200)
    assert "2/1/3" in wide
    assert "1m ago" in wide
    assert "12.5s" in wide
    assert "2.0s" in wide


def test_hosts_table() -> None:
    hosts: list[dict[str, Any]] = [
        {"name": "web-1", "status": "online", "link": "grpc", "groups": ["web", "eu"],
         "cpu_usage": 12.5, "memory_usage": 40.0, "load": 0.5,
         "last_seen_at": "2025-03-01T11:59:57Z"},
        {"name": "db-1", "status": "offline", "link": None, "groups": [],
         "cpu_usage": None, "memory_usage": None, "load": None, "last_seen_at": None},
    ]  # fmt: skip
    text = render(hosts_table(hosts, NOW), width=120)
    assert "web-1  ● online   grpc  web, eu  12%  40%  0.50  3s ago" in text
    assert "db-1   ● offline  -     -          -    -     -  never" in text


# -- API errors and events --------------------------------------------------------------------


def test_format_detail() -> None:
    assert format_detail("no such task") == "no such task"
    detail = [
        {"loc": ["body", "targets", "hosts"], "msg": "Field required", "type": "missing"},
        {"loc": ["query", "size"], "msg": "must be <= 500"},
        {"msg": "bad"},
    ]
    assert format_detail(detail) == "targets.hosts: Field required; size: must be <= 500; bad"
    assert format_detail(None) == ""
    assert format_detail({"a": 1}) == '{"a": 1}'


def test_error_message() -> None:
    response = httpx.Response(404, json={"detail": "unknown host: x"})
    assert error_message(response) == "unknown host: x"
    assert error_message(httpx.Response(502, text="Bad Gateway!")) == "Bad Gateway!"
    assert error_message(httpx.Response(503)) == "503 Service Unavailable"


def test_api_error_exit_codes() -> None:
    assert ApiError(404, "missing").exit_code == 2
    assert ApiError(404, "missing").message == "missing"
    server = ApiError(500, "boom")
    assert server.exit_code == 1
    assert "500" in server.message


def test_parse_event() -> None:
    sse = ServerSentEvent(event="run", data='{"run_id": "r1"}', id="7")
    assert parse_event(sse) == StreamEvent(id=7, event="run", data={"run_id": "r1"})
    assert parse_event(ServerSentEvent(event="ping", data="")) is None
    assert parse_event(ServerSentEvent(data="not json")) is None
    assert parse_event(ServerSentEvent(data='"a string"')) is None
    assert parse_event(ServerSentEvent(event="x", data="{}", id="abc")) == StreamEvent(
        id=None, event="x", data={}
    )


def sse_body(*events: tuple[int, str, dict[str, Any]]) -> bytes:
    return b"".join(
        f"id: {eid}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
        for eid, name, data in events
    )


EVENTS = [
    (1, "output", {"run_id": "r1", "host": "a", "stream": "stdout", "data": "one\n"}),
    (2, "output", {"run_id": "r1", "host": "a", "stream": "stdout", "data": "two\n"}),
    (3, "task", task_json()),
]


def test_follow_events_reconnects_with_last_event_id_and_stops_at_the_terminal_task() -> None:
    seen_ids: list[str | None] = []

    def dropping_after_first(last: int) -> Iterator[bytes]:
        yield sse_body(EVENTS[0])
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer s3cret"
        last = request.headers.get("Last-Event-ID")
        seen_ids.append(last)
        headers = {"content-type": "text/event-stream"}
        if last is None:
            return httpx.Response(200, headers=headers, content=dropping_after_first(0))
        # The server replays from after Last-Event-ID; a repeat must be dropped by the client.
        return httpx.Response(200, headers=headers, content=sse_body(*EVENTS))

    sleeps: list[float] = []
    api = ApiClient(
        ClientOptions(url="http://api", token="s3cret"),
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
    )
    with api:
        events = list(api.follow_events(TASK_ID))
    assert [e.id for e in events] == [1, 2, 3]
    assert events[-1].data["status"] == "succeeded"
    assert seen_ids == [None, "1"]
    assert len(sleeps) == 1


def test_follow_events_falls_back_to_the_task_when_the_stream_ends_early() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, headers=headers, content=sse_body(EVENTS[0]))
        return httpx.Response(200, json=task_json("canceled"))

    with ApiClient(ClientOptions(url="http://api"), transport=httpx.MockTransport(handler)) as api:
        events = list(api.follow_events(TASK_ID))
    assert [(e.id, e.event) for e in events] == [(1, "output"), (None, "task")]
    assert events[-1].data["status"] == "canceled"


def test_follow_events_gives_up_after_bounded_retries() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("refused")

    sleeps: list[float] = []
    api = ApiClient(
        ClientOptions(url="http://api:1/"),
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
    )
    with api, pytest.raises(ApiUnreachable) as caught:
        list(api.follow_events(TASK_ID, retries=3))
    assert len(calls) == 4
    assert len(sleeps) == 3
    assert "cannot reach the opsplane API at http://api:1" in caught.value.message


def test_follow_events_does_not_retry_a_client_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": f"no task {TASK_ID}"})

    api = ApiClient(ClientOptions(url="http://api"), transport=httpx.MockTransport(handler))
    with api, pytest.raises(ApiError) as caught:
        list(api.follow_events(TASK_ID))
    assert caught.value.message == f"no task {TASK_ID}"
    assert caught.value.exit_code == 2


def test_requests_map_errors_and_send_the_body() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.raw_path == b"/api/v1/hosts/a%2Fb":
            return httpx.Response(404, json={"detail": "unknown host 'a/b'"})
        if request.url.path == "/api/v1/tasks" and request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(201, json=task_json("pending"))
        if request.url.path == "/api/v1/tasks":
            return httpx.Response(401, json={"detail": "missing token"})
        return httpx.Response(500, text="")

    with ApiClient(ClientOptions(url="http://api"), transport=httpx.MockTransport(handler)) as api:
        task = api.create_task("uptime", groups=["web"], timeout=30)
        assert task["status"] == "pending"
        assert bodies == [
            {
                "command": "uptime",
                "targets": {"hosts": [], "groups": ["web"], "all": False, "labels": {}},
                "timeout": 30,
            }
        ]
        with pytest.raises(ApiError, match="unknown host 'a/b'"):
            api.get_host("a/b")
        with pytest.raises(ApiError, match=r"missing token \(pass --token"):
            api.list_tasks()
        with pytest.raises(ApiError) as caught:
            api.get_task("x")
        assert caught.value.exit_code == 1


def test_a_url_without_scheme_is_a_clear_error() -> None:
    with ApiClient(ClientOptions(url="localhost:8000")) as api, pytest.raises(CliError) as caught:
        api.get_task("x")
    assert "http://" in caught.value.message
    assert not isinstance(caught.value, ApiError)
