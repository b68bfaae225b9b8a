"""The web page's ES modules as the server hands them out, and as a browser will link them.

A browser runs a module only when it is served with a JavaScript type, resolves every import
to a file, and needs every imported name exported: a mistake in any of these shows as a blank
page. These checks read the files and ask the real ASGI app, without a browser (the browser
tests in tests/ui run the page itself).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from opsplane.api.web import WEB_DIR, mount_web

ROOT = Path(__file__).parents[2]
JS_DIR = WEB_DIR / "js"
MODULES = sorted(path.name for path in JS_DIR.glob("*.js"))
IMPORT = re.compile(r'^import \{([^}]*)\} from "([^"]+)";$', re.M)
EXPORT = re.compile(r"^export (?:async function|function|const|let|class) ([A-Za-z_$][\w$]*)", re.M)
MAX_LINES = 500


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    mount_web(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://page") as the_client:
        yield the_client


def _imports(name: str) -> dict[str, set[str]]:
    """What a module imports: {module file: names}."""
    found: dict[str, set[str]] = {}
    for names, source in IMPORT.findall((JS_DIR / name).read_text()):
        assert source.startswith("./") and source.endswith(".js"), f"{name}: import {source}"
        found.setdefault(source[2:], set()).update(n.strip() for n in names.split(","))
    return found


async def test_every_module_is_served_as_javascript_and_revalidated(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the host's MIME table says about .js (here: nothing useful).
    monkeypatch.setattr(
        "starlette.responses.guess_type", lambda *_args, **_kw: ("text/plain", None)
    )
    assert "main.js" in MODULES
    for name in MODULES:
        response = await client.get(f"/static/js/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == "text/javascript; charset=utf-8", name
        assert response.headers["cache-control"] == "no-cache", name
        assert response.headers["x-content-type-options"] == "nosniff", name
        # The revalidation answers 304 without a body.
        etag = response.headers["etag"]
        again = await client.get(f"/static/js/{name}", headers={"If-None-Match": etag})
        assert again.status_code == 304, name


async def test_the_page_loads_its_entry_module_from_self_under_the_policy(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy, policy
    html = response.text
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script type="module" src="/static/js/main.js">'
    ]
    # Every other module is preloaded, so that the browser fetches them all at once.
    preloaded = re.findall(r'<link rel="modulepreload" href="/static/js/([^"]+)">', html)
    assert sorted(preloaded) == [name for name in MODULES if name != "main.js"]


def test_modules_link_without_cycles_and_every_import_is_exported() -> None:
    exports = {name: set(EXPORT.findall((JS_DIR / name).read_text())) for name in MODULES}
    graph = {name: _imports(name) for name in MODULES}
    for name, imports in graph.items():
        for target, names in imports.items():
            assert target in exports, f"{name} imports the missing module {target}"
            missing = names - exports[target]
            assert not missing, f"{name} imports {sorted(missing)} that {target} does not export"
    # Every module is reached from the entry point.
    reached: set[str] = set()
    todo = ["main.js"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    assert reached == set(MODULES)
    # No cycle: a module may be evaluated only after everything it imports.
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for target in graph[name]:
            visit(target, (*path, name))
        done.add(name)

    visit("main.js", ())


@pytest.mark.parametrize("name", MODULES)
def test_module_is_small_and_shares_nothing_through_globals(name: str) -> None:
    text = (JS_DIR / name).read_text()
    assert len(text.splitlines()) < MAX_LINES, f"{name} has grown past {MAX_LINES} lines"
    # Shared state lives in state.js and travels by import, never on window.
    assert not re.search(r"\b(?:window|globalThis|self)\.\w+\s*=[^=]", text), name
    # Host output and names reach the page as text only.
    markup = re.compile(r"\.(?:inner|outer)HTML\s*=|insertAdjacentHTML|document\.write")
    assert not markup.search(text), name


def test_package_data_ships_every_file_of_the_page() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["opsplane"]
    package = WEB_DIR.parent
    files = [p.relative_to(package).as_posix() for p in WEB_DIR.rglob("*") if p.is_file()]
    missed = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) for pat in patterns)]
    assert files and not missed, f"not in the wheel: {missed}"
