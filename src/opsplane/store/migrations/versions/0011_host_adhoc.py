"""hosts.adhoc: an SSH target that only a seed-000 request brought, not an inventory host

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_hosts = sa.table(
    "hosts",
    sa.column("name", sa.String(255)),
    sa.column("link", sa.String(16)),
    sa.column("groups", sa.JSON()),
    sa.column("labels", sa.JSON()),
    sa.column("adhoc", sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("adhoc", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Seed-000 targets registered before this revision: exactly what engine/sshapi.py gave
    # them (SSH, group adhoc only, label registered_by=seed000-api). Anything an operator
    # changed since stays an inventory host.
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_hosts.c.name, _hosts.c.groups, _hosts.c.labels).where(_hosts.c.link == "ssh")
    )
    names = [
        name
        for name, groups, labels in rows
        if groups == ["adhoc"] and labels == {"registered_by": "seed000-api"}
    ]
    if names:
        bind.execute(sa.update(_hosts).where(_hosts.c.name.in_(names)).values(adhoc=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("adhoc")
