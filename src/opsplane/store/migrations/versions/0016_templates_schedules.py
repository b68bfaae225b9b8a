"""job templates and schedules (issue 20): templates, template_versions, template_grants,
schedules, schedule_fires; tasks.template and tasks.template_version

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0016"
# 0014 and 0015 are other branches'; the lead re-chains at merge.
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[Any]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _table_options() -> dict[str, Any]:
    dialect = op.get_bind().dialect
    if dialect.name not in ("mysql", "mariadb"):
        return {}
    collation = "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
    options = {"engine": "InnoDB", "charset": "utf8mb4", "collate": collation, "row_format": "DYNAMIC"}
    return {f"{dialect.name}_{key}": value for key, value in options.items()}


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_templates")),
        **_table_options(),
    )
    op.create_table(
        "template_versions",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_template_versions")),
        **_table_options(),
    )
    op.create_table(
        "template_grants",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("group_name", sa.String(length=255), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_template_grants_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_grants")),
        sa.UniqueConstraint(
            "user_id", "template", "group_name", name="uq_template_grants_user_template"
        ),
        **_table_options(),
    )
    op.create_index(op.f("ix_template_grants_template"), "template_grants", ["template"])
    op.create_index(op.f("ix_template_grants_user_id"), "template_grants", ["user_id"])
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("template", sa.String(length=128), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("secret_params", sa.JSON(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=True),
        sa.Column("cron", sa.String(length=255), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("misfire", sa.String(length=16), nullable=False),
        sa.Column("misfire_window", sa.Integer(), nullable=False),
        sa.Column("overlap", sa.String(length=16), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_due", _time(), nullable=True),
        sa.Column("last_task_id", sa.String(length=36), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        **_table_options(),
    )
    op.create_index("ix_schedules_paused_next_due", "schedules", ["paused", "next_due"])
    op.create_index(op.f("ix_schedules_template"), "schedules", ["template"])
    op.create_table(
        "schedule_fires",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("schedule_id", sa.String(length=36), nullable=False),
        sa.Column("due_at", _time(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=True),
        sa.Column("detail", _text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["schedules.id"],
            name=op.f("fk_schedule_fires_schedule_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_fires")),
        # Two control planes never both fire one due time of one schedule.
        sa.UniqueConstraint("schedule_id", "due_at", name="uq_schedule_fires_schedule_id_due_at"),
        **_table_options(),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_tasks_template"), ["template"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_template"))
        batch_op.drop_column("template_version")
        batch_op.drop_column("template")
    op.drop_table("schedule_fires")
    op.drop_index(op.f("ix_schedules_template"), table_name="schedules")
    op.drop_index("ix_schedules_paused_next_due", table_name="schedules")
    op.drop_table("schedules")
    op.drop_index(op.f("ix_template_grants_user_id"), table_name="template_grants")
    op.drop_index(op.f("ix_template_grants_template"), table_name="template_grants")
    op.drop_table("template_grants")
    op.drop_table("template_versions")
    op.drop_table("templates")
