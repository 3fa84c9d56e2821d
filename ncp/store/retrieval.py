"""Database models of country B's retrieval jobs (``ncp.consumer.jobs``).

A job pulls one or more studies of one patient from one peer. Its row holds what a worker needs
to carry it on after any crash (the HP's signed assertions, the current image access token, the
manifests it verifies against) and what an operator or the HP reads (status, progress, history).
The instances it stored are rows of their own, so a restarted job knows what not to fetch again.

Times are naive UTC, as everywhere in the node's database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from ncp.store.models import LO, UID, Base


class RetrievalJob(Base):
    """One retrieval job (statuses: :class:`ncp.consumer.jobs.Status`)."""

    __tablename__ = "retrieval_job"
    __table_args__ = (
        # What a worker looks for: queued jobs of its lane, oldest first.
        Index(None, "status", "priority", "created_at"),
        Index(None, "hp_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    """A random UUID: what the API, the CLI and the audit records name the job by."""
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    """Why the job is in its status (failed, declined, needs-hp, a retry), for people."""
    priority: Mapped[str] = mapped_column(String(16))
    """The lane: emergency, normal or batch."""
    option: Mapped[str] = mapped_column(String(1))
    """A (A's gateway) or C (A's edge gateway)."""
    peer: Mapped[str] = mapped_column(String(2))
    patient_system: Mapped[str] = mapped_column(LO)
    patient_value: Mapped[str] = mapped_column(LO)
    """The patient by A's identifier, as the TRC names them."""
    local_patient_value: Mapped[str | None] = mapped_column(LO)
    """B's own identifier of the patient, written into the instances when reconciling."""
    hp_id: Mapped[str] = mapped_column(LO)
    hp_name: Mapped[str] = mapped_column(LO)
    hp_source: Mapped[str] = mapped_column(String(16))
    """Where the HP identity came from: ``portal`` (a logged-in HP) or ``cli`` (the
    ``[retrieval.cli_hp]`` identity of the node's configuration)."""
    request_id: Mapped[str] = mapped_column(String(128))
    """The correlation id of the job's exchange with the peer, in both countries' audit."""
    hp_assertion: Mapped[str | None] = mapped_column(Text)
    trc: Mapped[str | None] = mapped_column(Text)
    context_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    """The HP assertion and TRC the job asks A with (B signed them; at most 2 hours long), kept
    so that any worker can carry on; cleared when the job ends."""
    token: Mapped[str | None] = mapped_column(Text)
    token_base_url: Mapped[str | None] = mapped_column(String(1024))
    token_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    """The current image access token from A and the DICOMweb base it is for; cleared at the end."""
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_done: Mapped[int] = mapped_column(Integer, default=0)
    instances_rejected: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    """From A's manifests; 0 when A gives no sizes."""
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Attempts in a row that failed for a transient reason (reset by one that stored)."""
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    """A queued job waiting to retry is not claimed before this."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    """The worker running the job and when it last reported; a stale report frees the job."""
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class RetrievalJobStudy(Base):
    """A study of a job, with A's manifest once it was read."""

    __tablename__ = "retrieval_job_study"
    __table_args__ = (UniqueConstraint("job_id", "study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("retrieval_job.id"))
    study_uid: Mapped[str] = mapped_column(UID)
    position: Mapped[int] = mapped_column(Integer)
    """The order the HP asked for the studies in."""
    manifest: Mapped[str | None] = mapped_column(Text)
    """A's manifest as JSON (:func:`ncp.consumer.manifests.manifest_to_json`): what every
    instance is verified against, kept so a resumed job verifies against the same."""
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, stored or failed."""
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)


class RetrievalEvent(Base):
    """A status the job entered (its history), in order."""

    __tablename__ = "retrieval_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("retrieval_job.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))


class RetrievedInstance(Base):
    """An instance a job verified and stored (or found stored already)."""

    __tablename__ = "retrieved_instance"
    __table_args__ = (
        # Never twice in one job: a restarted job skips what is here.
        UniqueConstraint("job_id", "sop_uid"),
        Index(None, "job_id", "study_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("retrieval_job.id"))
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_uid: Mapped[str] = mapped_column(UID)
    size: Mapped[int] = mapped_column(BigInteger)
    """Bytes as A sent them (before any reconciliation)."""
    received_at: Mapped[datetime | None] = mapped_column(DateTime)
    """When its download ended (None: found in the store already)."""
    stored_at: Mapped[datetime] = mapped_column(DateTime)
    downloaded: Mapped[bool] = mapped_column(Boolean, default=True)
    """False when the store held it already (an earlier job, or a crash before the record)."""


class RetrievalProblem(Base):
    """An instance rejected by verification, or missing: which and why."""

    __tablename__ = "retrieval_problem"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("retrieval_job.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String(16))
    """extra, missing, different or unreadable (:class:`ncp.consumer.verify.ProblemKind`)."""
    study_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str | None] = mapped_column(UID)
    sop_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[str] = mapped_column(Text)


class StoredStudy(Base):
    """A study in B's local store, for retention: when it was stored, when it will be purged."""

    __tablename__ = "stored_study"

    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    peer: Mapped[str] = mapped_column(String(2))
    patient_system: Mapped[str] = mapped_column(LO)
    patient_value: Mapped[str] = mapped_column(LO)
    store_kind: Mapped[str] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    stored_at: Mapped[datetime] = mapped_column(DateTime)
    purge_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    """None: kept until removed by hand (retention 0)."""
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)
