"""The fleet stream carries deltas: a client that reconnects with the id of the last event it
got receives only the hosts changed meanwhile (and the names of those removed), not the fleet;
a point the server cannot resume from gets a ``reset`` (reload the list)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from opsplane.app_factory import create_app
from opsplane.config import load_settings
from opsplane.engine.core import Engine
from opsplane.engine.hub import HostChangeLog
from opsplane.transport.base import AgentHello
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.e2e.fleet import free_port, serving

Event = tuple[str, str, str]  # (event, id, data)


async def until_summary(
    client: httpx.AsyncClient, headers: dict[str, str], **params: Any
) -> list[Event]:
    """The stream's events up to and including its first ``summary`` (bounded in time)."""
    events: list[Event] = []
    kind, ident, data = "", "", ""
    async with asyncio.timeout(15):
        async with client.stream(
            "GET", "/api/v1/fleet/events", headers=headers, params=params
        ) as answer:
            assert answer.status_code == 200
            async for line in answer.aiter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("id:"):
                    ident = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = line.split(":", 1)[1].strip()
                elif not line and kind:
                    events.append((kind, ident, data))
                    if kind == "summary":
                        return events
                    kind, ident, data = "", "", ""
    raise AssertionError("the stream ended before a summary")


async def test_a_reconnecting_client_gets_only_the_hosts_changed_meanwhile(tmp_path: Path) -> None:
    port = free_port()
    app = create_app(
        load_settings(
            data_dir=tmp_path,
            grpc_listen=f"127.0.0.1:{free_port()}",
            bootstrap_admin_token=ADMIN_TOKEN,
        )
    )
    async with serving(app, port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        engine: Engine = app.state.engine
        for n in range(1, 6):
            await engine.host_connected(
                AgentHello(hostname=f"web-{n}", link="grpc", groups=("web",))
            )
        await engine.hosts.host_disconnected("web-2", "grpc")

        first = await until_summary(client, ADMIN_HEADERS)
        # A fresh stream: no hosts, just where it stands.
        assert [kind for kind, _, _ in first] == ["summary"]
        point = first[-1][1]
        assert point

        await engine.host_connected(AgentHello(hostname="db-1", link="grpc", groups=("db",)))
        await engine.hosts.host_disconnected("web-1", "grpc")
        await engine.hosts.remove_host("web-2")

        resumed = await until_summary(client, {**ADMIN_HEADERS, "Last-Event-ID": point})
        hosts = {
            kind_data[2].split('"name":"')[1].split('"')[0]
            for kind_data in resumed
            if kind_data[0] == "host"
        }
        assert hosts == {"db-1", "web-1"}, resumed
        assert [data for kind, _, data in resumed if kind == "gone"] == ['{"name": "web-2"}']
        assert '"offline": 1' in resumed[-1][2] and resumed[-1][1] != point

        # The same through the query (a stream opened anew), from the newer point: nothing.
        again = await until_summary(client, ADMIN_HEADERS, since=resumed[-1][1])
        assert [kind for kind, _, _ in again] == ["summary"]

        # A point of another process (the server restarted) cannot be resumed: reload.
        foreign = await until_summary(client, ADMIN_HEADERS, since="0000.3")
        assert [kind for kind, _, _ in foreign] == ["reset", "summary"]


def test_the_change_log_keeps_one_entry_per_host_and_refuses_points_it_lost() -> None:
    log = HostChangeLog(size=3)
    start = log.point()
    log.record({"a", "b"})
    middle = log.point()
    log.record({"a"})
    log.record({"c"})
    assert log.since(start) == {"a", "b", "c"}
    assert log.since(middle) == {"a", "c"}
    assert log.since(log.point()) == set()
    log.record({"d"})  # four hosts in a log of three: the oldest (b) goes
    assert log.since(start) is None
    assert log.since(middle) == {"a", "c", "d"}
    for bad in ("", "x", f"{log.epoch}.", f"{log.epoch}.99", f"{log.epoch}.-1", "other.1"):
        assert log.since(bad) is None, bad
