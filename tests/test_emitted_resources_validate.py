"""What the node emits validates with its own validator, against the profiles it claims (the
project's and the guides' it follows: HL7 Europe imaging, IHE MADO, checked through their
transcriptions), and against each guide's profiles forced as ``ncp validate --ig`` does."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.dicom.folder import FolderSource
from ncp.fhir import canonical
from ncp.fhir.io import read_path, read_resource
from ncp.fhir.listing import manifest_reference
from ncp.fhir.mado import mado_bundle
from ncp.fhir.manifest import Custodian, ImagingEndpoints, imaging_study
from ncp.provider.describe import describe_indexed_study, describe_study
from ncp.provider.indexer import index_source
from ncp.store import db
from ncp.store.models import Study
from ncp.validation.engine import Validator
from ncp.validation.guides import guide_profiles
from ncp.validation.issues import Issue, has_errors
from tests.validation_support import generated_bundles

SAMPLE = Path(__file__).parents[1] / "examples" / "sample"
SAMPLE_REPORTS = sorted((SAMPLE / "reports").rglob("*.json"))
BASE = "https://ncp-a.example/fhir"
ENDPOINTS = ImagingEndpoints(
    "https://ncp-a.example/dicomweb", "https://edge-a.example/dicomweb", "https://ncp-a.example/v"
)
CUSTODIAN = Custodian("NCPeH AT", "urn:ietf:rfc:3986", BASE, "AT", ZoneInfo("Europe/Vienna"))
EU_BUNDLE = "http://hl7.eu/fhir/imaging/StructureDefinition/BundleReportEuImaging"
MADO_BUNDLE = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoFhirBundle"


def errors(resource: dict[str, Any], profiles: list[str] | None = None) -> list[Issue]:
    issues = Validator.default().validate(resource, profiles=profiles or [])
    return [i for i in issues if i.is_error] if has_errors(issues) else []


def skipped(resource: dict[str, Any]) -> list[str]:
    """Invariants the validator could not evaluate (it says so in an information issue)."""
    issues = Validator.default().validate(resource)
    return [i.diagnostics for i in issues if i.rule == "invariant-coverage"]


@pytest.mark.parametrize("path", SAMPLE_REPORTS, ids=lambda p: p.name)
def test_committed_sample_reports_are_valid_against_their_claimed_profiles(path: Path) -> None:
    bundle = read_resource(read_path(path))
    assert bundle["meta"]["profile"] == [
        canonical.structure_definition("ncp-imaging-report-bundle"),
        EU_BUNDLE,
    ]
    assert errors(bundle) == []


def test_the_sample_has_reports() -> None:
    assert len(SAMPLE_REPORTS) == 7


def test_every_generated_report_passes_the_hl7_europe_imaging_rules() -> None:
    """All report bundles the generator makes (several patients, every status and version),
    against the claimed profiles and against the guide's forced on every resource."""
    bundles = generated_bundles(patients=3, seed=5, big_patient_studies=8)
    assert len(bundles) > 15
    forced = guide_profiles(["eu-imaging"])
    observations = 0
    for bundle in bundles:
        assert EU_BUNDLE in bundle["meta"]["profile"]
        assert errors(bundle) == [], bundle["identifier"]
        assert errors(bundle, forced) == [], bundle["identifier"]
        assert skipped(bundle) == [], bundle["identifier"]
        observations += sum(e["resource"]["resourceType"] == "Observation" for e in bundle["entry"])
    assert observations > 0  # coded findings are carried as entries somewhere in the data


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    engine = db.make_engine(f"sqlite:///{tmp_path_factory.mktemp('emitted') / 'index.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    index_source(sessions, FolderSource(SAMPLE / "dicom"))
    with sessions() as session:
        yield session
    engine.dispose()


def test_every_manifest_of_the_sample_passes_the_mado_rules(sample_index: Session) -> None:
    """Each indexed study's MADO document, list ImagingStudy and manifest DocumentReference."""
    studies = list(sample_index.scalars(select(Study).order_by(Study.study_uid)))
    assert len(studies) == 7
    forced = guide_profiles(["mado"])
    created = datetime(2026, 1, 1, tzinfo=UTC)
    for study in studies:
        facts = describe_indexed_study(sample_index, study)
        document = mado_bundle(facts, ENDPOINTS, CUSTODIAN, base_url=BASE, created=created)
        assert document["meta"]["profile"] == [MADO_BUNDLE]
        assert errors(document) == [], study.study_uid
        assert errors(document, forced) == [], study.study_uid
        assert skipped(document) == [], study.study_uid
        listed = imaging_study(facts, ENDPOINTS, CUSTODIAN)
        assert errors(listed) == [], study.study_uid
        assert errors(listed, forced) == [], study.study_uid
        entry = manifest_reference(describe_study(study), CUSTODIAN, base_url=BASE)
        assert errors(entry) == [], study.study_uid
