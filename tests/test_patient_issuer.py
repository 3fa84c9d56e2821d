"""Patients whose archive gives no Issuer of Patient ID (0010,0021): the archive source's
configured assigning authority (``[archive] patient_id_issuer``) is their issuer in the index,
the list, image access tokens and both gateways' patient checks (issue 13, item 1).

Real archives rarely fill (0010,0021): without the setting such patients were indexed but no
peer could reach them ($match found none, $imaging-access answered 403).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.cli import main
from ncp.config import FolderArchive
from ncp.dicom.folder import FolderSource
from ncp.fhir.identifiers import patient_resource_id
from ncp.provider.indexer import index_source
from ncp.security.claims import PatientRef
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Patient, Study
from tests.gateway_support import AS_STORED, bearer, multipart_parts, token
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.node import ISSUER, SYSTEM, RunningNode, running_node

PATIENT_ID = "NOISS1"
STUDY = "1.2.826.0.1.3680043.10.543.300.1"
SOPS = {f"{STUDY}.1.{n}" for n in (1, 2)}
PATIENT = PatientRef(SYSTEM, PATIENT_ID)


def write_without_issuer(archive: Path) -> None:
    """Two instances of a patient whose files carry no Issuer of Patient ID."""
    for n in (1, 2):
        ds = make_instance(
            patient_id=PATIENT_ID,
            study_uid=STUDY,
            series_uid=f"{STUDY}.1",
            sop_uid=f"{STUDY}.1.{n}",
            PatientName="Weber^Lena",
            PatientBirthDate="19820304",
            PatientSex="F",
            InstanceNumber=n,
        )
        assert "IssuerOfPatientID" not in ds
        write_instance(archive / PATIENT_ID / f"{n}.dcm", ds)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(
        tmp_path_factory.mktemp("issuer"),
        settings_changes={"archive": {"patient_id_issuer": ISSUER}},
        archive_extra=write_without_issuer,
        edge=True,
    ) as running:
        yield running


def _values(parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        p["name"]: next(v for k, v in p.items() if k.startswith("value"))
        for p in parameters["parameter"]
    }


def test_the_patient_is_found_by_match(node: RunningNode) -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "resource",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": SYSTEM, "value": PATIENT_ID}],
                    "name": [{"family": "Weber", "given": ["Lena"]}],
                    "birthDate": "1982-03-04",
                },
            }
        ],
    }
    with node.client() as http:
        answer = http.post("/fhir/Patient/$match", json=body, headers=node.b.headers(None))
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert bundle["total"] == 1
    found = bundle["entry"][0]
    assert found["resource"]["identifier"][0] == {"system": SYSTEM, "value": PATIENT_ID}
    assert found["search"]["extension"][0]["valueCode"] == "certain"


def test_the_patients_studies_are_listed(node: RunningNode) -> None:
    reference = f"Patient/{patient_resource_id(SYSTEM, PATIENT_ID)}"
    with node.client() as http:
        answer = http.get(
            "/fhir/ImagingStudy", params={"patient": reference}, headers=node.b.headers(PATIENT)
        )
    assert answer.status_code == 200, answer.text
    studies = [e["resource"] for e in answer.json().get("entry", [])]
    assert [s["id"] for s in studies] == [STUDY]
    assert studies[0]["subject"]["identifier"] == {"system": SYSTEM, "value": PATIENT_ID}


@pytest.mark.parametrize("option", ["A", "C"])
def test_a_token_is_granted_and_the_study_retrieved(node: RunningNode, option: str) -> None:
    """Option A (the node's gateway, its index) and option C (the edge, no index) deliver the
    study: both read the archive's missing issuer as the configured one."""
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "study", "valueString": STUDY},
            {"name": "option", "valueCode": option},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    with node.client() as http:
        answer = http.post("/fhir/$imaging-access", json=body, headers=node.b.headers(PATIENT))
    assert answer.status_code == 200, answer.text
    granted = _values(answer.json())
    assert granted["dicomweb"] == (node.imaging_url if option == "A" else node.edge_url)
    context = ssl.create_default_context(cafile=node.ca_file)
    with httpx.Client(verify=context, timeout=30.0) as client:
        r = client.get(
            f"{granted['dicomweb']}/studies/{STUDY}",
            headers={**bearer(granted["token"]), "Accept": AS_STORED},
        )
        assert r.status_code == 200, r.text
        parts = multipart_parts(r.headers["content-type"], r.content)
        assert {pydicom.dcmread(BytesIO(p)).SOPInstanceUID for p in parts} == SOPS
        search = client.get(f"{granted['dicomweb']}/studies", headers=bearer(granted["token"]))
    assert search.status_code == 200, search.text
    assert [item["0020000D"]["Value"] for item in search.json()] == [[STUDY]]
    with node.node.sessions() as session:  # the grant is audited under A's system
        issued = session.scalars(
            select(AuditRecord).where(
                AuditRecord.action == "access-token-issue", AuditRecord.patient_id == PATIENT_ID
            )
        ).all()
    assert issued and {r.patient_issuer for r in issued} == {ISSUER}


@pytest.mark.parametrize("gateway", ["imaging", "edge"])
def test_the_same_id_under_another_issuer_is_another_patient(
    node: RunningNode, gateway: str
) -> None:
    """The configured issuer is the patient's: a token (signed by A) for the same ID in another
    namespace is another patient at both gateways (403), as an archive's issuer would make it."""
    base = node.imaging_url if gateway == "imaging" else node.edge_url
    assert base is not None
    key = node.node.keystore.current_signing_key()
    stranger = PatientRef("urn:oid:1.2.3.999", PATIENT_ID)
    context = ssl.create_default_context(cafile=node.ca_file)
    with httpx.Client(verify=context, timeout=30.0) as client:
        for patient, status in ((stranger, 403), (PATIENT, 200)):
            signed = token(base, (STUDY,), patient=patient, key=key)
            r = client.get(f"{base}/studies/{STUDY}/metadata", headers=bearer(signed))
            assert r.status_code == status, r.text


# --- the index ----------------------------------------------------------------------------------


def _index(tmp_path: Path, issuer: str) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    run = index_source(sessions, FolderSource(tmp_path / "archive"), patient_id_issuer=issuer)
    with sessions() as session:
        owners = session.execute(
            select(Patient.patient_id, Patient.issuer, Study.study_uid).join(
                Study, Study.patient_pk == Patient.id, isouter=True
            )
        ).all()
    engine.dispose()
    return run, sorted(owners)


def test_a_new_issuer_setting_reads_the_archive_again(tmp_path: Path) -> None:
    """The index built without the setting holds the patient without issuer; the next run
    under a configured issuer re-reads every entry, re-attaches the study and drops the
    patient row left without studies. The same setting again reads nothing."""
    write_without_issuer(tmp_path / "archive")
    run, owners = _index(tmp_path, "")
    assert owners == [(PATIENT_ID, "", STUDY)]
    assert run.without_issuer == 2
    run, owners = _index(tmp_path, ISSUER)
    assert owners == [(PATIENT_ID, ISSUER, STUDY)]
    assert (run.updated, run.unchanged, run.without_issuer) == (2, 0, 2)
    run, owners = _index(tmp_path, ISSUER)
    assert (run.updated, run.unchanged) == (0, 2)
    assert owners == [(PATIENT_ID, ISSUER, STUDY)]


def test_an_archive_issuer_wins_over_the_setting(tmp_path: Path) -> None:
    ds = make_instance(patient_id="P9", IssuerOfPatientID="1.2.3.4")
    write_instance(tmp_path / "archive" / "1.dcm", ds)
    run, owners = _index(tmp_path, ISSUER)
    assert [o[:2] for o in owners] == [("P9", "1.2.3.4")]
    assert run.without_issuer == 0


@pytest.mark.parametrize("value", ["not an issuer", "1.2.3.", "x" * 65 + ":", "a\\b:c", " 1.2.3"])
def test_an_issuer_that_no_identifier_system_can_name_is_refused(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ValidationError):
        FolderArchive(path=tmp_path, patient_id_issuer=value)
    assert FolderArchive(path=tmp_path, patient_id_issuer="urn:example:at").patient_id_issuer


# --- ncp index and ncp studies ------------------------------------------------------------------


def _config(tmp_path: Path, issuer: str) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[node]
country = "AT"
patient_id_issuer = "{ISSUER}"

[database]
url = "sqlite:///{tmp_path / "cli.db"}"

[archive]
kind = "folder"
path = "{tmp_path / "archive"}"
patient_id_issuer = "{issuer}"
""",
        encoding="utf-8",
    )
    return config


def test_ncp_studies_finds_the_patient_under_the_archives_issuer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_without_issuer(tmp_path / "archive")
    config = _config(tmp_path, "")
    assert main(["index", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 instances carry no Issuer of Patient ID and [archive] names no" in out
    assert main(["studies", "--config", str(config), "--patient", PATIENT_ID]) == 1
    out = capsys.readouterr().out
    assert "indexed under issuer ''" in out
    config = _config(tmp_path, ISSUER)
    assert main(["index", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["studies", "--config", str(config), "--patient", PATIENT_ID]) == 0
    assert "1 studies" in capsys.readouterr().out
