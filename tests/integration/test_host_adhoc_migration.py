"""Migration 0011 on every database: seed-000 targets registered before it become ad hoc;
hosts an operator made or changed stay inventory hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, text

from opsplane.store.database import create_engine
from opsplane.store.migrate import alembic_config, upgrade_to_head
from tests.integration.databases import backend_params, throwaway_database

SEED000 = {"registered_by": "seed000-api"}


def _to(revision: str) -> Any:
    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    return upgrade


@pytest.mark.parametrize("backend", backend_params())
async def test_seed_000_targets_from_before_are_flagged_adhoc(backend: str, tmp_path: Path) -> None:
    hosts = {
        "ops@10.0.0.9:22": (["adhoc"], SEED000),  # as a seed-000 request made it
        "ops@10.0.0.8:22": (["web"], SEED000),  # an operator gave it a group since
        "web-1": (["adhoc"], {}),  # an operator's host in a group called adhoc
    }
    async with throwaway_database(backend, tmp_path) as url:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(_to("0010"))
            async with engine.begin() as connection:
                for name, (groups, labels) in hosts.items():
                    await connection.execute(
                        text(
                            "INSERT INTO hosts (name, link, `groups`, labels, status, created_at) "
                            "VALUES (:name, 'ssh', :groups, :labels, 'online', CURRENT_TIMESTAMP)"
                            if backend == "mariadb"
                            else "INSERT INTO hosts (name, link, groups, labels, status, "
                            "created_at) VALUES (:name, 'ssh', :groups, :labels, 'online', "
                            "CURRENT_TIMESTAMP)"
                        ),
                        {"name": name, "groups": json.dumps(groups), "labels": json.dumps(labels)},
                    )
            await upgrade_to_head(engine)
            async with engine.connect() as connection:
                rows = await connection.execute(text("SELECT name, adhoc FROM hosts"))
                flags = {name: bool(adhoc) for name, adhoc in rows}
        finally:
            await engine.dispose()
    assert flags == {"ops@10.0.0.9:22": True, "ops@10.0.0.8:22": False, "web-1": False}
