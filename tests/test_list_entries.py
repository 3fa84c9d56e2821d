"""Rendered list entries (ncp.provider.list_entries): a list is read from what the index keeps,
and never shows an entry older than its sources.

In process on SQLite and PostgreSQL: node A's test dataset indexed from a folder, reports
ingested through the report store, searches run as the list API runs them (find the page,
render it, keep what was built). The builders are replaced by ones that fail to show which
entries were read rather than built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import NodeSettings, settings_from_mapping
from ncp.dicom.folder import FolderSource
from ncp.fhir.identifiers import issuer_of
from ncp.provider import list_entries
from ncp.provider.indexer import index_source
from ncp.provider.list_api import searchset
from ncp.provider.list_entries import EntryRenderer, render_studies, store
from ncp.provider.reports import ingest_bundle
from ncp.provider.search import find_page, parse_search
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.entry_memory import EntryMemory
from ncp.store.models import EntryKind, ListEntry
from ncp.validation.engine import Validator
from ncp.validation.issues import has_errors
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.node import ISSUER, SYSTEM, studies_of, write_dataset
from tests.test_report_api import make_report

PATIENT = (issuer_of(SYSTEM), "PAT100")
S1, S2 = studies_of("PAT100")
BASE = "https://ncp.at.test/fhir"


@dataclass
class Index:
    archive: Path
    settings: NodeSettings
    sessions: sessionmaker[Session]

    def reindex(self) -> None:
        index_source(self.sessions, FolderSource(self.archive))

    def with_urls(self, **urls: str) -> NodeSettings:
        return self.settings.model_copy(update={"urls": self.settings.urls.model_copy(update=urls)})


@pytest.fixture
def index(db_url: str, tmp_path: Path) -> Iterator[Index]:
    archive = tmp_path / "archive"
    write_dataset(archive)
    settings = settings_from_mapping(
        {
            "node": {"country": "AT", "name": "List entries AT", "patient_id_issuer": ISSUER},
            "urls": {
                "standard": BASE,
                "imaging": "https://ncp.at.test/dicomweb",
                "edge": "https://edge.at.test/dicomweb",
                "viewer": "https://viewer.at.test",
            },
            "database": {"url": db_url},
            "archive": {"kind": "folder", "path": str(archive)},
        },
        base_dir=tmp_path,
        environ={},
    )
    engine = make_engine(db_url)
    migrate(engine)
    made = Index(archive, settings, session_factory(engine))
    made.reindex()
    try:
        yield made
    finally:
        engine.dispose()


def listing(
    index: Index,
    rtype: str,
    params: list[tuple[str, str]] | None = None,
    *,
    memory: EntryMemory | None = None,
    settings: NodeSettings | None = None,
) -> bytes:
    """One search as the list API answers it: the Bundle's JSON, built entries kept."""
    given = list(params or [])
    if not any(name == "_count" for name, _ in given):
        given.append(("_count", "100"))
    query = parse_search(rtype, given)
    renderer = EntryRenderer(settings or index.settings, memory)
    with index.sessions() as session:
        page = find_page(session, query, patient=PATIENT)
        bundle, fresh = searchset(session, renderer, page)
    store(index.sessions, fresh)
    return bundle.json()


def resources(body: bytes) -> dict[str, dict[str, Any]]:
    """The Bundle's entries by fullUrl and version."""
    bundle = json.loads(body)
    return {
        f"{e['fullUrl']}|{e['resource'].get('meta', {}).get('versionId')}": e["resource"]
        for e in bundle.get("entry", [])
    }


def kept(index: Index) -> int:
    with index.sessions() as session:
        return session.scalar(select(func.count()).select_from(ListEntry)) or 0


def ingest(index: Index, bundle: dict[str, Any]) -> None:
    with index.sessions.begin() as session:
        ingest_bundle(session, bundle, validator=VALIDATOR, now=datetime.now(UTC))


VALIDATOR = Validator.default()


def rewrite_instance(index: Index, study_uid: str, n: int, **attributes: Any) -> None:
    """Write instance ``n`` of the study's series again with other attributes (a new file)."""
    series = f"{study_uid}.1"
    ds = make_instance(
        patient_id="PAT100",
        study_uid=study_uid,
        series_uid=series,
        sop_uid=f"{series}.{n}",
        IssuerOfPatientID=ISSUER,
        InstanceNumber=n,
        **attributes,
    )
    write_instance(index.archive / "PAT100" / f"{series}.{n}.dcm", ds)


# --- read, not built ---------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", ["ImagingStudy", "DocumentReference"])
def test_a_list_is_built_once_then_read(
    index: Index, rtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest(index, make_report(S1))
    first = listing(index, rtype)
    assert kept(index) == len(json.loads(first)["entry"]) > 0
    for name in ("imaging_study", "manifest_reference", "report_reference"):
        monkeypatch.setattr(list_entries, name, _refuse)
    second = listing(index, rtype)
    assert second == first
    for resource in resources(second).values():
        assert not has_errors(VALIDATOR.validate(resource))


def test_memory_serves_what_the_database_confirms(index: Index) -> None:
    memory = EntryMemory(1 << 24)
    first = listing(index, "ImagingStudy", memory=memory)
    with index.sessions.begin() as session:  # bodies in the database no longer what was built
        for row in session.scalars(select(ListEntry)):
            row.body = b'{"resourceType":"Basic"}'
    assert listing(index, "ImagingStudy", memory=memory) == first  # from memory
    other = listing(index, "ImagingStudy", memory=EntryMemory(1 << 24))  # from the database
    assert b'"resource":{"resourceType":"Basic"}' in other
    # Once the source changes, memory is not trusted: the study is rendered again.
    rewrite_instance(index, S2, 2, Modality="MR", PatientName="Gruber^Anna")
    index.reindex()
    again = resources(listing(index, "ImagingStudy", memory=memory))
    assert again[f"{BASE}/ImagingStudy/{S2}|None"]["numberOfInstances"] == 2


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("an entry was built: it should have been read")


QUERIES = [
    ("ImagingStudy", [("_revinclude", "DocumentReference:related")]),
    ("ImagingStudy", [("_sort", "-started"), ("_count", "1")]),
    ("DocumentReference", [("_include", "DocumentReference:patient")]),
    ("DocumentReference", [("_include", "DocumentReference:related"), ("_sort", "modality")]),
    ("DocumentReference", [("status", "superseded,current"), ("_format", "json")]),
]


@pytest.mark.parametrize(("rtype", "params"), QUERIES)
def test_what_is_read_equals_what_is_built(
    index: Index, rtype: str, params: list[tuple[str, str]]
) -> None:
    ingest(index, make_report(S1))
    ingest(index, make_report(S1, version=2, status="amended", findings="Revised."))
    ingest(index, make_report(S2, status="preliminary"))
    params = [(k, v) for k, v in params if k != "_format"]
    memory = EntryMemory(1 << 24)
    built = listing(index, rtype, params, memory=memory)
    assert kept(index) > 0
    from_memory = listing(index, rtype, params, memory=memory)
    from_database = listing(index, rtype, params)
    with index.sessions.begin() as session:
        session.execute(ListEntry.__table__.delete())
    rebuilt = listing(index, rtype, params)
    assert built == from_memory == from_database == rebuilt
    assert not has_errors(VALIDATOR.validate(json.loads(built)))


# --- never older than the sources ----------------------------------------------------------------


def test_a_study_changed_by_the_indexer_is_rendered_again(index: Index) -> None:
    memory = EntryMemory(1 << 24)
    before = resources(listing(index, "ImagingStudy", memory=memory))
    rewrite_instance(index, S2, 2, Modality="MR", PatientName="Gruber^Anna")
    index.reindex()
    after = resources(listing(index, "ImagingStudy", memory=memory))
    s2 = f"{BASE}/ImagingStudy/{S2}|None"
    assert before[s2]["numberOfInstances"] == 1
    assert after[s2]["numberOfInstances"] == 2
    s1 = f"{BASE}/ImagingStudy/{S1}|None"
    assert after[s1] == before[s1]


def test_the_patients_new_name_shows_in_untouched_studies(index: Index) -> None:
    memory = EntryMemory(1 << 24)
    ingest(index, make_report(S1))
    before = resources(listing(index, "DocumentReference", memory=memory))
    # A header with a smaller SOP Instance UID speaks for the patient: only S1 is touched.
    series = f"{S1}.1"
    ds = make_instance(
        patient_id="PAT100",
        study_uid=S1,
        series_uid=series,
        sop_uid=f"{series}.0",
        IssuerOfPatientID=ISSUER,
        PatientName="Gruber-Lang^Anna",
        Modality="CT",
    )
    write_instance(index.archive / "PAT100" / f"{series}.0.dcm", ds)
    index.reindex()
    after = resources(listing(index, "DocumentReference", memory=memory))
    assert set(after) == set(before)
    displays = {r["subject"].get("display") for r in after.values()}
    assert displays == {"Anna Gruber-Lang"}, displays
    assert {r["subject"].get("display") for r in before.values()} == {"Anna Gruber"}


def test_a_new_report_version_supersedes_the_kept_entry(index: Index) -> None:
    memory = EntryMemory(1 << 24)
    ingest(index, make_report(S1))
    first = resources(listing(index, "DocumentReference", memory=memory))
    (v1,) = [r for r in first.values() if r.get("meta", {}).get("versionId") == "1"]
    assert v1["status"] == "current"
    ingest(index, make_report(S1, version=2, status="amended", findings="Revised."))
    current = resources(listing(index, "DocumentReference", memory=memory))
    versions = [r["meta"]["versionId"] for r in current.values() if "versionId" in r["meta"]]
    assert versions == ["2"]
    old = resources(listing(index, "DocumentReference", [("status", "superseded")], memory=memory))
    (superseded,) = old.values()
    assert superseded["meta"]["versionId"] == "1" and superseded["status"] == "superseded"
    assert superseded["content"][0]["attachment"]["url"].endswith("/_history/1")


def test_new_urls_render_every_entry_again(index: Index) -> None:
    memory = EntryMemory(1 << 24)
    listing(index, "ImagingStudy", memory=memory)
    moved = index.with_urls(imaging="https://images.at.test/dicomweb")
    body = listing(index, "ImagingStudy", memory=memory, settings=moved)
    assert b"https://images.at.test/dicomweb" in body
    assert b"https://ncp.at.test/dicomweb" not in body
    # The database keeps one entry per study, now the moved one.
    with index.sessions() as session:
        bodies = session.scalars(
            select(ListEntry.body).where(ListEntry.kind == int(EntryKind.STUDY))
        ).all()
    assert len(bodies) == 2 and all(b"https://images.at.test/dicomweb" in b for b in bodies)


def test_a_replica_with_stale_memory_serves_the_new_entry(index: Index) -> None:
    replica_1, replica_2 = EntryMemory(1 << 24), EntryMemory(1 << 24)
    listing(index, "ImagingStudy", memory=replica_1)
    rewrite_instance(index, S2, 2, Modality="MR", PatientName="Gruber^Anna")
    index.reindex()
    listing(index, "ImagingStudy", memory=replica_2)  # renders S2 again and keeps it
    seen = resources(listing(index, "ImagingStudy", memory=replica_1))
    assert seen[f"{BASE}/ImagingStudy/{S2}|None"]["numberOfInstances"] == 2


def test_the_indexer_run_renders_what_it_changed(
    index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrite_instance(index, S2, 2, Modality="MR", PatientName="Gruber^Anna")
    run = index_source(index.sessions, FolderSource(index.archive))
    assert run.studies_touched == len(run.touched) == 1
    assert render_studies(index.settings, index.sessions, run.touched) == 2  # ImagingStudy, DocRef
    for name in ("imaging_study", "manifest_reference"):
        monkeypatch.setattr(list_entries, name, _refuse)
    body = listing(index, "ImagingStudy", [("_id", S2)])
    assert resources(body)[f"{BASE}/ImagingStudy/{S2}|None"]["numberOfInstances"] == 2
    assert render_studies(index.settings, index.sessions, [999_999]) == 0  # gone: passed over


def test_keeping_entries_may_fail_without_failing_the_list(
    index: Index, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = session_factory(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))  # no tables
    query = parse_search("ImagingStudy", [])
    renderer = EntryRenderer(index.settings)
    with index.sessions() as session:
        page = find_page(session, query, patient=PATIENT)
        _bundle, fresh = searchset(session, renderer, page)
    assert fresh
    with caplog.at_level(logging.WARNING, logger="ncp.provider.list_entries"):
        store(broken, fresh)
    assert "rendered list entries not kept" in caplog.text


# --- the memory tier -----------------------------------------------------------------------------


def test_memory_keeps_the_most_recent_bodies_within_its_bound() -> None:
    memory = EntryMemory(10)
    memory.put((EntryKind.STUDY, 1), "r", "s", b"12345")
    memory.put((EntryKind.STUDY, 2), "r", "s", b"12345")
    assert memory.get((EntryKind.STUDY, 1), "r", "s") == b"12345"  # now the most recent
    memory.put((EntryKind.STUDY, 3), "r", "s", b"123")
    assert memory.get((EntryKind.STUDY, 2), "r", "s") is None  # the least recent went
    assert memory.get((EntryKind.STUDY, 1), "r", "s") == b"12345"
    assert memory.get((EntryKind.STUDY, 1), "r", "other source") is None
    assert memory.get((EntryKind.STUDY, 1), "other renderer", "s") is None
    memory.put((EntryKind.STUDY, 4), "r", "s", b"x" * 11)  # larger than the bound: not kept
    assert memory.get((EntryKind.STUDY, 4), "r", "s") is None


# --- entries left out ----------------------------------------------------------------------------


def test_an_entry_left_out_names_its_study_and_the_rule(
    index: Index, caplog: pytest.LogCaptureFixture
) -> None:
    """A study whose patient has no Issuer of Patient ID cannot become an entry (its patient
    identifier would have no system): the log says which study, and which rule."""
    study = "1.2.826.0.1.3680043.10.543.900.1"
    ds = make_instance(
        patient_id="NOISSUER1",
        study_uid=study,
        series_uid=f"{study}.1",
        sop_uid=f"{study}.1.1",
        StudyDate="20240101",
    )
    write_instance(index.archive / "NOISSUER1" / "1.dcm", ds)
    run = index_source(index.sessions, FolderSource(index.archive))
    with caplog.at_level(logging.WARNING, logger="ncp.provider.list_entries"):
        assert render_studies(index.settings, index.sessions, run.touched) == 0
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2  # the ImagingStudy and the manifest's DocumentReference
    for message in left_out:
        assert study in message
        assert "rule: Patient.identifier.system" in message
