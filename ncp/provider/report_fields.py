"""The values the report store keeps in its columns, read out of an imaging report Bundle.

Works on a bundle the validator has passed, yet never trusts its shape: anything the store needs
and cannot find raises :class:`FieldError` with the location, and the store refuses the report.
Optional list values (author, custodian, study, accession, modalities, body parts, study type,
requesting specialty) are None or empty when the bundle does not say them.

Which resource says what: the Composition (identifier, version extension, relatesTo replaces,
status, title, date, author, custodian), its subject Patient (identifier), the ImagingStudy
entries (Study Instance UID, accession, modalities, body parts, procedure code), the
ServiceRequest (accession and procedure code when the study lacks them) and the PractitionerRole
that requested it (specialty).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ncp.fhir import canonical
from ncp.fhir.conformance import DefinitionNotFound, Definitions
from ncp.fhir.identifiers import STUDY_UID_SYSTEM, issuer_of, uid_of

VERSION_URL = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Composition.version"
"""R5 ``Composition.version`` as HL7 Europe imaging (R4) carries it; the node's profile narrows
its string to the version number (1, 2, ...), so versions compare."""
_VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
BODY_PART_SYSTEM = canonical.code_system("dicom-body-part-examined")
BODY_PART_MAP = canonical.concept_map("dicom-body-part-to-snomed")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_ACCESSION_TYPES = frozenset(
    {("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN"), (DCM, "121022")}
)
_STUDY_UID_TYPE = (DCM, "110180")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_PARTIAL_DATE = re.compile(r"([0-9]{4})(-([0-9]{2})(-([0-9]{2}))?)?")

# Column widths (ncp.store.models): identifiers must fit whole, display texts are cut.
LO = 256
UID = 64


class FieldError(ValueError):
    """The bundle lacks a value the store needs, or has one it cannot keep."""

    def __init__(self, expression: str, diagnostics: str) -> None:
        super().__init__(f"{expression}: {diagnostics}")
        self.expression = expression
        self.diagnostics = diagnostics


@dataclass(frozen=True, slots=True)
class ReportFields:
    identifier_system: str
    identifier_value: str
    """Composition.identifier: the same in every version of the report."""
    version: int
    bundle_system: str | None
    bundle_value: str
    """Bundle.identifier: names this version's document."""
    replaces: tuple[str | None, str] | None
    """(system, value) of the document relatesTo replaces names."""
    patient_system: str
    patient_value: str
    status: str
    title: str
    date: datetime
    """Composition.date as naive UTC (a partial date is its first instant)."""
    language: str | None
    author: str | None
    custodian_name: str | None
    custodian_system: str | None
    custodian_value: str | None
    study_uid: str | None
    accession_number: str | None
    accession_issuer: str | None
    """Issuer as the index keeps it (:func:`ncp.fhir.identifiers.issuer_of` of the system)."""
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    procedure_code: str | None
    requesting_code: str | None
    priority: str | None = None
    """The order's FHIR request-priority (ServiceRequest.priority), when the bundle says it."""

    @property
    def patient_issuer(self) -> str:
        return issuer_of(self.patient_system)


def version_of(bundle: Any) -> int | None:
    """The version number a bundle claims, or None; never raises (used to order a folder)."""
    try:
        composition = _composition(bundle)
        return _version(composition)
    except FieldError:
        return None


def report_fields(bundle: dict[str, Any], definitions: Definitions | None = None) -> ReportFields:
    """The column values of one report version. ``definitions`` give the ConceptMap from
    DICOM body parts to SNOMED CT, to read SNOMED-coded body sites back as DICOM codes."""
    entries = _Entries(bundle)
    composition = _composition(bundle)
    where = "Bundle.entry[0].resource.ofType(Composition)"
    identifier = _dict(composition.get("identifier"))
    system, value = _text(identifier.get("system")), _text(identifier.get("value"))
    if system is None or value is None:
        raise FieldError(f"{where}.identifier", "the report identifier needs a system and a value")
    doc = _dict(bundle.get("identifier"))
    doc_value = _text(doc.get("value"))
    if doc_value is None:
        raise FieldError("Bundle.identifier", "the document needs an identifier (per version)")
    patient = entries.resolve(composition.get("subject"), "Patient")
    if patient is None:
        raise FieldError(f"{where}.subject", "the subject is not a Patient in the bundle")
    patient_system, patient_value = _patient_identifier(patient)
    status, title = _text(composition.get("status")), _text(composition.get("title"))
    if status is None or title is None:
        raise FieldError(where, "the Composition needs a status and a title")
    studies = entries.of_type("ImagingStudy")
    order = _order(entries, studies)
    accession = _accession(studies, order)
    custodian_system, custodian_value = _custodian_identifier(entries, composition)
    return ReportFields(
        identifier_system=_fit(system, LO, f"{where}.identifier.system"),
        identifier_value=_fit(value, LO, f"{where}.identifier.value"),
        version=_version(composition),
        bundle_system=_fit_opt(_text(doc.get("system")), LO, "Bundle.identifier.system"),
        bundle_value=_fit(doc_value, LO, "Bundle.identifier.value"),
        replaces=_replaces(composition, where),
        patient_system=_fit(patient_system, LO, "Patient.identifier.system"),
        patient_value=_fit(patient_value, LO, "Patient.identifier.value"),
        status=_fit(status, 32, f"{where}.status"),
        title=_cut(title),
        date=_date(composition.get("date"), f"{where}.date"),
        language=_language(composition, bundle),
        author=_author(entries, composition),
        custodian_name=_custodian_name(entries, composition),
        custodian_system=custodian_system,
        custodian_value=custodian_value,
        study_uid=_study_uid(studies),
        accession_number=None if accession is None else _cut(accession[1]),
        accession_issuer=None if accession is None or accession[0] is None else accession[0],
        modalities=_modalities(studies),
        body_parts=_body_parts(studies, definitions),
        procedure_code=_procedure_code(studies, order),
        requesting_code=_requesting_code(entries, order),
        priority=_priority(order),
    )


# --- the bundle's entries --------------------------------------------------------------------


class _Entries:
    """Entries by fullUrl, and by ``Type/id`` for relative references."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.resources: list[dict[str, Any]] = []
        self.by_url: dict[str, dict[str, Any]] = {}
        for entry in _list(bundle.get("entry")):
            resource = _dict(_dict(entry).get("resource"))
            if not resource:
                continue
            self.resources.append(resource)
            url = _text(_dict(entry).get("fullUrl"))
            if url is not None:
                self.by_url[url] = resource
            rtype, rid = _text(resource.get("resourceType")), _text(resource.get("id"))
            if rtype is not None and rid is not None:
                self.by_url.setdefault(f"{rtype}/{rid}", resource)

    def resolve(self, reference: Any, rtype: str | None = None) -> dict[str, Any] | None:
        ref = _text(_dict(reference).get("reference"))
        if ref is None:
            return None
        found = self.by_url.get(ref)
        if found is None and "/" in ref:  # an absolute URL ending in Type/id
            found = self.by_url.get("/".join(ref.rsplit("/", 2)[-2:]))
        if found is None or (rtype is not None and found.get("resourceType") != rtype):
            return None
        return found

    def of_type(self, rtype: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r.get("resourceType") == rtype]


def _composition(bundle: Any) -> dict[str, Any]:
    first = _dict(_dict((_list(_dict(bundle).get("entry")) or [None])[0]).get("resource"))
    if first.get("resourceType") != "Composition":
        raise FieldError("Bundle.entry[0]", "a document starts with its Composition")
    return first


def _version(composition: dict[str, Any]) -> int:
    for ext in _list(composition.get("extension")):
        if _dict(ext).get("url") == VERSION_URL:
            value = _dict(ext).get("valueString")
            if isinstance(value, str) and _VERSION_NUMBER.fullmatch(value):
                return int(value)
            raise FieldError(
                "Composition.extension", "the report version must be a whole number, 1 or more"
            )
    raise FieldError("Composition.extension", "the report version extension is missing")


def _replaces(composition: dict[str, Any], where: str) -> tuple[str | None, str] | None:
    for i, relation in enumerate(_list(composition.get("relatesTo"))):
        relation = _dict(relation)
        if relation.get("code") != "replaces":
            continue
        target = _dict(relation.get("targetIdentifier"))
        value = _text(target.get("value"))
        if value is None:
            raise FieldError(
                f"{where}.relatesTo[{i}]",
                "relatesTo replaces must name the replaced document by its identifier",
            )
        system = _text(target.get("system"))
        return (_fit_opt(system, LO, f"{where}.relatesTo[{i}]"), _fit(value, LO, where))
    return None


def _patient_identifier(patient: dict[str, Any]) -> tuple[str, str]:
    for identifier in _list(patient.get("identifier")):
        system = _text(_dict(identifier).get("system"))
        value = _text(_dict(identifier).get("value"))
        if system is not None and value is not None:
            return system, value
    raise FieldError("Patient.identifier", "the patient needs an identifier with system and value")


def _language(composition: dict[str, Any], bundle: dict[str, Any]) -> str | None:
    language = _text(composition.get("language")) or _text(bundle.get("language"))
    return language if language is not None and len(language) <= 16 else None


def _author(entries: _Entries, composition: dict[str, Any]) -> str | None:
    authors = _list(composition.get("author"))
    if not authors:
        return None
    display = _text(_dict(authors[0]).get("display"))
    return _cut(display) if display is not None else _name_of(entries.resolve(authors[0]))


def _custodian_name(entries: _Entries, composition: dict[str, Any]) -> str | None:
    custodian = entries.resolve(composition.get("custodian"))
    name = _text((custodian or {}).get("name")) or _text(
        _dict(composition.get("custodian")).get("display")
    )
    return None if name is None else _cut(name)


def _custodian_identifier(
    entries: _Entries, composition: dict[str, Any]
) -> tuple[str | None, str | None]:
    reference = _dict(composition.get("custodian"))
    custodian = entries.resolve(reference) or {}
    identifiers = _list(custodian.get("identifier")) or [reference.get("identifier")]
    for identifier in identifiers:
        value = _text(_dict(identifier).get("value"))
        if value is not None and len(value) <= LO:
            system = _text(_dict(identifier).get("system"))
            return (system if system is not None and len(system) <= LO else None), value
    return None, None


def _name_of(resource: dict[str, Any] | None) -> str | None:
    if resource is None:
        return None
    name = resource.get("name")
    if isinstance(name, str):
        return _cut(name) if name.strip() else None
    for human in _list(name):
        human = _dict(human)
        text = _text(human.get("text")) or " ".join(
            [p for p in (*_list(human.get("given")), human.get("family")) if isinstance(p, str)]
        )
        if text.strip():
            return _cut(text)
    return None


# --- study, order and codes ------------------------------------------------------------------


def _priority(order: dict[str, Any] | None) -> str | None:
    value = _text(_dict(order).get("priority"))
    return value if value in ("routine", "urgent", "asap", "stat") else None


def _order(entries: _Entries, studies: list[dict[str, Any]]) -> dict[str, Any] | None:
    for study in studies:
        for based_on in _list(study.get("basedOn")):
            found = entries.resolve(based_on, "ServiceRequest")
            if found is not None:
                return found
    orders = entries.of_type("ServiceRequest")
    return orders[0] if orders else None


def _typed(identifier: Any, types: frozenset[tuple[str, str]]) -> bool:
    codings = _list(_dict(_dict(identifier).get("type")).get("coding"))
    return any((_dict(c).get("system"), _dict(c).get("code")) in types for c in codings)


def _study_uid(studies: list[dict[str, Any]]) -> str | None:
    for study in studies:
        for identifier in _list(study.get("identifier")):
            identifier = _dict(identifier)
            value = _text(identifier.get("value"))
            if identifier.get("system") != STUDY_UID_SYSTEM or value is None:
                continue
            uid = uid_of(value)
            if uid is not None and len(uid) <= UID and _UID.fullmatch(uid):
                return uid
    return None


def _accession(
    studies: list[dict[str, Any]], order: dict[str, Any] | None
) -> tuple[str | None, str] | None:
    """(issuer, number): from the study's accession identifier, else from the order's."""
    candidates = [i for s in studies for i in _list(s.get("identifier"))]
    if order is not None:
        candidates += _list(order.get("identifier"))
    for identifier in candidates:
        if not _typed(identifier, _ACCESSION_TYPES):
            continue
        value = _text(_dict(identifier).get("value"))
        if value is None:
            continue
        system = _text(_dict(identifier).get("system"))
        issuer = None if system is None else issuer_of(system)
        return (issuer if issuer is None or len(issuer) <= LO else None), value
    return None


def _modalities(studies: list[dict[str, Any]]) -> tuple[str, ...]:
    codes: set[str] = set()
    for study in studies:
        for coding in _list(study.get("modality")):
            codes.add(_text(_dict(coding).get("code")) or "")
        for series in _list(study.get("series")):
            codes.add(_text(_dict(_dict(series).get("modality")).get("code")) or "")
    return tuple(sorted(c for c in codes if c and len(c) <= 16))


def _body_parts(studies: list[dict[str, Any]], definitions: Definitions | None) -> tuple[str, ...]:
    """DICOM Body Part Examined codes of the series: coded as such, or in SNOMED CT and read
    back through the ConceptMap the node publishes."""
    back = _snomed_to_body_part(definitions) if definitions is not None else {}
    codes: set[str] = set()
    for study in studies:
        for series in _list(study.get("series")):
            site = _dict(_dict(series).get("bodySite"))
            code = _text(site.get("code"))
            if code is None:
                continue
            if site.get("system") == BODY_PART_SYSTEM:
                codes.add(code.upper())
            elif site.get("system") == SNOMED and code in back:
                codes.add(back[code])
    return tuple(sorted(c for c in codes if len(c) <= 16))


@functools.cache
def _snomed_to_body_part(definitions: Definitions) -> dict[str, str]:
    try:
        concept_map = definitions.resource(BODY_PART_MAP, "ConceptMap")
    except DefinitionNotFound:
        return {}
    back: dict[str, str] = {}
    for group in _list(concept_map.get("group")):
        if _dict(group).get("source") != BODY_PART_SYSTEM or _dict(group).get("target") != SNOMED:
            continue
        for element in _list(_dict(group).get("element")):
            source = _text(_dict(element).get("code"))
            for target in _list(_dict(element).get("target")):
                code = _text(_dict(target).get("code"))
                equivalent = _dict(target).get("equivalence") in ("equivalent", "equal")
                if source is not None and code is not None and equivalent:
                    back.setdefault(code, source)
    return back


def _procedure_code(studies: list[dict[str, Any]], order: dict[str, Any] | None) -> str | None:
    """The study type: a LOINC code first, else any code of the study, else of the order."""
    concepts = [c for s in studies for c in _list(s.get("procedureCode"))]
    if order is not None and order.get("code") is not None:
        concepts.append(order["code"])
    return _pick_code(concepts, LOINC)


def _requesting_code(entries: _Entries, order: dict[str, Any] | None) -> str | None:
    if order is None:
        return None
    role = entries.resolve(order.get("requester"), "PractitionerRole")
    return None if role is None else _pick_code(_list(role.get("specialty")), SNOMED)


def _pick_code(concepts: list[Any], preferred: str) -> str | None:
    codings = [_dict(c) for concept in concepts for c in _list(_dict(concept).get("coding"))]
    ordered = sorted(codings, key=lambda c: c.get("system") != preferred)  # stable
    for coding in ordered:
        code = _text(coding.get("code"))
        if code is not None and len(code) <= LO:
            return code
    return None


# --- values ----------------------------------------------------------------------------------


def _date(value: Any, where: str) -> datetime:
    text = _text(value)
    if text is None:
        raise FieldError(where, "the report needs a date")
    partial = _PARTIAL_DATE.fullmatch(text)
    if partial is not None:
        year, month, day = partial.group(1), partial.group(3), partial.group(5)
        try:
            return datetime(int(year), int(month or 1), int(day or 1))
        except ValueError:
            raise FieldError(where, "not a valid date") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FieldError(where, "not a valid dateTime") from None
    if moment.tzinfo is None:
        raise FieldError(where, "a dateTime with a time needs a UTC offset")
    return moment.astimezone(UTC).replace(tzinfo=None)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _fit(value: str, width: int, where: str) -> str:
    if len(value) > width:
        raise FieldError(where, f"longer than the {width} characters the store keeps")
    return value


def _fit_opt(value: str | None, width: int, where: str) -> str | None:
    return None if value is None else _fit(value, width, where)


def _cut(value: str) -> str:
    """A display text for the list: cut to the column (the stored document keeps it whole)."""
    return value if len(value) <= LO else value[: LO - 1] + "…"
