"""The templates and schedules views in a real browser, against a real control plane with real
agents (issue 20): a launch form generated from a template's parameters, the server's refusal
shown beside it, who sees which buttons, and a schedule paused from the page with its history.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import Browser, Page, expect

from tests.e2e.fleet import Fleet
from tests.ui.conftest import DESKTOP, Snap, _open_page

TASK_URL = re.compile(r"#/tasks/[0-9a-f-]{36}$")
PASSWORD = "another correct horse battery"
GREET = {
    "name": "greet",
    "description": "say hello on the web hosts",
    "command": 'echo "hello $PARAM_WHO mode=$PARAM_MODE count=$PARAM_COUNT"',
    "parameters": [
        {"name": "who", "type": "string", "default": "world", "description": "whom to greet"},
        {"name": "mode", "type": "choice", "choices": ["soft", "hard"], "default": "soft"},
        {"name": "count", "type": "int", "default": 2},
        {"name": "token", "type": "secret"},
    ],
    "targets": {"groups": ["web"]},
    "timeout": 30,
}


def _api(fleet: Fleet, method: str, path: str, body: Any = None) -> Any:
    with fleet.client() as client:
        answer = client.request(method, path, json=body)
    assert answer.status_code < 300, answer.text
    return answer.json() if answer.content else None


def _ensure_template(fleet: Fleet) -> None:
    with fleet.client() as client:
        if client.get("/api/v1/templates/greet").status_code == 404:
            assert client.post("/api/v1/templates", json=GREET).status_code == 201


def _user(fleet: Fleet, name: str, role: str, groups: list[str] | None = None) -> None:
    with fleet.client() as client:
        if client.get(f"/api/v1/users/{name}").status_code == 404:
            body = {"name": name, "role": role, "groups": groups, "password": PASSWORD}
            created = client.post("/api/v1/users", json=body)
            assert created.status_code == 201, created.text


@contextmanager
def _page_as(browser: Browser, fleet: Fleet, name: str) -> Iterator[Page]:
    """A fresh page with a web session of ``name`` (failing on any JavaScript error)."""
    pages = _open_page(browser, DESKTOP, None, color_scheme="light")
    page = next(pages)
    answer = page.context.request.post(
        fleet.url + "/api/v1/auth/login", data={"name": name, "password": PASSWORD}
    )
    assert answer.ok, answer.text()
    try:
        yield page
    finally:
        next(pages, None)


def _card(page: Page, name: str) -> Any:
    return page.locator(f'article.template-card[data-template="{name}"]')


def test_launch_a_parameterized_template_from_its_form(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    _ensure_template(fleet)
    page.goto(fleet.url + "/#/templates")
    card = _card(page, "greet")
    expect(card.locator("h2")).to_have_text("greet")
    # One field per parameter, of its type, defaults filled in, required marked.
    expect(card.get_by_label(re.compile("^who"))).to_have_attribute("type", "text")
    expect(card.get_by_label(re.compile("^who"))).to_have_value("world")
    expect(card.get_by_label(re.compile("^count"))).to_have_attribute("type", "number")
    expect(card.get_by_label(re.compile("^count"))).to_have_value("2")
    expect(card.get_by_label(re.compile("^token"))).to_have_attribute("type", "password")
    mode = card.get_by_label(re.compile("^mode"))
    expect(mode).to_have_value("soft")
    expect(mode.locator("option")).to_have_text(["soft", "hard"])
    expect(card.locator("text=whom to greet")).to_be_visible()
    snap(page, "templates")

    mode.select_option("hard")
    card.get_by_label(re.compile("^who")).fill("; touch /tmp/never $(id)")
    card.get_by_role("button", name="Launch").click()
    expect(page).to_have_url(TASK_URL)
    task = _api(fleet, "GET", f"/api/v1/tasks/{page.url.rsplit('/', 1)[1]}")
    assert task["template"] == {"name": "greet", "version": 1}
    # The value arrives verbatim, as the variable's value: never as shell text.
    expect(page.locator("#term")).to_contain_text(
        "hello ; touch /tmp/never $(id) mode=hard count=2", timeout=15_000
    )
    expect(page.locator("#task-status")).to_have_text("succeeded", timeout=15_000)

    # A value the server refuses: its sentence beside the form, nothing launched.
    page.goto(fleet.url + "/#/templates")
    card = _card(page, "greet")
    card.get_by_label(re.compile("^count")).fill("")
    card.get_by_label(re.compile("^count")).press_sequentially("1.5")
    card.get_by_role("button", name="Launch").click()
    expect(card.locator(".error")).to_contain_text("parameter count")
    expect(page).to_have_url(re.compile(r"#/templates$"))


def test_a_granted_operator_launches_on_its_grant_and_sees_the_refusal_elsewhere(
    browser: Browser, fleet: Fleet, snap: Snap
) -> None:
    _ensure_template(fleet)
    _user(fleet, "ui-op", "operator", ["spare"])
    _user(fleet, "ui-viewer", "viewer")
    grant = {"template": "greet", "groups": ["web"]}
    _api(fleet, "POST", "/api/v1/users/ui-op/template-grants", grant)
    with _page_as(browser, fleet, "ui-op") as page:
        page.goto(fleet.url + "/#/templates")
        card = _card(page, "greet")
        launch = card.get_by_role("button", name="Launch")
        expect(launch).to_be_enabled()
        expect(card.locator("text=Granted to you on web.")).to_be_attached()
        card.locator("details.override summary").click()
        card.get_by_label("Groups for greet").fill("db")
        launch.click()
        error = card.locator(".error")
        expect(error).to_contain_text("not allowed on host(s) outside your groups")
        expect(error).to_contain_text("db-1")
        snap(page, "templates-refused")
        # On the granted group it runs.
        card.get_by_label("Groups for greet").fill("web")
        launch.click()
        expect(page).to_have_url(TASK_URL)
        expect(page.locator("#task-status")).to_have_text("succeeded", timeout=15_000)

    with _page_as(browser, fleet, "ui-viewer") as page:
        page.goto(fleet.url + "/#/templates")
        card = _card(page, "greet")
        expect(card.get_by_role("button", name="Launch")).to_be_disabled()
        expect(card).to_contain_text("Your role (viewer) may launch only the templates granted")
        page.goto(fleet.url + "/#/schedules")
        expect(page.locator("#schedules-title")).to_be_visible()
        expect(page.locator("#schedule-form")).to_be_hidden()
        # The server refuses all the same.
        answer = page.context.request.post(
            fleet.url + "/api/v1/templates/greet/launch",
            data={"params": {}},
            headers={"X-CSRF-Token": _csrf(page)},
        )
        assert answer.status == 403, answer.text()


def _csrf(page: Page) -> str:
    for cookie in page.context.cookies():
        if cookie["name"] == "opsplane_csrf":
            return str(cookie["value"])
    return ""


def test_create_a_schedule_then_pause_it_from_the_page_and_read_its_history(
    page: Page, fleet: Fleet, snap: Snap
) -> None:
    _ensure_template(fleet)
    page.goto(fleet.url + "/#/schedules")
    form = page.locator("#schedule-form")
    expect(form).to_be_visible()
    form.get_by_label("Template").select_option("greet")
    expect(form.get_by_label(re.compile("^mode"))).to_have_value("soft")
    form.locator("label", has_text="Every N seconds").click()
    form.get_by_label("Interval (seconds)").fill("2")
    form.get_by_role("button", name="Create schedule").click()
    expect(page).to_have_url(re.compile(r"#/schedules\?id=[0-9a-f-]{36}$"))
    schedule_id = page.url.rsplit("=", 1)[1]
    row = page.locator(f'#schedules-rows tr[data-schedule="{schedule_id}"]')
    expect(row).to_contain_text("every 2 seconds")
    expect(row.locator("ol.fires li")).to_have_count(5)

    # The history fills in as it fires (the real loop, 1 s tick; refreshed every 3 s).
    history = page.locator("#schedule-history-rows tr")
    expect(history.filter(has_text="launched").first).to_be_visible(timeout=15_000)
    expect(history.first.locator("a")).to_have_attribute("href", re.compile(r"^#/tasks/"))
    snap(page, "schedules")

    switch = row.get_by_role("switch")
    switch.check()
    deadline = time.monotonic() + 5
    while not _api(fleet, "GET", f"/api/v1/schedules/{schedule_id}")["paused"]:
        assert time.monotonic() < deadline, "the pause switch did not reach the server"
        time.sleep(0.1)
    expect(row.locator(".next-fires")).to_have_text("paused")
    launched = len(_api(fleet, "GET", f"/api/v1/schedules/{schedule_id}/history")["items"])
    time.sleep(3)
    after = _api(fleet, "GET", f"/api/v1/schedules/{schedule_id}/history")["items"]
    assert len(after) == launched, "a paused schedule fired"
    expect(switch).to_be_checked()
    _api(fleet, "DELETE", f"/api/v1/schedules/{schedule_id}")


def test_templates_and_schedules_fit_a_phone(phone: Page, fleet: Fleet, snap: Snap) -> None:
    _ensure_template(fleet)
    screens = {
        "templates": ("#/templates", 'article.template-card[data-template="greet"] form'),
        "schedules": ("#/schedules", '#schedule-template option[value="greet"]'),
    }
    for name, (address, ready) in screens.items():
        phone.goto(f"{fleet.url}/{address}")
        expect(phone.locator(ready).first).to_be_attached()
        widths = phone.evaluate(
            "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
        )
        assert max(widths[:2]) <= widths[2], f"{name} scrolls sideways: {widths}"
        snap(phone, f"phone-{name}")


def test_an_admin_creates_a_parameterized_template_and_grants_it_from_the_page(
    page: Page, fleet: Fleet
) -> None:
    _user(fleet, "ui-op2", "operator", ["spare"])
    page.goto(fleet.url + "/#/templates")
    form = page.locator("#template-form")
    expect(form).to_be_visible()
    form.get_by_label("Name").fill("page-made")
    form.get_by_label("Command").fill('echo "made $PARAM_MODE"')
    form.get_by_label("Parameters").fill("who=web\nmode:choice(soft|hard)=soft\ncount:int=3")
    form.get_by_label("Default groups").fill("web")
    form.get_by_role("button", name="Create template").click()
    card = _card(page, "page-made")
    expect(card.get_by_label(re.compile("^mode"))).to_have_value("soft")
    expect(card.get_by_label(re.compile("^count"))).to_have_attribute("type", "number")
    made = _api(fleet, "GET", "/api/v1/templates/page-made")
    assert made["targets"]["groups"] == ["web"]
    assert [p["type"] for p in made["parameters"]] == ["string", "choice", "int"]
    # The server's sentence for a refused definition, beside the form.
    form.get_by_label("Name").fill("page-made")
    form.get_by_label("Command").fill("true")
    form.get_by_role("button", name="Create template").click()
    expect(form.locator(".error")).to_contain_text("exists")

    grant = page.locator("#grant-form")
    grant.get_by_label("User").fill("ui-op2")
    grant.get_by_label("Template").select_option("page-made")
    grant.get_by_label("Groups").fill("web")
    grant.get_by_role("button", name="Grant").click()
    expect(grant.locator("#grant-done")).to_have_text("ui-op2 may launch page-made on web.")
    grants = _api(fleet, "GET", "/api/v1/users/ui-op2/template-grants")["items"]
    assert grants == [{"user": "ui-op2", "template": "page-made", "groups": ["web"]}]
    _api(fleet, "DELETE", "/api/v1/templates/page-made")
