"""The ImagingStudy manifest (ncp.fhir.manifest) from a real index of generated DICOM: valid
against ncp-imaging-study-manifest, and saying what the DICOM files say."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session, sessionmaker

from ncp.config import NodeSettings
from ncp.dicom.folder import FolderSource
from ncp.errors import ConfigError
from ncp.examples.generate import generate_examples
from ncp.fhir.identifiers import patient_resource_id, patient_system
from ncp.fhir.manifest import (
    IMAGING_OPTION_SYSTEM,
    UNQUALIFIED_ACCESSION_SYSTEM,
    Custodian,
    ImagingEndpoints,
    ManifestError,
)
from ncp.fhir.manifest import imaging_study as build_imaging_study
from ncp.provider.describe import describe_indexed_study, describe_study
from ncp.provider.indexer import index_source
from ncp.store import db
from ncp.store.models import Instance, Patient, Series, Study
from ncp.validation.engine import Validator
from ncp.validation.issues import Issue, has_errors

BASE = "https://ncp-a.example/fhir"
ENDPOINTS = ImagingEndpoints(
    option_a="https://ncp-a.example/dicomweb",
    option_c="https://edge-a.example/dicomweb",
    viewer="https://ncp-a.example/viewer",
)
CUSTODIAN = Custodian(
    name="NCPeH Österreich",
    system="urn:ietf:rfc:3986",
    value=BASE,
    country="AT",
    zone=ZoneInfo("Europe/Vienna"),
)


def imaging_study(
    study: Study,
    endpoints: ImagingEndpoints,
    custodian: Custodian,
    *,
    instances: dict[str, list[Instance]] | None = None,
) -> dict[str, Any]:
    """The manifest of an index study row, described as the provider describes it (its
    instances read through its session when not given)."""
    if instances is None:
        session = object_session(study)
        if session is None:
            raise ManifestError("a detached study row needs its instances")
        facts = describe_indexed_study(session, study)
    else:
        facts = describe_study(study, study.series, instances)
    return build_imaging_study(facts, endpoints, custodian)


def errors(resource: dict[str, Any]) -> list[Issue]:
    issues = Validator.default().validate(resource)
    return [i for i in issues if i.severity in ("error", "fatal")] if has_errors(issues) else []


# --- a real index of generated examples, and what the DICOM files say ------------------------


@dataclass
class DicomStudy:
    accession: str
    started: datetime
    series: dict[str, list[tuple[str, str, int, int]]] = field(default_factory=dict)
    """Series UID → (SOP Instance UID, SOP Class UID, Instance Number, file size)."""


@dataclass
class Indexed:
    root: Path
    sessions: sessionmaker[Session]
    dicom: dict[str, DicomStudy]


def read_dicom(root: Path) -> dict[str, DicomStudy]:
    out: dict[str, DicomStudy] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        started = datetime.strptime(f"{ds.StudyDate}{ds.StudyTime[:6]}", "%Y%m%d%H%M%S")
        study = out.setdefault(ds.StudyInstanceUID, DicomStudy(ds.AccessionNumber, started))
        study.series.setdefault(ds.SeriesInstanceUID, []).append(
            (ds.SOPInstanceUID, ds.SOPClassUID, int(ds.InstanceNumber), path.stat().st_size)
        )
    return out


def build_index(root: Path) -> Indexed:
    generate_examples(root / "ex", patients=2, seed=4, big_patient_studies=5)
    engine = db.make_engine(f"sqlite:///{root / 'index.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    index_source(sessions, FolderSource(root / "ex" / "dicom"))
    return Indexed(root, sessions, read_dicom(root / "ex" / "dicom"))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    return build_index(tmp_path_factory.mktemp("manifest"))


@pytest.fixture
def session(indexed: Indexed) -> Iterator[Session]:
    with indexed.sessions() as s:
        yield s


def studies(session: Session) -> list[Study]:
    return list(session.scalars(select(Study).order_by(Study.study_uid)))


# --- every manifest of the index --------------------------------------------------------------


def test_every_manifest_is_valid_and_says_what_the_dicom_says(
    indexed: Indexed, session: Session
) -> None:
    found = studies(session)
    assert len(found) == 7 and set(indexed.dicom) == {s.study_uid for s in found}
    for study in found:
        manifest = imaging_study(study, ENDPOINTS, CUSTODIAN)
        assert errors(manifest) == [], study.study_uid
        truth = indexed.dicom[study.study_uid]
        assert manifest["id"] == study.study_uid
        uid_id, accession = manifest["identifier"]
        assert uid_id["system"] == "urn:dicom:uid"
        assert uid_id["value"] == f"urn:oid:{study.study_uid}"
        assert accession["value"] == truth.accession
        assert accession["system"] == f"urn:oid:{study.accession_issuer}"
        assert manifest["numberOfSeries"] == len(truth.series)
        all_instances = [i for rows in truth.series.values() for i in rows]
        assert manifest["numberOfInstances"] == len(all_instances)
        assert manifest["extension"][0]["valueDecimal"] == sum(i[3] for i in all_instances)
        # DICOM's local study time, with Vienna's offset of that day.
        local = truth.started.replace(tzinfo=ZoneInfo("Europe/Vienna"))
        assert datetime.fromisoformat(manifest["started"]) == local
        assert manifest["endpoint"] == [{"reference": "#viewer"}]
        for series in manifest["series"]:
            rows = truth.series[series["uid"]]
            assert series["numberOfInstances"] == len(rows)
            assert series["extension"][0]["valueDecimal"] == sum(r[3] for r in rows)
            listed = {(i["uid"], i["sopClass"]["code"], i["number"]) for i in series["instance"]}
            assert listed == {(r[0], f"urn:oid:{r[1]}", r[2]) for r in rows}
            numbers = [i["number"] for i in series["instance"]]
            assert numbers == sorted(numbers)
            assert series["endpoint"] == [{"reference": "#a"}, {"reference": "#c"}]
            (performer,) = series["performer"]
            assert performer["function"]["coding"][0]["code"] == "CST"
            assert performer["actor"]["identifier"] == {"system": CUSTODIAN.system, "value": BASE}
        series_numbers = [s["number"] for s in manifest["series"]]
        assert series_numbers == sorted(series_numbers)


def test_manifest_names_the_patient_by_country_a_identifier(session: Session) -> None:
    study = studies(session)[0]
    subject = imaging_study(study, ENDPOINTS, CUSTODIAN)["subject"]
    system = patient_system(study.patient.issuer)
    assert subject["identifier"] == {"system": system, "value": study.patient.patient_id}
    assert (
        subject["reference"] == f"Patient/{patient_resource_id(system, study.patient.patient_id)}"
    )


def test_body_site_goes_through_the_concept_map(session: Session) -> None:
    chest = next(s for s in studies(session) if s.body_parts == "CHEST")
    manifest = imaging_study(chest, ENDPOINTS, CUSTODIAN)
    sites = {(s["bodySite"]["system"], s["bodySite"]["code"]) for s in manifest["series"]}
    assert sites == {("http://snomed.info/sct", "816094009")}


def test_study_type_and_requesting_specialty(session: Session) -> None:
    study = studies(session)[0]
    manifest = imaging_study(study, ENDPOINTS, CUSTODIAN)
    assert manifest["procedureCode"][0]["coding"][0] == {
        "system": "http://loinc.org",
        "code": study.procedure_code,
        "display": manifest["procedureCode"][0]["coding"][0]["display"],
    }
    referrer = next(c for c in manifest["contained"] if c["id"] == "referrer")
    assert manifest["referrer"] == {"reference": "#referrer"}
    assert referrer["specialty"][0]["coding"][0]["code"] == study.requesting_code
    assert referrer["practitioner"]["display"] == study.referring_physician


# --- endpoints ---------------------------------------------------------------------------------


def contained(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in manifest["contained"]}


def test_options_a_and_c_are_told_apart(session: Session) -> None:
    manifest = imaging_study(studies(session)[0], ENDPOINTS, CUSTODIAN)
    found = contained(manifest)
    a, c, viewer = found["a"], found["c"], found["viewer"]
    assert a["identifier"] == [{"system": IMAGING_OPTION_SYSTEM, "value": "A"}]
    assert c["identifier"] == [{"system": IMAGING_OPTION_SYSTEM, "value": "C"}]
    assert a["address"] == ENDPOINTS.option_a and c["address"] == ENDPOINTS.option_c
    assert a["name"].startswith("Option A") and c["name"].startswith("Option C")
    assert {a["connectionType"]["code"], c["connectionType"]["code"]} == {"dicom-wado-rs"}
    assert viewer["connectionType"]["code"] == "ihe-iid"
    assert viewer["address"].startswith(f"{ENDPOINTS.viewer}/IHEInvokeImageDisplay?")
    assert f"studyUID={manifest['id']}" in viewer["address"]


def test_without_edge_and_viewer_only_option_a_is_offered(session: Session) -> None:
    only_a = ImagingEndpoints(option_a="https://ncp-a.example/dicomweb/")
    manifest = imaging_study(studies(session)[1], only_a, CUSTODIAN)
    assert errors(manifest) == []
    endpoints = [c for c in manifest["contained"] if c["resourceType"] == "Endpoint"]
    assert [e["id"] for e in endpoints] == ["a"]
    assert endpoints[0]["address"] == "https://ncp-a.example/dicomweb"
    assert "endpoint" not in manifest
    assert all(s["endpoint"] == [{"reference": "#a"}] for s in manifest["series"])


def test_the_validator_resolves_the_contained_endpoints(session: Session) -> None:
    """Contained endpoints are checked against their profiles, and a dangling one fails."""
    manifest = imaging_study(studies(session)[0], ENDPOINTS, CUSTODIAN)
    broken = copy.deepcopy(manifest)
    contained(broken)["a"]["connectionType"]["code"] = "ihe-iid"
    assert any("connectionType" in i.diagnostics for i in errors(broken))
    dangling = copy.deepcopy(manifest)
    dangling["series"][0]["endpoint"] = [{"reference": "#nowhere"}]
    assert any(i.rule == "ref-1" for i in errors(dangling))


def test_endpoints_and_custodian_from_settings(tmp_path: Path) -> None:
    settings = NodeSettings(
        node={"country": "AT", "name": "NCPeH-AT"},  # type: ignore[arg-type]
        archive={"kind": "folder", "path": tmp_path},  # type: ignore[arg-type]
        urls={  # type: ignore[arg-type]
            "standard": "https://ncp-a.example/fhir/",
            "imaging": "https://ncp-a.example/dicomweb",
        },
    )
    endpoints = ImagingEndpoints.from_settings(settings)
    assert endpoints == ImagingEndpoints("https://ncp-a.example/dicomweb", None, None)
    custodian = Custodian.from_settings(settings)
    assert (custodian.name, custodian.system, custodian.value) == (
        "NCPeH-AT",
        "urn:ietf:rfc:3986",
        "https://ncp-a.example/fhir",
    )
    assert custodian.zone == ZoneInfo("Europe/Vienna")
    bare = NodeSettings(
        node={"country": "AT"},  # type: ignore[arg-type]
        archive={"kind": "folder", "path": tmp_path},  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError):
        ImagingEndpoints.from_settings(bare)
    with pytest.raises(ConfigError):
        Custodian.from_settings(bare)


# --- rows the index may hold -------------------------------------------------------------------


def test_explicit_instances_give_the_same_manifest(session: Session) -> None:
    study = studies(session)[2]
    loaded: dict[str, list[Instance]] = {s.series_uid: [] for s in study.series}
    for series in study.series:
        loaded[series.series_uid] = list(
            session.scalars(select(Instance).where(Instance.series_pk == series.id))
        )
    assert imaging_study(study, ENDPOINTS, CUSTODIAN, instances=loaded) == imaging_study(
        study, ENDPOINTS, CUSTODIAN
    )


def test_detached_rows_need_their_instances() -> None:
    study, _ = make_study(StudySpec(series=[SeriesSpec(instances=1)]))
    with pytest.raises(ManifestError):
        imaging_study(study, ENDPOINTS, CUSTODIAN)


def test_no_date_anywhere_is_refused() -> None:
    study, instances = make_study(StudySpec(started=None, series=[SeriesSpec(started=None)]))
    with pytest.raises(ManifestError, match="no date"):
        imaging_study(study, ENDPOINTS, CUSTODIAN, instances=instances)


def test_missing_study_date_falls_back_to_the_first_series() -> None:
    spec = StudySpec(
        started=None,
        series=[SeriesSpec(started=datetime(2020, 1, 2, 3, 4, 5)), SeriesSpec(started=None)],
    )
    study, instances = make_study(spec)
    manifest = imaging_study(study, ENDPOINTS, CUSTODIAN, instances=instances)
    assert errors(manifest) == []
    assert manifest["started"] == "2020-01-02T03:04:05+01:00"


def test_series_without_instances_are_left_out() -> None:
    study, instances = make_study(StudySpec(series=[SeriesSpec(instances=2), SeriesSpec()]))
    instances[study.series[1].series_uid] = []
    manifest = imaging_study(study, ENDPOINTS, CUSTODIAN, instances=instances)
    assert errors(manifest) == []
    assert (manifest["numberOfSeries"], manifest["numberOfInstances"]) == (1, 2)


def test_patient_without_issuer_is_refused() -> None:
    study, instances = make_study(StudySpec(issuer=""))
    with pytest.raises(ManifestError, match="Issuer"):
        imaging_study(study, ENDPOINTS, CUSTODIAN, instances=instances)


# --- odd index values (property) ---------------------------------------------------------------


@dataclass
class SeriesSpec:
    instances: int = 1
    modality: str | None = "CT"
    body_part: str | None = "CHEST"
    laterality: str | None = None
    description: str | None = "series"
    number: int | None = 1
    started: datetime | None = datetime(2024, 5, 6, 7, 8, 9)
    size: int = 1000


@dataclass
class StudySpec:
    series: list[SeriesSpec] = field(default_factory=lambda: [SeriesSpec()])
    started: datetime | None = datetime(2024, 5, 6, 7, 0, 0)
    description: str | None = "CT Chest"
    accession: str | None = "ACC1"
    accession_issuer: str | None = "1.2.3.4"
    procedure: tuple[str, str, str] | None = ("LN", "24627-2", "CT Chest")
    requesting: tuple[str, str, str] | None = ("SCT", "394579002", "Cardiology")
    referring: str | None = "Dr. Referrer"
    family: str | None = "Doe"
    given: str | None = "Jane"
    issuer: str = "1.2.40.0.10.1.4.3.1"
    birth_date: date | None = date(1970, 1, 1)


def make_study(spec: StudySpec) -> tuple[Study, dict[str, list[Instance]]]:
    """Transient index rows (no database), shaped as the indexer writes them."""
    patient = Patient(
        patient_id="PAT-1",
        issuer=spec.issuer,
        family_name=spec.family,
        given_name=spec.given,
        birth_date=spec.birth_date,
        sex="F",
        header_sop_uid="1.2.3",
    )
    procedure = spec.procedure or (None, None, None)
    requesting = spec.requesting or (None, None, None)
    sizes = sum(s.size * s.instances for s in spec.series)
    study = Study(
        study_uid="1.2.826.0.1.3680043.8.498.1",
        patient=patient,
        accession_number=spec.accession,
        accession_issuer=spec.accession_issuer,
        started=spec.started,
        description=spec.description,
        procedure_scheme=procedure[0],
        procedure_code=procedure[1],
        procedure_meaning=procedure[2],
        requesting_scheme=requesting[0],
        requesting_code=requesting[1],
        requesting_meaning=requesting[2],
        referring_physician=spec.referring,
        modalities="\\".join(sorted({s.modality for s in spec.series if s.modality})),
        body_parts="\\".join(sorted({s.body_part for s in spec.series if s.body_part})),
        num_series=len(spec.series),
        num_instances=sum(s.instances for s in spec.series),
        size_bytes=sizes,
        header_sop_uid="1.2.3",
    )
    instances: dict[str, list[Instance]] = {}
    for i, s in enumerate(spec.series, start=1):
        series = Series(
            series_uid=f"1.2.826.0.1.3680043.8.498.1.{i}",
            study=study,
            number=s.number,
            modality=s.modality,
            description=s.description,
            body_part=s.body_part,
            laterality=s.laterality,
            started=s.started,
            num_instances=s.instances,
            size_bytes=s.size * s.instances,
            header_sop_uid="1.2.3",
        )
        instances[series.series_uid] = [
            Instance(
                sop_uid=f"{series.series_uid}.{j}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                instance_number=j if j % 3 else None,
                size_bytes=s.size,
                source="test",
                locator=f"{i}/{j}",
            )
            for j in range(1, s.instances + 1)
        ]
    return study, instances


# FHIR strings: no control characters, and something besides whitespace.
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\ufffe\uffff"),
    min_size=1,
    max_size=40,
).filter(lambda t: t.strip() != "")
_maybe_text = st.none() | _text
_modality = st.sampled_from(["CT", "MR", "US", "SR", "XX", "KO"]) | st.none()
_body_part = st.sampled_from(["CHEST", "HEAD", "KNEE", "NOTAPART", "ABDOMENPELVIS"]) | st.none()
_moment = st.none() | st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(2030, 1, 1))
_series = st.builds(
    SeriesSpec,
    instances=st.integers(1, 4),
    modality=_modality,
    body_part=_body_part,
    laterality=st.sampled_from(["L", "R", "B", "U", "", None]),
    description=_maybe_text,
    number=st.none() | st.integers(-5, 2**31 - 1),
    started=_moment,
    size=st.integers(0, 2**40),
)
_specs = st.builds(
    StudySpec,
    series=st.lists(_series, min_size=1, max_size=30),
    started=st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(2030, 1, 1)),
    description=_maybe_text,
    accession=st.none() | st.text(alphabet="ABC123-/ ", min_size=1, max_size=20),
    accession_issuer=st.sampled_from([None, "", "1.2.3", "https://ris.example/acc", "ris"]),
    procedure=st.sampled_from(
        [None, ("LN", "24627-2", "CT Chest"), ("99LOCAL", "X1", "Local code"), ("LN", "1-1", None)]
    ),
    requesting=st.sampled_from([None, ("SCT", "394579002", "Cardiology"), (None, None, "Neuro")]),
    referring=_maybe_text,
    family=_maybe_text,
    given=_maybe_text,
    birth_date=st.none() | st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 1, 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs)
def test_odd_index_values_still_give_a_valid_manifest(spec: StudySpec) -> None:
    study, instances = make_study(spec)
    manifest = imaging_study(study, ENDPOINTS, CUSTODIAN, instances=instances)
    assert errors(manifest) == []
    assert manifest["numberOfSeries"] == len(spec.series)
    assert manifest["numberOfInstances"] == sum(s.instances for s in spec.series)
    has_accession = bool(spec.accession) and len(spec.accession or "") <= 16
    assert (len(manifest["identifier"]) == 2) == has_accession
    if has_accession and not spec.accession_issuer:
        assert manifest["identifier"][1]["system"] == UNQUALIFIED_ACCESSION_SYSTEM


# --- Key Object Selection documents (IHE MADO ko-document-title) -------------------------------


def test_a_key_object_selection_document_carries_its_title(tmp_path: Path) -> None:
    """A KOS instance in the archive: the index keeps its Concept Name, the manifest shows it
    as MADO's ko-document-title, and a multi-frame instance its number of frames."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    archive = tmp_path / "archive"
    archive.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()

    def write(name: str, sop_class: str, **values: Any) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.IssuerOfPatientID = "KOS-1", "1.2.40.0.10.1.4.3.1"
        ds.StudyDate, ds.StudyTime, ds.Modality = "20240105", "101500", "KO"
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(archive / name, enforce_file_format=True)

    title = Dataset()
    title.CodingSchemeDesignator, title.CodeValue = "DCM", "113000"
    title.CodeMeaning = "Of Interest"
    write(
        "ko.dcm", "1.2.840.10008.5.1.4.1.1.88.59", InstanceNumber=1, ConceptNameCodeSequence=[title]
    )
    write("mf.dcm", "1.2.840.10008.5.1.4.1.1.7", InstanceNumber=2, NumberOfFrames=3)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    index_source(sessions, FolderSource(archive))
    with sessions() as session:
        (study,) = studies(session)
        manifest = imaging_study(study, ENDPOINTS, CUSTODIAN)
    assert errors(manifest) == []
    instances = {i["number"]: i for s in manifest["series"] for i in s["instance"]}
    ko_url = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoKeyObjectDocumentTitle"
    frames_url = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"
    (ko,) = instances[1]["extension"]
    assert ko["url"] == ko_url
    assert ko["valueCodeableConcept"]["coding"][0] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "113000",
        "display": "Of Interest",
    }
    assert instances[2]["extension"] == [{"url": frames_url, "valueInteger": 3}]
    engine.dispose()
