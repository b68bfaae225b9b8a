"""task pacing: priority, policy, deadlines, stop reason, reruns; run attempts and waves

Revision ID: 0005
Revises: 0004

Existing rows get the defaults a task without a policy has: priority 0, latest attempts in wave 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("policy", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("deadline_at", _time(), nullable=True))
        batch_op.add_column(sa.Column("deliver_by", _time(), nullable=True))
        batch_op.add_column(sa.Column("stop_reason", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("rerun_of", sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f("ix_tasks_priority"), ["priority"], unique=False)
        batch_op.create_index(batch_op.f("ix_tasks_rerun_of"), ["rerun_of"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("not_before", _time(), nullable=True))
        batch_op.add_column(sa.Column("wave", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("wave")
        batch_op.drop_column("not_before")
        batch_op.drop_column("superseded")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_rerun_of"))
        batch_op.drop_index(batch_op.f("ix_tasks_priority"))
        batch_op.drop_column("rerun_of")
        batch_op.drop_column("stop_reason")
        batch_op.drop_column("deliver_by")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("policy")
        batch_op.drop_column("priority")
