"""Guessing passwords through the API: after a few failures the name and the address are held,
attempts are answered 429 with Retry-After at once (the password is not even checked), the
rest of the API keeps answering, and /metrics counts it all (issue 14 item 6)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.auth import ADMIN_HEADERS
from tests.integration.apps import admin_api


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_repeated_failed_logins_are_held_and_counted(tmp_path: Path) -> None:
    async with admin_api(tmp_path) as (_app, client):
        user = {"name": "carol", "role": "viewer", "all_groups": True, "password": "right one"}
        assert (
            await client.post("/api/v1/users", json=user, headers=ADMIN_HEADERS)
        ).status_code == 201
        statuses = []
        for attempt in range(6):
            answer = await client.post(
                "/api/v1/auth/login", json={"name": "carol", "password": f"guess {attempt}"}
            )
            statuses.append(answer.status_code)
        # Two free failures, the third holds the name and the address for 0.5 s: the next
        # guesses arrive within it and are refused unchecked.
        assert statuses[:3] == [401, 401, 401] and set(statuses[3:]) == {429}, statuses
        held = await client.post(
            "/api/v1/auth/login", json={"name": "carol", "password": "right one"}
        )
        assert held.status_code == 429 and int(held.headers["retry-after"]) >= 1
        # Nothing waits on the server meanwhile: the rest of the API answers.
        assert (await client.get("/healthz")).status_code == 200
        await asyncio.sleep(0.6)
        opened = await client.post(
            "/api/v1/auth/login", json={"name": "carol", "password": "right one"}
        )
        assert opened.status_code == 200, opened.text
        metrics = (await client.get("/metrics")).text
    assert _metric(metrics, "opsplane_login_failures_total") == 3
    assert _metric(metrics, "opsplane_login_throttled_total") == 4
    assert _metric(metrics, "opsplane_login_delay_seconds_total") == 0.5
