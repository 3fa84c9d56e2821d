"""Database engines for tests, on each engine the ``db_url`` fixture gives (SQLite, and
PostgreSQL where the cluster runs): ``engine`` migrated to the head revision, ``empty_engine``
with no table yet (for tests of the migrations themselves)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from ncp.store.db import make_engine, migrate


@pytest.fixture
def empty_engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    migrate(empty_engine)
    return empty_engine
