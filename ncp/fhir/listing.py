"""The metadata list's entries (design.md step 5): DocumentReferences for study manifests and
for reports (profile ncp-imaging-documentreference), the Patient and the custodian Organization.

Pure functions of plain values (:mod:`ncp.fhir.values`): the provider describes its index and
report-store rows with them, and nothing here knows how they are stored. Every entry points at
what it lists both by identifier (Study Instance UID, accession number: what IHE MADO clients
search by) and by literal reference (``ImagingStudy/<id>`` in ``context.related``), so that
``_include`` and ``_revinclude`` work on the node's own searchsets.

- Manifest entry: the IHE MADO FHIR-manifest format code, and the eHN guideline's selection
  parameters (invariants ncp-doc-1..6): modality, body site, study date, study type, requesting
  specialty, size. Where the DICOM does not say the study type, requesting specialty or body
  part, the concept carries only a text saying so: the invariants want the parameter present,
  and a made-up code would be wrong.
- Report entry: one per report, for its latest version (older versions: status superseded,
  attachment at ``_history``); ``docStatus`` lets B flag preliminary reports unopened.
"""

from __future__ import annotations

from typing import Any

from ncp.fhir.datatypes import (
    LOINC,
    SNOMED,
    claims,
    coding,
    concept,
    data_absent,
    local_moment,
    modality_coding,
    size_bytes,
    study_uid_identifier,
    utc_moment,
)
from ncp.fhir.identifiers import (
    imaging_study_id,
    manifest_reference_id,
    patient_resource_id,
    patient_system,
)
from ncp.fhir.manifest import (
    PATIENT_SYSTEM_RULE,
    Custodian,
    ManifestError,
    accession_identifier,
    body_part_codings,
    gender,
    modalities,
    patient_display,
    patient_identifier,
    patient_reference,
    requesting_specialty,
    study_started,
    study_type,
)
from ncp.fhir.terminology import default_terminology
from ncp.fhir.values import Organisation, PatientFacts, ReportFacts, StudyFacts

MADO_FORMAT = {
    "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
    "code": "urn:ihe:rad:MADO:fhir-manifest:2026",
}
MODALITY_EXTENSION = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.modality"
)
BODY_SITE_EXTENSION = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.bodySite"
)
FHIR_JSON = "application/fhir+json"
PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"
URGENT_PRIORITIES = {"urgent": "Urgent", "asap": "ASAP", "stat": "STAT"}
"""Request priorities a report's list entry is tagged with (``meta.tag``), by their FHIR
displays: what B's list flags as urgent."""

# Composition.status (what the report store keeps) → DocumentReference.docStatus
# (composition-status). "corrected" is a DiagnosticReport status; for a document it is amended.
_DOC_STATUS = {
    "preliminary": "preliminary",
    "final": "final",
    "amended": "amended",
    "corrected": "amended",
    "entered-in-error": "entered-in-error",
}


def _document_type() -> dict[str, Any]:
    return concept(coding(LOINC, "18748-4", "Diagnostic imaging study"))


# --- manifest entries ----------------------------------------------------------------------------


def manifest_reference(study: StudyFacts, custodian: Custodian, *, base_url: str) -> dict[str, Any]:
    """The DocumentReference that lists one study's manifest: the IHE MADO document at
    ``{base_url}/Bundle/{id}`` (the same id), about the ImagingStudy ``context.related`` names."""
    uid = study.study_uid
    started = local_moment(study_started(study), custodian.zone)
    body_parts = [b for b in study.body_parts if b.strip()]
    extensions: list[dict[str, Any]] = [
        {"url": MODALITY_EXTENSION, "valueCodeableConcept": concept(modality_coding(m))}
        for m in modalities(study.modalities)
    ]
    if body_parts:
        extensions.extend(_body_site(concept(*body_part_codings(b))) for b in body_parts)
    else:
        extensions.append(_body_site(concept(text="Body part not recorded in the DICOM")))
    extensions.append(size_bytes(study.size_bytes))
    accession = accession_identifier(study.accession_number, study.accession_issuer)
    title = _manifest_title(study)
    out: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": manifest_reference_id(uid),
        "meta": claims("ncp-imaging-documentreference"),
        "extension": extensions,
        "status": "current",
        "type": _document_type(),
        "subject": patient_reference(study.patient),
        "date": started,
        "custodian": custodian.reference(),
        "description": f"Imaging manifest of study {title}",
        "content": [
            {
                "attachment": {
                    "contentType": FHIR_JSON,
                    # The IHE MADO manifest document (ncp.fhir.mado); the ImagingStudy
                    # itself is context.related, and searchable.
                    "url": f"{base_url.rstrip('/')}/Bundle/{manifest_reference_id(uid)}",
                    "title": title,
                },
                "format": dict(MADO_FORMAT),
            }
        ],
        "context": {
            "event": [study_type(study) or concept(text="Study type not recorded in the DICOM")],
            "period": {"start": started},
            "practiceSetting": requesting_specialty(study)
            or concept(text="Requesting specialty not recorded in the DICOM"),
            "related": _related(uid, accession, indexed=True),
        },
    }
    return out


def _manifest_title(study: StudyFacts) -> str:
    meaning = study.procedure.meaning if study.procedure is not None else None
    return study.description or meaning or "/".join(modalities(study.modalities))


def _body_site(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": BODY_SITE_EXTENSION,
        "extension": [{"url": "concept", "valueCodeableConcept": value}],
    }


def _related(uid: str, accession: dict[str, Any] | None, *, indexed: bool) -> list[dict[str, Any]]:
    study_ref: dict[str, Any] = {}
    if indexed:
        study_ref["reference"] = f"ImagingStudy/{imaging_study_id(uid)}"
    study_ref["type"] = "ImagingStudy"
    study_ref["identifier"] = study_uid_identifier(uid)
    related = [study_ref]
    if accession is not None:
        related.append({"type": "ServiceRequest", "identifier": accession})
    return related


# --- report entries ------------------------------------------------------------------------------


def report_reference(
    version: ReportFacts,
    *,
    base_url: str,
    study: StudyFacts | None,
    custodian: Custodian | None = None,
) -> dict[str, Any]:
    """The DocumentReference of one version of a report (the list shows the latest).

    ``study`` is the indexed study the report is about, when indexed (adds the literal reference,
    the study date, and fills modality and body site the report lacks). ``custodian`` stands
    in when the report names no custodian of its own.
    """
    uid = version.study_uid or (study.study_uid if study is not None else None)
    if uid is None:
        raise ManifestError(
            f"report {version.resource_id} names no study: context.related needs its UID",
            rule="DocumentReference.context.related 1..*",
        )
    base = base_url.rstrip("/")
    url = f"{base}/Bundle/{version.resource_id}"
    if not version.latest:
        url = f"{url}/_history/{version.version}"
    doc_status = _DOC_STATUS.get(version.status)
    if doc_status is None:
        raise ManifestError(
            f"report status {version.status!r} has no docStatus",
            rule="DocumentReference.docStatus",
        )
    extensions = _report_extensions(version, study)
    attachment: dict[str, Any] = {"contentType": FHIR_JSON}
    if version.language:
        attachment["language"] = version.language
    attachment["url"] = url
    attachment["size"] = version.size_bytes
    attachment["title"] = version.title
    attachment["creation"] = utc_moment(version.date)
    accession = accession_identifier(version.accession_number, version.accession_issuer)
    if accession is None and study is not None:
        accession = accession_identifier(study.accession_number, study.accession_issuer)
    context: dict[str, Any] = {}
    event = _coded(LOINC, version.procedure_code) or (study_type(study) if study else None)
    if event is not None:
        context["event"] = [event]
    if study is not None:
        # The study's local time needs the archive's zone; without it, the date alone is right.
        started = study_started(study)
        start = local_moment(started, custodian.zone) if custodian else started.date().isoformat()
        context["period"] = {"start": start}
    setting = _coded(SNOMED, version.requesting_code) or (
        requesting_specialty(study) if study else None
    )
    if setting is not None:
        context["practiceSetting"] = setting
    context["related"] = _related(uid, accession, indexed=study is not None)

    meta = claims("ncp-imaging-documentreference")
    if version.priority in URGENT_PRIORITIES:
        # An urgent order's report is tagged so: B's list flags it without reading the report.
        meta["tag"] = [
            coding(PRIORITY_SYSTEM, version.priority, URGENT_PRIORITIES[version.priority])
        ]
    out: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": version.resource_id,
        "meta": meta,
    }
    if extensions:
        out["extension"] = extensions
    master: dict[str, Any] = {"value": version.bundle_value}
    if version.bundle_system:
        master = {"system": version.bundle_system, "value": version.bundle_value}
    out["masterIdentifier"] = master
    out["identifier"] = [{"system": version.identifier_system, "value": version.identifier_value}]
    out["status"] = _status(version)
    out["docStatus"] = doc_status
    out["type"] = _document_type()
    out["category"] = [concept(coding(LOINC, "85430-7", "Diagnostic imaging report"))]
    out["subject"] = _report_subject(version, study)
    out["date"] = utc_moment(version.date)
    if version.author:
        out["author"] = [{"display": version.author}]
    out["custodian"] = _report_custodian(version, custodian)
    out["content"] = [{"attachment": attachment}]
    out["context"] = context
    return out


def _status(version: ReportFacts) -> str:
    # As ncp.provider.search.document_status, which filters by it: only the latest version is
    # current (or entered-in-error when the report was withdrawn so).
    if not version.latest:
        return "superseded"
    return "entered-in-error" if version.status == "entered-in-error" else "current"


def _coded(system: str, code: str | None) -> dict[str, Any] | None:
    if not code:
        return None
    return concept(coding(system, code, default_terminology().display(system, code)))


def _report_extensions(version: ReportFacts, study: StudyFacts | None) -> list[dict[str, Any]]:
    codes = version.modalities or (study.modalities if study is not None else ())
    out: list[dict[str, Any]] = [
        {"url": MODALITY_EXTENSION, "valueCodeableConcept": concept(modality_coding(m))}
        for m in codes
        if m.strip()
    ]
    parts = version.body_parts or (study.body_parts if study is not None else ())
    out.extend(
        _body_site(concept(*body_part_codings(b.strip().upper()))) for b in parts if b.strip()
    )
    return out


def _report_subject(version: ReportFacts, study: StudyFacts | None) -> dict[str, Any]:
    if study is not None and (study.patient.patient_id, study.patient.issuer) == (
        version.patient_id,
        version.patient_issuer,
    ):
        return patient_reference(study.patient)
    if not version.patient_issuer:
        raise ManifestError(
            f"report {version.resource_id}: the patient identifier has no issuer",
            rule=PATIENT_SYSTEM_RULE,
        )
    try:
        system = patient_system(version.patient_issuer)
    except ValueError as exc:
        raise ManifestError(str(exc), rule=PATIENT_SYSTEM_RULE) from exc
    return {
        "reference": f"Patient/{patient_resource_id(system, version.patient_id)}",
        "type": "Patient",
        "identifier": {"system": system, "value": version.patient_id},
    }


def _report_custodian(version: ReportFacts, fallback: Custodian | None) -> dict[str, Any]:
    named: Organisation | None = version.custodian
    if named is not None and named.name and named.system and named.value:
        return Custodian(named.name, named.system, named.value).reference()
    if fallback is None:
        raise ManifestError(
            "the report names no custodian and none was given",
            rule="DocumentReference.custodian 1..1",
        )
    return fallback.reference()


# --- Patient and Organization --------------------------------------------------------------------


def patient_resource(patient: PatientFacts) -> dict[str, Any]:
    """A patient as ncp-patient. A name or birth date DICOM lacks is marked absent
    (data-absent-reason) rather than invented."""
    identifier = patient_identifier(patient)
    name: dict[str, Any] = {}
    text = patient_display(patient.family_name, patient.given_name)
    if text is None:
        name["extension"] = [data_absent()]
    else:
        name["text"] = text
        if patient.family_name:
            name["family"] = patient.family_name
        if patient.given_name:
            name["given"] = [patient.given_name]
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_resource_id(identifier["system"], identifier["value"]),
        "meta": claims("ncp-patient"),
        "identifier": [identifier],
        "name": [name],
        "gender": gender(patient.sex),
    }
    if patient.birth_date is not None:
        out["birthDate"] = patient.birth_date.isoformat()
    else:
        out["_birthDate"] = {"extension": [data_absent()]}
    return out


def organization(custodian: Custodian) -> dict[str, Any]:
    """The custodian as ncp-organization, with the id its references use."""
    out: dict[str, Any] = {
        "resourceType": "Organization",
        "id": custodian.resource_id,
        "meta": claims("ncp-organization"),
        "identifier": [{"system": custodian.system, "value": custodian.value}],
        "active": True,
        "name": custodian.name,
    }
    if custodian.country:
        out["address"] = [{"country": custodian.country}]
    return out


__all__ = [
    "MADO_FORMAT",
    "manifest_reference",
    "organization",
    "patient_resource",
    "report_reference",
]
