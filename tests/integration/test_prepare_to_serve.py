"""What the control plane does once before it serves, so that serving never pays for it
(docs/reliability.md, scenario 8): FastAPI's routing built, the start-up heap frozen."""

from __future__ import annotations

import gc
from pathlib import Path

import httpx
from fastapi import FastAPI

from opsplane.app_factory import create_app, warm_up
from opsplane.cli.processes import prepare_to_serve
from opsplane.config import load_settings
from tests.e2e.fleet import free_port

# A first request matched against routing that was not built yet makes some 8,000 objects
# (the routes' dependencies and validators); against built routing, a few dozen.
BUILT_ROUTING_MAKES_FEWER_THAN = 500


def _app(tmp_path: Path) -> FastAPI:
    return create_app(load_settings(data_dir=tmp_path, grpc_listen=f"127.0.0.1:{free_port()}"))


async def _objects_made_by_a_request(app: FastAPI, path: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        gc.disable()  # a collection in between would hide what the request made
        try:
            before = len(gc.get_objects())
            # Past every router: matched against all of them before the static files.
            response = await client.get(path)
            made = len(gc.get_objects()) - before
        finally:
            gc.enable()
    assert response.status_code == 404
    return made


async def test_warm_up_builds_the_routing_before_the_first_request(tmp_path: Path) -> None:
    app = _app(tmp_path)
    await warm_up(app)
    made = await _objects_made_by_a_request(app, "/static/no-such-file")
    assert made < BUILT_ROUTING_MAKES_FEWER_THAN


async def test_without_warm_up_the_first_request_builds_the_routing(tmp_path: Path) -> None:
    # The other side of the test above: what it counts is what warm_up saves.
    made = await _objects_made_by_a_request(_app(tmp_path), "/static/no-such-file")
    assert made > BUILT_ROUTING_MAKES_FEWER_THAN


async def test_prepare_to_serve_takes_the_start_up_heap_out_of_collections(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    try:
        await prepare_to_serve(app)
        frozen = gc.get_freeze_count()
        # What a full collection walks now: what was made since, not the start-up heap.
        walked = len(gc.get_objects())
        assert frozen > 100_000, frozen
        assert walked < frozen // 20, (walked, frozen)
    finally:
        gc.unfreeze()
