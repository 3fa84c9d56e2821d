"""What B sends on the standard channel: search parameters of the metadata list (the filters
docs/standard-channel.md lists, as ``ncp.provider.search_params`` reads them), the Parameters of
``Patient/$match`` and of ``$imaging-access``.

Values are escaped as FHIR search requires (``\\,`` ``\\|`` ``\\$`` ``\\\\``), so a code or a
text holding a comma stays one value; alternatives of one filter are joined by commas (OR),
different filters are separate parameters (AND).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

from ncp.consumer.model import ImageOption, Priority
from ncp.consumer.results import ListFilters, PatientQuery
from ncp.dicom.uids import is_uid
from ncp.fhir.identifiers import STUDY_UID_SYSTEM, uid_value
from ncp.security.claims import MAX_STUDIES, PatientRef

ResourceType = Literal["DocumentReference", "ImagingStudy"]
MAX_ALTERNATIVES = 100
"""Alternatives A takes in one parameter (``ncp.provider.search_params``)."""

WIRE_PRIORITY: dict[str, str] = {"emergency": "stat", "normal": "routine", "batch": "routine"}
"""B's lanes as FHIR request-priority on the wire (model.Priority): A knows nothing lower than
routine, so B holds batch jobs back itself."""

_NAMES: dict[ResourceType, dict[str, str]] = {
    "DocumentReference": {
        "date": "date",
        "study_types": "event",
        "requesting_specialties": "setting",
        "study_uids": "study-instance-uid",
    },
    "ImagingStudy": {
        "date": "started",
        "study_types": "study-type",
        "requesting_specialties": "requesting-specialty",
        "study_uids": "identifier",
    },
}


def escape(value: str) -> str:
    """A FHIR search value with its special characters escaped."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def patient_parameter(patient: PatientRef) -> tuple[str, str]:
    return ("patient.identifier", f"{escape(patient.system)}|{escape(patient.value)}")


def list_parameters(
    resource_type: ResourceType,
    patient: PatientRef,
    filters: ListFilters,
    *,
    page_size: int,
) -> list[tuple[str, str]]:
    """The search parameters of one list request (its first page)."""
    names = _NAMES[resource_type]
    params = [patient_parameter(patient)]
    if filters.date_from is not None:
        params.append((names["date"], f"ge{_date(filters.date_from)}"))
    if filters.date_to is not None:
        params.append((names["date"], f"le{_date(filters.date_to)}"))
    for name, values in (
        ("modality", filters.modalities),
        ("bodysite", filters.body_sites),
        (names["study_types"], filters.study_types),
        (names["requesting_specialties"], filters.requesting_specialties),
    ):
        if values:
            params.append((name, _alternatives(name, values)))
    if filters.study_uids:
        for uid in filters.study_uids:
            if not is_uid(uid):
                raise ValueError(f"{uid!r} is not a Study Instance UID")
        uids = (
            [f"{STUDY_UID_SYSTEM}|{uid_value(u)}" for u in filters.study_uids]
            if resource_type == "ImagingStudy"
            else list(filters.study_uids)
        )
        params.append((names["study_uids"], _joined(names["study_uids"], uids)))
    if filters.text and filters.text.strip():
        if not text_words(filters.text):
            raise ValueError("text: a free-text filter needs at least one word (letters or digits)")
        params.append(("_text", escape(filters.text.strip())))
    if resource_type == "DocumentReference" and filters.include_superseded:
        params.append(("status", "current,superseded"))
    if filters.sort:
        params.append(("_sort", filters.sort))
    if not 1 <= page_size <= 1000:
        raise ValueError("page_size: 1 to 1000 entries a page")
    params.append(("_count", str(page_size)))
    return params


def text_words(text: str) -> list[str]:
    """The words of a free-text filter as the standard channel compares them: case folded,
    accents removed (NFKD without combining marks), split at white space. A text without any
    (an accent alone) is refused by A, so B refuses it before sending."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c)).split()


def _date(value: date | datetime) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a moment to filter by needs a time zone")
        return value.isoformat()
    return value.isoformat()


def _alternatives(name: str, values: Sequence[str]) -> str:
    cleaned = [v.strip() for v in values if v.strip()]
    if not cleaned:
        raise ValueError(f"{name}: no value given")
    return _joined(name, [escape(v) for v in cleaned])


def _joined(name: str, values: Sequence[str]) -> str:
    if len(values) > MAX_ALTERNATIVES:
        raise ValueError(f"{name}: at most {MAX_ALTERNATIVES} values in one request")
    return ",".join(values)


def match_parameters(query: PatientQuery) -> dict[str, Any]:
    """The Parameters of ``Patient/$match`` (a Patient, onlyCertainMatches, count)."""
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if query.identifier is not None:
        patient["identifier"] = [query.identifier.to_json()]
    name: dict[str, Any] = {}
    if query.family:
        name["family"] = query.family
    if query.given:
        name["given"] = [query.given]
    if name:
        patient["name"] = [name]
    if query.gender:
        patient["gender"] = query.gender
    if query.birth_date is not None:
        patient["birthDate"] = query.birth_date.isoformat()
    if query.identifier is None and not (query.family and query.birth_date):
        raise ValueError(
            "give A's identifier of the patient, or at least family name and birth date"
        )
    params: list[dict[str, Any]] = [{"name": "resource", "resource": patient}]
    if query.only_certain:
        params.append({"name": "onlyCertainMatches", "valueBoolean": True})
    if query.count is not None:
        if query.count < 1:
            raise ValueError("count: at least 1")
        params.append({"name": "count", "valueInteger": query.count})
    return {"resourceType": "Parameters", "parameter": params}


def access_parameters(
    study_uids: Sequence[str],
    option: ImageOption | Literal["B"],
    purpose: str,
    priority: Priority,
) -> dict[str, Any]:
    """The Parameters of ``$imaging-access``: the studies, the option, the TRC's purpose and
    the lane's priority on the wire (:data:`WIRE_PRIORITY`)."""
    studies = list(dict.fromkeys(study_uids))
    if not studies:
        raise ValueError("name at least one study")
    if len(studies) > MAX_STUDIES:
        raise ValueError(f"at most {MAX_STUDIES} studies per token; ask for several")
    for uid in studies:
        if not is_uid(uid):
            raise ValueError(f"{uid!r} is not a Study Instance UID")
    if option not in ("A", "B", "C"):
        raise ValueError(f"option {option!r}: A, B or C")
    if priority not in WIRE_PRIORITY:
        raise ValueError(f"priority {priority!r}: emergency, normal or batch")
    params: list[dict[str, Any]] = [{"name": "study", "valueString": uid} for uid in studies]
    params += [
        {"name": "option", "valueCode": option},
        {"name": "purpose", "valueCode": purpose},
        {"name": "priority", "valueCode": WIRE_PRIORITY[priority]},
    ]
    return {"resourceType": "Parameters", "parameter": params}
