"""``$match`` by demographics finds names as the rules say (case folded, canonically equivalent
spellings equal, accents kept), the same on SQLite and PostgreSQL, through the real indexer."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ncp.dicom.folder import FolderSource
from ncp.provider.indexer import index_source
from ncp.provider.match import MatchQuery, find_candidates
from ncp.store.db import make_engine, migrate, session_factory
from tests.support.dicom_factory import make_instance, write_instance

ISSUER = "1.2.40.0.10.1.4.3.1"
SYSTEM = f"urn:oid:{ISSUER}"
ROOT = "1.2.826.0.1.3680043.10.98"

# (patient id, DICOM Patient's Name, birth date)
PATIENTS = [
    ("P1", "Żak^Marie", "19800203"),
    ("P2", "Ørsted^Hans", "19750405"),
    ("P3", "Straße^Anna", "19900101"),
    ("P4", "Zak^Piotr", "19800203"),  # the ASCII name, on the same birth date as Żak
    ("P5", "Müller^Jörg", "19660606"),
]


@pytest.fixture
def sessions(db_url: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    archive = tmp_path / "archive"
    for n, (pid, name, birth) in enumerate(PATIENTS, start=1):
        ds = make_instance(
            patient_id=pid,
            study_uid=f"{ROOT}.{n}",
            series_uid=f"{ROOT}.{n}.1",
            sop_uid=f"{ROOT}.{n}.1.1",
            PatientName=name,
            PatientBirthDate=birth,
            IssuerOfPatientID=ISSUER,
        )
        write_instance(archive / pid / "1.dcm", ds)
    engine: Engine = make_engine(db_url)
    migrate(engine)
    factory = session_factory(engine)
    run = index_source(factory, FolderSource(archive))
    assert run.skipped == []
    yield factory
    engine.dispose()


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def found(sessions: sessionmaker[Session], query: MatchQuery) -> list[tuple[str, str]]:
    with sessions() as session:
        return [(c.row.patient_id, c.grade) for c in find_candidates(session, query)]


@pytest.mark.parametrize(
    ("family", "birth", "expected"),
    [
        ("Żak", date(1980, 2, 3), ["P1"]),
        ("żak", date(1980, 2, 3), ["P1"]),
        ("ŻAK", date(1980, 2, 3), ["P1"]),
        (nfd("Żak"), date(1980, 2, 3), ["P1"]),  # Z + combining dot above
        (" Żak ", date(1980, 2, 3), ["P1"]),
        ("Zak", date(1980, 2, 3), ["P4"]),  # accents are not case: Zak is not Żak
        ("Ørsted", date(1975, 4, 5), ["P2"]),
        ("ørsted", date(1975, 4, 5), ["P2"]),
        ("ØRSTED", date(1975, 4, 5), ["P2"]),
        ("Orsted", date(1975, 4, 5), []),
        ("STRASSE", date(1990, 1, 1), ["P3"]),  # full case folding: ß folds to ss
        ("straße", date(1990, 1, 1), ["P3"]),
        ("MÜLLER", date(1966, 6, 6), ["P5"]),
        (nfd("müller"), date(1966, 6, 6), ["P5"]),
        ("Żak", date(1980, 2, 4), []),
    ],
)
def test_demographics_match_folds_case_and_canonical_equivalence(
    sessions: sessionmaker[Session], family: str, birth: date, expected: list[str]
) -> None:
    got = found(sessions, MatchQuery((), family=family, birth_date=birth))
    assert [pid for pid, _ in got] == expected
    assert all(grade != "certain" for _, grade in got)  # demographics alone never are


def test_identifier_with_agreeing_demographics_in_another_spelling_is_certain(
    sessions: sessionmaker[Session],
) -> None:
    query = MatchQuery(
        ((SYSTEM, "P5"),), family="MÜLLER", given=nfd("jörg"), birth_date=date(1966, 6, 6)
    )
    assert found(sessions, query) == [("P5", "certain")]
    query = MatchQuery(((SYSTEM, "P1"),), family="zak", given="marie", birth_date=date(1980, 2, 3))
    assert found(sessions, query) == [("P1", "possible")]  # Zak is another name than Żak


def test_the_migration_fills_the_key_of_patients_indexed_before_it(
    empty_engine: Engine,
) -> None:
    from alembic import command
    from sqlalchemy import text

    from ncp.store.db import alembic_config

    cfg = alembic_config(empty_engine)
    with empty_engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0005")
        connection.execute(
            text(
                "INSERT INTO patient (patient_id, issuer, family_name, birth_date, "
                "header_sop_uid) VALUES ('P1', :issuer, 'Żak', :birth, '1.2')"
            ),
            {"issuer": ISSUER, "birth": date(1980, 2, 3)},
        )
    migrate(empty_engine)
    with session_factory(empty_engine)() as session:
        query = MatchQuery((), family="ŻAK", birth_date=date(1980, 2, 3))
        assert [c.row.patient_id for c in find_candidates(session, query)] == ["P1"]
