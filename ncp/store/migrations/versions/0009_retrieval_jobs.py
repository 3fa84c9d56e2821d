"""country B's retrieval jobs: jobs, their studies, history, stored instances, problems, and
the stored studies retention purges

Revision ID: retrieval_jobs
Revises: viewer_session
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "retrieval_jobs"
down_revision = "viewer_session"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrieval_job",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("option", sa.String(length=1), nullable=False),
        sa.Column("peer", sa.String(length=2), nullable=False),
        sa.Column("patient_system", sa.String(length=256), nullable=False),
        sa.Column("patient_value", sa.String(length=256), nullable=False),
        sa.Column("local_patient_value", sa.String(length=256), nullable=True),
        sa.Column("hp_id", sa.String(length=256), nullable=False),
        sa.Column("hp_name", sa.String(length=256), nullable=False),
        sa.Column("hp_source", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("hp_assertion", sa.Text(), nullable=True),
        sa.Column("trc", sa.Text(), nullable=True),
        sa.Column("context_expires_at", sa.DateTime(), nullable=True),
        sa.Column("token", sa.Text(), nullable=True),
        sa.Column("token_base_url", sa.String(length=1024), nullable=True),
        sa.Column("token_expires_at", sa.DateTime(), nullable=True),
        sa.Column("instances_total", sa.Integer(), nullable=False),
        sa.Column("instances_done", sa.Integer(), nullable=False),
        sa.Column("instances_rejected", sa.Integer(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_job")),
    )
    op.create_index(
        op.f("ix_retrieval_job_hp_id_created_at"),
        "retrieval_job",
        ["hp_id", "created_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_retrieval_job_status_priority_created_at"),
        "retrieval_job",
        ["status", "priority", "created_at"],
        unique=False,
    )
    op.create_table(
        "stored_study",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("peer", sa.String(length=2), nullable=False),
        sa.Column("patient_system", sa.String(length=256), nullable=False),
        sa.Column("patient_value", sa.String(length=256), nullable=False),
        sa.Column("store_kind", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", sa.DateTime(), nullable=False),
        sa.Column("purge_at", sa.DateTime(), nullable=True),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_stored_study")),
    )
    op.create_index(op.f("ix_stored_study_purge_at"), "stored_study", ["purge_at"], unique=False)
    op.create_table(
        "retrieval_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["retrieval_job.id"], name=op.f("fk_retrieval_event_job_id_retrieval_job")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_event")),
    )
    op.create_index(op.f("ix_retrieval_event_job_id"), "retrieval_event", ["job_id"], unique=False)
    op.create_table(
        "retrieval_job_study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("instances_total", sa.Integer(), nullable=False),
        sa.Column("instances_done", sa.Integer(), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["retrieval_job.id"],
            name=op.f("fk_retrieval_job_study_job_id_retrieval_job"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_job_study")),
        sa.UniqueConstraint(
            "job_id", "study_uid", name=op.f("uq_retrieval_job_study_job_id_study_uid")
        ),
    )
    op.create_table(
        "retrieval_problem",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["retrieval_job.id"], name=op.f("fk_retrieval_problem_job_id_retrieval_job")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_problem")),
    )
    op.create_index(
        op.f("ix_retrieval_problem_job_id"), "retrieval_problem", ["job_id"], unique=False
    )
    op.create_table(
        "retrieved_instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=True),
        sa.Column("stored_at", sa.DateTime(), nullable=False),
        sa.Column("downloaded", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["retrieval_job.id"],
            name=op.f("fk_retrieved_instance_job_id_retrieval_job"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieved_instance")),
        sa.UniqueConstraint("job_id", "sop_uid", name=op.f("uq_retrieved_instance_job_id_sop_uid")),
    )
    op.create_index(
        op.f("ix_retrieved_instance_job_id_study_uid"),
        "retrieved_instance",
        ["job_id", "study_uid"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_retrieved_instance_job_id_study_uid"), table_name="retrieved_instance")
    op.drop_table("retrieved_instance")
    op.drop_index(op.f("ix_retrieval_problem_job_id"), table_name="retrieval_problem")
    op.drop_table("retrieval_problem")
    op.drop_table("retrieval_job_study")
    op.drop_index(op.f("ix_retrieval_event_job_id"), table_name="retrieval_event")
    op.drop_table("retrieval_event")
    op.drop_index(op.f("ix_stored_study_purge_at"), table_name="stored_study")
    op.drop_table("stored_study")
    op.drop_index(op.f("ix_retrieval_job_status_priority_created_at"), table_name="retrieval_job")
    op.drop_index(op.f("ix_retrieval_job_hp_id_created_at"), table_name="retrieval_job")
    op.drop_table("retrieval_job")
