"""A real control plane, real agents and a real headless Chromium for the web page tests.

Chromium is the Debian package at /usr/bin/chromium (never a Playwright download). When it cannot
start, the tests skip on a laptop and fail under ``CI=true``, like the real-service tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from tests.conftest import services_required, unavailable
from tests.e2e.fleet import Fleet, running_fleet

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # a dev dependency: missing only on a partial install
    if services_required():
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

CHROMIUM = os.environ.get("OPSPLANE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip
# Every wait is bounded: a few seconds for what the page does by itself.
EXPECT_TIMEOUT_MS = 5_000
# The web user the tests log in as (created through the API with the bootstrap admin token).
UI_USER = "ui-admin"
UI_PASSWORD = "correct horse battery staple"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# web-1 and web-2 share a group; db-1 is alone; spare-1 exists to be stopped by a test.
AGENTS: dict[str, tuple[str, ...]] = {
    "web-1": ("web",),
    "web-2": ("web",),
    "db-1": ("db",),
    "spare-1": ("spare",),
}

Snap = Callable[..., Path]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("uifleet"), AGENTS) as the_fleet:
        response = httpx.get(the_fleet.url + "/", timeout=10.0)
        if response.status_code != 200 or "<html" not in response.text:
            pytest.fail(
                f"GET / answered {response.status_code}: the web page is not mounted "
                "(opsplane.app_factory must call opsplane.api.web.mount_web(app))"
            )
        with the_fleet.client() as client:
            body = {"name": UI_USER, "role": "admin", "password": UI_PASSWORD}
            created = client.post("/api/v1/users", json=body)
            assert created.status_code == 201, created.text
        yield the_fleet


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        manager = sync_playwright().start()
    except Exception as e:  # the driver itself could not start
        _cannot_run(f"Playwright could not start: {e}")
    try:
        try:
            the_browser = manager.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
            )
        except Exception as e:
            _cannot_run(f"Chromium at {CHROMIUM} could not start: {e}")
        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        yield the_browser
        the_browser.close()
    finally:
        manager.stop()


def _cannot_run(message: str) -> NoReturn:
    unavailable(message)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: OPSPLANE_UI_SCREENSHOTS if set, else a pytest temporary folder."""
    chosen = os.environ.get("OPSPLANE_UI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def snap(screenshots: Path) -> Snap:
    def take(page: Page, name: str, full_page: bool = True) -> Path:
        path = screenshots / f"{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.png"
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        return path

    return take


def log_in(page: Page, fleet: Fleet) -> None:
    """Open a web session in the page's browser context, as the login form does: the
    context's cookie jar keeps the session cookie and the CSRF cookie."""
    body = {"name": UI_USER, "password": UI_PASSWORD}
    answer = page.context.request.post(fleet.url + "/api/v1/auth/login", data=body)
    assert answer.ok, answer.text()


def _open_page(
    browser: Browser, viewport: dict[str, int], fleet: Fleet | None, **options: Any
) -> Iterator[Page]:
    context = browser.new_context(viewport=viewport, accept_downloads=True, **options)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    context.set_default_navigation_timeout(10_000)
    page = context.new_page()
    if fleet is not None:
        log_in(page, fleet)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: (
            errors.append(f"console: {message.text}")
            if message.type == "error" and "Failed to load resource" not in message.text
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"the page reported JavaScript errors: {errors}"


@pytest.fixture
def page(browser: Browser, fleet: Fleet) -> Iterator[Page]:
    """A fresh desktop-sized page per test, logged in; fails the test on any JavaScript error."""
    yield from _open_page(browser, DESKTOP, fleet, color_scheme="light")


@pytest.fixture
def anonymous_page(browser: Browser) -> Iterator[Page]:
    """A fresh desktop-sized page without a session."""
    yield from _open_page(browser, DESKTOP, None, color_scheme="light")


@pytest.fixture
def phone(browser: Browser, fleet: Fleet) -> Iterator[Page]:
    yield from _open_page(
        browser,
        PHONE,
        fleet,
        color_scheme="dark",
        is_mobile=True,
        has_touch=True,
        device_scale_factor=1,
    )
