"""Authenticate before the body is read.

FastAPI reads and parses a route's body before it solves the route's dependencies, so an
anonymous request with malformed JSON got a 422 and ten anonymous megabytes were parsed before
``deps.authenticate`` said 401. ``AuthenticateFirst`` hands the route a ``receive`` that, the
first time the body is asked for, authenticates the caller when the matched route needs one
(its dependencies include ``deps.authenticate``: every route but the public ones). A stranger
gets the 401 before a byte of the body is read; the route's own dependency then finds the
caller already known. A seed API's route opened by ``compat_anonymous`` is no exception: the
anonymous principal is decided here too, from the route and the peer address alone. Public
routes (health, login, agent enrollment, a public ``/metrics``, the page) stay as they are:
which routes need a caller is read from the routes themselves, not from a list kept here. A
body's size is bounded by FastAPI's ``max_body_size`` (``max_request_bytes``), outside this.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opsplane.api.deps import authenticate
from opsplane.api.errors import CHALLENGE, status_of
from opsplane.domain.errors import OpsplaneError


def _needs_caller(route: Any) -> bool:
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        sub = stack.pop()
        if sub.call is authenticate:
            return True
        stack.extend(sub.dependencies)
    return False


class AuthenticateFirst:
    """Authenticates the caller of a route that needs one before its body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        checked = False

        async def receive_after_authentication() -> Message:
            nonlocal checked
            if not checked:
                checked = True
                # The router put the matched route in this very scope before the route ran.
                route = scope.get("route")
                # Walked each time (a dozen dependencies): nothing cached to go stale.
                if route is not None and _needs_caller(route):
                    await _authenticate(Request(scope))
            return await receive()

        await self.app(scope, receive_after_authentication, send)


async def _authenticate(request: Request) -> None:
    try:
        await authenticate(request)
    except OpsplaneError as e:
        # An HTTPException passes FastAPI's body parsing as it is (another error would become
        # a 400) and reaches the app's handler, which answers seed 004's routes in their
        # envelope.
        status = status_of(e)
        raise HTTPException(status, str(e), CHALLENGE if status == 401 else None) from e
    except Exception:
        # The store did not answer. Raised here, FastAPI would turn it into a 400 about the
        # body; the route's own dependency asks again and fails as any route does.
        return
