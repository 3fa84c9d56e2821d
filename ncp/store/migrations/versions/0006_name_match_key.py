"""the folded family name that Patient/$match compares, on every database alike

Revision ID: name_key
Revises: 0005

``patient.family_key`` holds the family name case folded and canonically decomposed (Unicode's
canonical caseless match), computed by the node rather than by the database: SQLite's
``lower()`` folds ASCII only and PostgreSQL's depends on the cluster's locale, so "Żak" was
never found by demographics. Existing rows are filled here; the indexer writes the key with the
name from now on.
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "name_key"
down_revision = "0005"
branch_labels = None
depends_on = None

_BATCH = 1000


def _key(text: str | None) -> str | None:
    # Written out rather than imported (ncp.store.models.name_key): a migration must not change
    # when the code does.
    if text is None or not text.strip():
        return None
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", text.strip()).casefold())


def upgrade() -> None:
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.add_column(sa.Column("family_key", sa.String(length=256), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_patient_birth_date_family_key"),
            ["birth_date", "family_key"],
            unique=False,
        )
    patient = sa.table(
        "patient",
        sa.column("id", sa.Integer),
        sa.column("family_name", sa.String),
        sa.column("family_key", sa.String),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(patient.c.id, patient.c.family_name).where(patient.c.family_name.is_not(None))
    ).all()
    update = (
        sa.update(patient)
        .where(patient.c.id == sa.bindparam("row_id"))
        .values(family_key=sa.bindparam("key"))
    )
    for start in range(0, len(rows), _BATCH):
        batch = [{"row_id": i, "key": _key(name)} for i, name in rows[start : start + _BATCH]]
        bind.execute(update, batch)


def downgrade() -> None:
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patient_birth_date_family_key"))
        batch_op.drop_column("family_key")
