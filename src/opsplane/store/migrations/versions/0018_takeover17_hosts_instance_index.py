"""takeover: index hosts by the instance holding their stream (docs/instances.md)

The monitor lease's holder lists the instances named by host rows at every renewal, and
releases a dead instance's hosts by that column: an index, not a scan of every host.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
# The lead re-chains at merge.
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_hosts_instance", "hosts", ["instance"])


def downgrade() -> None:
    op.drop_index("ix_hosts_instance", table_name="hosts")
