"""The login screen in a real browser: nothing is shown before a session exists, a wrong
password says so, the session cookie is HttpOnly and SameSite=Strict, the CSRF header rides on
every state-changing request, and an ended session brings the login back."""

from __future__ import annotations

import re

from playwright.sync_api import Page, Request, expect

from tests.e2e.fleet import Fleet
from tests.ui.conftest import UI_PASSWORD, UI_USER, Snap, log_in


def test_login_screen_then_the_fleet_then_logout(
    anonymous_page: Page, fleet: Fleet, snap: Snap
) -> None:
    page = anonymous_page
    page.goto(fleet.url + "/#/tasks")
    form = page.locator("#login")
    expect(form).to_be_visible()
    expect(page.locator("header.top")).to_be_hidden()
    expect(page.locator("main")).to_be_hidden()
    expect(page.locator("#login").get_by_label("Name")).to_be_focused()
    snap(page, "login")

    page.locator("#login").get_by_label("Name").fill(UI_USER)
    page.locator("#login").get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_have_text("Wrong name or password.")

    page.locator("#login").get_by_label("Password").fill(UI_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    # Back where the user was going, with the data loaded and who is logged in.
    expect(page.locator("#view-tasks")).to_be_visible()
    expect(page).to_have_url(re.compile(r"#/tasks$"))
    expect(page.locator("#whoami")).to_have_text(f"{UI_USER} · admin")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["opsplane_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert cookies["opsplane_csrf"]["httpOnly"] is False

    page.get_by_role("button", name="Log out").click()
    expect(form).to_be_visible()
    assert "opsplane_session" not in {c["name"] for c in page.context.cookies()}


def test_state_changing_requests_carry_the_csrf_header(page: Page, fleet: Fleet) -> None:
    sent: list[Request] = []
    page.on("request", lambda r: sent.append(r) if r.method == "POST" else None)
    page.goto(fleet.url + "/#/fleet")
    expect(page.locator('#fleet-rows tr[data-host="web-1"]')).to_be_visible()
    page.goto(fleet.url + "/#/run")
    page.locator("#cmd").fill("echo csrf")
    page.get_by_label("Add a host or group").fill("web-1")
    page.get_by_label("Add a host or group").press("Enter")
    page.get_by_role("button", name=re.compile(r"^Run on 1 host")).click()
    expect(page).to_have_url(re.compile(r"#/tasks/[0-9a-f-]{36}$"))
    posts = [r for r in sent if r.url.endswith("/api/v1/tasks")]
    csrf = {c["name"]: c["value"] for c in page.context.cookies()}["opsplane_csrf"]
    assert posts and posts[0].headers.get("x-csrf-token") == csrf


def test_an_ended_session_brings_the_login_back(page: Page, fleet: Fleet) -> None:
    page.goto(fleet.url + "/#/fleet")
    expect(page.locator("#view-fleet")).to_be_visible()
    page.context.clear_cookies()
    page.locator(".nav a", has_text="Tasks").click()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_have_text("Your session has ended: log in again.")
    log_in(page, fleet)
    page.reload()
    expect(page.locator("#view-tasks")).to_be_visible()
