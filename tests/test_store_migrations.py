"""Schema migrations of the study index, on SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Engine,
    ForeignKeyConstraint,
    UniqueConstraint,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError

# The audit tables, B's retrieval jobs and the portal's belong to the schema.
import ncp.audit.models
import ncp.store.portal
import ncp.store.retrieval  # noqa: F401
from ncp.store.db import alembic_config, make_engine, migrate, session_factory
from ncp.store.models import Base, Instance, Patient, Series, SourceObject, Study

MODEL_TABLES = {
    "patient",
    "study",
    "series",
    "instance",
    "source_object",
    "audit_record",
    "audit_chain_head",
    "report",
    "report_version",
    "used_token",
    "viewer_session",
    "list_entry",
    "retrieval_job",
    "retrieval_job_study",
    "retrieval_event",
    "retrieved_instance",
    "retrieval_problem",
    "stored_study",
    "hp_account",
    "portal_session",
    "login_failure",
}


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    """This module's engine starts with no table: its tests migrate it themselves."""
    return empty_engine


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    migrate(engine)
    return engine


def _alembic(engine: Engine, fn: Callable[[Config, str], None], revision: str) -> None:
    """Run an alembic command on ``engine`` the way ``migrate`` does (on a handed-over
    connection, in one transaction)."""
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        fn(cfg, revision)


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _names(engine: Engine) -> dict[str, dict[str, Any]]:
    """Constraint and index names per table, as the database reports them."""
    insp = inspect(engine)
    out: dict[str, dict[str, Any]] = {}
    for table in sorted(set(insp.get_table_names()) & MODEL_TABLES):
        out[table] = {
            "pk": insp.get_pk_constraint(table)["name"],
            "uq": sorted(u["name"] for u in insp.get_unique_constraints(table)),
            "fk": sorted(f["name"] for f in insp.get_foreign_keys(table)),
            # PostgreSQL also lists the index behind each unique constraint: not ours.
            "ix": sorted(
                i["name"] for i in insp.get_indexes(table) if not i.get("duplicates_constraint")
            ),
        }
    return out


def _model_names() -> dict[str, dict[str, Any]]:
    """The same, as the models' naming convention says they should be."""
    out: dict[str, dict[str, Any]] = {}
    for t in Base.metadata.sorted_tables:
        out[t.name] = {
            "pk": str(t.primary_key.name),
            "uq": sorted(str(c.name) for c in t.constraints if isinstance(c, UniqueConstraint)),
            "fk": sorted(str(c.name) for c in t.constraints if isinstance(c, ForeignKeyConstraint)),
            "ix": sorted(str(i.name) for i in t.indexes),
        }
    return out


# -- builders ----------------------------------------------------------------------------------


def _patient(pid: str = "P1", issuer: str = "", **kw: Any) -> Patient:
    return Patient(patient_id=pid, issuer=issuer, header_sop_uid="1.2.3.1", **kw)


def _study(patient: Patient, uid: str = "1.2.3", **kw: Any) -> Study:
    return Study(study_uid=uid, patient=patient, header_sop_uid="1.2.3.1", **kw)


def _series(study: Study, uid: str = "1.2.3.4", **kw: Any) -> Series:
    return Series(series_uid=uid, study=study, header_sop_uid="1.2.3.1", **kw)


def _instance(series: Series, uid: str, size: int) -> Instance:
    return Instance(
        sop_uid=uid,
        series_pk=series.id,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size_bytes=size,
        source="test",
        locator=f"file:{uid}",
    )


# -- migrate() ---------------------------------------------------------------------------------


def test_migrate_creates_schema(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) == set()
    migrate(engine)
    assert set(inspect(engine).get_table_names()) == MODEL_TABLES | {"alembic_version"}
    assert _current(engine) == _head() == "report_priority"


def test_migrate_is_idempotent(migrated: Engine) -> None:
    before = _names(migrated)
    writes: list[str] = []

    def record(_conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE"}:
            writes.append(statement)

    event.listen(migrated, "before_cursor_execute", record)
    try:
        migrate(migrated)
    finally:
        event.remove(migrated, "before_cursor_execute", record)
    assert writes == []
    assert _current(migrated) == _head()
    assert _names(migrated) == before


def test_migrated_schema_equals_models(migrated: Engine) -> None:
    assert _schema_diff(migrated) == []


def test_downgrade_to_base_and_upgrade_again(migrated: Engine) -> None:
    with session_factory(migrated)() as s:
        s.add(_patient())
        s.commit()

    _alembic(migrated, command.downgrade, "base")
    assert set(inspect(migrated).get_table_names()) <= {"alembic_version"}
    assert _current(migrated) is None

    migrate(migrated)
    assert _current(migrated) == _head()
    assert _schema_diff(migrated) == []
    with session_factory(migrated)() as s:
        assert s.scalars(select(Patient)).all() == []


def test_constraint_names_follow_the_naming_convention(migrated: Engine) -> None:
    assert _names(migrated) == _model_names()


@pytest.mark.postgres
def test_constraint_names_are_the_same_on_both_engines(postgres_url: str, tmp_path: Path) -> None:
    engines = [make_engine(f"sqlite:///{tmp_path / 'names.db'}"), make_engine(postgres_url)]
    try:
        for e in engines:
            migrate(e)
        sqlite_names, pg_names = (_names(e) for e in engines)
    finally:
        for e in engines:
            e.dispose()
    assert set(sqlite_names) == MODEL_TABLES
    assert sqlite_names == pg_names


# -- constraints and types ---------------------------------------------------------------------


def test_duplicate_study_uid_is_rejected(migrated: Engine) -> None:
    make = session_factory(migrated)
    with make() as s:
        p = _patient()
        s.add(_study(p, "1.2.840.1"))
        s.commit()
    with make() as s:
        p = s.scalars(select(Patient)).one()
        s.add(_study(p, "1.2.840.1"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_duplicate_patient_id_and_issuer_is_rejected(migrated: Engine) -> None:
    make = session_factory(migrated)
    with make() as s:
        s.add_all([_patient("P1", ""), _patient("P1", "HOSP-A"), _patient("P2", "")])
        s.commit()  # the same id under another issuer is another patient
    for issuer in ("", "HOSP-A"):
        with make() as s:
            s.add(_patient("P1", issuer))
            with pytest.raises(IntegrityError):
                s.commit()
    with make() as s:
        assert s.scalar(select(func.count()).select_from(Patient)) == 3


def test_foreign_keys_are_enforced(migrated: Engine) -> None:
    # On SQLite only because make_engine turns PRAGMA foreign_keys on.
    with session_factory(migrated)() as s:
        s.add(Study(study_uid="1.2.9", patient_pk=999_999, header_sop_uid="1"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_size_bytes_holds_values_above_32_bits(migrated: Engine) -> None:
    big = [2**31, 2**31 + 7, 5 * 2**40, 2**63 - 1]
    make = session_factory(migrated)
    with make() as s:
        st_ = _study(_patient(), size_bytes=big[2])
        se = _series(st_, size_bytes=big[1])
        s.add(se)
        s.flush()
        s.add_all(_instance(se, f"1.2.3.4.{i}", size) for i, size in enumerate(big))
        s.commit()
    with make() as s:
        assert s.scalars(select(Study.size_bytes)).one() == big[2]
        assert s.scalars(select(Series.size_bytes)).one() == big[1]
        assert sorted(s.scalars(select(Instance.size_bytes))) == big
        above = select(func.count()).where(Instance.size_bytes > 2**31)
        assert s.scalar(above) == 3
        # The denormalised sums are computed this way: no 32-bit overflow either.
        total = select(func.sum(Instance.size_bytes)).where(Instance.size_bytes < 2**62)
        assert int(s.scalar(total)) == big[0] + big[1] + big[2]


NON_ASCII = {
    "family_name": "Müller",
    "given_name": "Łukasz",
}


def test_non_ascii_text_round_trips(migrated: Engine) -> None:
    make = session_factory(migrated)
    long_cjk = "王" * 256  # String(256) counts characters on PostgreSQL, not bytes
    with make() as s:
        p = _patient("王-001", "Szpital Łódź", birth_date=date(1970, 1, 2), **NON_ASCII)
        s.add(
            _study(
                p,
                institution_name="王府井医院",
                description=long_cjk,
                referring_physician="Ødegård^Åse",
                started=datetime(2024, 5, 6, 7, 8, 9),
            )
        )
        s.add(
            SourceObject(
                source="fs",
                locator="file:/données/Łódź/王.dcm",
                fingerprint="x",
                skipped_reason="ungültig: Ω≈ç√ 🚑",
                seen_at=datetime(2024, 1, 1),
            )
        )
        s.commit()
    with make() as s:
        p = s.scalars(select(Patient).where(Patient.family_name == "Müller")).one()
        assert (p.patient_id, p.issuer, p.given_name) == ("王-001", "Szpital Łódź", "Łukasz")
        study = s.scalars(select(Study)).one()
        assert study.institution_name == "王府井医院"
        assert study.description == long_cjk
        assert study.referring_physician == "Ødegård^Åse"
        so = s.scalars(select(SourceObject).where(SourceObject.locator.like("%王%"))).one()
        assert so.skipped_reason == "ungültig: Ω≈ç√ 🚑"


# Any text a DICOM header can carry once decoded; NUL is excluded because PostgreSQL text cannot
# hold it (SQLite can): the indexer must strip NUL padding before storing.
_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.text(_chars, max_size=256), reason=st.text(_chars, max_size=2000))
def test_any_text_round_trips(migrated: Engine, name: str, reason: str) -> None:
    pid = uuid.uuid4().hex
    with session_factory(migrated)() as s:
        s.add(_patient(pid, family_name=name))
        s.add(
            SourceObject(
                source="t",
                locator=pid,
                fingerprint="f",
                skipped_reason=reason,
                seen_at=datetime(2024, 1, 1),
            )
        )
        s.commit()
    with session_factory(migrated)() as s:
        assert s.scalars(select(Patient.family_name).where(Patient.patient_id == pid)).one() == name
        got = s.scalars(select(SourceObject.skipped_reason).where(SourceObject.locator == pid))
        assert got.one() == reason
