"""The web page in a real browser, against a real control plane with real agents.

The tests run in file order on one fleet; each one leaves the fleet as it found it, except the
last ones, which stop the spare agent.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, Response, Route, expect

from opsplane.api.web import WEB_DIR
from tests.e2e.fleet import Fleet
from tests.ui.conftest import AGENTS, Snap

TASK_URL = re.compile(r"#/tasks/[0-9a-f-]{36}$")


def host_row(page: Page, name: str) -> Any:
    return page.locator(f'#fleet-rows tr[data-host="{name}"]')


def run_row(page: Page, host: str) -> Any:
    return page.locator("#runs-rows tr").filter(has=page.get_by_role("link", name=host, exact=True))


def task_id_of(page: Page) -> str:
    return page.url.rsplit("/", 1)[1]


def create_task(fleet: Fleet, command: str, **body: Any) -> dict[str, Any]:
    with fleet.client() as client:
        response = client.post("/api/v1/tasks", json={"command": command, **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_fleet_view_shows_every_host_online_with_counts_and_filters(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    response = page.goto(fleet.url + "/")
    assert response is not None and response.ok
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy, policy

    expect(page).to_have_url(re.compile(r"#/fleet$"))
    for name, groups in AGENTS.items():
        row = host_row(page, name)
        expect(row).to_have_attribute("data-status", "online")
        expect(row.locator(".c-link")).to_have_text("gRPC")
        expect(row.locator(".tag.group")).to_have_text(list(groups))
        expect(row.locator(".c-version")).not_to_have_text("\u2013")
        expect(row.locator(".c-seen time")).to_have_text(re.compile(r"just now|\ds ago"))
    expect(page.locator("#sum-online")).to_have_text(str(len(AGENTS)))
    expect(page.locator("#sum-offline")).to_have_text("0")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    # Metrics arrive with the first heartbeat.
    expect(host_row(page, "web-1").locator(".c-metric .metric-value").first).to_have_text(
        re.compile(r"%$")
    )
    snap(page, "fleet")

    page.locator("#view-fleet").get_by_label("Filter", exact=True).fill("web")
    expect(page.locator("#fleet-rows tr")).to_have_count(2)
    expect(page).to_have_url(re.compile(r"#/fleet\?q=web$"))
    page.locator("#view-fleet").get_by_label("Filter", exact=True).fill("")
    page.locator("#view-fleet").get_by_label("Group", exact=True).select_option("db")
    expect(page.locator("#fleet-rows tr")).to_have_count(1)
    expect(host_row(page, "db-1")).to_be_visible()
    # The filter lives in the address: a reload keeps it.
    page.reload()
    expect(page.locator("#fleet-rows tr")).to_have_count(1)
    expect(page.locator("#view-fleet").get_by_label("Group", exact=True)).to_have_value("db")
    page.locator("#view-fleet").get_by_label("Group", exact=True).select_option("")
    page.locator("#view-fleet").get_by_label("Status", exact=True).select_option("offline")
    expect(page.locator("#fleet-rows tr")).to_have_count(0)
    expect(page.locator("#fleet-empty")).to_contain_text("No host matches")


def test_the_page_loads_as_es_modules_that_keep_their_names_to_themselves(
    page: Page, fleet: Fleet
) -> None:
    # The page fixture fails the test on any console error (a module the browser refuses
    # logs one) or uncaught exception.
    scripts: dict[str, Response] = {}

    def seen(response: Response) -> None:
        if "/static/js/" in response.url:
            scripts.setdefault(response.url.rsplit("/", 1)[1], response)

    page.on("response", seen)
    page.goto(fleet.url + "/")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(host_row(page, "web-1")).to_be_visible()
    assert sorted(scripts) == sorted(path.name for path in (WEB_DIR / "js").glob("*.js"))
    for name, response in scripts.items():
        assert response.status == 200, name
        assert response.headers["content-type"].startswith("text/javascript"), name
    # Module scope: none of the page's functions or state is a global.
    leaked = page.evaluate(
        """() => ["h", "api", "fleet", "auth", "current", "taskView", "route", "start", "toast"]
            .filter((name) => name in window)"""
    )
    assert leaked == []


def test_run_console_streams_output_before_the_command_finishes(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    page.goto(fleet.url + "/#/fleet")
    expect(host_row(page, "web-1")).to_be_visible()
    # The keyboard shortcut jumps to the console with the command box focused.
    page.keyboard.press("r")
    expect(page).to_have_url(re.compile(r"#/run$"))
    expect(page.locator("#cmd")).to_be_focused()

    page.keyboard.type("echo first-line; sleep 3; echo second-line")
    page.get_by_label("Add a host or group").fill("group:web")
    page.get_by_label("Add a host or group").press("Enter")
    expect(page.locator("#target-match")).to_contain_text("Matches 2 hosts")
    expect(page.locator("#target-match")).to_contain_text("web-1, web-2")
    page.get_by_label("Timeout per host (seconds)").fill("30")
    snap(page, "run-console")
    run_button = page.get_by_role("button", name="Run on 2 hosts")
    run_button.click()

    expect(page).to_have_url(TASK_URL)
    task_id = task_id_of(page)
    term = page.locator("#term")
    expect(term.locator(".ln", has_text="first-line")).to_have_count(2)
    # The first line is on screen while the command still sleeps.
    started = time.monotonic()
    assert fleet.task(task_id)["status"] == "running"
    assert "second-line" not in (term.text_content() or "")
    expect(page.locator("#task-status")).to_have_text("running")
    expect(page.locator("#task-cancel")).to_be_visible()
    assert time.monotonic() - started < 2.5
    expect(term.locator(".ln .pfx", has_text="web-1").first).to_be_visible()
    snap(page, "task-live")

    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=10_000)
    expect(term.locator(".ln", has_text="second-line")).to_have_count(2)
    expect(run_row(page, "web-1").locator(".badge")).to_have_text("succeeded")
    expect(run_row(page, "web-1").locator("td").nth(2)).to_have_text("0")
    expect(run_row(page, "web-2").locator("td").nth(3)).to_have_text(re.compile(r"\d"))
    expect(page.locator("#task-cancel")).to_be_hidden()
    expect(page.locator("#task-progress")).to_have_attribute("aria-valuenow", "100")

    # Expanding one host hides the others and their prefixes.
    run_row(page, "web-2").get_by_role("button", name="Output of web-2").click()
    expect(page.locator("#output-title")).to_have_text("Output of web-2")
    expect(term.locator(".ln:visible")).to_have_count(2)
    expect(term.locator(".pfx:visible")).to_have_count(0)
    snap(page, "task-done")

    # The history after a reload of the task address replays the whole output.
    page.reload()
    expect(term.locator(".ln", has_text="first-line")).to_have_count(2)


def test_cancel_a_running_task_from_the_task_view(page: Page, fleet: Fleet, snap: Snap) -> None:
    task = fleet.create_task("echo waiting; sleep 30", hosts=["db-1"])
    page.goto(f"{fleet.url}/#/tasks/{task['id']}")
    expect(run_row(page, "db-1").locator(".badge")).to_have_text("running")
    expect(page.locator("#term")).to_contain_text("waiting")
    page.get_by_role("button", name="Cancel task").click()
    expect(page.locator("#task-status")).to_have_text("canceled", timeout=10_000)
    expect(run_row(page, "db-1").locator(".badge")).to_have_text("canceled")
    expect(page.locator("#task-cancel")).to_be_hidden()
    assert fleet.task(task["id"])["status"] == "canceled"
    # A canceled run did not succeed: it can be run again.
    expect(page.locator("#task-rerun")).to_have_text("Re-run on the failed host")
    snap(page, "task-canceled")


def test_output_follows_the_end_until_the_user_scrolls_up(page: Page, fleet: Fleet) -> None:
    command = (
        "for i in $(seq 1 300); do echo line $i; done; sleep 2; "
        "for i in $(seq 301 600); do echo line $i; done"
    )
    task = fleet.create_task(command, hosts=["web-1"])
    page.goto(f"{fleet.url}/#/tasks/{task['id']}")
    term = page.locator("#term")
    expect(term.locator(".ln", has_text=re.compile(r"line 300$"))).to_be_visible()
    at_bottom = "el => el.scrollTop + el.clientHeight >= el.scrollHeight - 8"
    assert term.evaluate(at_bottom)
    expect(page.locator("#output-follow")).to_be_hidden()

    term.hover()
    page.mouse.wheel(0, -2000)
    expect(page.locator("#output-follow")).to_be_visible()
    scrolled_to = term.evaluate("el => el.scrollTop")
    expect(term.locator(".ln", has_text=re.compile(r"line 600$"))).to_have_count(1, timeout=10_000)
    assert term.evaluate("el => el.scrollTop") == scrolled_to
    assert not term.evaluate(at_bottom)

    page.get_by_role("button", name="Follow output").click()
    expect(page.locator("#output-follow")).to_be_hidden()
    assert term.evaluate(at_bottom)


def test_rerun_on_failed_hosts_targets_only_the_hosts_that_did_not_succeed(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    # Each agent runs in its own work directory, so $PWD tells the hosts apart.
    command = 'case "$PWD" in */web-2) echo boom >&2; exit 3;; esac; echo fine'
    task = fleet.create_task(command, groups=["web"])
    page.goto(f"{fleet.url}/#/tasks/{task['id']}")
    expect(page.locator("#task-status")).to_have_text("failed", timeout=10_000)
    expect(run_row(page, "web-2").locator("td").nth(2)).to_have_text("3")
    expect(page.locator('#term .ln[data-s="err"]')).to_have_text(re.compile(r"web-2\s*boom"))
    expect(page.locator('#term .ln[data-s="out"]')).to_have_text(re.compile(r"web-1\s*fine"))

    with page.expect_download() as download_info:
        run_row(page, "web-2").get_by_role("button", name="Download the log of web-2").click()
    log = download_info.value
    assert log.suggested_filename.startswith("web-2-")
    assert "boom" in Path(log.path()).read_text(encoding="utf-8")

    page.get_by_role("button", name="Re-run on the failed host").click()
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("web-2")
    snap(page, "task-rerun-dialog", full_page=False)
    dialog.get_by_role("button", name="Run on 1 host").click()
    expect(page).not_to_have_url(re.compile(task["id"]))
    expect(page).to_have_url(TASK_URL)
    again = fleet.task(task_id_of(page))
    assert again["command"] == command
    assert again["targets"]["hosts"] == ["web-2"] and not again["targets"]["groups"]
    assert again["rerun_of"] == task["id"]
    expect(page.get_by_role("link", name=task["id"][:8])).to_be_visible()
    expect(page.locator("#task-status")).to_have_text("failed", timeout=10_000)


def test_host_output_is_shown_as_text_never_as_html(page: Page, fleet: Fleet, snap: Snap) -> None:
    command = (
        "echo '<b>x</b>'; echo '<img src=x onerror=window.__pwned=1>'; "
        r"printf '\033[31mred\033[0m plain \033[1;32mbold green\033[0m\n'; "
        r"printf 'progress 10%%\rprogress 100%%\n'"
    )
    task = fleet.create_task(command, hosts=["web-1"])
    page.goto(f"{fleet.url}/#/tasks/{task['id']}")
    term = page.locator("#term")
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=10_000)
    expect(term).to_contain_text("<b>x</b>")
    expect(term).to_contain_text("<img src=x onerror=window.__pwned=1>")
    assert term.locator("b, img").count() == 0
    assert page.evaluate("window.__pwned") is None
    # ANSI colours are rendered, their escape codes never shown.
    expect(term.locator(".a-f1")).to_have_text("red")
    expect(term.locator(".a-f2.a-bold")).to_have_text("bold green")
    text = term.text_content() or ""
    assert "\x1b" not in text and "[31m" not in text and "[0m" not in text
    # A carriage return redraws the line, like a terminal.
    expect(term.locator(".ln", has_text="progress")).to_have_text(re.compile(r"progress 100%$"))
    # The command itself is remote text too.
    expect(page.locator("#task-command")).to_have_text(command)
    assert page.locator("#task-command b").count() == 0
    snap(page, "task-output-escaping")


def test_task_history_lists_tasks_with_filters(page: Page, fleet: Fleet, snap: Snap) -> None:
    name = f"history check {uuid.uuid4().hex[:8]}"
    task = create_task(fleet, "echo from history", targets={"groups": ["db"]}, name=name)
    other = fleet.create_task("echo unnamed task in history", hosts=["web-1"])
    fleet.wait_task_done(task["id"])
    fleet.wait_task_done(other["id"])
    page.goto(fleet.url + "/#/tasks")
    rows = page.locator("#tasks-rows tr")
    row = rows.filter(has_text=name)
    expect(row.locator(".badge")).to_have_text("succeeded")
    expect(row.locator(".c-targets")).to_have_text("group db")
    expect(row.locator(".c-hosts")).to_contain_text("1/1 ok")
    # Created with the bootstrap admin token (tests.auth), which has no user: its name.
    expect(row.locator(".c-by")).to_have_text("bootstrap")
    expect(row.locator(".c-task code")).to_have_text("echo from history")
    expect(row.locator(".c-dur")).to_have_text(re.compile(r"\d"))
    expect(row.locator(".c-when time")).to_have_text(re.compile(r"just now|\ds ago"))
    # Newest first: the unnamed task came second.
    expect(rows.first.locator(".task-link")).to_have_text("echo unnamed task in history")
    expect(rows.first.locator(".c-targets")).to_have_text("web-1")
    snap(page, "history")

    page.locator("#view-tasks").get_by_label("Name", exact=True).fill(name)
    expect(rows).to_have_count(1)
    expect(page).to_have_url(re.compile(r"#/tasks\?name=history\+check"))
    page.locator("#view-tasks").get_by_label("Status", exact=True).select_option("failed")
    expect(rows).to_have_count(0)
    expect(page.locator("#tasks-empty")).to_contain_text("No task matches")
    page.locator("#view-tasks").get_by_label("Status", exact=True).select_option("succeeded")
    expect(rows).to_have_count(1)
    rows.first.locator(".c-targets").click()
    expect(page).to_have_url(re.compile(f"#/tasks/{task['id']}$"))
    expect(page.locator("#task-title")).to_have_text(name)
    page.go_back()
    expect(rows).to_have_count(1)
    expect(page.locator("#view-tasks").get_by_label("Status", exact=True)).to_have_value(
        "succeeded"
    )


def test_host_page_shows_details_and_a_live_sparkline(page: Page, fleet: Fleet, snap: Snap) -> None:
    page.goto(fleet.url + "/#/hosts/web-1")
    expect(page.locator("#host-title")).to_have_text("web-1")
    expect(page.locator("#host-status")).to_have_text("online")
    details = page.locator("#host-details")
    expect(details).to_contain_text("gRPC")
    expect(details.locator(".tag.group")).to_have_text(["web"])
    expect(page.locator("#host-metrics .metric-big").first).to_have_text(re.compile(r"%$"))
    # Heartbeats come every second in these tests; two of them draw a line.
    expect(page.locator("#host-chart polyline.line-cpu")).to_have_count(1, timeout=10_000)
    expect(page.locator("#host-chart-legend")).to_contain_text("heartbeats over")
    snap(page, "host")
    page.get_by_role("link", name="Run a command here").click()
    expect(page).to_have_url(re.compile(r"#/run\?hosts=web-1$"))
    expect(page.locator("#target-chips")).to_contain_text("web-1")
    expect(page.locator("#target-match")).to_contain_text("Matches 1 host")

    page.goto(fleet.url + "/#/hosts/no-such-host")
    expect(page.locator("#view-missing")).to_contain_text("no host named")


def test_host_page_shows_recent_runs_and_the_heartbeat_history(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    name = f"host runs check {uuid.uuid4().hex[:8]}"
    task = create_task(fleet, "echo on db-1; exit 4", targets={"hosts": ["db-1"]}, name=name)
    fleet.wait_task_done(task["id"])
    page.goto(fleet.url + "/#/hosts/db-1")
    expect(page.locator("#host-title")).to_have_text("db-1")
    row = page.locator("#host-runs-rows tr").filter(has_text=name)
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text("failed")
    expect(row.locator(".c-exit")).to_have_text("4")
    expect(row.locator(".c-dur")).to_have_text(re.compile(r"\d"))
    expect(row.locator(".task-cmd")).to_have_text("echo on db-1; exit 4")
    # Newest first.
    expect(page.locator("#host-runs-rows tr").first).to_have_attribute("data-task", task["id"])
    # The chart starts from the stored history (one point a minute), not from nothing.
    chart = page.locator("#host-chart")
    expect(chart).to_have_attribute("data-history", re.compile(r"^[1-9]\d*$"))
    expect(chart.locator("polyline.line-cpu, circle.chart-dot-cpu").first).to_be_attached()
    assert int(chart.get_attribute("data-points") or "0") >= 1
    snap(page, "host-runs")
    row.get_by_role("link", name=name).click()
    expect(page).to_have_url(re.compile(f"#/tasks/{task['id']}$"))
    expect(page.locator("#task-title")).to_have_text(name)


def test_run_console_runs_a_catalog_script_and_follows_its_task(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    page.goto(fleet.url + "/#/run")
    mode = page.locator("#run-mode")
    expect(mode).to_be_visible()
    expect(page.locator("#script-box")).to_be_hidden()
    mode.locator("label", has_text="Script").click()
    expect(page.locator("#cmd")).to_be_hidden()
    scripts = page.locator("#script option")
    # /async/query and /async/kill are not scripts; /sync/... routes are not listed.
    expect(scripts).to_have_text(["tendb-ha/counter"])
    snap(page, "run-script")

    # A refusal is shown with the catalog's message (the envelope's msg).
    refused: list[Any] = []

    def refuse(route: Route) -> None:
        refused.append(route.request)
        body = {"code": 1, "data": "", "msg": "no such cluster: demo9"}
        route.fulfill(status=422, content_type="application/json", body=json.dumps(body))

    sent: list[Any] = []

    def record(route: Route) -> None:
        sent.append((route.request.headers.get("content-type"), route.request.post_data))
        route.fallback()

    page.route(re.compile(r"/async/tendb-ha/counter$"), refuse)
    page.get_by_label("Arguments").fill("--cluster=demo9\n\n  two words \n")
    page.get_by_role("button", name="Run script").click()
    expect(page.locator("#script-error")).to_have_text("Not started: no such cluster: demo9")
    # One argument a line, trimmed, blank lines dropped: a JSON array of strings, sent with the
    # CSRF header like every other state-changing request.
    assert refused[0].method == "POST"
    assert json.loads(refused[0].post_data) == ["--cluster=demo9", "two words"]
    assert refused[0].headers["content-type"] == "application/json"
    assert refused[0].headers.get("x-csrf-token")
    page.unroute(re.compile(r"/async/tendb-ha/counter$"))

    # For real: the in-process counter takes no arguments; its session id is a task id.
    page.route(re.compile(r"/async/tendb-ha/counter$"), record)
    page.get_by_label("Arguments").fill("")
    page.get_by_role("button", name="Run script").click()
    expect(page).to_have_url(TASK_URL)
    assert sent and sent[0][1] in (None, "")
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=10_000)
    expect(page.locator("#term")).to_contain_text("counted to 3")


def test_fleet_view_shows_a_host_go_offline_without_a_reload(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    page.goto(fleet.url + "/#/fleet")
    row = host_row(page, "spare-1")
    expect(row).to_have_attribute("data-status", "online")
    page.evaluate("window.__sameDocument = true")

    fleet.stop_agent("spare-1")
    expect(row).to_have_attribute("data-status", "offline", timeout=10_000)
    expect(row.locator(".status-text")).to_have_text("offline")
    expect(page.locator("#sum-offline")).to_have_text("1")
    expect(page.locator("#sum-online")).to_have_text(str(len(AGENTS) - 1))
    assert page.evaluate("window.__sameDocument") is True
    snap(page, "fleet-offline")

    # The run console counts what a selection matches from the same live list.
    page.goto(fleet.url + "/#/run")
    page.get_by_label("Add a host or group").fill("group:spare web-1")
    page.get_by_label("Add a host or group").press("Enter")
    expect(page.locator("#target-match")).to_contain_text("Matches 2 hosts")
    expect(page.locator("#target-match")).to_contain_text("1 not online")


def test_fleet_view_applies_host_changes_from_its_stream_without_reloading_the_list(
    page: Page, fleet: Fleet
) -> None:
    lists: list[str] = []
    page.on("request", lambda r: lists.append(r.url) if "/api/v1/hosts?" in r.url else None)
    page.goto(fleet.url + "/#/fleet")
    expect(host_row(page, "web-1")).to_be_visible()
    loaded = len(lists)
    assert loaded >= 1

    with fleet.client() as client:
        body = {"name": "delta-1", "ssh": "ops@127.0.0.1:22", "groups": ["delta"]}
        assert client.post("/api/v1/hosts", json=body).status_code == 201
    expect(host_row(page, "delta-1")).to_be_visible(timeout=10_000)
    with fleet.client() as client:
        assert client.delete("/api/v1/hosts/delta-1").status_code == 204
    expect(host_row(page, "delta-1")).to_have_count(0, timeout=10_000)
    # Both arrived as deltas on the stream (a host, then its removal): no list was reloaded.
    assert len(lists) == loaded, lists


def test_every_screen_fits_a_phone_without_horizontal_scrolling(
    phone: Page, fleet: Fleet, snap: Snap
) -> None:
    task = fleet.create_task("echo phone; printf 'a very long line %.0s' $(seq 40); echo", all=True)
    fleet.wait_task_done(task["id"])
    screens = {
        "fleet": ("#/fleet", "#fleet-rows tr"),
        "run": ("#/run", "#cmd"),
        "history": ("#/tasks", "#tasks-rows tr"),
        "task": (f"#/tasks/{task['id']}", "#term .ln"),
        "host": ("#/hosts/web-1", "#host-details div"),
    }
    for name, (address, ready) in screens.items():
        phone.goto(f"{fleet.url}/{address}")
        expect(phone.locator(ready).first).to_be_visible()
        widths = phone.evaluate(
            "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
        )
        assert max(widths[:2]) <= widths[2], f"{name} scrolls sideways: {widths}"
        snap(phone, f"phone-{name}")


def test_fleet_view_stays_responsive_with_ten_thousand_hosts(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    total = 10_000
    groups = ["web", "db", "cache", "batch"]

    def host(i: int) -> dict[str, Any]:
        return {
            "name": f"node-{i:05d}", "link": "grpc", "groups": [groups[i % 4]],
            "labels": {"rack": f"r{i % 40}"}, "status": "offline" if i % 97 == 0 else "online",
            "last_seen_at": "2030-01-01T00:00:00Z", "connected_at": None,
            "cpu_usage": float(i % 100), "memory_usage": float((i * 7) % 100), "load": 0.5,
            "disk_usage": 40.0, "agent_version": "0.1.0", "os": "Linux",
        }  # fmt: skip

    requests: list[str] = []

    def hosts_page(route: Route) -> None:
        # Keyset pages as the server gives them: the cursor here is simply the next index.
        query = dict(p.split("=", 1) for p in route.request.url.split("?", 1)[1].split("&"))
        start, size = int(query.get("cursor", "0")), int(query["size"])
        requests.append(route.request.url)
        end = min(start + size, total)
        items = [host(i) for i in range(start, end)]
        body = {"items": items, "total": total, "page": 1, "size": size,
                "next_cursor": str(end) if end < total else None}  # fmt: skip
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route(re.compile(r"/api/v1/hosts\?"), hosts_page)
    page.route(re.compile(r"/api/v1/fleet/events"), lambda route: route.abort())
    page.goto(fleet.url + "/#/fleet")
    expect(page.locator("#fleet-range")).to_contain_text("10,000 hosts", timeout=10_000)
    # A first screenful, then a thousand at a time, each after the cursor of the one before.
    assert "size=200" in requests[0] and "cursor" not in requests[0]
    assert all("size=1000" in url for url in requests[1:]) and len(requests) == 11
    assert all(f"cursor={200 + 1000 * n}&" in url or url.endswith(f"cursor={200 + 1000 * n}")
               for n, url in enumerate(requests[1:])), requests  # fmt: skip
    # Only one page of rows exists in the document.
    expect(page.locator("#fleet-rows tr")).to_have_count(100)
    snap(page, "fleet-10k", full_page=False)

    # Responsive: no task on the main thread blocks it for long, loading included.
    page.evaluate(
        """() => {
            window.__longest = 0;
            new PerformanceObserver((list) => {
                for (const entry of list.getEntries()) {
                    window.__longest = Math.max(window.__longest, entry.duration);
                }
            }).observe({ type: "longtask", buffered: true });
        }"""
    )
    quick = 2_000
    page.locator("#view-fleet").get_by_label("Filter", exact=True).fill("node-09999")
    expect(page.locator("#fleet-rows tr")).to_have_count(1, timeout=quick)
    page.locator("#view-fleet").get_by_label("Filter", exact=True).fill("")
    page.get_by_role("button", name="CPU").click()
    busiest = page.locator("#fleet-rows tr").first.locator(".c-metric .metric-value").first
    expect(busiest).to_have_text("99%", timeout=quick)
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#fleet-range")).to_contain_text("showing 101\u2013200", timeout=quick)
    longest = page.evaluate("() => window.__longest")
    print(f"longest main-thread task with 10,000 hosts: {longest:.0f} ms")
    assert longest < 1_000, longest
