"""enrollment tokens bound to a host name

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The one name an agent enrolled with this token may take (None: any free name).
    op.add_column("enrollment_tokens", sa.Column("name", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("enrollment_tokens", "name")
