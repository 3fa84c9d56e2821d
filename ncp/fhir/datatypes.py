"""Small FHIR datatype builders shared by the report, manifest and listing modules.

Each returns a plain JSON-ready dict, so the builders compose them without a model layer; the
resources they end up in are checked by the validator in the tests.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from ncp.fhir import canonical
from ncp.fhir.identifiers import STUDY_UID_SYSTEM, uid_value

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
RADLEX = "http://www.radlex.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
URI = "urn:ietf:rfc:3986"
PRIORITY_CATEGORY = (
    "http://hl7.eu/fhir/health-data-api/CodeSystem/eehrxf-document-priority-category-cs"
)
"""The EU health data API's priority categories: ``Medical-Imaging`` for imaging reports and
manifests (HL7 Europe imaging ``category[imaging]``)."""
DATA_ABSENT_REASON_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
SIZE_BYTES_URL = canonical.structure_definition("ncp-size-bytes")

# DICOM modality codes (PS3.16 CID 29) with their code meanings.
MODALITY_MEANING = {
    "CR": "Computed Radiography",
    "CT": "Computed Tomography",
    "DX": "Digital Radiography",
    "MG": "Mammography",
    "MR": "Magnetic Resonance",
    "NM": "Nuclear Medicine",
    "PT": "Positron emission tomography",
    "US": "Ultrasound",
    "XA": "X-Ray Angiography",
    "RF": "Radio Fluoroscopy",
    "OT": "Other",
}

# DICOM Coding Scheme Designators (PS3.16 section 8) the index meets, as FHIR systems. A code of
# any other scheme is written as text only: guessing a system would make a wrong code.
_SCHEMES = {
    "LN": LOINC,
    "SCT": SNOMED,
    "SRT": SNOMED,  # the retired SNOMED designator, still written by older modalities
    "DCM": DICOM,
    "RADLEX": RADLEX,
    "RDLX": RADLEX,
}

# Where an archive's local DICOM dates and times were taken, by country (EU and EEA), so that
# they become FHIR dateTimes with an offset. Countries with several zones use the capital's.
COUNTRY_ZONES = {
    "AT": "Europe/Vienna",
    "BE": "Europe/Brussels",
    "BG": "Europe/Sofia",
    "CH": "Europe/Zurich",
    "CY": "Asia/Nicosia",
    "CZ": "Europe/Prague",
    "DE": "Europe/Berlin",
    "DK": "Europe/Copenhagen",
    "EE": "Europe/Tallinn",
    "ES": "Europe/Madrid",
    "FI": "Europe/Helsinki",
    "FR": "Europe/Paris",
    "GR": "Europe/Athens",
    "HR": "Europe/Zagreb",
    "HU": "Europe/Budapest",
    "IE": "Europe/Dublin",
    "IS": "Atlantic/Reykjavik",
    "IT": "Europe/Rome",
    "LI": "Europe/Vaduz",
    "LT": "Europe/Vilnius",
    "LU": "Europe/Luxembourg",
    "LV": "Europe/Riga",
    "MT": "Europe/Malta",
    "NL": "Europe/Amsterdam",
    "NO": "Europe/Oslo",
    "PL": "Europe/Warsaw",
    "PT": "Europe/Lisbon",
    "RO": "Europe/Bucharest",
    "SE": "Europe/Stockholm",
    "SI": "Europe/Ljubljana",
    "SK": "Europe/Bratislava",
}


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "code": code}
    if display is not None:
        out["display"] = display
    return out


def concept(*codings: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": list(codings)} if codings else {}
    if text is not None:
        out["text"] = text
    return out


def claims(profile: str | None, *guides: str) -> dict[str, Any]:
    """meta claiming one of the project's profiles and, where the resource conforms to them, the
    profiles of the guides it follows (full canonical URLs: HL7 Europe imaging, IHE MADO). The
    validator checks every profile claimed (a guide's through the project's transcription)."""
    own = [canonical.structure_definition(profile)] if profile else []
    return {"profile": [*own, *guides]}


EU_IMAGING = "http://hl7.eu/fhir/imaging/StructureDefinition/"
"""Canonical base of the HL7 Europe imaging report's profiles (hl7.fhir.eu.imaging, R4)."""
MADO = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/"
"""Canonical base of IHE RAD MADO's profiles (ihe.rad.mado)."""


def modality_coding(code: str) -> dict[str, Any]:
    """A DICOM modality (CID 29) Coding, with its code meaning when known."""
    return coding(DICOM, code, MODALITY_MEANING.get(code))


def accession_type() -> dict[str, Any]:
    """Identifier.type of an accession number (v2 ACSN and DICOM 121022, as IHE MADO)."""
    return concept(
        coding(V2_0203, "ACSN", "Accession ID"), coding(DICOM, "121022", "Accession Number")
    )


def study_uid_identifier(study_uid: str) -> dict[str, Any]:
    """The Study Instance UID as an Identifier (type DCM 110180, ``urn:dicom:uid``)."""
    return {
        "type": concept(coding(DICOM, "110180", "Study Instance UID")),
        "system": STUDY_UID_SYSTEM,
        "value": uid_value(study_uid),
    }


def size_bytes(value: int) -> dict[str, Any]:
    """The ncp-size-bytes extension: a whole number as a JSON number (never 1.0, never 1e9)."""
    return {"url": SIZE_BYTES_URL, "valueDecimal": int(value)}


def data_absent(reason: str = "unknown") -> dict[str, Any]:
    """The data-absent-reason extension, for a required element the source does not have."""
    return {"url": DATA_ABSENT_REASON_URL, "valueCode": reason}


def scheme_system(designator: str | None) -> str | None:
    """The FHIR system of a DICOM Coding Scheme Designator, or None when not known here."""
    return _SCHEMES.get((designator or "").strip().upper())


def dicom_concept(
    designator: str | None, code: str | None, meaning: str | None, display: str | None = None
) -> dict[str, Any] | None:
    """A CodeableConcept from a DICOM code (Code Sequence item), or None without code nor text.

    ``display`` (from the terminology) wins over the code meaning written in the DICOM.
    """
    system = scheme_system(designator)
    if system is not None and code:
        return concept(coding(system, code, display or meaning), text=meaning)
    text = meaning or code
    return concept(text=text) if text else None


def zone_of(country: str) -> ZoneInfo:
    """The time zone of a country's archives (UTC for a country not listed)."""
    return ZoneInfo(COUNTRY_ZONES.get(country.upper(), "UTC"))


def local_moment(value: datetime, zone: ZoneInfo) -> str:
    """A naive local DICOM date and time as a FHIR dateTime with the zone's UTC offset."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.isoformat()


def utc_of(value: datetime, zone: tzinfo) -> datetime:
    """A naive local DICOM date and time as naive UTC: the instant :func:`local_moment` shows.

    A wall-clock time that a DST change makes ambiguous (autumn) or skips (spring) is read
    with ``fold=0``: the offset in force before the change, as ``local_moment`` writes it.
    """
    return value.replace(tzinfo=zone, fold=0).astimezone(UTC).replace(tzinfo=None)


def zone_name(zone: tzinfo) -> str:
    """A stable name of a zone (the IANA key of a ZoneInfo): what an index records to tell
    which zone its UTC values were computed in."""
    key = getattr(zone, "key", None)
    return key if isinstance(key, str) else str(zone)


DATE_TIME = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?\Z"
)
"""A FHIR date, dateTime or instant, whole or partial, its parts in named groups (``y m d H M
S f tz``): what A's search parameters and B's reader of A's answers accept."""


def first_moment(match: re.Match[str], zone: tzinfo | None) -> datetime:
    """The first moment a :data:`DATE_TIME` match names, in ``zone`` (naive when None): a
    partial date is its first day, a date without time its midnight. ValueError when there is
    no such day or time (``2024-02-30``)."""
    g = match.groupdict()
    return datetime(
        int(g["y"]),
        int(g["m"] or 1),
        int(g["d"] or 1),
        int(g["H"] or 0),
        int(g["M"] or 0),
        int(g["S"] or 0),
        int((g["f"] or "0").ljust(6, "0")[:6]),
        tzinfo=zone,
    )


def utc_moment(value: datetime) -> str:
    """A naive UTC datetime (as the database stores them) as a FHIR instant."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()
