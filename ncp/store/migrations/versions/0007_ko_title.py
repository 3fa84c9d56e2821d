"""the title of Key Object Selection documents, for the IHE MADO manifest

Revision ID: kotitle
Revises: name_key

Instances indexed before keep NULL titles until the indexer reads them again; IHE MADO's
``ko-document-title`` is optional, so a manifest without it is still valid.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "kotitle"
down_revision = "name_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("title_scheme", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("title_code", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("title_meaning", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("title_meaning")
        batch_op.drop_column("title_code")
        batch_op.drop_column("title_scheme")
