"""The metadata list's search engine over a real index, on SQLite and PostgreSQL: each parameter,
each refusal, paging, sorting, includes, and the number of queries a page costs.

The data set is the example generator's (2 patients, 60 studies for the first), indexed from
its DICOM folder, with its report bundles ingested through the report store, plus three rows
added here for what the generator does not make: a withdrawn report of a study that is not
indexed, and reports of another patient (one naming the first patient's study).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.dicom.folder import FolderSource
from ncp.examples.generate import generate_examples
from ncp.fhir.datatypes import zone_of
from ncp.fhir.identifiers import (
    manifest_reference_id,
    patient_resource_id,
    patient_system,
)
from ncp.fhir.manifest import UNQUALIFIED_ACCESSION_SYSTEM
from ncp.provider.indexer import index_source
from ncp.provider.reports import load_folder
from ncp.provider.search import (
    MANIFEST_FORMAT_CODE,
    ManifestMatch,
    PatientInclude,
    ReportMatch,
    SearchPage,
    StudyMatch,
    document_status,
    run_search,
)
from ncp.provider.search_params import MAX_COUNT, SearchError, parse_search
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Report, ReportVersion, Study
from ncp.validation.engine import Validator

ZONE = zone_of("AT")
WITHDRAWN_STUDY = "1.2.826.0.1.3680043.10.99.7.1"
OTHER_PATIENT = "9999999999"


@dataclass(frozen=True)
class SearchIndex:
    sessions: sessionmaker[Session]
    engine_name: str
    big: tuple[str, str]
    """(issuer, value) of the patient with 60 studies."""
    small: tuple[str, str]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search-data") / "examples"
    generate_examples(out, patients=2, seed=4, big_patient_studies=60)
    return out


def _add_rows(sessions: sessionmaker[Session], issuer: str, big: str) -> None:
    """What the generator does not make: a withdrawn report of a study not in the index, and
    another patient's reports (one about the big patient's first study)."""
    with sessions() as session, session.begin():
        some_study = session.scalars(select(Study.study_uid).order_by(Study.study_uid)).first()

        def add(
            report_id: str, patient: str, status: str, study_uid: str | None, **kw: Any
        ) -> None:
            session.add(
                Report(
                    id=report_id,
                    identifier_system="urn:oid:1.2.3.4",
                    identifier_value=report_id,
                    patient_id=patient,
                    patient_issuer=issuer,
                    latest_version=1,
                )
            )
            session.flush()
            session.add(
                ReportVersion(
                    report_id=report_id,
                    version=1,
                    latest=True,
                    bundle_system="urn:ietf:rfc:3986",
                    bundle_value=f"urn:uuid:{report_id}",
                    status=status,
                    title=kw.pop("title"),
                    date=kw.pop("date"),
                    language="en",
                    custodian_name="Test hospital",
                    custodian_system="urn:oid:1.2.3.5",
                    custodian_value="1",
                    study_uid=study_uid,
                    content="{}",
                    size_bytes=2,
                    sha256="0" * 64,
                    received_at=datetime(2026, 1, 1),
                    **kw,
                )
            )

        add(
            "rwithdrawn",
            big,
            "entered-in-error",
            WITHDRAWN_STUDY,
            title="Imaging report: CT Head (withdrawn) Ödem",
            date=datetime(2020, 6, 1, 12, 0),
            modalities="CT",
            body_parts="HEAD",
            accession_number="ZZZ1",
            accession_issuer=None,
            procedure_code="24725-4",
            requesting_code="394591006",
        )
        add(
            "rother1",
            OTHER_PATIENT,
            "final",
            some_study,
            title="Imaging report: other patient",
            date=datetime(2021, 1, 1),
            modalities="CT",
        )
        add(
            "rother2",
            OTHER_PATIENT,
            "final",
            None,
            title="Imaging report: other patient 2",
            date=datetime(2021, 1, 2),
            modalities="MR",
        )


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def index(
    request: pytest.FixtureRequest, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SearchIndex]:
    cluster = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('search-db') / 'ncp.db'}"
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        name = f"ncp_search_{abs(hash(request.node.nodeid)) % 10**8}"
        url = cluster.create_database(name)
    engine = make_engine(url)
    try:
        migrate(engine)
        sessions = session_factory(engine)
        index_source(sessions, FolderSource(dataset / "dicom"))
        loaded = load_folder(
            sessions,
            dataset / "reports",
            validator=Validator.default(),
            now=datetime(2026, 6, 1, tzinfo=UTC),
        )
        assert loaded.ok and loaded.stored > 0
        manifest = json.loads((dataset / "manifest.json").read_text(encoding="utf-8"))
        issuer = manifest["patientIdIssuer"]
        big, small = (p["id"] for p in manifest["patients"])
        _add_rows(sessions, issuer, big)
        yield SearchIndex(sessions, request.param, (issuer, big), (issuer, small))
    finally:
        engine.dispose()
        if cluster is not None:
            cluster.drop_database(name)


def search(
    ix: SearchIndex,
    rtype: str,
    params: list[tuple[str, str]],
    *,
    patient: tuple[str, str] | None = None,
) -> SearchPage:
    with ix.sessions() as session:
        return run_search(
            session, parse_search(rtype, params), patient=patient or ix.big, zone=ZONE
        )


def keys(page: SearchPage) -> list[str]:
    out = []
    for m in page.matches:
        if isinstance(m, ReportMatch):
            out.append(f"{m.report.id}/{m.version.version}")
        elif isinstance(m, ManifestMatch):
            out.append(manifest_reference_id(m.study.study_uid))
        else:
            out.append(m.study.study_uid)
    return out


def studies_of(ix: SearchIndex, who: tuple[str, str]) -> list[Study]:
    with ix.sessions() as session:
        return [
            s
            for s in session.scalars(select(Study))
            if (s.patient.issuer, s.patient.patient_id) == who
        ]


def versions_of(ix: SearchIndex, who: tuple[str, str]) -> list[ReportVersion]:
    with ix.sessions() as session:
        stmt = (
            select(ReportVersion)
            .join(Report)
            .where(Report.patient_issuer == who[0], Report.patient_id == who[1])
        )
        return list(session.scalars(stmt))


def reports(page: SearchPage) -> list[ReportMatch]:
    return [m for m in page.matches if isinstance(m, ReportMatch)]


def manifests(page: SearchPage) -> list[ManifestMatch]:
    return [m for m in page.matches if isinstance(m, ManifestMatch)]


# --- the default list ------------------------------------------------------------------------


def test_default_list_is_current_reports_and_every_manifest_newest_first(
    index: SearchIndex,
) -> None:
    page = search(index, "DocumentReference", [("_count", str(MAX_COUNT))])
    studies = studies_of(index, index.big)
    current = [v for v in versions_of(index, index.big) if document_status(v) == "current"]
    assert len(studies) == 60
    assert page.total == len(studies) + len(current) == len(page.matches)
    assert {m.study.study_uid for m in manifests(page)} == {s.study_uid for s in studies}
    assert {m.version.id for m in reports(page)} == {v.id for v in current}
    assert all(m.report.patient_id == index.big[1] for m in reports(page))
    assert "rwithdrawn/1" not in keys(page)
    dates = [
        m.version.date.replace(tzinfo=UTC)  # true instants: reports UTC, studies local
        if isinstance(m, ReportMatch)
        else m.study.started and m.study.started.replace(tzinfo=ZONE)
        for m in page.matches
    ]
    assert all(d is not None for d in dates)
    assert dates == sorted(dates, reverse=True)  # type: ignore[type-var]


def test_report_match_carries_the_indexed_study_of_the_same_patient(index: SearchIndex) -> None:
    page = search(index, "DocumentReference", [("_count", "1000")])
    for m in reports(page):
        assert m.study is not None and m.study.study_uid == m.version.study_uid
    superseded = search(index, "DocumentReference", [("status", "entered-in-error")])
    assert [m.study for m in reports(superseded)] == [None]  # its study is not indexed


def test_small_patient_sees_only_own_entries(index: SearchIndex) -> None:
    page = search(index, "DocumentReference", [], patient=index.small)
    assert page.total == len(studies_of(index, index.small)) + len(
        [v for v in versions_of(index, index.small) if v.latest]
    )
    small_pks = {s.patient_pk for s in studies_of(index, index.small)}
    assert all(m.study.patient_pk in small_pks for m in manifests(page))
    other = search(index, "DocumentReference", [], patient=(index.big[0], OTHER_PATIENT))
    assert sorted(keys(other)) == ["rother1/1", "rother2/1"]  # reports without indexed studies
    assert search(index, "ImagingStudy", [], patient=(index.big[0], OTHER_PATIENT)).total == 0
    nobody = search(index, "DocumentReference", [], patient=("1.2.3", "nobody"))
    assert nobody.total == 0 and nobody.matches == ()


# --- paging ----------------------------------------------------------------------------------


def test_pages_concatenate_to_the_whole_list(index: SearchIndex) -> None:
    whole = keys(search(index, "DocumentReference", [("_count", "1000")]))
    pages: list[str] = []
    offset: int | None = 0
    links = []
    while offset is not None:
        page = search(index, "DocumentReference", [("_count", "7"), ("_offset", str(offset))])
        assert page.total == len(whole)
        pages += keys(page)
        links.append(page.link_params(page.next_offset) if page.next_offset else None)
        assert page.previous_offset == (None if offset == 0 else offset - 7)
        offset = page.next_offset
    assert pages == whole
    assert links[0] == [("_count", "7"), ("_offset", "7")]
    beyond = search(index, "DocumentReference", [("_offset", "5000")])
    assert beyond.total == len(whole) and beyond.matches == () and beyond.next_offset is None


def test_count_is_capped_and_zero_means_total_only(index: SearchIndex) -> None:
    assert parse_search("ImagingStudy", [("_count", "5000")]).count == MAX_COUNT
    page = search(index, "ImagingStudy", [("_count", "0")])
    assert page.total == 60 and page.matches == () and page.next_offset is None
    summary = search(index, "DocumentReference", [("_summary", "count"), ("modality", "CT")])
    assert (
        summary.matches == ()
        and summary.total == search(index, "DocumentReference", [("modality", "CT")]).total > 0
    )


def test_canonical_params_keep_the_accepted_parameters(index: SearchIndex) -> None:
    query = parse_search(
        "DocumentReference",
        [("modality", "CT,MR"), ("_format", "json"), ("date", "ge2020"), ("_count", "10")],
    )
    assert query.canonical_params(20) == [
        ("date", "ge2020"),
        ("modality", "CT,MR"),
        ("_count", "10"),
        ("_offset", "20"),
    ]


# --- filters ---------------------------------------------------------------------------------


def test_modality_token_forms(index: SearchIndex) -> None:
    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    bare = search(index, "DocumentReference", [("modality", "CT")])
    with_system = search(index, "DocumentReference", [("modality", f"{dcm}|CT")])
    assert keys(bare) == keys(with_system) and bare.total > 0
    for m in bare.matches:
        shown = (
            (m.version.modalities or (m.study.modalities if m.study else ""))
            if isinstance(m, ReportMatch)
            else m.study.modalities
        )
        assert "CT" in shown.split("\\")
    either = search(index, "DocumentReference", [("modality", "CT,MR")])
    mr = search(index, "DocumentReference", [("modality", "MR")])
    assert either.total == bare.total + mr.total
    both = search(index, "DocumentReference", [("modality", "CT"), ("modality", "MR")])
    assert both.total == 0  # AND: no study is both here
    assert search(index, "DocumentReference", [("modality", "http://loinc.org|CT")]).total == 0
    assert search(index, "DocumentReference", [("modality", "|CT")]).total == 0
    assert search(index, "DocumentReference", [("modality", "ct")]).total == 0  # exact codes


def test_bodysite_by_dicom_or_snomed_code(index: SearchIndex) -> None:
    dicom = search(index, "ImagingStudy", [("bodysite", "CHEST")])
    snomed = search(index, "ImagingStudy", [("bodysite", "http://snomed.info/sct|816094009")])
    assert dicom.total > 0 and keys(dicom) == keys(snomed)
    assert all("CHEST" in m.study.body_parts.split("\\") for m in dicom.matches)
    mado = search(index, "DocumentReference", [("anatomical-region", "816094009")])
    core = search(index, "DocumentReference", [("bodysite", "CHEST")])
    assert keys(mado) == keys(core) and len(reports(core)) > 0
    assert search(index, "ImagingStudy", [("bodysite", "http://loinc.org|CHEST")]).total == 0


def test_date_prefixes_and_precisions(index: SearchIndex) -> None:
    studies = studies_of(index, index.big)
    starts = [s.started for s in studies if s.started is not None]
    year = sorted(starts)[len(starts) // 2].year
    in_year = {s.study_uid for s in studies if s.started and s.started.year == year}
    page = search(index, "ImagingStudy", [("started", str(year)), ("_count", "1000")])
    assert set(keys(page)) == in_year
    ranged = search(
        index,
        "ImagingStudy",
        [("started", f"ge{year}-01-01"), ("started", f"lt{year + 1}"), ("_count", "1000")],
    )
    assert set(keys(ranged)) == in_year
    after = search(index, "ImagingStudy", [("started", f"gt{year}"), ("_count", "1000")])
    before = search(index, "ImagingStudy", [("started", f"lt{year}"), ("_count", "1000")])
    assert after.total + before.total + len(in_year) == 60
    ne = search(index, "ImagingStudy", [("started", f"ne{year}"), ("_count", "1000")])
    assert ne.total == 60 - len(in_year)
    one = next(s for s in studies if s.started is not None)
    assert one.started is not None
    day = one.started.date().isoformat()
    assert one.study_uid in keys(search(index, "ImagingStudy", [("started", day)]))
    # An instant with a zone: the study's local time in the archive's zone.
    local = one.started.replace(tzinfo=ZONE)
    instant = local.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert keys(search(index, "ImagingStudy", [("started", instant)])) == [one.study_uid]
    assert search(index, "ImagingStudy", [("started", f"eb{instant}")]).total == len(
        [s for s in starts if s < one.started]
    )


def test_report_dates_compare_in_utc(index: SearchIndex) -> None:
    v = next(v for v in versions_of(index, index.big) if document_status(v) == "current")
    utc = v.date.strftime("%Y-%m-%dT%H:%M:%S")
    shifted = v.date.replace(tzinfo=UTC).astimezone(ZONE).isoformat()
    for value in (f"{utc}Z", shifted, f"{utc}+00:00"):
        page = search(index, "DocumentReference", [("date", value), ("format", "x|y,a")])
        assert page.total == 0  # format narrows to nothing: the AND is honoured
        page = search(index, "DocumentReference", [("date", value)])
        assert f"{v.report_id}/{v.version}" in keys(page)


def test_study_type_and_requesting_specialty(index: SearchIndex) -> None:
    studies = studies_of(index, index.big)
    chest = {s.study_uid for s in studies if s.procedure_code == "24627-2"}
    loinc = search(index, "ImagingStudy", [("study-type", "http://loinc.org|24627-2")])
    assert set(keys(loinc)) == chest and chest
    assert (
        search(index, "ImagingStudy", [("study-type", "http://snomed.info/sct|24627-2")]).total == 0
    )
    event = search(index, "DocumentReference", [("event", "24627-2")])
    assert {m.study.study_uid for m in manifests(event)} == chest
    assert len(reports(event)) > 0
    cardio = {s.study_uid for s in studies if s.requesting_code == "394579002"}
    page = search(
        index, "ImagingStudy", [("requesting-specialty", "http://snomed.info/sct|394579002")]
    )
    assert set(keys(page)) == cardio and cardio
    setting = search(index, "DocumentReference", [("setting", "394579002")])
    assert {m.study.study_uid for m in manifests(setting)} == cardio


def test_study_instance_uid_identifier_and_related(index: SearchIndex) -> None:
    study = studies_of(index, index.big)[0]
    uid = study.study_uid
    forms = [f"urn:dicom:uid|urn:oid:{uid}", f"urn:oid:{uid}", uid]
    results = [keys(search(index, "DocumentReference", [("study-instance-uid", f)])) for f in forms]
    assert results[0] == results[1] == results[2]
    assert manifest_reference_id(uid) in results[0]
    related = search(index, "DocumentReference", [("related", f"ImagingStudy/{uid}")])
    assert keys(related) == results[0]
    assert keys(
        search(index, "ImagingStudy", [("identifier", f"urn:dicom:uid|urn:oid:{uid}")])
    ) == [uid]
    assert keys(search(index, "ImagingStudy", [("_id", uid)])) == [uid]


def test_accession_number_by_system(index: SearchIndex) -> None:
    study = next(s for s in studies_of(index, index.big) if s.accession_issuer)
    number, system = study.accession_number, f"urn:oid:{study.accession_issuer}"
    assert number is not None
    page = search(index, "DocumentReference", [("accession-number", f"{system}|{number}")])
    assert manifest_reference_id(study.study_uid) in keys(page)
    assert keys(page) == keys(search(index, "DocumentReference", [("accession-number", number)]))
    assert (
        search(index, "DocumentReference", [("accession-number", f"urn:oid:9.9|{number}")]).total
        == 0
    )
    ident = search(index, "ImagingStudy", [("identifier", f"{system}|{number}")])
    assert keys(ident) == [study.study_uid]
    assert keys(search(index, "ImagingStudy", [("identifier", number)])) == [study.study_uid]
    unqualified = search(
        index,
        "DocumentReference",
        [
            ("accession-number", f"{UNQUALIFIED_ACCESSION_SYSTEM}|ZZZ1"),
            ("status", "entered-in-error"),
        ],
    )
    assert keys(unqualified) == ["rwithdrawn/1"]


def test_free_text_ignores_case_and_accents(index: SearchIndex) -> None:
    lung = search(index, "ImagingStudy", [("_text", "LUNG")])
    assert lung.total > 0
    for m in lung.matches:
        assert isinstance(m, StudyMatch)
        assert any("lung" in (s.description or "").lower() for s in m.series)
    thorax = search(index, "ImagingStudy", [("_text", "THÖRAX br40")])
    assert thorax.total > 0
    assert search(index, "ImagingStudy", [("_content", "thorax lung")]).total <= thorax.total
    withdrawn = search(
        index, "DocumentReference", [("_text", "odem"), ("status", "entered-in-error")]
    )
    assert keys(withdrawn) == ["rwithdrawn/1"]
    assert search(index, "DocumentReference", [("_text", "no-such-word-here")]).total == 0


def test_status_filters(index: SearchIndex) -> None:
    versions = versions_of(index, index.big)
    older = {f"{v.report_id}/{v.version}" for v in versions if not v.latest}
    assert older
    superseded = search(index, "DocumentReference", [("status", "superseded")])
    assert set(keys(superseded)) == older and not manifests(superseded)
    both = search(index, "DocumentReference", [("status", "current,superseded")])
    default = search(index, "DocumentReference", [])
    assert both.total == default.total + len(older)
    withdrawn = search(index, "DocumentReference", [("status", "entered-in-error")])
    assert keys(withdrawn) == ["rwithdrawn/1"]
    assert search(index, "ImagingStudy", [("status", "available")]).total == 60
    assert search(index, "ImagingStudy", [("status", "cancelled")]).total == 0


def test_type_and_format(index: SearchIndex) -> None:
    everything = search(index, "DocumentReference", [("type", "http://loinc.org|18748-4")])
    assert everything.total == search(index, "DocumentReference", []).total
    only = search(index, "DocumentReference", [("format", MANIFEST_FORMAT_CODE)])
    assert only.total == 60 and not reports(only)
    assert search(index, "DocumentReference", [("type", "http://loinc.org|11111-1")]).total == 0


def test_id_of_report_and_manifest_entries(index: SearchIndex) -> None:
    uid = studies_of(index, index.big)[3].study_uid
    mid = manifest_reference_id(uid)
    latest = next(v for v in versions_of(index, index.big) if document_status(v) == "current")
    rid = latest.report_id
    page = search(index, "DocumentReference", [("_id", f"{mid},{rid}")])
    assert sorted(keys(page)) == sorted([mid, f"{rid}/{latest.version}"])


# --- sorting ---------------------------------------------------------------------------------


def test_sort_keys_and_tie_break(index: SearchIndex) -> None:
    page = search(index, "ImagingStudy", [("_sort", "modality,-started"), ("_count", "1000")])
    rows = [(m.study.modalities, m.study.started) for m in page.matches]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    for a, b in itertools.pairwise(rows):
        if a[0] == b[0]:
            assert a[1] is not None and b[1] is not None and a[1] >= b[1]
    by_desc = search(index, "ImagingStudy", [("_sort", "description"), ("_count", "1000")])
    pairs = [(m.study.description, m.study.study_uid) for m in by_desc.matches]
    assert pairs == sorted(pairs)  # ties broken by Study Instance UID
    titles = search(index, "DocumentReference", [("_sort", "-title"), ("_count", "1000")])
    shown = [
        m.version.title if isinstance(m, ReportMatch) else m.study.description
        for m in titles.matches
    ]
    assert shown == sorted(shown, reverse=True)  # type: ignore[type-var]


# --- includes --------------------------------------------------------------------------------


def test_include_related_studies_and_patient(index: SearchIndex) -> None:
    page = search(
        index,
        "DocumentReference",
        [
            ("modality", "CT"),
            ("_include", "DocumentReference:related"),
            ("_include", "DocumentReference:subject"),
            ("_count", "6"),
        ],
    )
    patients = [i for i in page.included if isinstance(i, PatientInclude)]
    assert len(patients) == 1 and patients[0].patient is not None
    assert patients[0].patient.patient_id == index.big[1]
    included = [i for i in page.included if isinstance(i, StudyMatch)]
    wanted = {
        m.version.study_uid if isinstance(m, ReportMatch) else m.study.study_uid
        for m in page.matches
    }
    assert {i.study.study_uid for i in included} == wanted
    assert len(included) == len(wanted)  # no duplicates
    for i in included:
        assert sum(len(i.instances_of(s)) for s in i.series) == i.study.num_instances


def test_revinclude_documents_of_the_page_studies(index: SearchIndex) -> None:
    page = search(
        index,
        "ImagingStudy",
        [("_revinclude", "DocumentReference:related"), ("_count", "5"), ("_sort", "started")],
    )
    uids = {m.study.study_uid for m in page.matches}
    docs = page.included
    assert {d.study.study_uid for d in docs if isinstance(d, ManifestMatch)} == uids
    current = {
        v.id
        for v in versions_of(index, index.big)
        if v.study_uid in uids and document_status(v) == "current"
    }
    assert {d.version.id for d in docs if isinstance(d, ReportMatch)} == current


def test_study_matches_carry_sorted_series_and_instances(index: SearchIndex) -> None:
    page = search(index, "ImagingStudy", [("_count", "10")])
    for m in page.matches:
        assert isinstance(m, StudyMatch)
        assert [s.number for s in m.series] == sorted(s.number or 0 for s in m.series)
        assert len(m.series) == m.study.num_series
        for s in m.series:
            numbers = [i.instance_number for i in m.instances_of(s)]
            assert len(numbers) == s.num_instances and numbers == sorted(numbers)  # type: ignore[type-var]


def test_a_page_costs_a_fixed_number_of_queries(index: SearchIndex) -> None:
    counts = {}
    statements: list[str] = []

    def listener(*args: Any) -> None:
        statements.append(args[2])

    for size in ("5", "50"):
        statements.clear()
        with index.sessions() as session:
            bind = session.get_bind()
            event.listen(bind, "before_cursor_execute", listener)
            try:
                query = parse_search(
                    "DocumentReference",
                    [("_count", size), ("_include", "DocumentReference:related")],
                )
                run_search(session, query, patient=index.big, zone=ZONE)
                query = parse_search("ImagingStudy", [("_count", size)])
                run_search(session, query, patient=index.big, zone=ZONE)
            finally:
                event.remove(bind, "before_cursor_execute", listener)
            counts[size] = len(statements)
    assert counts["5"] == counts["50"] <= 20


# --- the patient -----------------------------------------------------------------------------


def test_patient_parameters_name_the_searched_patient(index: SearchIndex) -> None:
    issuer, value = index.big
    system = patient_system(issuer)
    pid = patient_resource_id(system, value)
    for params in (
        [("patient", f"Patient/{pid}")],
        [("subject", pid)],
        [("patient.identifier", f"{system}|{value}")],
        [("subject:identifier", value)],
        [("patient", f"Patient/{pid},Patient/other")],
    ):
        query = parse_search("DocumentReference", params)
        assert query.names_patient and query.allows_patient(issuer, value), params
        assert search(index, "DocumentReference", params).total > 0
    for params in (
        [("patient", "Patient/other")],
        [("patient.identifier", f"{system}|{index.small[1]}")],
        [("patient.identifier", f"urn:oid:1.2.3|{value}")],
        [("patient", f"Patient/{pid}"), ("patient", "Patient/other")],
    ):
        query = parse_search("DocumentReference", params)
        assert not query.allows_patient(issuer, value), params
        page = search(index, "DocumentReference", params)
        assert page.total == 0 and page.matches == ()


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rtype", "params", "parameter", "code"),
    [
        ("DocumentReference", [("author", "x")], "author", "not-supported"),
        ("DocumentReference", [("started", "2020")], "started", "not-supported"),
        ("ImagingStudy", [("date", "2020")], "date", "not-supported"),
        ("ImagingStudy", [("setting", "1")], "setting", "not-supported"),
        ("DocumentReference", [("modality:not", "CT")], "modality:not", "not-supported"),
        ("DocumentReference", [("date", "ap2020")], "date", "not-supported"),
        ("DocumentReference", [("date", "xx2020")], "date", "not-supported"),
        ("DocumentReference", [("date", "2020-13")], "date", "invalid"),
        ("DocumentReference", [("date", "20200101")], "date", "invalid"),
        ("DocumentReference", [("date", "2020-01-01T10:00+15:00")], "date", "invalid"),
        ("DocumentReference", [("modality", "a|b|c")], "modality", "invalid"),
        ("DocumentReference", [("modality", "CT,,MR")], "modality", "invalid"),
        ("DocumentReference", [("modality", "DCM|")], "modality", "invalid"),
        ("DocumentReference", [("_count", "-1")], "_count", "invalid"),
        ("DocumentReference", [("_count", "ten")], "_count", "invalid"),
        ("DocumentReference", [("_offset", "1.5")], "_offset", "invalid"),
        ("DocumentReference", [("_sort", "author")], "_sort", "invalid"),
        ("DocumentReference", [("_sort", "date,-date")], "_sort", "invalid"),
        ("DocumentReference", [("_sort", "date"), ("_sort", "title")], "_sort", "invalid"),
        ("DocumentReference", [("_summary", "true")], "_summary", "invalid"),
        ("DocumentReference", [("_include", "*")], "_include", "not-supported"),
        (
            "DocumentReference",
            [("_revinclude", "DocumentReference:related")],
            "_revinclude",
            "not-supported",
        ),
        ("ImagingStudy", [("_include", "ImagingStudy:series")], "_include", "not-supported"),
        ("DocumentReference", [("patient", "Patient/a b")], "patient", "invalid"),
        ("DocumentReference", [("patient:Device", "x")], "patient:Device", "not-supported"),
        ("DocumentReference", [("related", "Patient/x")], "related", "invalid"),
        ("DocumentReference", [("_text", " ")], "_text", "invalid"),
        ("DocumentReference", [("_elements", "id")], "_elements", "not-supported"),
        ("DocumentReference", [("modality", "x" * 2000)], "modality", "invalid"),
        ("Patient", [], "resource type", "invalid"),
    ],
)
def test_refusals_name_the_parameter(
    rtype: str, params: list[tuple[str, str]], parameter: str, code: str
) -> None:
    with pytest.raises(SearchError) as caught:
        parse_search(rtype, params)
    assert caught.value.parameter == parameter
    assert caught.value.code == code
    assert parameter in str(caught.value)


def test_too_many_parameters_or_alternatives_are_refused() -> None:
    with pytest.raises(SearchError):
        parse_search("ImagingStudy", [("modality", "CT")] * 65)
    with pytest.raises(SearchError):
        parse_search("ImagingStudy", [("modality", ",".join(["CT"] * 101))])


def test_lenient_handling_drops_unknown_names_only(index: SearchIndex) -> None:
    query = parse_search("DocumentReference", [("author", "x"), ("modality", "CT")], lenient=True)
    assert query.ignored == ("author",)
    assert ("author", "x") not in query.canonical_params()
    with pytest.raises(SearchError):
        parse_search("DocumentReference", [("date", "nonsense")], lenient=True)


def test_empty_values_are_ignored_and_escapes_honoured() -> None:
    query = parse_search("DocumentReference", [("modality", ""), ("_text", r"a\,b")])
    assert query.canonical_params() == [("_text", r"a\,b"), ("_count", "50")]
    text = [f for f in query.filters if f.name == "_text"]
    assert text[0].alternatives == (("a,b",),)  # type: ignore[union-attr]
