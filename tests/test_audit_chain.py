"""The audit hash chain on SQLite and PostgreSQL (``db_url``): appending, verifying, and every
kind of tampering ``ncp audit verify`` must name: edits of any field, deletions (first, middle,
last), reordering, rewritten hashes, and writers racing each other."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Integer,
    String,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from ncp.audit.chain import (
    HASHED_FIELDS,
    ChainError,
    append,
    canonical,
    record_hash,
    values_of,
    verify,
)
from ncp.audit.models import GENESIS_HASH, AuditChainHead, AuditRecord
from ncp.audit.record import Auditor
from ncp.store.db import alembic_config, make_engine, migrate, session_factory
from ncp.store.models import Base
from tests.audit_support import (
    T0,
    delete_record,
    fill,
    head,
    mixed_events,
    sample_event,
    seqs,
    set_field,
    sparse_event,
    tampering,
    verify_on,
)

AUDIT_TABLES = {"audit_record", "audit_chain_head"}
N = 12


@pytest.fixture
def chain(engine: Engine) -> Engine:
    """A chain of N records, full and sparse ones mixed (so NULLs and values both occur)."""
    fill(engine, mixed_events(N))
    return engine


# -- schema ---------------------------------------------------------------------------------


def test_migration_creates_an_empty_chain(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= AUDIT_TABLES
    assert head(engine) == (0, GENESIS_HASH)
    with Session(engine) as session:
        result = verify(session)
    assert result.ok and result.count == 0 and result.head_seq == 0


def test_audit_tables_equal_the_models(engine: Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)

    assert [op for op in diff if "audit_" in repr(op)] == []


def test_downgrade_removes_the_audit_tables_and_upgrade_restores_them(chain: Engine) -> None:
    cfg = alembic_config(chain)
    with chain.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0001")
    assert not AUDIT_TABLES & set(inspect(chain).get_table_names())
    migrate(chain)
    assert head(chain) == (0, GENESIS_HASH)


def test_hashed_fields_are_every_column_but_the_hash() -> None:
    columns = [c.name for c in AuditRecord.__table__.columns]
    assert sorted(HASHED_FIELDS) == sorted(c for c in columns if c != "hash")
    assert len(set(HASHED_FIELDS)) == len(HASHED_FIELDS)


def test_canonical_form_is_stable() -> None:
    # A change here changes every hash ever written: it needs a new CHAIN_FORMAT, not an edit.
    values = sparse_event(1).columns() | {
        "seq": 1,
        "recorded": datetime(2024, 1, 2, 3, 4, 5),
        "prev_hash": GENESIS_HASH,
    }
    assert canonical(values).startswith(b'{"action":"hp-login","actor_country":null,')
    assert b'"recorded":"2024-01-02T03:04:05.000000"' in canonical(values)
    assert record_hash(values) == (
        "78506006579e4fb067643000e4e9a5d17b735601efe76ba7b88c1edf5493096d"
    )


# -- appending --------------------------------------------------------------------------------


def test_append_links_records_and_moves_the_head(chain: Engine) -> None:
    with Session(chain) as session:
        records = list(session.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    for r in records:
        assert r.hash == record_hash(values_of(r))
    assert head(chain) == (N, records[-1].hash)
    with Session(chain) as session:
        result = verify(session)
    assert result.ok, result.problems
    assert (result.count, result.head_seq, result.head_hash) == (N, N, records[-1].hash)


def test_values_come_back_exactly_as_hashed(chain: Engine) -> None:
    event = sample_event(3)
    with Session(chain) as session, session.begin():
        written = append(session, event, now=T0 + timedelta(days=1))
        expected, seq = values_of(written), written.seq
    with Session(chain) as session:
        stored = session.get(AuditRecord, seq)
        assert stored is not None
        assert values_of(stored) == expected
        assert stored.size_bytes == 5 * 2**31 + 3
        assert stored.details["note"] == "Ünïcödé ✓"


def test_recorded_never_goes_back_along_the_chain(engine: Engine) -> None:
    later, earlier = T0 + timedelta(hours=1), T0
    with Session(engine) as session, session.begin():
        first = append(session, sparse_event(1), now=later).recorded
    with Session(engine) as session, session.begin():
        # a replica with a slow clock
        second = append(session, sparse_event(2), now=earlier).recorded
    assert second == first == later
    with Session(engine) as session:
        assert verify(session).ok


def test_append_refuses_without_the_chain_head(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(text("DELETE FROM audit_chain_head"))
    with Session(engine) as session, session.begin(), pytest.raises(ChainError):
        append(session, sparse_event())


# -- tampering: edits ---------------------------------------------------------------------------

_TEXT = st.characters(codec="utf-8", exclude_characters="\x00")


def _values_for(name: str) -> st.SearchStrategy[Any]:
    """Any value the column's database type can hold (not only what AuditEvent would allow)."""
    column = AuditRecord.__table__.c[name]
    kind = column.type
    base: st.SearchStrategy[Any]
    if isinstance(kind, DateTime):
        base = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1))
    elif isinstance(kind, BigInteger):
        base = st.integers(-(2**63), 2**63 - 1)
    elif isinstance(kind, Integer):
        base = st.integers(-(2**31), 2**31 - 1)
    elif isinstance(kind, JSON):
        leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(_TEXT)
        base = st.recursive(
            leaf,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(_TEXT, max_size=5), inner, max_size=3)
            ),
            max_leaves=6,
        )
    elif isinstance(kind, String):
        base = st.text(_TEXT, max_size=kind.length or 60)
    else:  # pragma: no cover - a new column type needs a strategy
        raise AssertionError(f"no strategy for {name}: {kind!r}")
    return st.none() | base if column.nullable or isinstance(kind, JSON) else base


def _changed(current: Any, new: Any) -> bool:
    return type(current) is not type(new) or current != new


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_editing_any_field_of_any_record_is_named(chain: Engine, data: st.DataObject) -> None:
    seq = data.draw(st.integers(1, N), label="record")
    name = data.draw(st.sampled_from([*HASHED_FIELDS, "hash"]), label="field")
    with Session(chain) as session:
        record = session.get(AuditRecord, seq)
        assert record is not None
        current = getattr(record, name)
    if name == "seq":
        # Unused numbers only (seq is the primary key): beyond the head or below 1.
        new: Any = data.draw(st.integers(N + 1, 2**62) | st.integers(-(2**62), 0), label="value")
    else:
        new = data.draw(_values_for(name).filter(lambda v: _changed(current, v)), label="value")
    with tampering(chain) as connection:
        set_field(connection, seq, name, new)
        result = verify_on(connection)
    assert not result.ok
    first = result.first_broken
    assert first is not None
    if name == "seq":
        assert first.seq == min(seq, new)
    else:
        assert (first.seq, first.kind) == (seq, "edited"), first.describe()


def _another(name: str, current: Any) -> Any:
    """A value of the column's type that differs from ``current`` (a small, plausible edit)."""
    column = AuditRecord.__table__.c[name]
    kind = column.type
    if name == "seq":
        return 10_000
    if isinstance(kind, DateTime):
        return current + timedelta(microseconds=1)
    if isinstance(kind, Integer):  # BigInteger included
        return 1 if current is None else current + 1
    if isinstance(kind, JSON):
        return [*current, "9.9"] if isinstance(current, list) else {**current, "added": 1}
    if current is None:
        return "x"
    limit = getattr(kind, "length", None) or 10_000
    if len(current) < limit:
        return current + "x"
    return current[:-1] + ("y" if current.endswith("x") else "x")


@pytest.mark.parametrize("name", [*HASHED_FIELDS, "hash"])
def test_editing_each_field_is_named(chain: Engine, name: str) -> None:
    for seq in (4, 5):  # a sparse record (NULLs) and a full one
        with Session(chain) as session:
            record = session.get(AuditRecord, seq)
            assert record is not None
            new = _another(name, getattr(record, name))
        with tampering(chain) as connection:
            set_field(connection, seq, name, new)
            result = verify_on(connection)
        first = result.first_broken
        assert first is not None
        assert (first.seq, first.kind) == (seq, "deleted" if name == "seq" else "edited")


def test_an_edit_is_named_with_its_time_and_step(chain: Engine) -> None:
    with tampering(chain) as connection:
        set_field(connection, 5, "size_bytes", 1)
        result = verify_on(connection)
    first = result.first_broken
    assert first is not None and len(result.problems) == 1
    assert (first.seq, first.kind, first.action) == (5, "edited", "list-query")
    assert first.recorded == T0 + timedelta(milliseconds=4)
    assert "seq 5" in first.describe() and "list-query" in first.describe()


def test_edits_of_several_records_are_all_named(chain: Engine) -> None:
    with tampering(chain) as connection:
        for seq in (9, 2, 6):
            set_field(connection, seq, "reason", "covered up")
        result = verify_on(connection)
    named = [(p.seq, p.kind) for p in result.problems]
    assert named == [(2, "edited"), (6, "edited"), (9, "edited")]


def test_rewriting_a_record_with_a_recomputed_hash_is_named(chain: Engine) -> None:
    for seq in (4, N):  # a middle record, and the newest (caught by the chain head)
        with tampering(chain) as connection:
            with Session(bind=connection) as session:
                record = session.get(AuditRecord, seq)
                assert record is not None
                values = values_of(record) | {"patient_id": "SOMEONE-ELSE"}
            set_field(connection, seq, "patient_id", "SOMEONE-ELSE")
            set_field(connection, seq, "hash", record_hash(values))
            result = verify_on(connection)
        first = result.first_broken
        assert first is not None
        assert (first.seq, first.kind) == (seq, "relinked"), first.describe()


# -- tampering: deletions and reordering ---------------------------------------------------------


@pytest.mark.parametrize(
    ("deleted", "named", "kind"),
    [
        ([1], 1, "deleted"),
        ([5], 5, "deleted"),
        ([5, 6, 7], 5, "deleted"),
        ([N], N, "truncated"),
        ([N - 1, N], N - 1, "truncated"),
        (list(range(1, N + 1)), 1, "truncated"),
    ],
    ids=["first", "middle", "middle-run", "last", "last-two", "all"],
)
def test_deleting_records_is_named(
    chain: Engine, deleted: list[int], named: int, kind: str
) -> None:
    with tampering(chain) as connection:
        for seq in deleted:
            delete_record(connection, seq)
        result = verify_on(connection)
    first = result.first_broken
    assert first is not None
    assert (first.seq, first.kind) == (named, kind), first.describe()
    assert result.count == N - len(deleted)


def test_deleting_the_chain_head_is_named(chain: Engine) -> None:
    with tampering(chain) as connection:
        connection.execute(text("DELETE FROM audit_chain_head"))
        result = verify_on(connection)
    assert [(p.seq, p.kind) for p in result.problems] == [(N + 1, "head-missing")]


def test_setting_the_head_back_is_named(chain: Engine) -> None:
    with tampering(chain) as connection:
        connection.execute(update(AuditChainHead).values(seq=N - 3))
        result = verify_on(connection)
    kinds = {(p.seq, p.kind) for p in result.problems}
    assert (N - 2, "unanchored") in kinds


def test_reordering_records_is_named(chain: Engine) -> None:
    with tampering(chain) as connection:
        # Swap records 3 and 8 (through a free number: seq is the primary key).
        set_field(connection, 3, "seq", 10_000)
        set_field(connection, 8, "seq", 3)
        set_field(connection, 10_000, "seq", 8)
        result = verify_on(connection)
    assert [(p.seq, p.kind) for p in result.problems] == [(3, "edited"), (8, "edited")]


def test_moving_the_newest_time_backwards_is_named(chain: Engine) -> None:
    with tampering(chain) as connection:
        set_field(connection, N, "recorded", T0 - timedelta(days=1))
        result = verify_on(connection)
    first = result.first_broken
    assert first is not None and (first.seq, first.kind) == (N, "edited")


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """SQLite only: it stores whatever is written into a column (PostgreSQL checks types)."""
    eng = make_engine(f"sqlite:///{tmp_path / 'typeless.db'}")
    migrate(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.mark.parametrize("column", ["recorded", "details", "studies"])
def test_unparseable_values_are_named_not_a_crash(sqlite_engine: Engine, column: str) -> None:
    engine = sqlite_engine
    fill(engine, mixed_events(4))
    with tampering(engine) as connection:
        connection.execute(
            text(f"UPDATE audit_record SET {column} = 'not {column}{{' WHERE seq = 2")
        )
        result = verify_on(connection)
    first = result.first_broken
    assert first is not None
    assert (first.seq, first.kind) == (2, "edited"), first.describe()


def test_a_text_seq_is_named_not_a_crash(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    fill(engine, mixed_events(4))
    with tampering(engine) as connection:
        connection.execute(text("UPDATE audit_record SET seq = 'x' WHERE seq = 2"))
        result = verify_on(connection)
    first = result.first_broken
    assert first is not None and (first.seq, first.kind) == (2, "deleted")


def test_rewriting_the_tail_and_the_head_together_is_not_detectable(chain: Engine) -> None:
    """The limit of a chain kept in the database it protects: whoever deletes the newest
    records and sets the head to match leaves a valid shorter chain. A signed checkpoint kept
    elsewhere is what detects this (tests/test_audit_checkpoint.py)."""
    with Session(chain) as session:
        record = session.get(AuditRecord, N - 2)
        assert record is not None
        seq, digest = record.seq, record.hash
    with tampering(chain) as connection:
        delete_record(connection, N)
        delete_record(connection, N - 1)
        connection.execute(update(AuditChainHead).values(seq=seq, hash=digest))
        result = verify_on(connection)
    assert result.ok and result.head_hash == digest


# -- several writers ------------------------------------------------------------------------------


def _write_concurrently(engines: list[Engine], threads: int, each: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        auditor = Auditor(session_factory(engines[k % len(engines)]), country="AT")
        try:
            start.wait()
            for i in range(each):
                auditor.record(sparse_event(k * 1000 + i, node_country=None))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def _assert_one_chain(engine: Engine, total: int) -> None:
    assert seqs(engine) == list(range(1, total + 1))
    with Session(engine) as session:
        result = verify(session)
        request_ids = set(session.scalars(select(AuditRecord.request_id)))
    assert result.ok, [p.describe() for p in result.problems]
    assert result.count == total and len(request_ids) == total


def test_concurrent_writers_never_fork_the_chain(engine: Engine) -> None:
    assert _write_concurrently([engine], threads=6, each=15) == []
    _assert_one_chain(engine, 90)


def test_writers_on_two_engines_never_fork_the_chain(db_url: str, engine: Engine) -> None:
    """Two engines are two replicas of one node: separate pools, separate connections."""
    other = make_engine(db_url)
    try:
        assert _write_concurrently([engine, other], threads=6, each=15) == []
    finally:
        other.dispose()
    _assert_one_chain(engine, 90)


def test_a_writer_waits_for_the_one_holding_the_chain(db_url: str, engine: Engine) -> None:
    other = make_engine(db_url)
    done = threading.Event()

    def second() -> None:
        with Session(other) as session, session.begin():
            append(session, sparse_event(2))
        done.set()

    try:
        with Session(engine) as session, session.begin():
            append(session, sparse_event(1))
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.5)
            assert not done.is_set(), "the second writer did not wait for the chain"
        thread.join(timeout=30)
        assert done.is_set()
    finally:
        other.dispose()
    _assert_one_chain(engine, 2)


def test_verify_while_writers_append_reports_nothing_false(engine: Engine) -> None:
    results = []
    writer = threading.Thread(target=_write_concurrently, args=([engine], 2, 40))
    writer.start()
    while writer.is_alive():
        with Session(engine) as session:
            results.append(verify(session))
    writer.join()
    assert results and all(r.ok for r in results), [
        p.describe() for r in results for p in r.problems
    ]
    _assert_one_chain(engine, 80)


@pytest.mark.postgres
def test_two_postgres_connections_take_turns(postgres_url: str) -> None:
    """On PostgreSQL the head row lock (SELECT ... FOR UPDATE) orders writers: the second
    connection's append blocks inside its own transaction until the first commits."""
    a, b = make_engine(postgres_url), make_engine(postgres_url)
    try:
        migrate(a)
        with a.connect() as first, b.connect() as second:
            tx1, tx2 = first.begin(), second.begin()
            with Session(bind=first) as s1:
                append(s1, sparse_event(1))
            blocked = threading.Event()
            finished = threading.Event()

            def go() -> None:
                blocked.set()
                with Session(bind=second) as s2:
                    append(s2, sparse_event(2))
                finished.set()

            thread = threading.Thread(target=go)
            thread.start()
            blocked.wait()
            time.sleep(0.5)
            assert not finished.is_set()
            tx1.commit()
            thread.join(timeout=30)
            assert finished.is_set()
            tx2.commit()
        _assert_one_chain(a, 2)
    finally:
        a.dispose()
        b.dispose()
