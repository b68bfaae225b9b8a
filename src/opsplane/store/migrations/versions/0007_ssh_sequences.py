"""seed-000 command sequences survive a restart: ssh_sequences

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0007"
down_revision: str | None = "0006"
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
        "ssh_sequences",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("key_base", sa.String(length=255), nullable=False),
        sa.Column("commands", sa.JSON(), nullable=False),
        sa.Column("hosts", sa.JSON(), nullable=False),
        sa.Column("timeout", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("needs_secrets", sa.Boolean(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("error", _text(), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ssh_sequences")),
        **_table_options(),
    )
    op.create_index(op.f("ix_ssh_sequences_done"), "ssh_sequences", ["done"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ssh_sequences_done"), table_name="ssh_sequences")
    op.drop_table("ssh_sequences")
