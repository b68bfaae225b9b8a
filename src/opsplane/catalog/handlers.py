"""In-process handlers: catalog tasks written in Python, registered with a decorator (seed 004's
``addInternalHandler``, its Go ``democounter`` example is ``demo_counter`` below).

A handler is ``async def handler(ctx: HandlerContext, body: Any) -> int``: ``body`` is the
request's JSON body, parsed (any JSON value; ``None`` for an empty body); what it writes with
``await ctx.write(text)`` / ``await ctx.write(text, "stderr")`` is its output; the return value
is its exit code (0 is success); an exception fails the run with the exception as its error.
It runs on the control plane's event loop as an ordinary opsplane run of the local link, so it
must not block: use ``await`` or ``asyncio.to_thread`` for slow work. Cancellation (``/async/kill``
or a timeout) arrives as ``asyncio.CancelledError`` at its next ``await``.

Register on the default registry with ``@internal_task(cluster_type=..., name=...)``; the
module that defines a handler must be imported before the server builds its engine (the
built-in ones are, by importing this module).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from opsplane.catalog.registry import CatalogError, InternalEntry, route_slug
from opsplane.transport.local import Handler, HandlerContext

InternalTask = Callable[[HandlerContext, Any], Coroutine[Any, Any, int]]

# Where the local link finds a catalog handler; the name is stored with the task's spec.
_LINK_PREFIX = "catalog:"


class HandlerRegistry:
    """Named in-process handlers, each one catalog route."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[InternalEntry, InternalTask]] = {}

    def register(
        self, *, cluster_type: str, name: str, timeout: int | None = None
    ) -> Callable[[InternalTask], InternalTask]:
        """Decorator: expose ``fn`` as ``/sync/<kebab cluster_type>/<name>`` and the async twin.

        A second registration of one route is refused (``CatalogError``), as in the YAML file.
        """

        def decorate(fn: InternalTask) -> InternalTask:
            try:
                slug = route_slug(cluster_type, name)
            except ValueError as e:
                raise CatalogError(f"in-process handler {fn.__name__}: {e}") from e
            entry = InternalEntry(
                name=name,
                cluster_type=cluster_type,
                slug=slug,
                timeout=timeout,
                handler=f"{_LINK_PREFIX}{slug}/{name}",
            )
            if entry.key in self._entries:
                raise CatalogError(f"in-process handler route {entry.sync_path} registered twice")
            self._entries[entry.key] = (entry, fn)
            return fn

        return decorate

    def entries(self) -> list[InternalEntry]:
        return [entry for entry, _ in self._entries.values()]

    def link_handlers(self) -> dict[str, Handler]:
        """The handlers in the shape the local link runs them: name → ``handler(ctx)``."""
        return {entry.handler: _adapt(fn) for entry, fn in self._entries.values()}


def _adapt(fn: InternalTask) -> Handler:
    async def handler(ctx: HandlerContext) -> int:
        # The catalog sends the body as one JSON text argument (InternalEntry.exec_spec).
        body = json.loads(ctx.args[0]) if ctx.args else None
        return await fn(ctx, body)

    handler.__name__ = getattr(fn, "__name__", "handler")
    return handler


# The registry the server exposes; ``internal_task`` registers on it.
default_registry = HandlerRegistry()
internal_task = default_registry.register


@internal_task(cluster_type="TendbHA", name="counter")
async def demo_counter(ctx: HandlerContext, body: Any) -> int:
    """Counts from 1 to ``count``, one line per number, ``interval`` seconds apart.

    Body: ``{"count": 3, "interval": 0}`` (both optional; ``count`` at most 10000, ``interval``
    at most 60). The last line is ``counted to <count>``.
    """
    options = body if isinstance(body, dict) else {}
    if body is not None and not isinstance(body, dict):
        raise ValueError('body must be a JSON object like {"count": 3, "interval": 0.5}')
    count = options.get("count", 3)
    interval = options.get("interval", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 10_000:
        raise ValueError(f"count must be an integer from 0 to 10000, got {count!r}")
    if not isinstance(interval, int | float) or isinstance(interval, bool):
        raise ValueError(f"interval must be a number of seconds, got {interval!r}")
    if not 0 <= interval <= 60:
        raise ValueError(f"interval must be from 0 to 60 seconds, got {interval!r}")
    for number in range(1, count + 1):
        await ctx.write(f"{number}\n")
        if interval:
            await asyncio.sleep(interval)
    await ctx.write(f"counted to {count}\n")
    return 0
