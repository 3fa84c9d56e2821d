"""The database-backed replay guard: a one-time token id is accepted once across every replica
of a node (each replica an engine of its own on the shared database), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from ncp.security.access import AccessVerifier
from ncp.security.claims import VIEWER_LAUNCH
from ncp.security.tokens import Replayed, issue
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import UsedToken
from ncp.store.replay import DatabaseReplayGuard
from tests.support.token_factory import A_KEY, A_KEYS, STUDY, VIEWER, A, launch_claims

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=90)


@pytest.fixture()
def engines(db_url: str) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one migrated database: two replicas of a node."""
    first, second = make_engine(db_url), make_engine(db_url)
    migrate(first)
    yield first, second
    first.dispose()
    second.dispose()


def guard(engine: Engine) -> DatabaseReplayGuard:
    return DatabaseReplayGuard(session_factory(engine))


def test_first_use_passes_the_second_is_a_replay(engines: tuple[Engine, Engine]) -> None:
    one, two = (guard(e) for e in engines)
    assert one.seen_before("jti-1", LATER, now=NOW) is False
    assert one.seen_before("jti-1", LATER, now=NOW) is True
    assert two.seen_before("jti-1", LATER, now=NOW) is True  # the other replica knows it too
    assert two.seen_before("jti-2", LATER, now=NOW) is False


def test_expired_ids_are_dropped(engines: tuple[Engine, Engine]) -> None:
    replica = guard(engines[0])
    replica.seen_before("old", NOW + timedelta(seconds=10), now=NOW)
    replica.seen_before("new", LATER + timedelta(minutes=5), now=NOW)
    replica.seen_before("trigger", LATER + timedelta(minutes=5), now=LATER)
    with session_factory(engines[0])() as session:
        kept = set(session.scalars(select(UsedToken.jti)))
    assert kept == {"new", "trigger"}


def test_naive_times_are_refused(engines: tuple[Engine, Engine]) -> None:
    with pytest.raises(ValueError, match="aware"):
        guard(engines[0]).seen_before("x", LATER.replace(tzinfo=None), now=NOW)


def test_concurrent_replicas_let_exactly_one_use_through(engines: tuple[Engine, Engine]) -> None:
    ids = [f"launch-{i}" for i in range(25)]
    results: dict[str, list[bool]] = {jti: [] for jti in ids}
    lock = threading.Lock()
    start = threading.Barrier(4)

    def replica(engine: Engine) -> None:
        mine = guard(engine)
        start.wait()
        for jti in ids:
            seen = mine.seen_before(jti, LATER, now=NOW)
            with lock:
                results[jti].append(seen)

    # Two threads per engine, two engines: four concurrent uses of every id.
    threads = [threading.Thread(target=replica, args=(e,)) for e in (*engines, *engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(sorted(r) == [False, True, True, True] for r in results.values()), results
    with session_factory(engines[0])() as session:
        assert session.scalar(select(func.count()).select_from(UsedToken)) == len(ids)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s), max_size=8))
def test_replay_is_per_id(tmp_path_factory: pytest.TempPathFactory, ids: list[str]) -> None:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('replay') / 'r.db'}")
    migrate(engine)
    try:
        replica = guard(engine)
        seen: set[str] = set()
        for jti in ids:
            assert replica.seen_before(jti, LATER, now=NOW) is (jti in seen)
            seen.add(jti)
    finally:
        engine.dispose()


def test_a_viewer_launch_token_replayed_at_another_replica_is_refused(
    engines: tuple[Engine, Engine],
) -> None:
    token = issue(VIEWER_LAUNCH, launch_claims(NOW), A_KEY, now=NOW)

    def viewer(engine: Engine) -> AccessVerifier:
        return AccessVerifier(
            A_KEYS, VIEWER, A, guard(engine), kinds=(VIEWER_LAUNCH,), clock=lambda: NOW
        )

    first, second = (viewer(e) for e in engines)
    grant = first.check(token, study_uid=STUDY)
    assert grant.option == "B"
    with pytest.raises(Replayed):
        second.check(token, study_uid=STUDY)
