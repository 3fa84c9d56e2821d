"""Database models of the audit trail: one row per step of an exchange, chained by hashes.

Every step on both sides of an exchange (design.md section 3, step 10) leaves an
:class:`AuditRecord`. The records form a hash chain (:mod:`ncp.audit.chain`): each carries the
hash of the one before it, and :class:`AuditChainHead` holds the last sequence number and hash,
so that removing the newest records is detected as well as editing or removing any other.

This table is the one place where patient identifiers are kept outside the clinical data: the
application logs never carry them (see :mod:`ncp.audit.record`).

Times are naive UTC, as everywhere in the node's database.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ncp.store.models import LO, Base

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record: there is nothing before it."""

CHAIN_HEAD_ID = 1
"""The primary key of the one row of :class:`AuditChainHead`."""


class Side(enum.StrEnum):
    """Which part of the node recorded the step."""

    PROVIDER = "provider"
    """Country A's standard channel: identification, list, reports, tokens."""
    CONSUMER = "consumer"
    """Country B: the portal, the peer client and the retriever."""
    GATEWAY = "gateway"
    """Country A's option A DICOMweb gateway at NCPeH-A."""
    EDGE = "edge"
    """Country A's option C edge gateway in front of the national archive."""
    VIEWER = "viewer"
    """Country A's option B server-side viewer."""


class Action(enum.StrEnum):
    """The steps of the use case (design.md section 3) that leave an audit record."""

    HP_LOGIN = "hp-login"
    """B authenticated a health professional and signed the HP identity assertion (or refused a
    login step: a wrong password or code, a lock-out)."""
    HP_LOGOUT = "hp-logout"
    """A health professional's session at B's portal ended: logout, idle timeout or end of life."""
    PATIENT_IDENTIFY = "patient-identify"
    """B asked A to identify a patient; A confirmed, found no match, or found several."""
    TRC_CONFIRM = "trc-confirm"
    """B signed a treatment relationship confirmation; A checked one."""
    LIST_QUERY = "list-query"
    """The metadata list: a search for a patient's studies and reports."""
    REPORT_READ = "report-read"
    """An imaging report bundle was read (the latest version, or its history)."""
    ACCESS_TOKEN_ISSUE = "access-token-issue"
    """A issued an image access token (options A and C) or viewer launch code (option B)."""
    ACCESS_TOKEN_RENEW = "access-token-renew"
    """A renewed an image access token while the confirmation was valid."""
    IMAGE_TRANSFER_BEGIN = "image-transfer-begin"
    """A's gateway is about to send the first byte of a transfer (DICOM "Begin Transferring
    DICOM Instances"): written before it, so that a transfer cut short by a crash of the
    gateway still leaves a trace; its ``image-retrieve`` record says how it ended."""
    IMAGE_RETRIEVE = "image-retrieve"
    """Images moved over the imaging channel: served by A's gateway, pulled by B's retriever."""
    IMAGE_STORE = "image-store"
    """B's retriever verified the pulled instances against the manifest and stored them."""
    RETRIEVAL_JOB = "retrieval-job"
    """A retrieval job on B changed status in a way that matters (created, declined, failed,
    cancelled, waiting for the HP again, stored)."""
    IMAGE_PURGE = "image-purge"
    """B's retention removed a retrieved study from its local store."""
    VIEWER_LAUNCH = "viewer-launch"
    """A one-time viewer code was exchanged for a session in A's viewer (option B)."""
    VIEWER_SESSION = "viewer-session"
    """A viewer session at A ended (its expiry passed); what it viewed is on its image-view
    records."""
    IMAGE_VIEW = "image-view"
    """A study was viewed in a viewer (A's option B, B's local viewer): opened, then the frames
    rendered counted in one record when the viewing ends, not one record per frame."""
    INGEST = "ingest"
    """A national system submitted an imaging report to A's report store."""
    REFUSAL = "refusal"
    """A request refused before its step could be told (untrusted peer, invalid assertion)."""


class Outcome(enum.IntEnum):
    """The outcome of a step, with the codes of FHIR R4 ``AuditEvent.outcome`` (and ATNA's
    EventOutcomeIndicator)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    """The step failed but the request could go on (e.g. no match found)."""
    SERIOUS_FAILURE = 8
    """The step failed and the request ended (refused, upstream unavailable)."""
    MAJOR_FAILURE = 12
    """The node itself failed (unexpected error)."""

    @property
    def label(self) -> str:
        """``success``, ``minor-failure``, ``serious-failure`` or ``major-failure``."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, value: Outcome | int | str) -> Outcome:
        """From the enum, its code (``8`` or ``"8"``) or its label (``"serious-failure"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        text = value.strip()
        if text.isdigit():
            return cls(int(text))
        for member in cls:
            if member.label == text:
                return member
        raise ValueError(f"unknown outcome {value!r}: use one of {[m.label for m in cls]}")


class Purpose(enum.StrEnum):
    """Purpose of use, as HL7 v3 ActReason codes (ValueSet purpose-of-use)."""

    TREAT = "TREAT"
    ETREAT = "ETREAT"


class Priority(enum.StrEnum):
    """How urgently the images are needed (http://hl7.org/fhir/request-priority)."""

    ROUTINE = "routine"
    URGENT = "urgent"
    ASAP = "asap"
    STAT = "stat"


class AccessOption(enum.StrEnum):
    """The image access options of the imaging guideline."""

    A = "A"
    """Streamed through NCPeH-A's gateway."""
    B = "B"
    """Viewed in country A's server-side viewer."""
    C = "C"
    """Streamed from A's edge gateway at the national archive."""


class AuditRecord(Base):
    """One step of an exchange, as it was recorded. Never updated, never deleted."""

    __tablename__ = "audit_record"
    __table_args__ = (
        Index(None, "request_id"),
        Index(None, "recorded"),
        Index(None, "patient_id", "patient_issuer"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    """Position in the chain: 1, 2, 3, ... without gaps."""
    recorded: Mapped[datetime] = mapped_column(DateTime)
    """When the record was written (UTC); never decreases along the chain."""
    request_id: Mapped[str] = mapped_column(String(128))
    """The correlation id of the exchange, the same on every step and on both sides."""
    node_country: Mapped[str] = mapped_column(String(2))
    """The country of the node that wrote the record."""
    side: Mapped[str] = mapped_column(String(16))
    """:class:`Side`."""
    action: Mapped[str] = mapped_column(String(32))
    """:class:`Action`."""
    outcome: Mapped[int] = mapped_column(Integer)
    """:class:`Outcome` code: 0, 4, 8 or 12."""
    reason: Mapped[str | None] = mapped_column(Text)
    """Why the step failed or was refused (or a note on success)."""
    interaction: Mapped[str | None] = mapped_column(String(32))
    """The FHIR interaction (``read``, ``search-type``, ``operation``...) where it differs from
    the step's usual one."""

    actor_id: Mapped[str | None] = mapped_column(LO)
    """The health professional's identifier, as the HP identity assertion names it."""
    actor_name: Mapped[str | None] = mapped_column(LO)
    actor_role: Mapped[str | None] = mapped_column(LO)
    actor_organisation: Mapped[str | None] = mapped_column(LO)
    actor_organisation_id: Mapped[str | None] = mapped_column(LO)
    actor_point_of_care: Mapped[str | None] = mapped_column(LO)
    actor_country: Mapped[str | None] = mapped_column(String(2))
    peer_country: Mapped[str | None] = mapped_column(String(2))
    """The other country of the exchange (B's on the provider side, A's on the consumer side)."""

    patient_id: Mapped[str | None] = mapped_column(LO)
    patient_issuer: Mapped[str | None] = mapped_column(LO)

    purpose: Mapped[str | None] = mapped_column(String(16))
    """:class:`Purpose`."""
    priority: Mapped[str | None] = mapped_column(String(16))
    """:class:`Priority`."""
    option: Mapped[str | None] = mapped_column(String(1))
    """:class:`AccessOption`."""
    studies: Mapped[list[str]] = mapped_column(JSON)
    """Study Instance UIDs concerned, in the order given."""
    num_instances: Mapped[int | None] = mapped_column(BigInteger)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    token_jti: Mapped[str | None] = mapped_column(LO)
    """The ``jti`` of the access token or assertion the step was authorised by."""
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    """How long the step took, from receiving the request to answering it."""
    query: Mapped[str | None] = mapped_column(Text)
    """The query as received, for searches (FHIR search or DICOMweb QIDO-RS)."""
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Anything else worth keeping, as a JSON object."""

    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The one row that names the newest record of the chain.

    Appending locks this row, so writers on several replicas take turns; and verification
    compares it with the newest record, so that deleting the newest records is detected too.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    """The ``seq`` of the newest record; 0 while the chain is empty."""
    hash: Mapped[str] = mapped_column(String(64))
    """The ``hash`` of the newest record; :data:`GENESIS_HASH` while the chain is empty."""
    recorded: Mapped[datetime | None] = mapped_column(DateTime)
    """The ``recorded`` time of the newest record (times never go back along the chain)."""


__all__ = [
    "CHAIN_HEAD_ID",
    "GENESIS_HASH",
    "AccessOption",
    "Action",
    "AuditChainHead",
    "AuditRecord",
    "Outcome",
    "Priority",
    "Purpose",
    "Side",
]
