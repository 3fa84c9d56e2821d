"""sessions of the option B viewer, shared by every replica of the node

Revision ID: viewer_session
Revises: kotitle
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "viewer_session"
down_revision = "kotitle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "viewer_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("requesting_country", sa.String(length=2), nullable=False),
        sa.Column("patient_system", sa.String(length=256), nullable=False),
        sa.Column("patient_value", sa.String(length=256), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("studies", sa.JSON(), nullable=False),
        sa.Column("launch_jti", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_viewer_session")),
    )
    with op.batch_alter_table("viewer_session", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_viewer_session_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("viewer_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_viewer_session_expires_at"))
    op.drop_table("viewer_session")
