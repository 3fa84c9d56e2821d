"""The image manifest as IHE RAD MADO defines it: a FHIR document Bundle (``MadoFhirBundle``)
whose Composition presents one study, with the ImagingStudy (the same manifest the list serves,
:func:`ncp.fhir.manifest.imaging_study`), its WADO-RS endpoints (options A and C) and the option B
viewer as entries, the patient, the order (``MadoRequestedProcedure``, when the study has an
accession number), the node as the manifest's creator Device and the custodian Organization that
owns it.

The manifest's DocumentReference in the list points here (``{base}/Bundle/{id}``, the id of the
DocumentReference itself). Built from plain values on request: nothing is stored.

Entries the standard channel serves on their own (Patient, ImagingStudy, Organization) have their
absolute URLs as ``fullUrl``, so a reference followed outside the document reaches the same
resource; the others (Composition, Endpoints, Device, ServiceRequest) are ``urn:uuid:`` entries,
their UUIDs derived from the study and what the manifest says, so the same content gives the same
document. ``Bundle.identifier`` (= ``Composition.identifier``) changes whenever the content does.
"""

from __future__ import annotations

import hashlib
import html
import json
import uuid
from datetime import datetime
from typing import Any

import ncp
from ncp.fhir import canonical
from ncp.fhir.datatypes import LOINC, MADO, PRIORITY_CATEGORY, URI, claims, coding, concept
from ncp.fhir.identifiers import imaging_study_id, manifest_reference_id
from ncp.fhir.listing import organization, patient_resource
from ncp.fhir.manifest import (
    Custodian,
    ImagingEndpoints,
    accession_identifier,
    endpoint_resources,
    imaging_study,
    modalities,
    study_type,
)
from ncp.fhir.values import StudyFacts

DEVICE_TYPE_SYSTEM = "https://profiles.ihe.net/RAD/MADO/CodeSystem/MadoDeviceType"
XHTML = "http://www.w3.org/1999/xhtml"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{canonical.BASE}/mado-manifest")


def manifest_bundle_id(study_uid: str) -> str:
    """The id of a study's MADO document: that of its DocumentReference in the list."""
    return manifest_reference_id(study_uid)


def is_manifest_bundle_id(value: str) -> bool:
    """Whether a Bundle id names a manifest document (report ids start with ``r``)."""
    return len(value) == 33 and value[0] == "m" and all(c in "0123456789abcdef" for c in value[1:])


def mado_bundle(
    study: StudyFacts,
    endpoints: ImagingEndpoints,
    custodian: Custodian,
    *,
    base_url: str,
    created: datetime,
) -> dict[str, Any]:
    """The MADO manifest document of one study, created at ``created`` (an aware datetime)."""
    base = base_url.rstrip("/")
    uid = study.study_uid
    patient = patient_resource(study.patient)
    patient_url = f"{base}/Patient/{patient['id']}"
    patient["meta"] = claims("ncp-patient", MADO + "MadoPatient")
    org = organization(custodian)
    org["meta"] = claims("ncp-organization", MADO + "MadoCreatorOrganization")
    org_url = f"{base}/Organization/{org['id']}"

    def urn(role: str) -> str:
        return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{uid}|{role}')}"

    points = endpoint_resources(endpoints, custodian, uid)
    point_urls = {key: urn(f"endpoint-{key}") for key in points}
    accession = accession_identifier(study.accession_number, study.accession_issuer)
    order_url = urn("order") if accession is not None else None
    manifest = imaging_study(
        study,
        endpoints,
        custodian,
        endpoint_refs=point_urls,
        subject_ref=f"Patient/{patient['id']}",
        order_ref=order_url,
    )
    study_url = f"{base}/ImagingStudy/{imaging_study_id(uid)}"
    device_url = urn("creator")
    # What the document says, to name this version of it.
    digest = hashlib.sha256(
        json.dumps([manifest, patient, org, points], sort_keys=True).encode("utf-8")
    ).hexdigest()
    identifier = {"system": URI, "value": f"urn:uuid:{uuid.uuid5(_NAMESPACE, digest)}"}
    when = created.isoformat()

    entries: list[tuple[str, dict[str, Any]]] = [
        (
            urn(f"composition-{digest}"),
            _composition(
                study,
                manifest,
                identifier,
                when,
                urls={
                    "patient": f"Patient/{patient['id']}",
                    "study": study_url,
                    "device": device_url,
                    "organization": f"Organization/{org['id']}",
                    **{f"endpoint-{k}": v for k, v in point_urls.items()},
                },
                title=_title(study),
            ),
        ),
        (study_url, manifest),
        (patient_url, patient),
    ]
    entries += [(point_urls[key], point) for key, point in points.items()]
    entries.append((device_url, _creator(custodian, org)))
    entries.append((org_url, org))
    if accession is not None and order_url is not None:
        entries.append((order_url, _order(study, accession, patient)))
    return {
        "resourceType": "Bundle",
        "id": manifest_bundle_id(uid),
        "meta": claims(None, MADO + "MadoFhirBundle"),
        "identifier": identifier,
        "type": "document",
        "timestamp": when,
        "entry": [{"fullUrl": url, "resource": resource} for url, resource in entries],
    }


def _title(study: StudyFacts) -> str:
    meaning = study.procedure.meaning if study.procedure is not None else None
    return study.description or meaning or "/".join(modalities(study.modalities))


def _div(*parts: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">{"".join(parts)}</div>'}


def _row(label: str, value: object) -> str:
    return f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>"


def _composition(
    study: StudyFacts,
    manifest: dict[str, Any],
    identifier: dict[str, str],
    when: str,
    *,
    urls: dict[str, str],
    title: str,
) -> dict[str, Any]:
    """The Composition a document reader shows: the study in a table, a section per series."""
    rows = [
        _row("Study Instance UID", study.study_uid),
        _row("Started", manifest["started"]),
        _row("Modalities", ", ".join(c["code"] for c in manifest["modality"])),
        _row("Series", manifest["numberOfSeries"]),
        _row("Instances", manifest["numberOfInstances"]),
    ]
    if study.accession_number and "basedOn" in manifest:
        rows.append(_row("Accession number", manifest["basedOn"][0]["identifier"]["value"]))
    sections = []
    wado_refs = [
        {"reference": urls[key], "type": "Endpoint"}
        for key in ("endpoint-a", "endpoint-c")
        if key in urls
    ]
    for series in manifest["series"]:
        label = f"Series {series.get('number', '')}".strip()
        description = series.get("description")
        sections.append(
            {
                "title": f"{label}: {description}" if description else label,
                "text": _div(
                    "<table>",
                    _row("Series Instance UID", series["uid"]),
                    _row("Modality", series["modality"]["code"]),
                    _row("Instances", series["numberOfInstances"]),
                    "</table>",
                ),
                "entry": list(wado_refs),
            }
        )
    return {
        "resourceType": "Composition",
        "meta": claims(None, MADO + "MadoComposition"),
        "text": _div(f"<h1>{html.escape(title)}</h1><table>", *rows, "</table>"),
        "identifier": dict(identifier),
        "status": "final",
        "type": concept(coding(LOINC, "18748-4", "Diagnostic imaging study")),
        "category": [concept(coding(PRIORITY_CATEGORY, "Medical-Imaging", "Medical imaging"))],
        "subject": {"reference": urls["patient"], "type": "Patient"},
        "date": when,
        "author": [
            {"reference": urls["device"], "type": "Device"},
            {"reference": urls["organization"], "type": "Organization"},
        ],
        "title": title,
        "custodian": {"reference": urls["organization"], "type": "Organization"},
        "event": [
            {
                "code": [study_type(study) or concept(text=manifest["procedureCode"][0]["text"])],
                "period": {"start": manifest["started"]},
                "detail": [{"reference": urls["study"], "type": "ImagingStudy"}],
            }
        ],
        "section": sections,
    }


def _creator(custodian: Custodian, org: dict[str, Any]) -> dict[str, Any]:
    """The node itself, as the Device that created the manifest (MADO ``MadoCreator``)."""
    return {
        "resourceType": "Device",
        "meta": claims(None, MADO + "MadoCreator"),
        "manufacturer": "ncp (NCPeH imaging connector)",
        "deviceName": [{"name": f"ncp {ncp.__version__}", "type": "manufacturer-name"}],
        "type": concept(coding(DEVICE_TYPE_SYSTEM, "mado-creator", "MADO Creator")),
        "version": [{"value": ncp.__version__}],
        "owner": {"reference": f"Organization/{org['id']}", "display": custodian.name},
    }


def _order(study: StudyFacts, accession: dict[str, Any], patient: dict[str, Any]) -> dict[str, Any]:
    """The requested procedure the study was made for (MADO ``MadoRequestedProcedure``)."""
    out: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "meta": claims(None, MADO + "MadoRequestedProcedure"),
        "identifier": [accession],
        "status": "completed",
        "intent": "order",
    }
    procedure = study_type(study)
    if procedure is not None:
        out["code"] = procedure
    out["subject"] = {"reference": f"Patient/{patient['id']}"}
    return out


__all__ = ["is_manifest_bundle_id", "mado_bundle", "manifest_bundle_id"]
