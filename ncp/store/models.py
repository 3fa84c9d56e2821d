"""Database models of the study index (design.md section 5).

The index is denormalised for the metadata list: counts, sizes, modalities and body parts are
kept on the study and series rows, recomputed whenever their instances change, so that a patient
with hundreds of studies is listed without touching the instance table.

Absent optional values are NULL. Identifier issuers are ``""`` when absent instead, because NULLs
never collide in a unique constraint and two rows for the same patient would slip in.
"""

from __future__ import annotations

import unicodedata
from datetime import date, datetime
from enum import IntEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
# Long strings (LO, 64 chars; PN up to 5 x 64) as DICOM allows them, a little wider for joins.
LO = String(256)

# Stable constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def name_key(text: str | None) -> str | None:
    """The form a name is compared in (``Patient/$match``): without surrounding blanks, case
    folded and canonically decomposed, as Unicode's canonical caseless match defines it
    (``NFD(casefold(NFD(x)))``, Unicode 3.13 D145). "ŻAK", "żak" and a decomposed "Żak" are
    one name; "Zak" stays another (accents are not case). Computed here, not by the database:
    SQLite's ``lower()`` folds ASCII only, and PostgreSQL's depends on the cluster's locale."""
    if text is None or not text.strip():
        return None
    decomposed = unicodedata.normalize("NFD", text.strip())
    return unicodedata.normalize("NFD", decomposed.casefold())


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer"),
        Index(None, "birth_date", "family_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(LO)
    issuer: Mapped[str] = mapped_column(LO, default="")
    family_name: Mapped[str | None] = mapped_column(LO)
    given_name: Mapped[str | None] = mapped_column(LO)
    family_key: Mapped[str | None] = mapped_column(LO)
    """:func:`name_key` of ``family_name``, written with it: what a search by demographics
    compares, on any database."""
    birth_date: Mapped[date | None] = mapped_column(Date)
    sex: Mapped[str | None] = mapped_column(String(16))
    header_sop_uid: Mapped[str] = mapped_column(UID)
    """The instance whose header gave these values: the smallest SOP Instance UID seen, so that
    the index does not depend on the order in which a source lists its instances."""

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        Index(None, "patient_pk", "started"),
        Index(None, "patient_pk", "started_utc"),
        Index(None, "accession_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    accession_number: Mapped[str | None] = mapped_column(LO)
    accession_issuer: Mapped[str | None] = mapped_column(LO)
    study_id: Mapped[str | None] = mapped_column(LO)
    started: Mapped[datetime | None] = mapped_column(DateTime)
    """Study Date and Time as written: the archive's local wall clock."""
    started_utc: Mapped[datetime | None] = mapped_column(DateTime)
    """The start the study's entries show (``started``, else its earliest series start) as
    naive UTC, read in the zone ``utc_zone`` (``fold=0``, :func:`ncp.fhir.datatypes.utc_of`):
    what a sort by date compares with the reports' UTC dates. NULL without a date."""
    utc_zone: Mapped[str | None] = mapped_column(String(64))
    """The zone ``started_utc`` was computed in (:func:`ncp.fhir.datatypes.zone_name`); NULL
    until the indexer computed it (a row indexed before revision 0005, or without a zone)."""
    description: Mapped[str | None] = mapped_column(LO)
    procedure_scheme: Mapped[str | None] = mapped_column(LO)
    procedure_code: Mapped[str | None] = mapped_column(LO)
    procedure_meaning: Mapped[str | None] = mapped_column(LO)
    requesting_service: Mapped[str | None] = mapped_column(LO)
    requesting_scheme: Mapped[str | None] = mapped_column(LO)
    requesting_code: Mapped[str | None] = mapped_column(LO)
    requesting_meaning: Mapped[str | None] = mapped_column(LO)
    referring_physician: Mapped[str | None] = mapped_column(LO)
    referring_organization: Mapped[str | None] = mapped_column(LO)
    institution_name: Mapped[str | None] = mapped_column(LO)
    modalities: Mapped[str] = mapped_column(LO, default="")
    """Modalities in study: the series' modalities, sorted, backslash-separated as in DICOM."""
    body_parts: Mapped[str] = mapped_column(LO, default="")
    """The series' body parts, sorted, backslash-separated."""
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    header_sop_uid: Mapped[str] = mapped_column(UID)
    revision: Mapped[str] = mapped_column(String(32), default="", server_default="")
    """A new random value whenever the indexer changes the study, its series or instances:
    what a rendered list entry (:class:`ListEntry`) was built from, so a stale one is seen."""

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    number: Mapped[int | None] = mapped_column(Integer)
    modality: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(LO)
    body_part: Mapped[str | None] = mapped_column(LO)
    laterality: Mapped[str | None] = mapped_column(String(16))
    started: Mapped[datetime | None] = mapped_column(DateTime)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    header_sop_uid: Mapped[str] = mapped_column(UID)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    title_scheme: Mapped[str | None] = mapped_column(LO)
    title_code: Mapped[str | None] = mapped_column(LO)
    title_meaning: Mapped[str | None] = mapped_column(LO)
    """A Key Object Selection document's title (Concept Name Code Sequence: scheme, code,
    meaning); NULL for other instances, and for instances indexed before revision kotitle."""
    source: Mapped[str] = mapped_column(String(32))
    locator: Mapped[str] = mapped_column(String(1024))


class SourceObject(Base):
    """What the indexer has seen in a source, so the next run reads only what changed.

    Skipped objects are kept too (with the reason): they are not re-read until they change, and
    ``ncp index`` can list them.
    """

    __tablename__ = "source_object"
    __table_args__ = (UniqueConstraint("source", "locator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    locator: Mapped[str] = mapped_column(String(1024))
    fingerprint: Mapped[str] = mapped_column(String(128))
    sop_uid: Mapped[str | None] = mapped_column(UID, index=True)
    skipped_reason: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(DateTime)


class Report(Base):
    """One imaging report across its versions: what ``/fhir/Bundle/{id}`` names.

    The patient is kept as identifier and issuer, not as a link to :class:`Patient`: a report may
    arrive before its images are indexed, and the list must show it all the same.
    """

    __tablename__ = "report"
    __table_args__ = (
        UniqueConstraint("identifier_system", "identifier_value"),
        Index(None, "patient_id", "patient_issuer"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The logical id of the Bundle resource (FHIR id grammar), stable across versions."""
    identifier_system: Mapped[str] = mapped_column(LO)
    identifier_value: Mapped[str] = mapped_column(LO)
    """Composition.identifier: the report's business identifier, the same in every version."""
    patient_id: Mapped[str] = mapped_column(LO)
    patient_issuer: Mapped[str] = mapped_column(LO, default="")
    latest_version: Mapped[int] = mapped_column(Integer)

    versions: Mapped[list[ReportVersion]] = relationship(
        back_populates="report", order_by="ReportVersion.version"
    )


class ReportVersion(Base):
    """One version of a report document, stored as received (canonical JSON) with the values
    the metadata list filters and sorts by. Older versions stay readable (``_history``)."""

    __tablename__ = "report_version"
    __table_args__ = (
        UniqueConstraint("report_id", "version"),
        Index(None, "study_uid"),
        Index(None, "latest", "date"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("report.id"))
    version: Mapped[int] = mapped_column(Integer)
    """1, 2, ...: the FHIR versionId of the Bundle and the report's version extension."""
    latest: Mapped[bool] = mapped_column(Boolean, default=True)
    """True on the newest version only; the list shows that one (older: superseded)."""
    bundle_system: Mapped[str | None] = mapped_column(LO)
    bundle_value: Mapped[str] = mapped_column(LO)
    """Bundle.identifier: changes per version."""
    status: Mapped[str] = mapped_column(String(32))
    """Composition.status: preliminary, final, amended, corrected, entered-in-error."""
    title: Mapped[str] = mapped_column(LO)
    date: Mapped[datetime] = mapped_column(DateTime)
    """Composition.date, naive UTC."""
    language: Mapped[str | None] = mapped_column(String(16))
    author: Mapped[str | None] = mapped_column(LO)
    """Display of the first author."""
    custodian_name: Mapped[str | None] = mapped_column(LO)
    custodian_system: Mapped[str | None] = mapped_column(LO)
    custodian_value: Mapped[str | None] = mapped_column(LO)
    study_uid: Mapped[str | None] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(LO)
    accession_issuer: Mapped[str | None] = mapped_column(LO)
    modalities: Mapped[str] = mapped_column(LO, default="")
    """As on Study: sorted, backslash-separated (from the bundle's ImagingStudy)."""
    body_parts: Mapped[str] = mapped_column(LO, default="")
    """DICOM Body Part Examined codes, sorted, backslash-separated (may be empty)."""
    procedure_code: Mapped[str | None] = mapped_column(LO)
    """Study type (LOINC radiology procedure code) when the bundle says one."""
    requesting_code: Mapped[str | None] = mapped_column(LO)
    """Requesting specialty code when the bundle says one."""
    priority: Mapped[str | None] = mapped_column(String(16))
    """The order's FHIR request-priority (routine, urgent, asap, stat) when the bundle says it:
    the list flags urgent, asap and stat reports."""
    replaces_version: Mapped[int | None] = mapped_column(Integer)
    """The version this one replaces (relatesTo replaces); None for version 1, and until a
    replaced version that arrives late is stored."""
    replaces_system: Mapped[str | None] = mapped_column(LO)
    replaces_value: Mapped[str | None] = mapped_column(LO)
    """The Bundle.identifier relatesTo names, kept so a late replaced version can be linked."""
    content: Mapped[str] = mapped_column(Text)
    """The Bundle as stored: canonical JSON, without meta.versionId/lastUpdated (set on read)."""
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime)

    report: Mapped[Report] = relationship(back_populates="versions")


class UsedToken(Base):
    """One-time tokens already used (viewer launch), shared by every replica of a node through
    its database; rows are dropped once the token has expired."""

    __tablename__ = "used_token"

    jti: Mapped[str] = mapped_column(String(128), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class ViewerSession(Base):
    """A session of A's option B viewer, opened by a one-time launch code (``ncp.viewer``).

    Kept in the database so that every replica of the node serves it (decision record
    ``viewer-sessions-in-the-database``). The browser holds a random secret in a cookie; the row
    is keyed by the SHA-256 of that secret, so a copy of this table opens no session.
    """

    __tablename__ = "viewer_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """Hex SHA-256 of the cookie's secret."""
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    """The launch's time plus the configured lifetime, never later than the HP assertion and
    TRC the launch code was issued under. Never extended: a new launch opens a new session."""
    closed_at: Mapped[datetime | None] = mapped_column(DateTime)
    """Set once by the replica that recorded the session's end."""
    subject: Mapped[str] = mapped_column(LO)
    """The health professional (the launch token's ``sub``)."""
    requesting_country: Mapped[str] = mapped_column(String(2))
    patient_system: Mapped[str] = mapped_column(LO)
    patient_value: Mapped[str] = mapped_column(LO)
    purpose: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(16))
    locale: Mapped[str | None] = mapped_column(String(35))
    studies: Mapped[list[str]] = mapped_column(JSON)
    """The Study Instance UIDs the launch token named: all the session may show."""
    launch_jti: Mapped[str] = mapped_column(String(128))


class EntryKind(IntEnum):
    """What a metadata list entry shows (:class:`ListEntry` ``kind``)."""

    REPORT = 0
    """A report version's DocumentReference (subject: ``report_version.id``)."""
    MANIFEST = 1
    """A study's manifest DocumentReference (subject: ``study.id``)."""
    STUDY = 2
    """A study's ImagingStudy manifest (subject: ``study.id``)."""


class ListEntry(Base):
    """A metadata list entry as last rendered (compact FHIR JSON, UTF-8), so that a list of a
    thousand studies is read, not built (:mod:`ncp.provider.list_entries`).

    ``kind`` and ``subject_pk`` name the entry as the search engine does. ``renderer`` is a
    fingerprint of the node's URLs, custodian and renderer version; ``source`` is what the entry
    was built from that can change (the study's ``revision``, the patient's name, a report
    version's ``latest`` flag and status): an entry whose renderer or source differs from what
    they are now is stale and rendered again. No foreign key: the indexer drops the entries of
    studies it removes, and a stale row is only ever overwritten, never served.
    """

    __tablename__ = "list_entry"
    __table_args__ = (UniqueConstraint("kind", "subject_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[int] = mapped_column(Integer)
    subject_pk: Mapped[int] = mapped_column(Integer)
    renderer: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    body: Mapped[bytes] = mapped_column(LargeBinary)
