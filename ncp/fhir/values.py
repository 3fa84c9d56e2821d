"""The plain values the list, manifest and report-entry builders take: what a study, its series
and instances, a patient and one version of a report say, with no storage behind them.

Country A's provider turns its index and report-store rows into these
(:mod:`ncp.provider.describe`); country B's reader turns A's resources back into the same types.
So they hold what the resources show, in the words of DICOM where the values come from DICOM
(issuers as written, codes with their scheme designator, naive local dates and times) and are
all immutable. Nothing here imports the database or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True, slots=True)
class DicomCode:
    """A DICOM Code Sequence item (or the plain text a DICOM field gives instead of a code):
    Coding Scheme Designator, Code Value and Code Meaning, each as written, any may be absent."""

    scheme: str | None = None
    code: str | None = None
    meaning: str | None = None


@dataclass(frozen=True, slots=True)
class PatientFacts:
    """A patient as the archive knows them: Patient ID and Issuer of Patient ID (an OID or a
    URI; ``""`` when the DICOM names none), name parts, birth date and DICOM sex (M, F, O)."""

    patient_id: str
    issuer: str = ""
    family_name: str | None = None
    given_name: str | None = None
    birth_date: date | None = None
    sex: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceFacts:
    sop_uid: str
    sop_class_uid: str
    number: int | None = None
    """Instance Number; DICOM allows negative numbers, which FHIR cannot show."""
    frames: int | None = None
    """Number of Frames, when the instance is multi-frame (MADO ``number-of-frames``)."""
    size_bytes: int = 0
    document_title: DicomCode | None = None
    """For a Key Object Selection document: its Concept Name (the KO document title, CID 7010)."""


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    series_uid: str
    number: int | None = None
    modality: str | None = None
    description: str | None = None
    body_part: str | None = None
    """DICOM Body Part Examined, as written."""
    laterality: str | None = None
    started: datetime | None = None
    """Series Date and Time: naive, the archive's local wall clock."""
    instances: tuple[InstanceFacts, ...] = ()
    """Sorted as the manifest lists them (number, then SOP Instance UID)."""

    @property
    def size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.instances)


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """One study as the list and its manifest show it.

    ``series`` may be empty where only the study's own values are needed (the manifest's
    DocumentReference); the ImagingStudy manifest lists the series that have instances.
    """

    study_uid: str
    patient: PatientFacts
    started: datetime | None
    """When the study started: Study Date and Time, else its earliest series start; naive
    (the archive's local wall clock) or with an offset. None when DICOM gives no date at all."""
    accession_number: str | None = None
    accession_issuer: str | None = None
    """Issuer of Accession Number as written (an OID or a URI), None when not given."""
    description: str | None = None
    procedure: DicomCode | None = None
    """The study type (Procedure Code Sequence)."""
    requesting: DicomCode | None = None
    """The requesting specialty (Requesting Service Code Sequence, or Requesting Service)."""
    referring_physician: str | None = None
    referring_organization: str | None = None
    modalities: tuple[str, ...] = ()
    """Modalities in Study, sorted; empty when DICOM names none."""
    body_parts: tuple[str, ...] = ()
    """The series' Body Part Examined values, sorted."""
    size_bytes: int = 0
    series: tuple[SeriesFacts, ...] = ()
    """Sorted as the manifest lists them (number, then Series Instance UID)."""


@dataclass(frozen=True, slots=True)
class Organisation:
    """An organisation named by one identifier (system, value) and a name."""

    name: str
    system: str
    value: str


@dataclass(frozen=True, slots=True)
class ReportFacts:
    """One version of an imaging report, as its list entry (a DocumentReference) shows it."""

    resource_id: str
    """The report's logical id: its Bundle and its list entry share it."""
    identifier_system: str
    identifier_value: str
    """The report's business identifier (Composition.identifier), the same in every version."""
    patient_id: str
    patient_issuer: str
    """The patient's identifier; the issuer as the index keeps it (an OID or a URI)."""
    version: int
    latest: bool
    """True for the newest version; an older one is ``superseded``."""
    bundle_system: str | None
    bundle_value: str
    """Bundle.identifier of this version's document."""
    status: str
    """Composition.status."""
    title: str
    date: datetime
    """Composition.date, naive UTC."""
    size_bytes: int
    language: str | None = None
    author: str | None = None
    custodian: Organisation | None = None
    study_uid: str | None = None
    accession_number: str | None = None
    accession_issuer: str | None = None
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    procedure_code: str | None = None
    """LOINC code of the study type, when the report names one."""
    requesting_code: str | None = None
    """SNOMED CT code of the requesting specialty, when the report names one."""
    priority: str | None = None
    """The order's FHIR request-priority (routine, urgent, asap, stat), when the report says it."""


__all__ = [
    "DicomCode",
    "InstanceFacts",
    "Organisation",
    "PatientFacts",
    "ReportFacts",
    "SeriesFacts",
    "StudyFacts",
]
