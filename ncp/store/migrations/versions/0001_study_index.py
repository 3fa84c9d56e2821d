"""study index

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=False),
        sa.Column("issuer", sa.String(length=256), nullable=False),
        sa.Column("family_name", sa.String(length=256), nullable=True),
        sa.Column("given_name", sa.String(length=256), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("sex", sa.String(length=16), nullable=True),
        sa.Column("header_sop_uid", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient")),
        sa.UniqueConstraint("patient_id", "issuer", name=op.f("uq_patient_patient_id_issuer")),
    )
    op.create_table(
        "source_object",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("locator", sa.String(length=1024), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=True),
        sa.Column("skipped_reason", sa.Text(), nullable=True),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_object")),
        sa.UniqueConstraint("source", "locator", name=op.f("uq_source_object_source_locator")),
    )
    with op.batch_alter_table("source_object", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_source_object_sop_uid"), ["sop_uid"], unique=False)

    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_pk", sa.Integer(), nullable=False),
        sa.Column("accession_number", sa.String(length=256), nullable=True),
        sa.Column("accession_issuer", sa.String(length=256), nullable=True),
        sa.Column("study_id", sa.String(length=256), nullable=True),
        sa.Column("started", sa.DateTime(), nullable=True),
        sa.Column("description", sa.String(length=256), nullable=True),
        sa.Column("procedure_scheme", sa.String(length=256), nullable=True),
        sa.Column("procedure_code", sa.String(length=256), nullable=True),
        sa.Column("procedure_meaning", sa.String(length=256), nullable=True),
        sa.Column("requesting_service", sa.String(length=256), nullable=True),
        sa.Column("requesting_scheme", sa.String(length=256), nullable=True),
        sa.Column("requesting_code", sa.String(length=256), nullable=True),
        sa.Column("requesting_meaning", sa.String(length=256), nullable=True),
        sa.Column("referring_physician", sa.String(length=256), nullable=True),
        sa.Column("referring_organization", sa.String(length=256), nullable=True),
        sa.Column("institution_name", sa.String(length=256), nullable=True),
        sa.Column("modalities", sa.String(length=256), nullable=False),
        sa.Column("body_parts", sa.String(length=256), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("header_sop_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patient.id"], name=op.f("fk_study_patient_pk_patient")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_study_study_uid")),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_study_patient_pk_started"), ["patient_pk", "started"], unique=False
        )

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("description", sa.String(length=256), nullable=True),
        sa.Column("body_part", sa.String(length=256), nullable=True),
        sa.Column("laterality", sa.String(length=16), nullable=True),
        sa.Column("started", sa.DateTime(), nullable=True),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("header_sop_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["study_pk"], ["study.id"], name=op.f("fk_series_study_pk_study")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_uid", name=op.f("uq_series_series_uid")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_pk"), ["study_pk"], unique=False)

    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("locator", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"], ["series.id"], name=op.f("fk_instance_series_pk_series")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_instance_sop_uid")),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_series_pk"), ["series_pk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_series_pk"))

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_pk"))

    op.drop_table("series")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_patient_pk_started"))
        batch_op.drop_index(batch_op.f("ix_study_accession_number"))

    op.drop_table("study")
    with op.batch_alter_table("source_object", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_source_object_sop_uid"))

    op.drop_table("source_object")
    op.drop_table("patient")
