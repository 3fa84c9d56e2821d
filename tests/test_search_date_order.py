"""A sort by date compares true instants: reports (UTC) and studies (the archive's local wall
clock) in one order, on SQLite and PostgreSQL, across DST changes, for rows indexed before the
UTC start existed (revision 0005) and after an index run that was given no zone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.dicom.folder import FolderSource
from ncp.fhir.datatypes import local_moment
from ncp.provider.indexer import fill_study_instants, index_source
from ncp.provider.search import EntryKey, find_page
from ncp.provider.search_params import parse_search
from ncp.store.db import migrate, session_factory
from ncp.store.models import (
    EntryKind,
    Instance,
    Patient,
    Report,
    ReportVersion,
    Series,
    SourceObject,
    Study,
)
from tests.support.dicom_factory import make_instance, write_instance

VIENNA = ZoneInfo("Europe/Vienna")  # +01:00 in winter, +02:00 in summer
PATIENT = ("", "PAT-1")  # (issuer, value) as the index keeps them: no Issuer of Patient ID
ROOT = "1.2.826.0.1.3680043.10.98"


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    """This module's engine starts with no table: its tests migrate it themselves."""
    return empty_engine


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    migrate(engine)
    return session_factory(engine)


# --- helpers ---------------------------------------------------------------------------------


def write_study(folder: Path, n: int, date: str | None, time: str | None, **attrs: Any) -> str:
    """One study of PAT-1 with one instance; Study Date/Time as given (None: absent)."""
    study_uid = f"{ROOT}.{n}"
    ds = make_instance(
        patient_id=PATIENT[1],
        study_uid=study_uid,
        series_uid=f"{study_uid}.1",
        sop_uid=f"{study_uid}.1.1",
        StudyDate=date,
        StudyTime=time,
        **attrs,
    )
    write_instance(folder / f"{n}.dcm", ds)
    return study_uid


def add_report(session: Session, report_id: str, date: datetime) -> None:
    """A current report version of PAT-1 dated ``date`` (naive UTC, as the store keeps it)."""
    session.add(
        Report(
            id=report_id,
            identifier_system="urn:oid:1.2.3.4",
            identifier_value=report_id,
            patient_id=PATIENT[1],
            patient_issuer=PATIENT[0],
            latest_version=1,
        )
    )
    session.flush()
    session.add(
        ReportVersion(
            report_id=report_id,
            version=1,
            latest=True,
            bundle_value=f"urn:uuid:{uuid.uuid4()}",
            status="final",
            title="Imaging report",
            date=date,
            content="{}",
            size_bytes=2,
            sha256="0" * 64,
            received_at=datetime(2026, 1, 1),
        )
    )


def order(
    sessions: sessionmaker[Session],
    rtype: str = "DocumentReference",
    sort: str = "date",
    zone: ZoneInfo = VIENNA,
) -> list[str]:
    """The page's entries as report ids and Study Instance UIDs, in order."""
    query = parse_search(rtype, [("_sort", sort), ("_count", "1000")])
    with sessions() as session:
        page = find_page(session, query, patient=PATIENT, zone=zone)
    return [_name(k) for k in page.matches]


def _name(key: EntryKey) -> str:
    if key.kind == EntryKind.REPORT:
        assert key.report_id is not None
        return key.report_id
    assert key.study_uid is not None
    return key.study_uid


def index(sessions: sessionmaker[Session], folder: Path, zone: ZoneInfo | None = VIENNA) -> None:
    index_source(sessions, FolderSource(folder), zone=zone)


def utc_starts(sessions: sessionmaker[Session]) -> dict[str, tuple[datetime | None, str | None]]:
    with sessions() as session:
        rows = session.execute(select(Study.study_uid, Study.started_utc, Study.utc_zone))
        return {uid: (utc, zone) for uid, utc, zone in rows}


# --- the order of reports and studies --------------------------------------------------------


def test_a_study_at_0800z_sorts_before_a_report_at_0930z(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # 10:00 in Vienna in June is 08:00Z; 12:00 is 10:00Z. Compared as wall clocks, the report
    # (09:30) would come before both.
    early = write_study(tmp_path, 1, "20240601", "100000")
    late = write_study(tmp_path, 2, "20240601", "120000")
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))

    assert utc_starts(sessions)[early] == (datetime(2024, 6, 1, 8, 0), "Europe/Vienna")
    assert order(sessions) == [early, "r0930", late]
    assert order(sessions, sort="-date") == [late, "r0930", early]
    assert order(sessions, "ImagingStudy", "started") == [early, late]
    assert order(sessions, "ImagingStudy", "-started") == [late, early]


def test_what_the_entries_show_is_unchanged(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The index's UTC start is the instant the entries show: the local start with the zone's
    offset (ncp.fhir.datatypes.local_moment), which stays the Study Date/Time as written."""
    uid = write_study(tmp_path, 1, "20240601", "100000")
    index(sessions, tmp_path)
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_uid == uid)).one()
        assert study.started == datetime(2024, 6, 1, 10, 0)
        shown = local_moment(study.started, VIENNA)
        assert shown == "2024-06-01T10:00:00+02:00"
        assert study.started_utc is not None
        assert datetime.fromisoformat(shown) == study.started_utc.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("date", "time", "utc", "why"),
    [
        ("20241027", "023000", datetime(2024, 10, 27, 0, 30), "autumn: 02:30 twice, fold=0"),
        ("20240331", "023000", datetime(2024, 3, 31, 1, 30), "spring: 02:30 skipped, fold=0"),
        ("20241027", "013000", datetime(2024, 10, 26, 23, 30), "before the autumn change"),
        ("20241027", "033000", datetime(2024, 10, 27, 2, 30), "after the autumn change"),
    ],
)
def test_across_a_dst_change(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    date: str,
    time: str,
    utc: datetime,
    why: str,
) -> None:
    """A wall-clock time a DST change makes ambiguous or skips is read with fold=0: the offset
    in force before the change, which is also what local_moment shows."""
    uid = write_study(tmp_path, 1, date, time)
    index(sessions, tmp_path)
    assert utc_starts(sessions)[uid] == (utc, "Europe/Vienna"), why
    with sessions.begin() as session:
        add_report(session, "rbefore", utc - timedelta(minutes=1))
        add_report(session, "rafter", utc + timedelta(minutes=1))
    assert order(sessions) == ["rbefore", uid, "rafter"], why
    assert order(sessions, sort="-date") == ["rafter", uid, "rbefore"], why


def test_equal_instants_fall_to_the_tie_breaks(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    uid = write_study(tmp_path, 1, "20240115", "100000")  # 09:00Z in winter
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r-same", datetime(2024, 1, 15, 9, 0))
    # Ties by business identifier, code point order: "1.2..." < "r-same".
    assert order(sessions) == [uid, "r-same"]
    assert order(sessions, sort="-date") == [uid, "r-same"]


def test_a_study_without_zone_in_its_header_is_read_in_the_archive_zone(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The documented rule: a study's local time is read in the archive's zone (the node's,
    ncp.fhir.datatypes.zone_of), which is also the offset its entries show. Timezone Offset
    From UTC (0008,0201) is not read by the index: a header that has one is read like the
    others, so the order always agrees with the instants the entries show."""
    plain = write_study(tmp_path, 1, "20240601", "100000")  # no (0008,0201)
    tagged = write_study(tmp_path, 2, "20240601", "110000", TimezoneOffsetFromUTC="+0000")
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
    starts = utc_starts(sessions)
    assert starts[plain] == (datetime(2024, 6, 1, 8, 0), "Europe/Vienna")
    assert starts[tagged] == (datetime(2024, 6, 1, 9, 0), "Europe/Vienna")
    assert order(sessions) == [plain, tagged, "r0930"]


def test_a_study_without_study_date_sorts_by_its_first_series(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    uid = write_study(tmp_path, 1, None, None, SeriesDate="20240601", SeriesTime="100000")  # 08:00Z
    undated = write_study(tmp_path, 2, None, None, SeriesDate=None, SeriesTime=None)
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
        add_report(session, "r0730", datetime(2024, 6, 1, 7, 30))
    starts = utc_starts(sessions)
    assert starts[uid] == (datetime(2024, 6, 1, 8, 0), "Europe/Vienna")
    assert starts[undated] == (None, "Europe/Vienna")
    assert order(sessions) == ["r0730", uid, "r0930", undated]  # missing last
    assert order(sessions, sort="-date") == ["r0930", uid, "r0730", undated]  # both ways


def test_a_run_without_zone_leaves_the_search_to_compute_it(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    early = write_study(tmp_path, 1, "20240601", "100000")
    late = write_study(tmp_path, 2, "20240601", "120000")
    index(sessions, tmp_path, zone=None)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
    assert utc_starts(sessions) == {early: (None, None), late: (None, None)}
    assert order(sessions) == [early, "r0930", late]
    # A later run with the zone fills every study, changed or not.
    index(sessions, tmp_path)
    assert utc_starts(sessions)[early] == (datetime(2024, 6, 1, 8, 0), "Europe/Vienna")
    assert order(sessions) == [early, "r0930", late]


def test_a_value_computed_in_another_zone_is_not_trusted(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Lisbon is an hour behind Vienna: 10:00 there is 09:00Z in June, before the report."""
    uid = write_study(tmp_path, 1, "20240601", "103000")
    index(sessions, tmp_path)  # Vienna: 08:30Z
    with sessions.begin() as session:
        add_report(session, "r0900", datetime(2024, 6, 1, 9, 0))
    assert order(sessions) == [uid, "r0900"]
    assert order(sessions, zone=ZoneInfo("Europe/Lisbon")) == ["r0900", uid]  # 09:30Z


def test_a_reindexed_study_gets_its_new_instant(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    uid = write_study(tmp_path, 1, "20240601", "100000")
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
    assert order(sessions) == [uid, "r0930"]
    write_study(tmp_path, 1, "20240601", "120000")  # corrected Study Time: 10:00Z
    index(sessions, tmp_path)
    assert utc_starts(sessions)[uid] == (datetime(2024, 6, 1, 10, 0), "Europe/Vienna")
    assert order(sessions) == ["r0930", uid]


def test_an_interrupted_run_leaves_no_stale_instant(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after its batches, before its last step: the studies it changed carry no
    UTC start, and the search computes it from their new local start."""
    uid = write_study(tmp_path, 1, "20240601", "100000")
    index(sessions, tmp_path)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
    write_study(tmp_path, 1, "20240601", "120000")

    def stop(*_args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ncp.provider.indexer._recompute", stop)
    with pytest.raises(KeyboardInterrupt):
        index(sessions, tmp_path)
    assert utc_starts(sessions)[uid] == (None, None)
    assert order(sessions) == ["r0930", uid]


# --- upgrade from revision 0004 --------------------------------------------------------------


def test_upgrade_from_0004_sorts_right_before_and_after_the_next_index_run(
    engine: Engine,
) -> None:
    migrate(engine, "0004")
    meta = sa.MetaData()
    patient = sa.Table("patient", meta, autoload_with=engine)
    study = sa.Table("study", meta, autoload_with=engine)
    assert "started_utc" not in study.c
    with engine.begin() as conn:
        pk = conn.execute(
            patient.insert().values(patient_id=PATIENT[1], issuer="", header_sop_uid="1.1")
        ).inserted_primary_key[0]
        for n, started in ((1, datetime(2024, 6, 1, 10, 0)), (2, datetime(2024, 6, 1, 12, 0))):
            conn.execute(
                study.insert().values(
                    study_uid=f"{ROOT}.{n}",
                    patient_pk=pk,
                    started=started,
                    modalities="CT",
                    body_parts="",
                    num_series=1,
                    num_instances=1,
                    size_bytes=1,
                    header_sop_uid=f"{ROOT}.{n}.1.1",
                )
            )
    migrate(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        add_report(session, "r0930", datetime(2024, 6, 1, 9, 30))
    early, late = f"{ROOT}.1", f"{ROOT}.2"
    assert utc_starts(sessions) == {early: (None, None), late: (None, None)}
    assert order(sessions) == [early, "r0930", late]  # computed by the search

    assert fill_study_instants(sessions, VIENNA) == 2  # what the next index run does
    assert utc_starts(sessions)[early] == (datetime(2024, 6, 1, 8, 0), "Europe/Vienna")
    assert order(sessions) == [early, "r0930", late]
    assert order(sessions, sort="-date") == [late, "r0930", early]
    assert fill_study_instants(sessions, VIENNA) == 0


# --- property --------------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Vienna",
    "Europe/Lisbon",
    "America/New_York",
    "America/St_Johns",  # -03:30 / -02:30
    "Asia/Kolkata",  # +05:30
    "Pacific/Chatham",  # +12:45 / +13:45
]
# Around the 2024 autumn change in Europe and America, minutes apart: many near-ties and folds.
BASE = datetime(2024, 10, 26, 20, 0)
moments = st.integers(0, 60 * 30).map(lambda m: BASE + timedelta(minutes=m))


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "zone": ZoneInfo(draw(st.sampled_from(ZONES))),
        "reports": draw(st.lists(moments, max_size=6)),
        "studies": draw(st.lists(st.one_of(st.none(), moments), min_size=1, max_size=6)),
        "filled": draw(st.booleans()),
        "descending": draw(st.booleans()),
    }


def _reset(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        for model in (ReportVersion, Report, Instance, Series, Study, Patient, SourceObject):
            session.execute(delete(model))


def _seed(sessions: sessionmaker[Session], world: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Rows as the index would hold them, and the expected order's keys:
    (missing, instant, tie text, kind) per entry."""
    zone: ZoneInfo = world["zone"]
    expected: list[tuple[Any, ...]] = []
    with sessions.begin() as session:
        patient = Patient(patient_id=PATIENT[1], issuer="", header_sop_uid="1.1")
        session.add(patient)
        session.flush()
        for n, local in enumerate(world["studies"]):
            uid = f"{ROOT}.{n}"
            session.add(
                Study(
                    study_uid=uid,
                    patient_pk=patient.id,
                    started=local,
                    modalities="CT",
                    header_sop_uid=f"{uid}.1.1",
                )
            )
            instant = None if local is None else local.replace(tzinfo=zone).astimezone(UTC)
            expected.append((instant, uid, int(EntryKind.MANIFEST)))
        for n, date in enumerate(world["reports"]):
            add_report(session, f"r{n}", date)
            expected.append((date.replace(tzinfo=UTC), f"r{n}", int(EntryKind.REPORT)))
    if world["filled"]:
        fill_study_instants(sessions, zone)
    return expected


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=worlds())
def test_sorted_order_is_the_order_of_true_instants(
    sessions: sessionmaker[Session], world: dict[str, Any]
) -> None:
    _reset(sessions)
    expected = _seed(sessions, world)
    dated = [e for e in expected if e[0] is not None]
    undated = [e for e in expected if e[0] is None]
    # Date (missing last, both ways), then the tie-breaks: identifier, kind (ascending always).
    dated.sort(key=lambda e: (e[1], e[2]))
    dated.sort(key=lambda e: e[0], reverse=world["descending"])
    undated.sort(key=lambda e: (e[1], e[2]))
    want = [e[1] for e in dated + undated]
    sort = "-date" if world["descending"] else "date"
    assert order(sessions, sort=sort, zone=world["zone"]) == want
    studies = [e for e in dated + undated if e[2] == int(EntryKind.MANIFEST)]
    started = "-started" if world["descending"] else "started"
    got = order(sessions, "ImagingStudy", started, zone=world["zone"])
    assert got == [e[1] for e in studies]
