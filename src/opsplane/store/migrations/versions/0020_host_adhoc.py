"""hosts.adhoc: an SSH target that only a seed-000 request brought, not an inventory host

Revision ID: 0020
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Hosts that exist already are the operators' (or agents'): not ad hoc. Seed-000 targets
    # registered before this revision stay selectable by `all` until they are sent again.
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("adhoc", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("adhoc")
