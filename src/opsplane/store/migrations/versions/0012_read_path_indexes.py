"""read paths: indexes for the keyset pages of hosts, tasks and runs

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A task's runs by host and attempt; a host's runs newest first; hosts of one status by
    # name; tasks of one status newest first.
    op.create_index("ix_runs_task_id_host_attempt", "runs", ["task_id", "host", "attempt"])
    op.create_index("ix_runs_host_id", "runs", ["host", "id"])
    op.create_index("ix_hosts_status_name", "hosts", ["status", "name"])
    op.create_index("ix_tasks_status_created_at", "tasks", ["status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_created_at", table_name="tasks")
    op.drop_index("ix_hosts_status_name", table_name="hosts")
    op.drop_index("ix_runs_host_id", table_name="runs")
    op.drop_index("ix_runs_task_id_host_attempt", table_name="runs")
