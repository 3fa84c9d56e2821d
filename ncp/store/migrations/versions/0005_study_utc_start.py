"""the study's start in UTC, for sorting studies and reports together by date

Revision ID: 0005
Revises: 0004

Existing rows keep ``started_utc`` and ``utc_zone`` NULL: the migration cannot know the node's
zone. The search computes the UTC start of such rows itself until the next index run fills them
(:func:`ncp.provider.indexer.fill_study_instants`), so no sort is ever made on a missing value.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("started_utc", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("utc_zone", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_study_patient_pk_started_utc"),
            ["patient_pk", "started_utc"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_patient_pk_started_utc"))
        batch_op.drop_column("utc_zone")
        batch_op.drop_column("started_utc")
