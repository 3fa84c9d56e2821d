"""audit records by actor: the portal's view of an HP's own requests, newest first

Revision ID: audit_actor
Revises: portal
"""

from __future__ import annotations

from alembic import op

revision = "audit_actor"
down_revision = "portal"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_audit_record_actor_id_seq"), "audit_record", ["actor_id", "seq"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_record_actor_id_seq"), table_name="audit_record")
