"""DICOM header → study index record. Strict about identity, tolerant about everything else.

Rules (each one tested):

- An instance needs SOP Instance UID, SOP Class UID, Study and Series Instance UID and a Patient
  ID; without one of them it cannot be placed in the index and is refused with
  :class:`~ncp.errors.UnreadableInstance`. UIDs must be 1-64 characters of digits and dots.
- Text values are stripped of padding (spaces, NUL); an empty or blank value maps to ``None``.
- A multi-valued Modality (illegal: VM 1, yet seen in the wild) maps to its first value.
- Missing Body Part Examined maps to ``None``; present, it is upper-cased (the CS defined terms).
- Person names are decoded with the instance's Specific Character Set (pydicom); family and given
  name are kept apart and the alphabetic group is used.
- Dates and times that do not parse map to ``None`` and leave a note in ``IndexRecord.notes``.
- Private tags are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from ncp.dicom.elements import encodings_of, inherit_encodings, text_value
from ncp.dicom.source import InstanceHeader
from ncp.dicom.uids import is_uid
from ncp.errors import UnreadableInstance

_TAGS: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value as DICOM carries it (Code Sequence item)."""

    scheme: str
    """Coding Scheme Designator, e.g. 'LN', 'SCT', 'DCM'."""
    value: str
    meaning: str | None


@dataclass(frozen=True, slots=True)
class PatientRecord:
    patient_id: str
    issuer: str | None
    family_name: str | None
    given_name: str | None
    birth_date: date | None
    sex: str | None


@dataclass(frozen=True, slots=True)
class StudyRecord:
    study_uid: str
    accession_number: str | None
    accession_issuer: str | None
    study_id: str | None
    started: datetime | None
    """Study Date and Time; the time part is midnight when only the date is known."""
    description: str | None
    procedure_code: Code | None
    """Study type: first item of Procedure Code Sequence (0008,1032)."""
    requesting_service: str | None
    requesting_service_code: Code | None
    """Requesting specialty: Requesting Service Code Sequence (0032,1034)."""
    referring_physician: str | None
    referring_organization: str | None
    institution_name: str | None
    """The performing organisation."""


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    series_uid: str
    number: int | None
    modality: str | None
    description: str | None
    body_part: str | None
    laterality: str | None
    started: datetime | None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    number_of_frames: int | None
    size_bytes: int
    document_title: tuple[str | None, str | None, str | None] | None = None
    """A Key Object Selection document's title: its Concept Name Code Sequence (scheme, code,
    meaning; DICOM CID 7010), None for any other instance."""


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """Everything the index keeps of one instance, split by the level it belongs to."""

    patient: PatientRecord
    study: StudyRecord
    series: SeriesRecord
    instance: InstanceRecord
    notes: tuple[str, ...] = field(default=())
    """What the reader tolerated (unparseable dates and the like), for the index run report."""


@dataclass(frozen=True, slots=True)
class InstanceKeys:
    """Where one instance belongs and what the index keeps of the instance itself: the cheap
    part of a header, read for every instance (study, series and patient values are read only
    for the instance whose header speaks for its level, see :func:`map_levels`)."""

    patient_key: tuple[str, str]
    """(Patient ID, Issuer of Patient ID or "")."""
    study_uid: str
    series_uid: str
    instance: InstanceRecord
    notes: tuple[str, ...] = field(default=())
    issuer_given: bool = True
    """Whether the header carried its Issuer of Patient ID (else the archive's default, or
    none, is the patient's issuer: :func:`patient_issuer`)."""


def patient_issuer(issuer: str | None, default: str) -> str:
    """The issuer of an instance's Patient ID: its Issuer of Patient ID (0010,0021) when it
    carries one, else the archive source's configured assigning authority (``[archive]
    patient_id_issuer``; "" when none is configured: no peer can then name the patient).

    The one rule for every place that reads an instance's patient: the indexer, and both
    gateways' patient check, so that the list, the tokens and the gateways agree."""
    text = (issuer or "").replace("\x00", "").strip()
    return text or default


def map_instance(header: InstanceHeader, default_issuer: str = "") -> InstanceKeys:
    """Identity and instance values of one header, or raise :class:`UnreadableInstance`.
    ``default_issuer``: the archive's assigning authority for a Patient ID without issuer."""
    ds = header.dataset
    notes: list[str] = []
    locator = header.entry.locator

    def uid(keyword: str) -> str:
        value = _text(ds, keyword)
        if value is None:
            raise UnreadableInstance(locator, f"no {keyword}")
        if not is_uid(value):
            raise UnreadableInstance(locator, f"{keyword} is not a valid UID: {value[:80]!r}")
        return value

    sop_uid = uid("SOPInstanceUID")
    if header.meta_sop_uid is not None and header.meta_sop_uid != sop_uid:
        # The data set names the instance (ncp.gateway.servable): noted, not refused.
        notes.append(
            f"file meta names SOP Instance UID {header.meta_sop_uid[:64]}, the data set "
            f"{sop_uid}: indexed and served as the data set's"
        )
    sop_class = uid("SOPClassUID")
    study_uid = uid("StudyInstanceUID")
    series_uid = uid("SeriesInstanceUID")
    patient_id = _text(ds, "PatientID")
    if patient_id is None:
        raise UnreadableInstance(
            locator, "no PatientID: the instance cannot be attached to a patient"
        )
    instance = InstanceRecord(
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=header.transfer_syntax_uid,
        instance_number=_int(ds, "InstanceNumber", notes),
        number_of_frames=_int(ds, "NumberOfFrames", notes),
        size_bytes=header.size_bytes,
        document_title=_document_title(ds) if sop_class == KEY_OBJECT_SELECTION else None,
    )
    given = _text(ds, "IssuerOfPatientID")
    issuer = patient_issuer(given, default_issuer)
    return InstanceKeys(
        (patient_id, issuer), study_uid, series_uid, instance, tuple(notes), given is not None
    )


def map_header(header: InstanceHeader, default_issuer: str = "") -> IndexRecord:
    """The whole index record of one header, or raise :class:`UnreadableInstance`."""
    return map_levels(header, map_instance(header, default_issuer))


def map_levels(header: InstanceHeader, keys: InstanceKeys) -> IndexRecord:
    """Complete ``keys`` (from :func:`map_instance` of the same header) with the patient, study
    and series values. Sequences make this the costly part of mapping."""
    ds = header.dataset
    notes = list(keys.notes)
    family, given = _person(ds, "PatientName")
    patient = PatientRecord(
        patient_id=keys.patient_key[0],
        issuer=keys.patient_key[1] or None,
        family_name=family,
        given_name=given,
        birth_date=_date(ds, "PatientBirthDate", notes),
        sex=_text(ds, "PatientSex"),
    )
    study = StudyRecord(
        study_uid=keys.study_uid,
        accession_number=_text(ds, "AccessionNumber"),
        accession_issuer=_accession_issuer(ds),
        study_id=_text(ds, "StudyID"),
        started=_datetime(ds, "StudyDate", "StudyTime", notes),
        description=_text(ds, "StudyDescription"),
        procedure_code=_first_code(ds, "ProcedureCodeSequence"),
        requesting_service=_text(ds, "RequestingService"),
        requesting_service_code=_first_code(ds, "RequestingServiceCodeSequence"),
        referring_physician=_person_display(ds, "ReferringPhysicianName"),
        referring_organization=_referring_organization(ds),
        institution_name=_text(ds, "InstitutionName"),
    )
    body_part = _text(ds, "BodyPartExamined")
    series = SeriesRecord(
        series_uid=keys.series_uid,
        number=_int(ds, "SeriesNumber", notes),
        modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"),
        body_part=body_part.upper() if body_part else None,
        laterality=_text(ds, "Laterality"),
        started=_datetime(ds, "SeriesDate", "SeriesTime", notes),
    )
    return IndexRecord(patient, study, series, keys.instance, tuple(notes))


KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
"""SOP Class UID of the Key Object Selection Document (its title is what IHE MADO shows)."""


def _document_title(ds: Dataset) -> tuple[str | None, str | None, str | None] | None:
    """The first item of Concept Name Code Sequence (0040,A043), or None without one."""
    items = ds.get("ConceptNameCodeSequence")
    if not items:
        return None
    try:
        item = items[0]
    except (TypeError, IndexError):
        return None
    if not isinstance(item, Dataset):
        return None
    title = (
        _text(item, "CodingSchemeDesignator"),
        _text(item, "CodeValue"),
        _text(item, "CodeMeaning"),
    )
    return title if any(title) else None


def _clean(value: str) -> str | None:
    cleaned = value.replace("\x00", "").strip()
    return cleaned or None


def _text(ds: Dataset, keyword: str) -> str | None:
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = int(tag_for_keyword(keyword) or 0)
    value = text_value(ds, tag, encodings_of(ds))
    if value is None:
        return None
    # VM 1 attributes carrying several values: the first non-empty one is the one we can defend.
    for item in value.split("\\"):
        text = _clean(item)
        if text:
            return text
    return None


def _person(ds: Dataset, keyword: str) -> tuple[str | None, str | None]:
    value = _text(ds, keyword)
    if value is None:
        return None, None
    # Alphabetic group only (before '='); components family^given^middle^prefix^suffix.
    parts = value.split("=")[0].split("^")
    return _clean(parts[0]), _clean(parts[1]) if len(parts) > 1 else None


def _person_display(ds: Dataset, keyword: str) -> str | None:
    family, given = _person(ds, keyword)
    parts = [p for p in (given, family) if p]
    return " ".join(parts) or None


_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1


def _int(ds: Dataset, keyword: str, notes: list[str]) -> int | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        number = int(float(text))
    except (ValueError, OverflowError):  # 'abc', 'NaN'; 'INF', '1e400'
        number = None
    # DICOM's IS is a signed 32-bit value, and the index stores it as one.
    if number is None or not _IS_MIN <= number <= _IS_MAX:
        notes.append(f"{keyword} is not a number in range: {text[:40]!r}")
        return None
    return number


def _date(ds: Dataset, keyword: str, notes: list[str]) -> date | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        # DA is YYYYMMDD; strptime would also accept '2024 1 2' and is ten times slower.
        if len(text) < 8 or not text[:8].isdigit():
            raise ValueError
        return date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        notes.append(f"{keyword} is not a DICOM date: {text[:40]!r}")
        return None


def _time(text: str) -> time | None:
    digits = text.replace(":", "").split(".")[0]
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return None
    hh, mm, ss = int(digits[0:2]), int(digits[2:4] or 0), int(digits[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return time(hh, mm, min(ss, 59))


def _datetime(ds: Dataset, date_kw: str, time_kw: str, notes: list[str]) -> datetime | None:
    day = _date(ds, date_kw, notes)
    if day is None:
        return None
    text = _text(ds, time_kw)
    moment = _time(text) if text else None
    if text and moment is None:
        notes.append(f"{time_kw} is not a DICOM time: {text[:40]!r}")
    return datetime.combine(day, moment or time(0, 0))


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = ds.get(keyword)
        item = seq[0] if seq else None
    except Exception:  # a malformed sequence is treated as absent
        return None
    if isinstance(item, Dataset):
        # Items inherit the character set of the data set that holds them.
        inherit_encodings(item, ds)
        return item
    return None


def _first_code(ds: Dataset, keyword: str) -> Code | None:
    item = _first_item(ds, keyword)
    if item is None:
        return None
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
    scheme = _text(item, "CodingSchemeDesignator")
    if value is None or scheme is None:
        return None
    return Code(scheme=scheme, value=value, meaning=_text(item, "CodeMeaning"))


def _accession_issuer(ds: Dataset) -> str | None:
    item = _first_item(ds, "IssuerOfAccessionNumberSequence")
    if item is None:
        return None
    return _text(item, "UniversalEntityID") or _text(item, "LocalNamespaceEntityID")


def _referring_organization(ds: Dataset) -> str | None:
    item = _first_item(ds, "ReferringPhysicianIdentificationSequence")
    return None if item is None else _text(item, "InstitutionName")
