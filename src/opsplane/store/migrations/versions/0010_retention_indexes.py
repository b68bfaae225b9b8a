"""retention: indexes for the monitor's silence check and the event retention

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_hosts_status_last_seen_at", "hosts", ["status", "last_seen_at"])
    op.create_index("ix_task_events_created_at", "task_events", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_task_events_created_at", table_name="task_events")
    op.drop_index("ix_hosts_status_last_seen_at", table_name="hosts")
