"""What B's peer client hands its callers (the portal, the retrieval jobs, ``ncp ask``): A's
answers on the standard channel as plain, typed values. :mod:`ncp.consumer.read` builds them from
A's FHIR resources; nothing here knows HTTP or FHIR JSON.

Every result that was read tolerantly carries ``quirks``: what the reader let pass (an unknown
grade, a size written as ``12.0``, a Study Instance UID without its ``urn:oid:`` prefix), so that a
tester sees what a peer does differently without the HP being refused for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from ncp.consumer.model import StudyManifest
from ncp.fhir.patient_match import query_text
from ncp.security.claims import PatientRef

Grade = Literal["certain", "probable", "possible"]
"""FHIR ``match-grade`` codes A gives each candidate (``certain-match`` is FHIR's wording of the
same scale; B reads both)."""
MatchOutcome = Literal["certain", "probable", "possible", "ambiguous", "no-match"]
"""What identification found: exactly one candidate of a grade, several candidates (the HP
chooses), or none."""


# --- Patient/$match ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientQuery:
    """What the HP knows of the patient: A's identifier and demographics. A searches by the
    identifier exactly, and by demographics only with at least family name and birth date."""

    identifier: PatientRef | None = None
    family: str | None = None
    given: str | None = None
    birth_date: date | None = None
    gender: Literal["male", "female", "other", "unknown"] | None = None
    only_certain: bool = False
    count: int | None = None

    def text(self) -> str:
        """The query as B's audit record keeps it, as A's does
        (:func:`ncp.fhir.patient_match.query_text`)."""
        identifier = self.identifier
        return query_text(
            () if identifier is None else ((identifier.system, identifier.value),),
            family=self.family,
            given=self.given,
            birth_date=self.birth_date,
            gender=self.gender,
            only_certain=self.only_certain,
            count=self.count,
        )


@dataclass(frozen=True)
class PatientCandidate:
    """One patient A proposes, with A's identifier (what a TRC names) and demographics."""

    patient: PatientRef
    """A's identifier of the patient: the one in the system asked for, else the first."""
    grade: Grade
    score: float | None = None
    family: str | None = None
    given: tuple[str, ...] = ()
    name: str | None = None
    """The name as A writes it for people (``HumanName.text``), if given."""
    birth_date: date | None = None
    gender: str | None = None
    identifiers: tuple[PatientRef, ...] = ()


@dataclass(frozen=True)
class MatchResult:
    outcome: MatchOutcome
    candidates: tuple[PatientCandidate, ...]
    """Best first, as A ranked them."""
    quirks: tuple[str, ...] = ()

    @property
    def certain(self) -> PatientCandidate | None:
        """The one candidate, when A is certain of it (no choice for the HP to make)."""
        return self.candidates[0] if self.outcome == "certain" else None


# --- the metadata list ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Coded:
    """A coded value (CodeableConcept or Coding) as B shows it: the code in its system, and
    A's display or text. Either may be absent (a concept with only a text says A has no code)."""

    system: str | None = None
    code: str | None = None
    display: str | None = None
    text: str | None = None

    @property
    def label(self) -> str:
        return self.text or self.display or self.code or ""


@dataclass(frozen=True)
class ListFilters:
    """The list filters of the standard channel (docs/standard-channel.md), combinable; each
    tuple is an OR of its values, different filters AND together."""

    date_from: date | datetime | None = None
    """Inclusive: studies (and reports) on or after this day or moment."""
    date_to: date | datetime | None = None
    """Inclusive: on or before this day (the whole day) or moment."""
    modalities: tuple[str, ...] = ()
    """DICOM modality codes (CT, MR...)."""
    body_sites: tuple[str, ...] = ()
    """DICOM Body Part Examined terms (CHEST) or SNOMED CT codes."""
    study_types: tuple[str, ...] = ()
    """Procedure codes (LOINC/RadLex as A codes them): DocumentReference ``event``,
    ImagingStudy ``study-type``."""
    requesting_specialties: tuple[str, ...] = ()
    """SNOMED CT specialty codes: DocumentReference ``setting``, ImagingStudy
    ``requesting-specialty``."""
    text: str | None = None
    """Free text: every word must occur (A folds case and accents)."""
    study_uids: tuple[str, ...] = ()
    include_superseded: bool = False
    """Reports: also older versions (status superseded), not only the current ones."""
    sort: str | None = None
    """A ``_sort`` of the standard channel (``-date``, ``modality``...); by default A lists the
    newest first."""


@dataclass(frozen=True)
class ListedStudy:
    """A study in the list: A's manifest DocumentReference (the guideline's selection
    parameters)."""

    study_uid: str
    entry_id: str
    """The DocumentReference's id at A."""
    manifest_url: str | None
    """Where A serves the study's ImagingStudy manifest."""
    title: str | None = None
    description: str | None = None
    date: datetime | None = None
    """When the study started (aware when A gives a zone; A does)."""
    modalities: tuple[str, ...] = ()
    body_sites: tuple[Coded, ...] = ()
    study_type: Coded | None = None
    requesting_specialty: Coded | None = None
    size: int | None = None
    """Bytes, as A states them: for the expected download time."""
    accession: str | None = None
    accession_system: str | None = None
    custodian: str | None = None
    """The organisation that holds the images (A's node), by name."""


@dataclass(frozen=True)
class ListedReport:
    """A report in the list: A's report DocumentReference (one per report, its latest version
    unless superseded ones were asked for)."""

    report_id: str
    """A's id of the report's Bundle: what :meth:`PeerClient.report` takes."""
    status: str
    """current, superseded or entered-in-error (DocumentReference.status)."""
    doc_status: str | None
    """preliminary, final, amended... (DocumentReference.docStatus)."""
    version: str | None = None
    """The version this entry is (from its ``_history/<v>`` URL), None for the latest."""
    url: str | None = None
    title: str | None = None
    date: datetime | None = None
    """When this version was written."""
    language: str | None = None
    size: int | None = None
    author: str | None = None
    custodian: str | None = None
    study_uid: str | None = None
    accession: str | None = None
    accession_system: str | None = None
    modalities: tuple[str, ...] = ()
    body_sites: tuple[Coded, ...] = ()
    event: Coded | None = None
    practice_setting: Coded | None = None
    identifier: PatientRef | None = None
    """The report's business identifier (system, value), the same in every version."""
    priority: str | None = None
    """The priority of the order the report answers (FHIR request-priority: routine, urgent,
    asap, stat), when A tags the entry with it (``meta.tag``)."""

    @property
    def preliminary(self) -> bool:
        return self.doc_status == "preliminary"

    @property
    def urgent(self) -> bool:
        return self.priority in ("urgent", "asap", "stat")


@dataclass(frozen=True)
class MetadataList:
    """A patient's list as A gave it, every page read."""

    studies: tuple[ListedStudy, ...]
    reports: tuple[ListedReport, ...]
    total: int | None
    """What A said the list holds (its ``total``); the entries are all of it."""
    pages: int
    warnings: tuple[str, ...] = ()
    """A's own warnings (OperationOutcome entries: an entry it could not build)."""
    quirks: tuple[str, ...] = ()

    def reports_of(self, study_uid: str) -> tuple[ListedReport, ...]:
        """The reports about one study (one click from study to report)."""
        return tuple(r for r in self.reports if r.study_uid == study_uid)

    def study_of(self, report: ListedReport) -> ListedStudy | None:
        """The study a report is about, when it is in the list."""
        return next((s for s in self.studies if s.study_uid == report.study_uid), None)


@dataclass(frozen=True)
class ManifestList:
    """ImagingStudy manifests (``GET ImagingStudy``), every page read."""

    manifests: tuple[StudyManifest, ...]
    total: int | None
    pages: int
    warnings: tuple[str, ...] = ()
    quirks: tuple[str, ...] = ()

    def by_uid(self) -> dict[str, StudyManifest]:
        return {m.study_uid: m for m in self.manifests}


# --- reports -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSection:
    """One section of the report's Composition, its narrative as plain text paragraphs (the
    portal renders them as text: A's XHTML never reaches B's pages as markup)."""

    code: str | None
    """LOINC section code (59776-5 findings, 19005-8 impression, 18783-1 recommendation...)."""
    title: str | None
    paragraphs: tuple[str, ...]
    empty_reason: str | None = None
    """Why a section is empty (``notstarted`` for a preliminary report's pending findings)."""


@dataclass(frozen=True)
class ReportDocument:
    """One version of an imaging report: the HL7 Europe document Bundle read."""

    report_id: str
    """A's id of the Bundle (the same for every version)."""
    version: str | None
    """meta.versionId."""
    status: str
    """Composition.status: preliminary, final, amended, corrected, entered-in-error."""
    title: str | None
    date: datetime | None
    language: str | None
    identifier: PatientRef | None
    """The report's business identifier (system, value)."""
    patient: PatientRef
    study_uids: tuple[str, ...]
    sections: tuple[ReportSection, ...]
    accession: str | None = None
    authors: tuple[str, ...] = ()
    organisation: str | None = None
    conclusion: str | None = None
    last_updated: datetime | None = None
    replaces: str | None = None
    """The document identifier of the version this one replaces (relatesTo replaces)."""
    priority: str | None = None
    """The priority of the order the report answers (its ServiceRequest's, FHIR
    request-priority), when the document says it."""
    bundle: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The Bundle as A sent it (JSON form), for keeping or re-validating."""
    quirks: tuple[str, ...] = ()

    @property
    def preliminary(self) -> bool:
        return self.status == "preliminary"

    @property
    def urgent(self) -> bool:
        return self.priority in ("urgent", "asap", "stat")

    def section(self, code: str) -> ReportSection | None:
        return next((s for s in self.sections if s.code == code), None)


@dataclass(frozen=True)
class ReportHistory:
    report_id: str
    versions: tuple[ReportDocument, ...]
    """Newest first (by version number, whatever order A listed them in)."""
    quirks: tuple[str, ...] = ()

    @property
    def latest(self) -> ReportDocument | None:
        return self.versions[0] if self.versions else None
