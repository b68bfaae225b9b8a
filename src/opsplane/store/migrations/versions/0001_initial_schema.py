"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 20:40:16.577043

One schema for SQLite, MySQL/MariaDB and PostgreSQL (docs/operations.md):
- times: naive UTC DATETIME on SQLite, DATETIME(6) on MySQL (microseconds, not whole seconds),
  TIMESTAMP WITH TIME ZONE on PostgreSQL;
- free text: TEXT, MEDIUMTEXT on MySQL (its TEXT stops at 64 KiB);
- floats: double precision everywhere (MySQL's FLOAT is single precision);
- MySQL/MariaDB tables: InnoDB, utf8mb4, DYNAMIC rows, and a binary NO PAD collation so that
  keys compare as on the other two (case and trailing spaces count).
The types are spelled out here rather than imported from opsplane.store.tables, so that this
revision keeps creating the same schema whatever the code becomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[Any]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _event_id() -> sa.types.TypeEngine[Any]:
    # 64-bit on servers; SQLite autoincrements only INTEGER (which is 64-bit there anyway).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _table_options() -> dict[str, Any]:
    dialect = op.get_bind().dialect
    if dialect.name not in ("mysql", "mariadb"):
        return {}
    # The two servers name their binary NO PAD utf8mb4 collations differently.
    collation = "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
    options = {"engine": "InnoDB", "charset": "utf8mb4", "collate": collation, "row_format": "DYNAMIC"}
    # A mysql:// URL reads mysql_ options, a mariadb:// one mariadb_ options.
    return {f"{dialect.name}_{key}": value for key, value in options.items()}


def upgrade() -> None:
    options = _table_options()

    op.create_table(
        "heartbeats",
        sa.Column("id", _event_id(), autoincrement=True, nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("cpu_usage", sa.Double(), nullable=True),
        sa.Column("memory_usage", sa.Double(), nullable=True),
        sa.Column("load", sa.Double(), nullable=True),
        sa.Column("disk_usage", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_heartbeats")),
        **options,
    )
    op.create_index("ix_heartbeats_host_at", "heartbeats", ["host", "at"])

    op.create_table(
        "hosts",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("link", sa.String(length=16), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_seen_at", _time(), nullable=True),
        sa.Column("connected_at", _time(), nullable=True),
        sa.Column("cpu_usage", sa.Double(), nullable=True),
        sa.Column("memory_usage", sa.Double(), nullable=True),
        sa.Column("load", sa.Double(), nullable=True),
        sa.Column("disk_usage", sa.Double(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("os", sa.String(length=255), nullable=True),
        sa.Column("public_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_hosts")),
        **options,
    )
    op.create_index(op.f("ix_hosts_status"), "hosts", ["status"])

    op.create_table(
        "task_events",
        sa.Column("id", _event_id(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_events")),
        **options,
    )
    op.create_index(op.f("ix_task_events_task_id"), "task_events", ["task_id"])

    op.create_table(
        "tasks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", _text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("command", _text(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("timeout", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("started_at", _time(), nullable=True),
        sa.Column("finished_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_tasks_idempotency_key")),
        **options,
    )
    op.create_index(op.f("ix_tasks_created_at"), "tasks", ["created_at"])
    op.create_index(op.f("ix_tasks_name"), "tasks", ["name"])
    op.create_index(op.f("ix_tasks_status"), "tasks", ["status"])

    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("stdout", _text(), nullable=False),
        sa.Column("stderr", _text(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("error", _text(), nullable=True),
        sa.Column("dispatched_at", _time(), nullable=True),
        sa.Column("started_at", _time(), nullable=True),
        sa.Column("finished_at", _time(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("log_path", sa.String(length=1024), nullable=True),
        sa.Column("updated_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_runs_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        **options,
    )
    op.create_index("ix_runs_host_status", "runs", ["host", "status"])
    op.create_index(op.f("ix_runs_status"), "runs", ["status"])
    op.create_index(op.f("ix_runs_task_id"), "runs", ["task_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes; MySQL refuses to drop the index a foreign key uses
    # on its own, so the tables go whole, the referencing one first.
    for table in ("runs", "tasks", "task_events", "hosts", "heartbeats"):
        op.drop_table(table)
