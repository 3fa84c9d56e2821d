"""the order's priority of a report version: urgent reports are flagged in the list

Revision ID: report_priority
Revises: audit_actor

Versions stored before keep no priority (NULL): their list entries carry no urgency tag, as
before; a report ingested again (a new version) gets it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "report_priority"
down_revision = "audit_actor"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("report_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("report_version", schema=None) as batch_op:
        batch_op.drop_column("priority")
