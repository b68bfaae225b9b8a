"""The web page: one HTML file and its static assets, served by the API application.

The page talks to the control plane only through the public ``/api/v1`` routes, so serving it
is nothing more than handing out files. It has no build step: what is in ``opsplane/web`` is
what the browser gets: ``index.html``, ``style.css`` and the ES modules under ``js/``
(``js/main.js`` is the entry point; docs/architecture.md has the module map).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

import opsplane

WEB_DIR = Path(opsplane.__file__).parent / "web"

# Host output and host names are untrusted; the page renders them as text, and this policy makes
# sure that even a mistake there cannot run a script: only the page's own files may execute.
_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    # Revalidate on every load (a cheap 304): after an upgrade nobody runs yesterday's modules.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# A browser runs a module script only when it is served with a JavaScript type, and Python's
# guess for .js depends on the host (/etc/mime.types, the Python version): say it here.
_JAVASCRIPT = "text/javascript; charset=utf-8"


class _WebFiles(StaticFiles):
    """Static files that are always revalidated, so an upgrade is picked up on reload."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(_HEADERS)
        # A 304 carries no body and so no type.
        if os.fspath(full_path).endswith(".js") and "content-type" in response.headers:
            response.headers["content-type"] = _JAVASCRIPT
        return response


def mount_web(app: FastAPI) -> None:
    """Serve the page: ``GET /`` is ``index.html``, its assets live under ``/static/``."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            WEB_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={**_HEADERS, "Content-Security-Policy": _CONTENT_SECURITY_POLICY},
        )

    app.mount("/static", _WebFiles(directory=WEB_DIR), name="static")
