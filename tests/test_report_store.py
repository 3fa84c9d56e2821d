"""The report store (ncp.provider.reports): ingest, version rules, reads, folder load, races.

Every database test runs on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import copy
import hashlib
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ncp.fhir.identifiers import report_resource_id
from ncp.fhir.io import read_path, read_resource, to_json, to_xml
from ncp.provider import reports
from ncp.provider.report_fields import BODY_PART_SYSTEM, SNOMED, report_fields
from ncp.store.db import session_factory
from ncp.store.models import Report, ReportVersion
from ncp.validation.engine import Validator
from ncp.validation.issues import from_operation_outcome, has_errors
from tests.validation_support import entry_of, generated_bundles

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample" / "reports"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LKA = "RPT-LKA2023283035"
_LOCK = threading.Lock()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator.default()


def sample(name: str) -> dict[str, Any]:
    (path,) = SAMPLE.rglob(f"{name}.json")
    return read_resource(read_path(path))


def composition(bundle: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = bundle["entry"][0]["resource"]
    return resource


def report_id_of(bundle: dict[str, Any]) -> str:
    identifier = composition(bundle)["identifier"]
    return report_resource_id(identifier["system"], identifier["value"])


def ingest(
    sessions: sessionmaker[Session],
    validator: Validator,
    bundle: dict[str, Any],
    now: datetime = NOW,
) -> reports.IngestResult:
    with sessions.begin() as session:
        return reports.ingest_bundle(
            session, bundle, validator=validator, now=now, validator_lock=_LOCK
        )


def counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(Report)) or 0,
            session.scalar(select(func.count()).select_from(ReportVersion)) or 0,
        )


def versions_by_report(bundles: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for bundle in bundles:
        out.setdefault(composition(bundle)["identifier"]["value"], []).append(bundle)
    return out


def three_versions() -> list[dict[str, Any]]:
    """v1, v2, v3 of one generated report (preliminary, final, amended)."""
    for found in versions_by_report(generated_bundles(patients=4, seed=3)).values():
        if len(found) >= 3:
            return found[:3]
    raise AssertionError("the generator made no report with three versions")


def snapshot(session: Session, report_id: str) -> list[tuple[int, bool, str, int | None]]:
    return [
        (row.version, row.latest, row.sha256, row.replaces_version)
        for row in reports.history(session, report_id)
    ]


# --- the sample folder -----------------------------------------------------------------------


def test_sample_folder_loads(sessions: sessionmaker[Session], validator: Validator) -> None:
    summary = reports.load_folder(sessions, SAMPLE, validator=validator, now=NOW)
    assert (summary.stored, summary.unchanged, summary.failed) == (7, 0, [])
    assert counts(sessions) == (6, 7)
    v1, v2 = sample("LKA2023283035-v1"), sample("LKA2023283035-v2")
    rid = report_id_of(v2)
    with sessions() as session:
        head = reports.latest(session, rid)
        assert head is not None and head.version == 2 and head.latest
        old = reports.version(session, rid, 1)
        assert old is not None and not old.latest and old.status == "preliminary"
        assert reports.as_served(old)["identifier"] == v1["identifier"]
        assert [r.version for r in reports.history(session, rid)] == [2, 1]
        assert head.replaces_version == 1
        report = session.get(Report, rid)
        assert report is not None and report.latest_version == 2
        # the list's values, as the bundle says them
        assert report.patient_id == "6940030952"
        assert report.patient_issuer == "1.2.40.0.10.1.4.3.1"  # urn:oid: dropped, as the index
        assert head.status == "final" and head.title == "Imaging report: US Breast"
        assert head.date == datetime(2023, 4, 2, 9, 22, 7)  # +02:00 as naive UTC
        assert head.language == "en"
        assert head.author == "Landesklinikum Alpenblick"
        assert head.custodian_name == "Landesklinikum Alpenblick"
        assert head.custodian_value == "urn:oid:2.25.225465799366253215828779836200508436846"
        assert head.study_uid == (
            "1.2.826.0.1.3680043.8.498.69329073277844679768009174727840683286"
        )
        assert head.accession_number == "LKA2023283035"
        assert head.accession_issuer == "2.25.225465799366253215828779836200508436846.1"
        assert head.modalities == "US"
        assert head.procedure_code == "24601-7"
        assert head.requesting_code == "394814009"
        assert head.received_at == NOW.replace(tzinfo=None)


def test_reload_is_idempotent(sessions: sessionmaker[Session], validator: Validator) -> None:
    reports.load_folder(sessions, SAMPLE, validator=validator, now=NOW)
    with sessions() as session:
        before = {
            (r.report_id, r.version): (r.sha256, r.received_at, r.latest)
            for r in session.scalars(select(ReportVersion))
        }
    later = NOW + timedelta(days=1)
    summary = reports.load_folder(sessions, SAMPLE, validator=validator, now=later)
    assert (summary.stored, summary.unchanged, summary.failed) == (0, 7, [])
    with sessions() as session:
        after = {
            (r.report_id, r.version): (r.sha256, r.received_at, r.latest)
            for r in session.scalars(select(ReportVersion))
        }
    assert after == before


def test_bad_files_are_reported_and_the_rest_loads(
    tmp_path: Path, sessions: sessionmaker[Session], validator: Validator
) -> None:
    folder = tmp_path / "reports"
    shutil.copytree(SAMPLE, folder)
    # one version as XML instead of JSON: read the same
    json_path = next(folder.rglob("RZS2013283031-v1.json"))
    json_path.with_suffix(".xml").write_bytes(to_xml(read_resource(json_path.read_bytes())))
    json_path.unlink()
    (folder / "broken.json").write_text('{"resourceType": "Bundle", ', encoding="utf-8")
    invalid = sample("KDN2024283037-v1")
    del composition(invalid)["status"]
    composition(invalid)["identifier"]["value"] = "RPT-INVALID"
    (folder / "sub").mkdir()
    (folder / "sub" / "invalid.json").write_bytes(to_json(invalid))
    (folder / "notes.txt").write_text("not a bundle", encoding="utf-8")

    summary = reports.load_folder(sessions, folder, validator=validator, now=NOW)

    assert summary.stored == 7 and not summary.ok
    assert [f.path for f in summary.failed] == ["broken.json", "sub/invalid.json"]
    assert "FhirReadError" in summary.failed[0].reason
    assert "InvalidReport" in summary.failed[1].reason
    assert counts(sessions) == (6, 7)


def test_missing_folder_is_a_typed_error(
    tmp_path: Path, sessions: sessionmaker[Session], validator: Validator
) -> None:
    with pytest.raises(reports.ReportFolderError):
        reports.load_folder(sessions, tmp_path / "nowhere", validator=validator, now=NOW)


# --- refusals --------------------------------------------------------------------------------


def test_invalid_bundle_is_refused_with_an_outcome(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    bundle = sample("KDN2025283036-v1")
    del composition(bundle)["identifier"]  # 1..1 in the profile
    with pytest.raises(reports.InvalidReport) as caught:
        ingest(sessions, validator, bundle)
    outcome = caught.value.outcome
    assert outcome["resourceType"] == "OperationOutcome"
    found = from_operation_outcome(outcome)
    assert has_errors(found)
    assert any("Composition" in issue.expression for issue in found if issue.is_error)
    assert not has_errors(validator.validate(outcome))
    assert counts(sessions) == (0, 0)


def test_a_bundle_that_is_no_report_is_refused(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:x:y", "value": "1"}]}
    with pytest.raises(reports.InvalidReport):
        ingest(sessions, validator, patient)
    collection = {"resourceType": "Bundle", "type": "collection"}
    with pytest.raises(reports.InvalidReport):
        ingest(sessions, validator, collection)
    assert counts(sessions) == (0, 0)


def test_version_must_be_stated(sessions: sessionmaker[Session], validator: Validator) -> None:
    bundle = sample("KDN2025283036-v1")
    del composition(bundle)["extension"]
    with pytest.raises(reports.InvalidReport):
        ingest(sessions, validator, bundle)
    assert counts(sessions) == (0, 0)


def test_same_version_other_content_conflicts(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    bundle = sample("KDN2025283036-v1")
    first = ingest(sessions, validator, bundle)
    changed = copy.deepcopy(bundle)
    composition(changed)["title"] = "Imaging report: MR Brain (corrected)"
    with pytest.raises(reports.VersionConflict) as caught:
        ingest(sessions, validator, changed)
    assert caught.value.outcome["issue"][0]["code"] == "conflict"
    with sessions() as session:
        row = reports.version(session, first.report_id, 1)
        assert row is not None and row.sha256 == first.row.sha256
    assert counts(sessions) == (1, 1)


def test_same_version_same_content_is_idempotent(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    bundle = sample("KDN2025283036-v1")
    first = ingest(sessions, validator, bundle)
    # what the node serves, sent back: id and meta.versionId/lastUpdated are the node's own
    served = reports.as_served(first.row)
    again = ingest(sessions, validator, served, now=NOW + timedelta(hours=1))
    assert first.created and not again.created
    assert again.row.received_at == first.row.received_at
    assert counts(sessions) == (1, 1)


def test_higher_version_becomes_latest(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v1, v2 = sample("LKA2023283035-v1"), sample("LKA2023283035-v2")
    assert ingest(sessions, validator, v1).latest
    result = ingest(sessions, validator, v2, now=NOW + timedelta(minutes=5))
    assert result.created and result.latest
    with sessions() as session:
        rows = reports.history(session, result.report_id)
        assert [(r.version, r.latest, r.replaces_version) for r in rows] == [
            (2, True, 1),
            (1, False, None),
        ]


def test_late_lower_version_is_stored_not_latest(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v1, v2 = sample("LKA2023283035-v1"), sample("LKA2023283035-v2")
    ingest(sessions, validator, v2)
    late = ingest(sessions, validator, v1, now=NOW + timedelta(minutes=5))
    assert late.created and not late.latest
    with sessions() as session:
        head = reports.latest(session, late.report_id)
        assert head is not None and head.version == 2
        # v2 named v1's document before v1 was there: linked now
        assert head.replaces_version == 1
        assert [r.version for r in reports.history(session, late.report_id)] == [2, 1]
        report = session.get(Report, late.report_id)
        assert report is not None and report.latest_version == 2


def test_other_patient_conflicts(sessions: sessionmaker[Session], validator: Validator) -> None:
    v1, v2 = sample("LKA2023283035-v1"), sample("LKA2023283035-v2")
    ingest(sessions, validator, v1)
    _, patient = entry_of(v2, "Patient")
    patient["identifier"][0]["value"] = "1111111111"
    with pytest.raises(reports.PatientConflict):
        ingest(sessions, validator, v2)
    assert counts(sessions) == (1, 1)


def test_replaces_must_name_an_older_version(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v1, v2, v3 = three_versions()
    ingest(sessions, validator, v1)
    ingest(sessions, validator, v3)
    backwards = copy.deepcopy(v2)
    composition(backwards)["relatesTo"][0]["targetIdentifier"] = v3["identifier"]
    with pytest.raises(reports.VersionConflict):
        ingest(sessions, validator, backwards)
    assert counts(sessions) == (1, 2)
    ingest(sessions, validator, v2)  # the real v2 is fine
    assert counts(sessions) == (1, 3)


def test_a_version_named_as_replaced_must_be_older(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v1, v2, v3 = three_versions()
    ingest(sessions, validator, v2)  # v2 replaces v1's document, not yet here
    impostor = copy.deepcopy(v3)  # claims v1's document identifier with version 3
    impostor["identifier"] = v1["identifier"]
    composition(impostor)["relatesTo"][0]["targetIdentifier"] = {
        "system": "urn:ietf:rfc:3986",
        "value": "urn:uuid:00000000-0000-5000-8000-000000000000",
    }
    with pytest.raises(reports.VersionConflict):
        ingest(sessions, validator, impostor)
    assert counts(sessions) == (1, 1)


def test_a_document_identifier_names_one_version(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v1, v2, v3 = three_versions()
    ingest(sessions, validator, v1)
    ingest(sessions, validator, v2)
    reused = copy.deepcopy(v3)
    reused["identifier"] = v1["identifier"]
    with pytest.raises(reports.VersionConflict):
        ingest(sessions, validator, reused)
    assert counts(sessions) == (1, 2)


def test_a_version_cannot_replace_itself(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    v2 = sample("LKA2023283035-v2")
    composition(v2)["relatesTo"][0]["targetIdentifier"] = copy.deepcopy(v2["identifier"])
    with pytest.raises(reports.InvalidReport):
        ingest(sessions, validator, v2)
    assert counts(sessions) == (0, 0)


# --- reads -----------------------------------------------------------------------------------


def test_served_bundles_validate(sessions: sessionmaker[Session], validator: Validator) -> None:
    reports.load_folder(sessions, SAMPLE, validator=validator, now=NOW)
    with sessions() as session:
        rows = list(session.scalars(select(ReportVersion)))
        assert len(rows) == 7
        for row in rows:
            served = reports.as_served(row)
            assert served["id"] == row.report_id
            assert served["meta"]["versionId"] == str(row.version)
            assert served["meta"]["lastUpdated"] == "2026-03-01T12:00:00Z"
            assert served["meta"]["profile"][0] == reports.REPORT_BUNDLE_PROFILE
            issues = validator.validate(served)
            assert not has_errors(issues), [i for i in issues if i.is_error]
    assert reports.instant(datetime(2026, 3, 1, 12, 0, 0, 250000)) == "2026-03-01T12:00:00.250000Z"


def test_unknown_report_reads_nothing(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    ingest(sessions, validator, sample("KDN2025283036-v1"))
    with sessions() as session:
        assert reports.latest(session, "r0000") is None
        assert reports.version(session, "r0000", 1) is None
        assert reports.history(session, "r0000") == []
        assert reports.version(session, report_id_of(sample("KDN2025283036-v1")), 2) is None


def test_generated_reports_ingest_and_serve(
    sessions: sessionmaker[Session], validator: Validator
) -> None:
    bundles = generated_bundles(patients=4, seed=3)
    for bundle in sorted(bundles, key=lambda b: int(composition(b)["extension"][1]["valueString"])):
        ingest(sessions, validator, bundle)
    by_report = versions_by_report(bundles)
    assert counts(sessions) == (len(by_report), len(bundles))
    with sessions() as session:
        latest = list(session.scalars(select(ReportVersion).where(ReportVersion.latest)))
        assert len(latest) == len(by_report)
        for row in latest:
            assert row.modalities and row.study_uid and row.procedure_code
            assert not has_errors(validator.validate(reports.as_served(row)))


# --- extraction details ----------------------------------------------------------------------


def test_body_parts_come_from_series_body_sites(validator: Validator) -> None:
    bundle = sample("KDN2024283037-v1")
    _, study = entry_of(bundle, "ImagingStudy")
    study["series"] = [
        {
            "uid": "1.2.3.1",
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
            "bodySite": {"system": SNOMED, "code": "818981001"},  # Abdomen
        },
        {
            "uid": "1.2.3.2",
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SR"},
            "bodySite": {"system": BODY_PART_SYSTEM, "code": "CHEST"},
        },
    ]
    fields = report_fields(bundle, validator.definitions)
    assert fields.body_parts == ("ABDOMEN", "CHEST")
    assert fields.modalities == ("CT", "SR")
    assert report_fields(sample("KDN2024283037-v1"), validator.definitions).body_parts == ()


# --- order and concurrency -------------------------------------------------------------------


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(order=st.permutations([0, 1, 2]))
def test_any_arrival_order_gives_the_same_result(
    order: list[int], sessions: sessionmaker[Session], validator: Validator
) -> None:
    bundles = three_versions()
    with sessions.begin() as session:  # the database is shared by the examples
        session.execute(delete(ReportVersion))
        session.execute(delete(Report))
    for step, index in enumerate(order):
        ingest(sessions, validator, bundles[index], now=NOW + timedelta(minutes=step))
    for bundle in bundles:  # and everything again: nothing changes
        assert not ingest(sessions, validator, bundle).created
    rid = report_id_of(bundles[0])
    with sessions() as session:
        got = snapshot(session, rid)
    digests = [_sha(reports.canonical_content(b)) for b in reversed(bundles)]
    assert got == [
        (3, True, digests[0], 2),
        (2, False, digests[1], 1),
        (1, False, digests[2], None),
    ]


def _sha(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _wait_until_blocked(engine: Engine, done: threading.Event) -> None:
    """On PostgreSQL, until another backend waits for a lock (the racing ingest), so that the
    test really makes it wait; SQLite gives no such view (its writer waits on the file lock)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as connection:
        while not done.is_set():
            waiting = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar_one()
            connection.rollback()  # pg_stat_activity is a snapshot per transaction
            if waiting:
                return
            done.wait(0.01)


# (stored before, held by an open transaction, ingested meanwhile, versions stored after)
RACES = {
    "new-report": ((), 1, 2, 2),
    "existing-report": ((1,), 2, 3, 3),
    "same-late-version": ((2,), 1, 1, 2),
}


@pytest.mark.parametrize("race", list(RACES))
def test_concurrent_ingests_keep_one_latest(
    race: str, engine: Engine, sessions: sessionmaker[Session], validator: Validator
) -> None:
    before, held, meanwhile, newest = RACES[race]
    bundles = three_versions()
    for n in before:
        ingest(sessions, validator, bundles[n - 1])
    errors: list[BaseException] = []
    results: list[reports.IngestResult] = []
    done = threading.Event()

    holder = sessions()
    holder.begin()
    first = reports.ingest_bundle(
        holder, bundles[held - 1], validator=validator, now=NOW, validator_lock=_LOCK
    )

    def racer() -> None:
        try:
            results.append(ingest(sessions, validator, bundles[meanwhile - 1], now=NOW))
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=racer)
    thread.start()
    _wait_until_blocked(engine, done)
    holder.commit()
    holder.close()
    thread.join(timeout=120)
    assert not thread.is_alive() and errors == []
    assert first.created and results[0].created == (held != meanwhile)
    rid = report_id_of(bundles[0])
    with sessions() as session:
        rows = reports.history(session, rid)
        assert [(r.version, r.latest) for r in rows] == [
            (n, n == newest) for n in range(newest, 0, -1)
        ]
        assert [r.replaces_version for r in rows] == [*range(newest - 1, 0, -1), None]
        report = session.get(Report, rid)
        assert report is not None and report.latest_version == newest
    assert counts(sessions)[0] == 1


def test_ingest_holds_the_report_lock_until_commit(
    engine: Engine, sessions: sessionmaker[Session], validator: Validator
) -> None:
    """Even a late version, which changes no report column, locks the report for the rest of
    the transaction: PostgreSQL refuses another FOR UPDATE, SQLite another writer."""
    v1, v2 = sample("LKA2023283035-v1"), sample("LKA2023283035-v2")
    ingest(sessions, validator, v2)
    rid = report_id_of(v2)
    with sessions.begin() as holder:
        reports.ingest_bundle(holder, v1, validator=validator, now=NOW)
        with engine.connect() as other:
            if engine.dialect.name == "postgresql":
                # NO KEY UPDATE: the new version's foreign key alone holds a KEY SHARE lock
                probe = "SELECT id FROM report WHERE id = :id FOR NO KEY UPDATE NOWAIT"
                with pytest.raises(OperationalError, match="could not obtain lock"):
                    other.execute(text(probe), {"id": rid})
            else:
                other.exec_driver_sql("PRAGMA busy_timeout = 0")
                with pytest.raises(OperationalError, match="locked"):
                    other.exec_driver_sql("BEGIN IMMEDIATE")
            other.rollback()
