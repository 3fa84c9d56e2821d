"""The imaging report as a FHIR R4 document Bundle, in the shape of the HL7 Europe Imaging
Report (Composition first, then DiagnosticReport, Patient, ImagingStudy, ServiceRequest,
Organization, Practitioner, PractitionerRole).

The builder is strict: it refuses inconsistent input with :class:`ReportBuildError` and
checks what it built with ``fhir.resources.R4B`` (wire-compatible with R4). The report carries no
endpoint and no image URL: image access is the manifest's job, so moving a study between
archives never breaks a signed report.

What the HL7 Europe imaging report (R4) asks and this builder writes (docs/profiles.md): the
categories ``imaging-report`` (LOINC 85430-7) and ``imaging`` (the EU health data API's
Medical-Imaging) in Composition and DiagnosticReport; the Composition→DiagnosticReport
extension, so every entry is reachable from the Composition; the version in the R5
cross-version ``Composition.version`` extension; author, attester, performer and results
interpreter as the guide slices them; findings the source states in coded form as Observation
entries (DiagnosticReport.result), and every section without entries carrying its narrative in
the ``note`` extension as well (rule eu-imaging-composition-1: an entry, an emptyReason, a
sub-section or a note). A section that has nothing to say carries an emptyReason instead.

Identifiers: the report's business identifier (``Composition.identifier``, equal to one
``DiagnosticReport.identifier``) is the same for every version; ``Bundle.identifier`` names one
version's document and is derived from report identifier and version number, like every
``fullUrl`` (UUID v5), so rebuilding a version gives the same bytes.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from ncp.fhir import canonical

# Re-exported: the example generator and the tests take the code systems from here.
from ncp.fhir.datatypes import DICOM as DICOM
from ncp.fhir.datatypes import EU_IMAGING
from ncp.fhir.datatypes import LOINC as LOINC
from ncp.fhir.datatypes import PRIORITY_CATEGORY as PRIORITY_CATEGORY
from ncp.fhir.datatypes import SNOMED as SNOMED
from ncp.fhir.datatypes import URI as URI
from ncp.fhir.datatypes import V2_0203 as V2_0203
from ncp.fhir.datatypes import accession_type as _accession_type
from ncp.fhir.datatypes import claims as _claims
from ncp.fhir.datatypes import coding as _coding
from ncp.fhir.datatypes import concept as _concept
from ncp.fhir.datatypes import modality_coding as _modality

ReportStatus = Literal["preliminary", "final", "amended"]
Gender = Literal["male", "female", "other", "unknown"]

V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LIST_EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"

# R4 has no Composition.version; HL7 Europe imaging (R4) uses the R5 element through its
# cross-version extension (a string), and so do we, with the version number as its value.
COMPOSITION_VERSION_URL = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Composition.version"
)
# R4 has no DiagnosticReport→Composition link; the HL7 Europe imaging report (R4) uses the R5
# element through its cross-version extension, and so do we.
DIAGNOSTIC_REPORT_COMPOSITION_URL = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.composition"
)
# ... and the way back (HL7 Europe extensions), so the DiagnosticReport is reachable from the
# Composition as a document's entries must be.
COMPOSITION_DIAGNOSTIC_REPORT_URL = (
    "http://hl7.eu/fhir/extensions/StructureDefinition/composition-diagnosticReportReference"
)
NOTE_URL = "http://hl7.org/fhir/StructureDefinition/note"
"""The section's narrative as an Annotation, as the HL7 Europe examples carry narrative-only
sections."""
XHTML = "http://www.w3.org/1999/xhtml"

# Section codes of the HL7 Europe imaging report (LOINC), in document order.
SECTION_IMAGING_STUDY = "18726-0"
SECTION_ORDER = "55115-0"
SECTION_HISTORY = "11329-0"
SECTION_PROCEDURE = "55111-9"
SECTION_FINDINGS = "59776-5"
SECTION_IMPRESSION = "19005-8"
SECTION_RECOMMENDATION = "18783-1"
_SECTION_DISPLAY = {
    SECTION_IMAGING_STUDY: "Radiology studies (set)",
    SECTION_ORDER: "Requested imaging studies information Document",
    SECTION_HISTORY: "History general Narrative - Reported",
    SECTION_PROCEDURE: "Current imaging procedure descriptions Document",
    SECTION_FINDINGS: "Procedure Findings Narrative",
    SECTION_IMPRESSION: "Radiology Imaging study [Impression] (narrative)",
    SECTION_RECOMMENDATION: "Radiology Study recommendation (narrative)",
}
_SECTION_TITLE = {
    SECTION_IMAGING_STUDY: "Imaging study",
    SECTION_ORDER: "Order",
    SECTION_HISTORY: "Clinical history",
    SECTION_PROCEDURE: "Procedure",
    SECTION_FINDINGS: "Findings",
    SECTION_IMPRESSION: "Impression",
    SECTION_RECOMMENDATION: "Recommendation",
}
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{canonical.BASE}/imaging-report")


REQUEST_PRIORITIES = ("routine", "urgent", "asap", "stat")
"""FHIR R4 request-priority codes (ServiceRequest.priority binds to them, required)."""


class ReportBuildError(ValueError):
    """The report input is inconsistent or cannot become a valid FHIR R4 document."""


@dataclass(frozen=True, slots=True)
class Identifier:
    system: str
    value: str


@dataclass(frozen=True, slots=True)
class Coding:
    system: str
    code: str
    display: str


@dataclass(frozen=True, slots=True)
class HumanName:
    family: str
    given: tuple[str, ...]
    prefix: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join([*self.prefix, *self.given, self.family])


@dataclass(frozen=True, slots=True)
class ReportPatient:
    identifier: Identifier
    """Country A's identifier of the patient."""
    name: HumanName
    birth_date: date
    gender: Gender


@dataclass(frozen=True, slots=True)
class ReportOrganization:
    identifier: Identifier
    name: str
    city: str | None = None


@dataclass(frozen=True, slots=True)
class ReportStudy:
    study_instance_uid: str
    accession: Identifier
    """Accession number, qualified by the system of the RIS that issued it."""
    started: datetime
    modalities: tuple[str, ...]
    """DICOM modality codes (CT, MR, ...)."""
    description: str
    procedure: Coding
    number_of_series: int
    number_of_instances: int


@dataclass(frozen=True, slots=True)
class ReportOrder:
    requester: HumanName
    requesting_service: Coding | None = None
    """The ordering specialty (SNOMED CT); carried by the requester's PractitionerRole."""
    reason: str | None = None
    priority: str | None = None
    """The order's FHIR request-priority (routine, urgent, asap, stat), when the source says
    it: ServiceRequest.priority; A's list flags the report urgent for urgent, asap and stat."""


@dataclass(frozen=True, slots=True)
class ReportFinding:
    """A finding the source states in coded form: an Observation entry of the findings
    section (HL7 Europe ObservationFindingEuImaging), and a conclusion code of the report."""

    code: Coding
    """What was found (SNOMED CT clinical finding)."""
    body_site: Coding | None = None
    size_mm: int | None = None
    """Its largest dimension, when the report measured it."""


@dataclass(frozen=True, slots=True)
class ReportText:
    """Narrative sections; None leaves a section empty (it then carries an emptyReason)."""

    history: str | None
    procedure: str | None
    findings: str | None
    impression: str | None
    recommendation: str | None = None
    """Optional section: left out of the document when None."""
    coded_findings: tuple[ReportFinding, ...] = ()
    """What the findings narrative states in coded form; empty when the source is narrative only."""


@dataclass(frozen=True, slots=True)
class ReportVersion:
    """Everything one version of an imaging report says."""

    report_id: Identifier
    """Business identifier, the same for every version of the report."""
    version: int
    status: ReportStatus
    issued: datetime
    replaces: Identifier | None
    """The document (Bundle) identifier of the version this one replaces; None for version 1."""
    title: str
    language: str
    patient: ReportPatient
    study: ReportStudy
    order: ReportOrder
    organization: ReportOrganization
    """Author and custodian."""
    radiologist: HumanName
    text: ReportText


def document_identifier(report_id: Identifier, version: int) -> Identifier:
    """The identifier of one version's document (Bundle.identifier)."""
    return Identifier(URI, f"urn:uuid:{_uuid(report_id, version, 'document')}")


def _uuid(report_id: Identifier, version: int, role: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{report_id.system}|{report_id.value}|{version}|{role}")


# --- input checks ------------------------------------------------------------------------------


def _check_text(where: str, value: str) -> None:
    if not value.strip():
        raise ReportBuildError(f"{where} is empty: FHIR strings must have content")
    for ch in value:
        category = unicodedata.category(ch)
        # XHTML narrative and FHIR strings exclude C0 controls other than tab, LF, CR,
        # surrogates and the non-characters U+FFFE/U+FFFF.
        if (category == "Cc" and ch not in "\t\n\r") or category == "Cs" or ch in "\ufffe\uffff":
            raise ReportBuildError(f"{where} contains the character U+{ord(ch):04X}")


def _check_moment(where: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ReportBuildError(f"{where} needs a UTC offset (FHIR instant and dateTime)")


def _check_identifier(where: str, value: Identifier) -> None:
    _check_text(f"{where}.system", value.system)
    _check_text(f"{where}.value", value.value)
    if ":" not in value.system:
        raise ReportBuildError(f"{where}.system must be an absolute URI, got {value.system!r}")


def _check_name(where: str, name: HumanName) -> None:
    _check_text(f"{where}.family", name.family)
    for i, part in enumerate((*name.given, *name.prefix)):
        _check_text(f"{where} part {i}", part)


def _check(report: ReportVersion) -> None:
    _check_versioning(report)
    for where, identifier in (
        ("report_id", report.report_id),
        ("replaces", report.replaces),
        ("patient.identifier", report.patient.identifier),
        ("organization.identifier", report.organization.identifier),
        ("study.accession", report.study.accession),
    ):
        if identifier is not None:
            _check_identifier(where, identifier)
    _check_moment("issued", report.issued)
    _check_moment("study.started", report.study.started)
    if report.issued < report.study.started:
        raise ReportBuildError("the report is issued before its study started")
    if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{1,8})*", report.language):
        raise ReportBuildError(f"{report.language!r} is not a BCP 47 language tag")
    _check_study(report.study)
    _check_texts(report)


def _check_versioning(report: ReportVersion) -> None:
    """Status and version agree, and a later version names the document it replaces."""
    if report.status not in ("preliminary", "final", "amended"):
        raise ReportBuildError(f"status {report.status!r} is not preliminary, final or amended")
    if report.version < 1:
        raise ReportBuildError(f"version must be 1 or more, got {report.version}")
    if report.version == 1 and report.replaces is not None:
        raise ReportBuildError("version 1 replaces nothing, yet 'replaces' is set")
    if report.version > 1 and report.replaces is None:
        raise ReportBuildError(
            f"version {report.version} must name the document of the version it replaces"
        )
    if report.replaces == document_identifier(report.report_id, report.version):
        raise ReportBuildError("a version cannot replace its own document")
    if report.status == "amended" and report.version == 1:
        raise ReportBuildError("an amended report is a later version of an issued report")
    if report.status != "preliminary" and report.text.impression is None:
        raise ReportBuildError(f"a {report.status} report needs an impression")


def _check_study(study: ReportStudy) -> None:
    if not study.modalities:
        raise ReportBuildError("the study has no modality")
    for modality in study.modalities:
        if not re.fullmatch(r"[A-Z0-9]{2,16}", modality):
            raise ReportBuildError(f"{modality!r} is not a DICOM modality code")
    if study.number_of_series < 1 or study.number_of_instances < study.number_of_series:
        raise ReportBuildError("a study has at least one series, each with an instance")
    if not _is_dicom_uid(study.study_instance_uid):
        raise ReportBuildError(f"{study.study_instance_uid!r} is not a DICOM UID")


def _check_texts(report: ReportVersion) -> None:
    _check_name("patient.name", report.patient.name)
    _check_name("radiologist", report.radiologist)
    _check_name("order.requester", report.order.requester)
    codings = {"study.procedure": report.study.procedure}
    if report.order.requesting_service is not None:
        codings["order.requesting_service"] = report.order.requesting_service
    texts = {
        "title": report.title,
        "study.description": report.study.description,
        "organization.name": report.organization.name,
        "organization.city": report.organization.city,
        "order.reason": report.order.reason,
        **{
            f"text.{k}": getattr(report.text, k)
            for k in ReportText.__dataclass_fields__
            if k != "coded_findings"
        },
        **{f"{k}.{f}": getattr(c, f) for k, c in codings.items() for f in ("code", "display")},
    }
    for where, value in texts.items():
        if value is not None:
            _check_text(where, value)
    for i, finding in enumerate(report.text.coded_findings):
        codings[f"text.coded_findings[{i}].code"] = finding.code
        if finding.body_site is not None:
            codings[f"text.coded_findings[{i}].body_site"] = finding.body_site
        if finding.size_mm is not None and finding.size_mm <= 0:
            raise ReportBuildError(f"text.coded_findings[{i}].size_mm must be positive")
    if report.text.coded_findings and report.text.findings is None:
        raise ReportBuildError("coded findings need the findings narrative they come from")
    for where, coding in codings.items():
        _check_text(f"{where}.code", coding.code)
        _check_text(f"{where}.display", coding.display)
        if ":" not in coding.system:
            raise ReportBuildError(f"{where}.system must be an absolute URI")


def _is_dicom_uid(value: str) -> bool:
    parts = value.split(".")
    return (
        len(value) <= 64
        and len(parts) > 1
        and all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts)
    )


# --- resources -----------------------------------------------------------------------------------


def _identifier(value: Identifier, type_: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if type_ is not None:
        out["type"] = type_
    out["system"] = value.system
    out["value"] = value.value
    return out


def _name(name: HumanName) -> dict[str, Any]:
    out: dict[str, Any] = {"text": name.text, "family": name.family}
    if name.given:
        out["given"] = list(name.given)
    if name.prefix:
        out["prefix"] = list(name.prefix)
    return out


def _ref(full_url: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": full_url}
    if display is not None:
        out["display"] = display
    return out


def _div(paragraphs: Iterable[str]) -> dict[str, str]:
    body = "".join(
        f"<p>{html.escape(line.strip(), quote=False)}</p>"
        for paragraph in paragraphs
        for line in paragraph.splitlines()
        if line.strip()
    )
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">{body}</div>'}


def _when(value: datetime) -> str:
    return value.isoformat()


@dataclass(frozen=True, slots=True)
class _Urls:
    composition: str
    report: str
    patient: str
    study: str
    order: str
    organization: str
    radiologist: str
    requester_role: str
    findings: tuple[str, ...] = ()


def _urls(report: ReportVersion) -> _Urls:
    def url(role: str) -> str:
        return f"urn:uuid:{_uuid(report.report_id, report.version, role)}"

    return _Urls(
        composition=url("composition"),
        report=url("report"),
        patient=url("patient"),
        study=url("study"),
        order=url("order"),
        organization=url("organization"),
        radiologist=url("radiologist"),
        requester_role=url("requester_role"),
        findings=tuple(url(f"finding-{i}") for i in range(len(report.text.coded_findings))),
    )


def _section(
    code: str, paragraphs: list[str] | None, entries: Sequence[str] = (), *, empty_reason: str = ""
) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if paragraphs and not entries:
        # A narrative-only section: its text again as the section's note, the way the HL7
        # Europe examples carry narrative, which satisfies eu-imaging-composition-1 without
        # an emptyReason that would tell country B the section is empty.
        note = "\n".join(p.strip() for p in paragraphs if p.strip())
        section["extension"] = [{"url": NOTE_URL, "valueAnnotation": {"text": note}}]
    section["title"] = _SECTION_TITLE[code]
    section["code"] = _concept(_coding(LOINC, code, _SECTION_DISPLAY[code]))
    if paragraphs:
        section["text"] = _div(paragraphs)
    else:
        # An empty section still needs narrative (cmp-1) and says why it is empty (cmp-2).
        reason = empty_reason or "unavailable"
        section["text"] = _div(
            ["No information available." if reason == "unavailable" else "Not yet reported."]
        )
        section["emptyReason"] = _concept(
            _coding(
                LIST_EMPTY_REASON,
                reason,
                "Unavailable" if reason == "unavailable" else "Not Started",
            )
        )
    if entries:
        section["entry"] = [_ref(e) for e in entries]
    return section


def _composition(report: ReportVersion, urls: _Urls) -> dict[str, Any]:
    study, text = report.study, report.text
    pending = "notstarted" if report.status == "preliminary" else "unavailable"
    sections = [
        _section(
            SECTION_IMAGING_STUDY,
            [
                f"{study.description} ({', '.join(study.modalities)}), {_when(study.started)}.",
                f"{study.number_of_series} series, {study.number_of_instances} instances.",
                f"Study Instance UID {study.study_instance_uid}.",
            ],
            [urls.study],
        ),
        _section(
            SECTION_ORDER,
            [
                f"Accession number {study.accession.value}: {study.procedure.display}.",
                f"Requested by {report.order.requester.text}"
                + (
                    f" ({report.order.requesting_service.display})."
                    if report.order.requesting_service
                    else "."
                ),
            ],
            [urls.order],
        ),
        _section(SECTION_HISTORY, [text.history] if text.history else None),
        _section(SECTION_PROCEDURE, [text.procedure] if text.procedure else None),
        _section(
            SECTION_FINDINGS,
            [text.findings] if text.findings else None,
            urls.findings,
            empty_reason=pending,
        ),
        _section(
            SECTION_IMPRESSION, [text.impression] if text.impression else None, empty_reason=pending
        ),
    ]
    if text.recommendation:
        sections.append(_section(SECTION_RECOMMENDATION, [text.recommendation]))
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "meta": _claims("ncp-imaging-report-composition", EU_IMAGING + "CompositionEuImaging"),
        "language": report.language,
        "extension": [
            {"url": COMPOSITION_DIAGNOSTIC_REPORT_URL, "valueReference": _ref(urls.report)},
            {"url": COMPOSITION_VERSION_URL, "valueString": str(report.version)},
        ],
        "identifier": _identifier(report.report_id),
        "status": report.status,
        "type": _concept(_coding(LOINC, "18748-4", "Diagnostic imaging study")),
        "category": _categories(),
        "subject": _ref(urls.patient, report.patient.name.text),
        "date": _when(report.issued),
        "author": [
            _ref(urls.organization, report.organization.name),
            _ref(urls.radiologist, report.radiologist.text),
        ],
        "title": report.title,
        "confidentiality": "N",
    }
    if report.status != "preliminary":
        composition["attester"] = [
            {"mode": "legal", "time": _when(report.issued), "party": _ref(urls.radiologist)}
        ]
    composition["custodian"] = _ref(urls.organization, report.organization.name)
    if report.replaces is not None:
        composition["relatesTo"] = [
            {"code": "replaces", "targetIdentifier": _identifier(report.replaces)}
        ]
    composition["section"] = sections
    return composition


def _categories() -> list[dict[str, Any]]:
    """Composition and DiagnosticReport categories of HL7 Europe imaging: the diagnostic
    service (v2-0074 RAD), the imaging report (LOINC 85430-7) and the priority category."""
    return [
        _concept(_coding(V2_0074, "RAD", "Radiology")),
        _concept(_coding(LOINC, "85430-7", "Diagnostic imaging report")),
        _concept(_coding(PRIORITY_CATEGORY, "Medical-Imaging", "Medical imaging")),
    ]


def _order_ref(report: ReportVersion, urls: _Urls) -> dict[str, Any]:
    """The order, by reference and by its accession number: HL7 Europe imaging slices
    basedOn references to the order and wants the accession number in them."""
    return {
        "reference": urls.order,
        "type": "ServiceRequest",
        "identifier": _identifier(report.study.accession, _accession_type()),
    }


def _diagnostic_report(report: ReportVersion, urls: _Urls) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": _claims(
            "ncp-imaging-report-diagnosticreport", EU_IMAGING + "DiagnosticReportEuImaging"
        ),
        "language": report.language,
        "extension": [
            {"url": DIAGNOSTIC_REPORT_COMPOSITION_URL, "valueReference": _ref(urls.composition)}
        ],
        "identifier": [_identifier(report.report_id)],
        "basedOn": [_order_ref(report, urls)],
        "status": report.status,
        "category": _categories(),
        "code": _concept(_coding(LOINC, "18748-4", "Diagnostic imaging study")),
        "subject": _ref(urls.patient),
        "effectiveDateTime": _when(report.study.started),
        "issued": _when(report.issued),
        "performer": [_ref(urls.organization, report.organization.name)],
        "resultsInterpreter": [_ref(urls.radiologist, report.radiologist.text)],
    }
    if urls.findings:
        out["result"] = [_ref(url) for url in urls.findings]
    out["imagingStudy"] = [_ref(urls.study)]
    if report.text.impression:
        out["conclusion"] = report.text.impression
    if report.text.coded_findings:
        out["conclusionCode"] = [
            _concept(_coding(f.code.system, f.code.code, f.code.display))
            for f in report.text.coded_findings
        ]
    return out


def _finding(report: ReportVersion, urls: _Urls, finding: ReportFinding) -> dict[str, Any]:
    """One coded finding as an Observation (HL7 Europe ObservationFindingEuImaging)."""
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": _claims(None, EU_IMAGING + "ObservationFindingEuImaging"),
        "language": report.language,
        "basedOn": [_order_ref(report, urls)],
        # A preliminary report's findings are preliminary too; amended ones stay amended.
        "status": report.status,
        "category": [_concept(_coding(OBSERVATION_CATEGORY, "imaging", "Imaging"))],
        "code": _concept(_coding(finding.code.system, finding.code.code, finding.code.display)),
        "subject": _ref(urls.patient),
        "effectiveDateTime": _when(report.study.started),
        "issued": _when(report.issued),
        "performer": [_ref(urls.radiologist, report.radiologist.text)],
    }
    if finding.size_mm is not None:
        out["valueQuantity"] = {
            "value": finding.size_mm,
            "unit": "mm",
            "system": UCUM,
            "code": "mm",
        }
    if finding.body_site is not None:
        site = finding.body_site
        out["bodySite"] = _concept(_coding(site.system, site.code, site.display))
    out["derivedFrom"] = [_ref(urls.study)]
    return out


def _patient(report: ReportVersion) -> dict[str, Any]:
    patient = report.patient
    return {
        "resourceType": "Patient",
        "meta": _claims("ncp-patient"),
        "identifier": [_identifier(patient.identifier)],
        "name": [_name(patient.name)],
        "gender": patient.gender,
        "birthDate": patient.birth_date.isoformat(),
    }


def _imaging_study(report: ReportVersion, urls: _Urls) -> dict[str, Any]:
    study = report.study
    study_uid = Identifier("urn:dicom:uid", f"urn:oid:{study.study_instance_uid}")
    return {
        "resourceType": "ImagingStudy",
        "meta": _claims(None, EU_IMAGING + "ImagingStudyEuImaging"),
        "identifier": [
            _identifier(study_uid, _concept(_coding(DICOM, "110180", "Study Instance UID"))),
            _identifier(study.accession, _accession_type()),
        ],
        "status": "available",
        "modality": [_modality(m) for m in study.modalities],
        "subject": _ref(urls.patient),
        "started": _when(study.started),
        "basedOn": [_order_ref(report, urls)],
        "interpreter": [_ref(urls.radiologist)],
        "numberOfSeries": study.number_of_series,
        "numberOfInstances": study.number_of_instances,
        "procedureCode": [
            _concept(_coding(study.procedure.system, study.procedure.code, study.procedure.display))
        ],
        "description": study.description,
    }


def _service_request(report: ReportVersion, urls: _Urls) -> dict[str, Any]:
    study, order = report.study, report.order
    out: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "meta": _claims(None, EU_IMAGING + "ServiceRequestOrderEuImaging"),
        "identifier": [_identifier(study.accession, _accession_type())],
        "status": "completed",
        "intent": "order",
        # HL7 Europe imaging orders (ServiceRequestOrderEuImaging) say they are for imaging.
        "category": [_concept(_coding(SNOMED, "363679005", "Imaging"))],
        "code": _concept(
            _coding(study.procedure.system, study.procedure.code, study.procedure.display)
        ),
        "subject": _ref(urls.patient),
        "requester": _ref(urls.requester_role, order.requester.text),
    }
    if order.priority:
        if order.priority not in REQUEST_PRIORITIES:
            raise ReportBuildError(
                f"order priority {order.priority!r}: one of {', '.join(REQUEST_PRIORITIES)} "
                "(FHIR request-priority, a required binding)"
            )
        out["priority"] = order.priority
    if order.reason:
        out["reasonCode"] = [{"text": order.reason}]
    return out


def _organization(report: ReportVersion) -> dict[str, Any]:
    org = report.organization
    out: dict[str, Any] = {
        "resourceType": "Organization",
        "meta": _claims("ncp-organization"),
        "identifier": [_identifier(org.identifier)],
        "active": True,
        "name": org.name,
    }
    if org.city:
        out["address"] = [{"city": org.city}]
    return out


def _practitioner(name: HumanName) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "meta": _claims("ncp-practitioner"),
        "name": [_name(name)],
    }


def _requester_role(report: ReportVersion) -> dict[str, Any]:
    # The order's requester is a PractitionerRole so that the requesting specialty, one of
    # the guideline's selection parameters, travels with the order.
    out: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "meta": _claims("ncp-practitionerrole"),
        "practitioner": {"display": report.order.requester.text},
    }
    service = report.order.requesting_service
    if service is not None:
        out["specialty"] = [_concept(_coding(service.system, service.code, service.display))]
    return out


def build_report_bundle(report: ReportVersion) -> dict[str, Any]:
    """The document Bundle of one report version, as a JSON-ready dict in FHIR element order.

    Raises :class:`ReportBuildError` when the input is inconsistent.
    """
    _check(report)
    urls = _urls(report)
    resources = [
        (urls.composition, _composition(report, urls)),
        (urls.report, _diagnostic_report(report, urls)),
        (urls.patient, _patient(report)),
        (urls.study, _imaging_study(report, urls)),
        (urls.order, _service_request(report, urls)),
        (urls.organization, _organization(report)),
        (urls.radiologist, _practitioner(report.radiologist)),
        (urls.requester_role, _requester_role(report)),
        *(
            (url, _finding(report, urls, finding))
            for url, finding in zip(urls.findings, report.text.coded_findings, strict=True)
        ),
    ]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": _claims("ncp-imaging-report-bundle", EU_IMAGING + "BundleReportEuImaging"),
        "language": report.language,
        "identifier": _identifier(document_identifier(report.report_id, report.version)),
        "type": "document",
        "timestamp": _when(report.issued),
        "entry": [{"fullUrl": url, "resource": resource} for url, resource in resources],
    }
    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:  # a bug here, not the caller's: still a typed error
        raise ReportBuildError(f"the built bundle is not valid FHIR R4: {exc}") from exc
    return bundle


def report_bundle_json(report: ReportVersion) -> str:
    """The bundle as JSON text, in FHIR element order (not sorted), UTF-8 characters kept."""
    return json.dumps(build_report_bundle(report), ensure_ascii=False, indent=1)
