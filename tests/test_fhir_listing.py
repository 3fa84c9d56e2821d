"""The metadata list's entries (ncp.fhir.listing): manifest and report DocumentReferences,
Patient and Organization, from a real index of generated DICOM and report rows made here."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.fhir import listing
from ncp.fhir.identifiers import (
    manifest_reference_id,
    patient_resource_id,
    patient_system,
    report_resource_id,
)
from ncp.fhir.listing import MADO_FORMAT, organization
from ncp.fhir.manifest import Custodian, ManifestError
from ncp.provider.describe import describe_patient, describe_report, describe_study
from ncp.store.models import Patient, Report, ReportVersion, Study
from tests.test_fhir_manifest import (
    BASE,
    CUSTODIAN,
    ENDPOINTS,
    Indexed,
    StudySpec,
    _specs,
    build_index,
    errors,
    imaging_study,
    make_study,
)

# The builders take plain values; these describe index and report rows as the provider does.


def manifest_reference(study: Study, custodian: Custodian, *, base_url: str) -> dict[str, Any]:
    return listing.manifest_reference(describe_study(study), custodian, base_url=base_url)


def report_reference(
    report: Report,
    version: ReportVersion,
    *,
    base_url: str,
    study: Study | None,
    custodian: Custodian | None = None,
) -> dict[str, Any]:
    return listing.report_reference(
        describe_report(report, version),
        base_url=base_url,
        study=describe_study(study) if study is not None else None,
        custodian=custodian,
    )


def patient_resource(patient: Patient) -> dict[str, Any]:
    return listing.patient_resource(describe_patient(patient))


SNOMED = "http://snomed.info/sct"
MODALITY_URL = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.modality"
BODY_SITE_URL = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.bodySite"
SIZE_URL = "https://ncp.example/fhir/StructureDefinition/ncp-size-bytes"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    return build_index(tmp_path_factory.mktemp("listing"))


@pytest.fixture
def session(indexed: Indexed) -> Iterator[Session]:
    with indexed.sessions() as s:
        yield s


def studies(session: Session) -> list[Study]:
    return list(session.scalars(select(Study).order_by(Study.study_uid)))


def extensions(resource: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension", []) if e["url"] == url]


# --- manifest entries --------------------------------------------------------------------------


def test_every_manifest_entry_is_valid_and_carries_the_selection_parameters(
    indexed: Indexed, session: Session
) -> None:
    for study in studies(session):
        entry = manifest_reference(study, CUSTODIAN, base_url=BASE + "/")
        assert errors(entry) == [], study.study_uid
        truth = indexed.dicom[study.study_uid]
        assert entry["id"] == manifest_reference_id(study.study_uid)
        (content,) = entry["content"]
        assert content["format"] == MADO_FORMAT
        assert (
            content["attachment"]["url"]
            == f"{BASE}/Bundle/{manifest_reference_id(study.study_uid)}"
        )
        assert content["attachment"]["title"] == study.description
        size = sum(i[3] for rows in truth.series.values() for i in rows)
        assert extensions(entry, SIZE_URL) == [{"url": SIZE_URL, "valueDecimal": size}]
        modality = extensions(entry, MODALITY_URL)
        assert [m["valueCodeableConcept"]["coding"][0]["code"] for m in modality] == [
            study.modalities
        ]
        (site,) = extensions(entry, BODY_SITE_URL)
        codings = site["extension"][0]["valueCodeableConcept"]["coding"]
        assert codings[0]["system"] == SNOMED and codings[1]["code"] == study.body_parts
        context = entry["context"]
        assert context["event"][0]["coding"][0]["code"] == study.procedure_code
        assert context["practiceSetting"]["coding"][0]["code"] == study.requesting_code
        assert context["period"]["start"] == entry["date"]
        uid_ref, acc_ref = context["related"]
        assert uid_ref["reference"] == f"ImagingStudy/{study.study_uid}"
        assert uid_ref["identifier"]["value"] == f"urn:oid:{study.study_uid}"
        assert acc_ref["identifier"]["value"] == truth.accession
        assert entry["custodian"]["display"] == CUSTODIAN.name


def test_a_searchset_of_entries_and_manifests_validates(session: Session) -> None:
    """What the list answers with `_include`: entries, manifests (contained endpoints),
    the patient and the custodian, all resolving inside the bundle."""
    found = studies(session)
    patient = found[0].patient
    resources: list[dict[str, Any]] = []
    for study in (s for s in found if s.patient_pk == patient.id):
        resources.append(manifest_reference(study, CUSTODIAN, base_url=BASE))
        resources.append(imaging_study(study, ENDPOINTS, CUSTODIAN))
    resources += [patient_resource(patient), organization(CUSTODIAN)]
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources) - 2,
        "entry": [
            {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
        ],
    }
    assert errors(bundle) == []


def test_manifest_entry_says_so_when_dicom_lacks_a_parameter() -> None:
    study, _ = make_study(StudySpec(procedure=None, requesting=None))
    for series in study.series:
        series.body_part = None
    study.body_parts = ""
    entry = manifest_reference(study, CUSTODIAN, base_url=BASE)
    assert errors(entry) == []
    assert entry["context"]["event"] == [{"text": "Study type not recorded in the DICOM"}]
    assert "coding" not in entry["context"]["practiceSetting"]
    (site,) = extensions(entry, BODY_SITE_URL)
    assert "coding" not in site["extension"][0]["valueCodeableConcept"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs)
def test_odd_index_values_still_give_valid_entries(spec: StudySpec) -> None:
    study, _ = make_study(spec)
    assert errors(manifest_reference(study, CUSTODIAN, base_url=BASE)) == []
    assert errors(patient_resource(study.patient)) == []


# --- report entries ----------------------------------------------------------------------------


def report_rows(
    study: Study, statuses: tuple[str, ...] = ("preliminary", "final")
) -> tuple[Report, list[ReportVersion]]:
    """A report with one version per status, as the report store keeps them (model columns)."""
    system, value = "urn:oid:2.25.1.2", f"RPT-{study.accession_number}"
    report = Report(
        id=report_resource_id(system, value),
        identifier_system=system,
        identifier_value=value,
        patient_id=study.patient.patient_id,
        patient_issuer=study.patient.issuer,
        latest_version=len(statuses),
    )
    versions = [
        ReportVersion(
            report=report,
            version=n,
            latest=n == len(statuses),
            bundle_system="urn:ietf:rfc:3986",
            bundle_value=f"urn:uuid:00000000-0000-4000-8000-00000000000{n}",
            status=status,
            title=f"Imaging report: {study.description}",
            date=datetime(2025, 1, n, 12, 0, 0),
            language="de-AT",
            author="Dr. Gerhard Pfeifer",
            custodian_name="Landesklinikum Alpenblick",
            custodian_system="urn:ietf:rfc:3986",
            custodian_value="urn:oid:2.25.225465799366253215828779836200508436846",
            study_uid=study.study_uid,
            accession_number=study.accession_number,
            accession_issuer=study.accession_issuer,
            modalities=study.modalities,
            body_parts=study.body_parts,
            procedure_code=study.procedure_code,
            requesting_code=study.requesting_code,
            replaces_version=n - 1 if n > 1 else None,
            content="{}",
            size_bytes=4096 + n,
            sha256="0" * 64,
            received_at=datetime(2025, 1, n, 12, 0, 1),
        )
        for n, status in enumerate(statuses, start=1)
    ]
    return report, versions


def test_report_rows_are_storable(session: Session) -> None:
    """The rows built here are what the report store's tables accept."""
    report, _versions = report_rows(studies(session)[0])
    session.add(report)
    session.flush()
    assert [v.version for v in report.versions] == [1, 2]
    session.rollback()


def test_latest_report_version_is_current_and_linked_to_its_study(session: Session) -> None:
    study = studies(session)[0]
    report, (_v1, v2) = report_rows(study)
    entry = report_reference(report, v2, base_url=BASE, study=study, custodian=CUSTODIAN)
    assert errors(entry) == []
    assert (entry["id"], entry["status"], entry["docStatus"]) == (report.id, "current", "final")
    attachment = entry["content"][0]["attachment"]
    assert attachment["url"] == f"{BASE}/Bundle/{report.id}"
    assert attachment["contentType"] == "application/fhir+json"
    assert (attachment["language"], attachment["size"]) == ("de-AT", v2.size_bytes)
    assert entry["type"]["coding"][0]["code"] == "18748-4"
    assert entry["masterIdentifier"]["value"] == v2.bundle_value
    assert entry["identifier"] == [
        {"system": report.identifier_system, "value": report.identifier_value}
    ]
    assert entry["date"] == "2025-01-02T12:00:00+00:00"
    assert entry["custodian"]["display"] == "Landesklinikum Alpenblick"
    uid_ref, acc_ref = entry["context"]["related"]
    assert uid_ref["reference"] == f"ImagingStudy/{study.study_uid}"
    assert acc_ref["identifier"]["value"] == study.accession_number
    assert (
        entry["context"]["period"]["start"] == imaging_study(study, ENDPOINTS, CUSTODIAN)["started"]
    )
    assert extensions(entry, MODALITY_URL)[0]["valueCodeableConcept"]["coding"][0]["code"] == (
        study.modalities
    )
    system = patient_system(study.patient.issuer)
    assert entry["subject"]["reference"] == (
        f"Patient/{patient_resource_id(system, study.patient.patient_id)}"
    )


def test_a_report_of_an_urgent_order_is_tagged_so_in_its_list_entry(session: Session) -> None:
    study = studies(session)[0]
    report, (_v1, v2) = report_rows(study)
    plain = report_reference(report, v2, base_url=BASE, study=study, custodian=CUSTODIAN)
    assert "tag" not in plain["meta"]
    for priority, flagged in (("stat", True), ("asap", True), ("urgent", True), ("routine", False)):
        v2.priority = priority
        entry = report_reference(report, v2, base_url=BASE, study=study, custodian=CUSTODIAN)
        assert errors(entry) == []
        tags = entry["meta"].get("tag", [])
        assert tags == (
            [{"system": "http://hl7.org/fhir/request-priority", "code": priority,
              "display": {"stat": "STAT", "asap": "ASAP", "urgent": "Urgent"}[priority]}]
            if flagged else []
        )  # fmt: skip


def test_older_version_is_superseded_and_points_at_its_history(session: Session) -> None:
    study = studies(session)[0]
    report, (v1, _v2) = report_rows(study)
    entry = report_reference(report, v1, base_url=BASE, study=study)
    assert errors(entry) == []
    assert (entry["status"], entry["docStatus"]) == ("superseded", "preliminary")
    assert entry["content"][0]["attachment"]["url"] == f"{BASE}/Bundle/{report.id}/_history/1"
    # Without the archive's zone the study date alone is written, never a wrong offset.
    assert entry["context"]["period"]["start"] == study.started.date().isoformat()  # type: ignore[union-attr]


def test_report_of_a_study_not_indexed_is_listed_by_identifier_only(session: Session) -> None:
    study = studies(session)[0]
    report, (_v1, v2) = report_rows(study)
    entry = report_reference(report, v2, base_url=BASE, study=None)
    assert errors(entry) == []
    uid_ref = entry["context"]["related"][0]
    assert "reference" not in uid_ref
    assert uid_ref["identifier"]["value"] == f"urn:oid:{study.study_uid}"
    assert "period" not in entry["context"]


@pytest.mark.parametrize(
    ("status", "doc_status"),
    [
        ("preliminary", "preliminary"),
        ("final", "final"),
        ("amended", "amended"),
        ("corrected", "amended"),
    ],
)
def test_doc_status_follows_the_report_status(
    session: Session, status: str, doc_status: str
) -> None:
    study = studies(session)[1]
    report, versions = report_rows(study, ("final", status))
    entry = report_reference(report, versions[-1], base_url=BASE, study=study)
    assert errors(entry) == []
    assert entry["docStatus"] == doc_status


def test_report_without_custodian_uses_the_given_one(session: Session) -> None:
    study = studies(session)[0]
    report, (_v1, v2) = report_rows(study)
    v2.custodian_name = v2.custodian_system = v2.custodian_value = None
    with pytest.raises(ManifestError):
        report_reference(report, v2, base_url=BASE, study=study)
    entry = report_reference(report, v2, base_url=BASE, study=study, custodian=CUSTODIAN)
    assert errors(entry) == []
    assert entry["custodian"]["identifier"]["value"] == CUSTODIAN.value


def test_report_row_without_codes_still_validates(session: Session) -> None:
    study = studies(session)[0]
    report, (_v1, v2) = report_rows(study)
    v2.modalities = v2.body_parts = ""
    v2.procedure_code = v2.requesting_code = v2.accession_number = None
    v2.language = v2.author = None
    entry = report_reference(report, v2, base_url=BASE, study=None)
    assert errors(entry) == []
    assert "extension" not in entry and len(entry["context"]["related"]) == 1


def test_report_without_any_study_uid_is_refused(session: Session) -> None:
    report, (_v1, v2) = report_rows(studies(session)[0])
    v2.study_uid = None
    with pytest.raises(ManifestError):
        report_reference(report, v2, base_url=BASE, study=None)


# --- Patient and Organization ------------------------------------------------------------------


def test_patients_of_the_index_are_valid(session: Session) -> None:
    patients = list(session.scalars(select(Patient)))
    assert len(patients) == 2
    for patient in patients:
        resource = patient_resource(patient)
        assert errors(resource) == []
        system = patient_system(patient.issuer)
        assert resource["id"] == patient_resource_id(system, patient.patient_id)
        assert resource["identifier"] == [{"system": system, "value": patient.patient_id}]
        assert resource["name"][0]["family"] == patient.family_name
        assert resource["birthDate"] == patient.birth_date.isoformat()  # type: ignore[union-attr]
        assert resource["gender"] in ("male", "female")


def test_patient_without_name_or_birth_date_is_marked_absent() -> None:
    patient = Patient(patient_id="X", issuer="1.2.3", header_sop_uid="1.2")
    resource = patient_resource(patient)
    assert errors(resource) == []
    assert "birthDate" not in resource and "_birthDate" in resource
    assert resource["gender"] == "unknown"
    named = Patient(
        patient_id="Y",
        issuer="https://id.example/pat",
        family_name="Kovačević",
        given_name="Ágnes",
        birth_date=date(1952, 9, 3),
        sex="O",
        header_sop_uid="1.2",
    )
    resource = patient_resource(named)
    assert errors(resource) == []
    assert resource["name"][0]["text"] == "Ágnes Kovačević"
    assert resource["identifier"][0]["system"] == "https://id.example/pat"


def test_organization_is_what_references_point_at() -> None:
    resource = organization(CUSTODIAN)
    assert errors(resource) == []
    assert CUSTODIAN.reference()["reference"] == f"Organization/{resource['id']}"
    assert resource["address"] == [{"country": "AT"}]
