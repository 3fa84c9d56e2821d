"""The image manifest: one study as an IHE MADO-style ImagingStudy (profile
ncp-imaging-study-manifest), built from plain values (:mod:`ncp.fhir.values`) without asking the
archive or knowing how the values are stored.

What country B needs to pick and pull a study is all here: Study Instance UID and accession,
counts and sizes, modality, body site, description, date, study type, the custodian (series
performer, function CST), and where to fetch it from. Endpoints are **contained** (``#a``,
``#c``, ``#viewer``) so that a searchset of manifests needs nothing outside itself:

- ``#a``: WADO-RS at NCPeH-A's DICOMweb gateway (option A), on every series;
- ``#c``: WADO-RS at A's edge gateway (option C), on every series when an edge is configured;
- ``#viewer``: the option B viewer (IHE IID launch form), at study level when configured.

The same ImagingStudy, with the endpoints as entries instead of contained, is the heart of the
IHE MADO manifest document (:mod:`ncp.fhir.mado`). What MADO adds and the index knows is written
in both: the WADO-RS endpoints' Retrieve Location UID, the number of frames of multi-frame
instances, the study's anatomical regions (MADO's short list, from the series' body parts), a
Key Object Selection document's title when known, and a procedure code a viewer can show
(rule mado-reqproc-1: the study type, or a text saying DICOM does not record it).

Options A and C are told apart by ``Endpoint.identifier`` (system :data:`IMAGING_OPTION_SYSTEM`,
value ``A`` or ``C``, the value of ``$imaging-access``'s ``option``) and by ``Endpoint.name``.
Neither endpoint works without an access token from ``$imaging-access``: the manifest says where,
the token says whether.

Index values that the profile needs and DICOM lacks are filled as follows (each tested): a
missing modality is ``OT`` (Other); a missing study date falls back to the earliest series date
(none at all: :class:`ManifestError`); an accession number without issuer gets
:data:`UNQUALIFIED_ACCESSION_SYSTEM`; an accession longer than DICOM allows (SH, 16) is left
out. Naive DICOM dates and times are local to the custodian's zone (:attr:`Custodian.zone`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from ncp.config import NodeSettings
from ncp.errors import ConfigError, NcpError
from ncp.fhir import canonical
from ncp.fhir.datatypes import (
    MADO,
    SNOMED,
    URI,
    accession_type,
    claims,
    coding,
    concept,
    data_absent,
    dicom_concept,
    local_moment,
    modality_coding,
    scheme_system,
    size_bytes,
    study_uid_identifier,
    zone_of,
)
from ncp.fhir.identifiers import (
    UNQUALIFIED_ACCESSION_SYSTEM,
    imaging_study_id,
    is_oid,
    patient_resource_id,
    patient_system,
)
from ncp.fhir.terminology import default_terminology
from ncp.fhir.values import DicomCode, InstanceFacts, PatientFacts, SeriesFacts, StudyFacts

IMAGING_OPTION_SYSTEM = f"{canonical.BASE}/sid/imaging-option"
"""System of ``Endpoint.identifier``: value ``A`` (NCPeH-A's gateway) or ``C`` (edge gateway)."""
"""System of an accession number whose issuer the DICOM does not name."""
BODY_PART_SYSTEM = canonical.code_system("dicom-body-part-examined")
BODY_PART_MAP = canonical.concept_map("dicom-body-part-to-snomed")
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
OTHER_MODALITY = "OT"
RETRIEVE_LOCATION_URL = MADO + "MadoRetrieveLocationUIDExtension"
NUMBER_OF_FRAMES_URL = MADO + "MadoNumberOfFrames"
KO_TITLE_URL = MADO + "MadoKeyObjectDocumentTitle"
ANATOMICAL_REGION_URL = MADO + "MadoAnatomicalRegionExtension"
NO_STUDY_TYPE = "Study type not recorded in the DICOM"

# DICOM Body Part Examined (the project's CodeSystem) -> the anatomical region of MADO's short
# list (ValueSetAnatomicalRegion, SNOMED CT; IHE RAD MADO input/fsh/terminology/
# anatomical-region.fsh). A body part that spans regions gives each; one not listed gives none.
_REGIONS = {
    "63337009": "Abdominopelvic segment of trunk",
    "38266002": "Entire body as a whole",
    "53120007": "Upper limb structure",
    "61685007": "Lower limb structure",
    "67734004": "Thoracic segment of trunk",
    "774007": "Structure of head and/or neck",
    "80891009": "Heart",
    "76752008": "Breast structure",
    "737561001": "Structure of vertebral column and/or spinal cord",
}
_REGION_OF_BODY_PART: dict[str, tuple[str, ...]] = {
    "ABDOMEN": ("63337009",),
    "ABDOMENPELVIS": ("63337009",),
    "PELVIS": ("63337009",),
    "KIDNEY": ("63337009",),
    "LIVER": ("63337009",),
    "CHEST": ("67734004",),
    "LUNG": ("67734004",),
    "CHESTABDOMEN": ("67734004", "63337009"),
    "CHESTABDPELVIS": ("67734004", "63337009"),
    "HEAD": ("774007",),
    "BRAIN": ("774007",),
    "SKULL": ("774007",),
    "NECK": ("774007",),
    "HEADNECK": ("774007",),
    "CSPINE": ("737561001",),
    "TSPINE": ("737561001",),
    "LSPINE": ("737561001",),
    "SPINE": ("737561001",),
    "SHOULDER": ("53120007",),
    "ELBOW": ("53120007",),
    "WRIST": ("53120007",),
    "HAND": ("53120007",),
    "HIP": ("61685007",),
    "KNEE": ("61685007",),
    "ANKLE": ("61685007",),
    "FOOT": ("61685007",),
    "HEART": ("80891009",),
    "BREAST": ("76752008",),
    "WHOLEBODY": ("38266002",),
}
MAX_ACCESSION = 16  # DICOM SH

# DICOM Laterality (0020,0060) and Image Laterality B → SNOMED CT (R4 example binding).
_LATERALITY = {
    "L": ("7771000", "Left"),
    "R": ("24028007", "Right"),
    "B": ("51440002", "Right and left"),
}
_SEX = {"M": "male", "F": "female", "O": "other"}


PATIENT_SYSTEM_RULE = "Patient.identifier.system 1..1 (ncp-patient)"
"""A patient reference names country A's identifier with its system (the Issuer of Patient ID)."""


class ManifestError(NcpError, ValueError):
    """An index row cannot become a valid resource (the message says which value is missing);
    ``rule`` names the rule of the resource it would break (an element's cardinality, say), so
    that the entry left out of a list can be logged with its reason."""

    def __init__(self, message: str, *, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class ImagingEndpoints:
    """Where studies are served, from the node's settings (``[urls]``)."""

    option_a: str
    """DICOMweb base of NCPeH-A's gateway (``urls.imaging``)."""
    option_c: str | None = None
    """DICOMweb base of A's edge gateway (``urls.edge``), None without option C."""
    viewer: str | None = None
    """Base of the option B viewer (``urls.viewer``), None without option B."""

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> ImagingEndpoints:
        urls = settings.urls
        if not urls.imaging:
            raise ConfigError("urls.imaging: the DICOMweb base of option A is needed for manifests")
        return cls(
            option_a=urls.imaging.rstrip("/"),
            option_c=urls.edge.rstrip("/") or None,
            viewer=urls.viewer.rstrip("/") or None,
        )


@dataclass(frozen=True)
class Custodian:
    """The organisation that holds country A's images and answers for them: the NCPeH-A node.

    Identified by its FHIR base URL (system ``urn:ietf:rfc:3986``): a URL is unique, already
    known to every peer from the trust list, and needs no registry.
    """

    name: str
    system: str
    value: str
    country: str | None = None
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    """Time zone of the archive's naive DICOM dates and times."""

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> Custodian:
        node = settings.node
        if not settings.urls.standard:
            raise ConfigError("urls.standard: the node's FHIR base identifies the custodian")
        return cls(
            name=node.name or f"NCPeH {node.country}",
            system=URI,
            value=settings.urls.standard.rstrip("/"),
            country=node.country,
            zone=zone_of(node.country),
        )

    @property
    def resource_id(self) -> str:
        """Logical id of the Organization resource (derived from the identifier, like every id)."""
        digest = hashlib.sha256(f"{self.system}|{self.value}".encode()).hexdigest()[:32]
        return "o" + digest

    def reference(self) -> dict[str, Any]:
        """A reference that needs no resolution: literal id, identifier and name."""
        return {
            "reference": f"Organization/{self.resource_id}",
            "type": "Organization",
            "identifier": {"system": self.system, "value": self.value},
            "display": self.name,
        }


# --- shared by the manifest and the list entries -----------------------------------------------


def patient_identifier(patient: PatientFacts) -> dict[str, str]:
    """Country A's identifier of a patient (raises :class:`ManifestError` without issuer)."""
    if not patient.issuer:
        raise ManifestError(
            "the patient has no Issuer of Patient ID: the identifier would have no system",
            rule=PATIENT_SYSTEM_RULE,
        )
    try:
        system = patient_system(patient.issuer)
    except ValueError as exc:
        raise ManifestError(str(exc), rule=PATIENT_SYSTEM_RULE) from exc
    return {"system": system, "value": patient.patient_id}


def patient_display(family: str | None, given: str | None) -> str | None:
    text = " ".join(p for p in (given, family) if p)
    return text or None


def patient_reference(patient: PatientFacts) -> dict[str, Any]:
    identifier = patient_identifier(patient)
    out: dict[str, Any] = {
        "reference": f"Patient/{patient_resource_id(identifier['system'], identifier['value'])}",
        "type": "Patient",
        "identifier": identifier,
    }
    display = patient_display(patient.family_name, patient.given_name)
    if display:
        out["display"] = display
    return out


def gender(sex: str | None) -> str:
    return _SEX.get((sex or "").strip().upper(), "unknown")


def accession_identifier(number: str | None, issuer: str | None) -> dict[str, Any] | None:
    """The accession number as an Identifier, or None when absent or not a DICOM SH."""
    if not number or len(number) > MAX_ACCESSION:
        return None
    if issuer and is_oid(issuer):
        system = f"urn:oid:{issuer}"
    elif issuer and ":" in issuer:
        system = issuer
    else:
        system = UNQUALIFIED_ACCESSION_SYSTEM
    return {"type": accession_type(), "system": system, "value": number}


def modalities(codes: Sequence[str]) -> list[str]:
    """A study's modalities, OT when there are none."""
    return [m for m in codes if m.strip()] or [OTHER_MODALITY]


def body_part_codings(body_part: str) -> list[dict[str, Any]]:
    """The SNOMED CT body structure (through the ConceptMap) and the DICOM term itself."""
    terms = default_terminology()
    out: list[dict[str, Any]] = []
    for system, code, _eq in terms.translate(BODY_PART_MAP, BODY_PART_SYSTEM, body_part):
        out.append(coding(system, code, terms.display(system, code)))
    out.append(coding(BODY_PART_SYSTEM, body_part, terms.display(BODY_PART_SYSTEM, body_part)))
    return out


def coded(value: DicomCode | None) -> dict[str, Any] | None:
    """A DICOM code as a CodeableConcept, its display from the terminology where known."""
    if value is None:
        return None
    terms = default_terminology()
    system = scheme_system(value.scheme)
    display = terms.display(system, value.code) if system and value.code else None
    return dicom_concept(value.scheme, value.code, value.meaning, display)


def study_type(study: StudyFacts) -> dict[str, Any] | None:
    return coded(study.procedure)


def requesting_specialty(study: StudyFacts) -> dict[str, Any] | None:
    return coded(study.requesting)


def study_started(study: StudyFacts) -> datetime:
    """The study's start (Study Date/Time, else its earliest series start)."""
    if study.started is None:
        raise ManifestError(
            f"study {study.study_uid} has no date: ImagingStudy.started is 1..1",
            rule="ImagingStudy.started 1..1",
        )
    return study.started


# --- the ImagingStudy ---------------------------------------------------------------------------


def anatomical_regions(body_parts: Sequence[str]) -> list[dict[str, Any]]:
    """MADO's study-level anatomical regions of these DICOM body parts, in code order."""
    codes = sorted({c for part in body_parts for c in _REGION_OF_BODY_PART.get(part.upper(), ())})
    return [concept(coding(SNOMED, code, _REGIONS[code])) for code in codes]


def imaging_study(
    study: StudyFacts,
    endpoints: ImagingEndpoints,
    custodian: Custodian,
    *,
    endpoint_refs: dict[str, str] | None = None,
    subject_ref: str | None = None,
    order_ref: str | None = None,
) -> dict[str, Any]:
    """The manifest of one study.

    A series without instances is left out: the manifest lists what can be retrieved, and its
    counts are those of what it lists. Endpoints are contained, unless ``endpoint_refs`` gives
    the reference of each (``a``, ``c``, ``viewer``: entries of a MADO document, built by
    :func:`endpoint_resources`); ``subject_ref`` and ``order_ref`` are the references of the
    document's Patient and ServiceRequest entries.
    """
    uid = study.study_uid
    contained = [] if endpoint_refs is not None else _endpoints(endpoints, custodian, uid)
    refs = endpoint_refs or {"a": "#a", "c": "#c", "viewer": "#viewer"}
    wado = [{"reference": refs["a"]}] + ([{"reference": refs["c"]}] if endpoints.option_c else [])
    series_out: list[dict[str, Any]] = []
    total_instances = 0
    for series in sorted(study.series, key=series_order):
        if not series.instances:
            continue
        total_instances += len(series.instances)
        series_out.append(_series(series, wado, custodian))
    if not series_out:
        raise ManifestError(
            f"study {uid} has no instances: a manifest lists at least one",
            rule="ImagingStudy.series.instance 1..*",
        )

    identifiers = [study_uid_identifier(uid)]
    accession = accession_identifier(study.accession_number, study.accession_issuer)
    if accession is not None:
        identifiers.append(accession)
    out: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(uid),
        "meta": claims("ncp-imaging-study-manifest", MADO + "MadoImagingStudy"),
    }
    referrer = _referrer(study)
    if referrer is not None:
        contained.append(referrer)
    if contained:
        out["contained"] = contained
    extensions = [size_bytes(study.size_bytes)]
    extensions += [
        {"url": ANATOMICAL_REGION_URL, "valueCodeableConcept": region}
        for region in anatomical_regions([s.body_part for s in study.series if s.body_part])
    ]
    out["extension"] = extensions
    out["identifier"] = identifiers
    out["status"] = "available"
    out["modality"] = [modality_coding(m) for m in modalities(study.modalities)]
    subject = patient_reference(study.patient)
    if subject_ref is not None:
        subject["reference"] = subject_ref
    out["subject"] = subject
    out["started"] = local_moment(study_started(study), custodian.zone)
    if accession is not None:
        out["basedOn"] = [
            {"type": "ServiceRequest", "identifier": accession, "display": accession["value"]}
        ]
        if order_ref is not None:
            out["basedOn"][0] = {"reference": order_ref, **out["basedOn"][0]}
    if referrer is not None:
        out["referrer"] = {"reference": "#referrer"}
    if endpoints.viewer:
        out["endpoint"] = [{"reference": refs["viewer"]}]
    out["numberOfSeries"] = len(series_out)
    out["numberOfInstances"] = total_instances
    out["procedureCode"] = [_showable(study_type(study) or concept(text=NO_STUDY_TYPE))]
    if study.description:
        out["description"] = study.description
    out["series"] = series_out
    return out


def _showable(value: dict[str, Any]) -> dict[str, Any]:
    """A concept a viewer can show (MADO mado-reqproc-1): a text or a display; a bare code
    that the terminology cannot name is given its code as text."""
    codings = value.get("coding", [])
    if "text" in value or any("display" in c for c in codings):
        return value
    return {**value, "text": ", ".join(c["code"] for c in codings)}


def series_order(series: SeriesFacts) -> tuple[int, int, str]:
    """The manifest's order of series: by number (none last), then Series Instance UID."""
    return (series.number is None, series.number or 0, series.series_uid)


def instance_order(instance: InstanceFacts) -> tuple[int, int, str]:
    """The manifest's order of instances: by number (none last), then SOP Instance UID."""
    number = instance.number
    return (number is None, number or 0, instance.sop_uid)


def _series(
    series: SeriesFacts, wado: list[dict[str, Any]], custodian: Custodian
) -> dict[str, Any]:
    rows = series.instances
    out: dict[str, Any] = {
        "extension": [size_bytes(series.size_bytes)],
        "uid": series.series_uid,
    }
    # DICOM IS allows negative numbers; FHIR's unsignedInt does not: leave those out.
    if series.number is not None and series.number >= 0:
        out["number"] = series.number
    out["modality"] = modality_coding(series.modality or OTHER_MODALITY)
    if series.description:
        out["description"] = series.description
    out["numberOfInstances"] = len(rows)
    out["endpoint"] = list(wado)
    if series.body_part:
        # R4 series.bodySite is one Coding: SNOMED CT when the map knows the term (the binding),
        # else the DICOM term itself.
        out["bodySite"] = body_part_codings(series.body_part)[0]
    laterality = _LATERALITY.get((series.laterality or "").strip().upper())
    if laterality is not None:
        out["laterality"] = coding(SNOMED, *laterality)
    if series.started is not None:
        out["started"] = local_moment(series.started, custodian.zone)
    out["performer"] = [
        {
            "function": concept(coding(PARTICIPATION, "CST", "custodian")),
            "actor": custodian.reference(),
        }
    ]
    out["instance"] = [_instance(r) for r in sorted(rows, key=instance_order)]
    return out


def _instance(row: InstanceFacts) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extensions: list[dict[str, Any]] = []
    if row.frames is not None and row.frames >= 1:
        extensions.append({"url": NUMBER_OF_FRAMES_URL, "valueInteger": row.frames})
    title = coded(row.document_title)
    if title is not None:
        extensions.append({"url": KO_TITLE_URL, "valueCodeableConcept": title})
    if extensions:
        out["extension"] = extensions
    out.update(
        {
            "uid": row.sop_uid,
            # R4's sopClass binding (DICOM UIDs as URIs), as in the R4 ImagingStudy examples.
            "sopClass": coding(URI, f"urn:oid:{row.sop_class_uid}"),
        }
    )
    if row.number is not None and row.number >= 0:
        out["number"] = row.number
    return out


def _referrer(study: StudyFacts) -> dict[str, Any] | None:
    """The referring physician as a contained PractitionerRole, carrying the requesting
    specialty (a guideline selection parameter ImagingStudy has no element for)."""
    specialty = requesting_specialty(study)
    if specialty is None and not study.referring_physician:
        return None
    practitioner: dict[str, Any] = (
        {"display": study.referring_physician}
        if study.referring_physician
        else {"extension": [data_absent()]}
    )
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": "referrer",
        "meta": claims("ncp-practitionerrole"),
        "practitioner": practitioner,
    }
    if study.referring_organization:
        role["organization"] = {"display": study.referring_organization}
    if specialty is not None:
        role["specialty"] = [specialty]
    return role


# --- endpoints ----------------------------------------------------------------------------------


def viewer_address(base: str, study_uid: str) -> str:
    """The option B viewer's IHE IID (RAD-106) launch URL of one study, without access code:
    B gets a usable URL with a one-time code from ``$imaging-access`` (option B)."""
    query = urlencode({"requestType": "STUDY", "studyUID": study_uid})
    return f"{base.rstrip('/')}/IHEInvokeImageDisplay?{query}"


def retrieve_location_uid(address: str) -> str:
    """The Retrieve Location UID (DICOM (0040,E011)) of a WADO-RS base: a UUID-derived UID
    (``2.25.``, PS3.5 B.2) of its address, so it is the same wherever and whenever it is built."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, address.rstrip('/')).int}"


def endpoint_resources(
    endpoints: ImagingEndpoints, custodian: Custodian, study_uid: str
) -> dict[str, dict[str, Any]]:
    """The study's endpoints as resources by key (``a``, ``c``, ``viewer``), without ids: the
    entries of a MADO document."""
    out = {}
    for resource in _endpoints(endpoints, custodian, study_uid):
        key = resource.pop("id")
        out[key] = resource
    return out


def _endpoints(endpoints: ImagingEndpoints, custodian: Custodian, uid: str) -> list[dict[str, Any]]:
    name_a = f"Option A: DICOMweb gateway of {custodian.name}"
    out = [_wado("a", "A", name_a, endpoints.option_a, custodian)]
    if endpoints.option_c:
        name_c = f"Option C: edge gateway at the image archive of {custodian.name}"
        out.append(_wado("c", "C", name_c, endpoints.option_c, custodian))
    if endpoints.viewer:
        out.append(
            {
                "resourceType": "Endpoint",
                "id": "viewer",
                "meta": claims("ncp-endpoint-viewer", MADO + "MadoWebViewerEndpoint"),
                "identifier": [{"system": IMAGING_OPTION_SYSTEM, "value": "B"}],
                "status": "active",
                "connectionType": coding(CONNECTION_TYPE, "ihe-iid", "IHE IID"),
                "name": f"Option B: viewer of {custodian.name}",
                "managingOrganization": custodian.reference(),
                "payloadType": [
                    concept(coding(PAYLOAD_TYPE, "none", "None"), text="IHE IID image display")
                ],
                "payloadMimeType": ["text/html"],
                "address": viewer_address(endpoints.viewer, uid),
            }
        )
    return out


def _wado(rid: str, option: str, name: str, address: str, custodian: Custodian) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": rid,
        "meta": claims("ncp-endpoint-wado-rs", MADO + "MadoWadoEndpoint"),
        "extension": [
            {"url": RETRIEVE_LOCATION_URL, "valueString": retrieve_location_uid(address)}
        ],
        "identifier": [{"system": IMAGING_OPTION_SYSTEM, "value": option}],
        "status": "active",
        "connectionType": coding(CONNECTION_TYPE, "dicom-wado-rs", "DICOM WADO-RS"),
        "name": name,
        "managingOrganization": custodian.reference(),
        "payloadType": [concept(coding(PAYLOAD_TYPE, "none", "None"), text="DICOM WADO-RS")],
        "payloadMimeType": ["application/dicom", "application/dicom+json"],
        "address": address.rstrip("/"),
    }


__all__ = [
    "Custodian",
    "ImagingEndpoints",
    "ManifestError",
    "anatomical_regions",
    "endpoint_resources",
    "imaging_study",
    "instance_order",
    "retrieve_location_uid",
    "series_order",
    "viewer_address",
]
