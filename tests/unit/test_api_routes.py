from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi import HTTPException

from opsplane.api.app import create_app
from opsplane.api.deps import require_principal
from opsplane.config import load_settings

PUBLIC = {"/healthz", "/readyz"}


async def _refuse() -> None:
    raise HTTPException(status_code=401, detail="refused by the test")


async def test_every_api_route_goes_through_the_one_auth_dependency(tmp_path: Path) -> None:
    app = create_app(load_settings(data_dir=tmp_path))
    app.dependency_overrides[require_principal] = _refuse
    # No lifespan runs: the refusal must come before any engine work.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await _check_every_route(client)


async def _check_every_route(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    checked = 0
    for path, methods in paths.items():
        if path in PUBLIC:
            continue
        url = re.sub(r"\{[^}]+\}", "x", path)
        for method in methods:
            response = await client.request(method.upper(), url, json={})
            assert response.status_code == 401, f"{method.upper()} {path} skipped authentication"
            checked += 1
    assert checked >= 9
