"""The throwaway PostgreSQL helper of the tests (tests/support/postgres.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import make_url, text

import tests.support.postgres as pg
from ncp.store.db import make_engine
from tests.support.postgres import PostgresCluster, _connect_kwargs


@pytest.mark.postgres
def test_url_works_with_make_engine(postgres_url: str) -> None:
    url = make_url(postgres_url)
    assert url.drivername == "postgresql+psycopg"
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_database()")) == url.database
            assert conn.scalar(text("SHOW server_encoding")) == "UTF8"
            assert (
                conn.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")) == 0
            )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_two_databases_are_isolated(postgres_cluster: PostgresCluster, postgres_url: str) -> None:
    other_url = postgres_cluster.create_database()
    other_name = make_url(other_url).database
    assert other_url != postgres_url
    a, b = make_engine(postgres_url), make_engine(other_url)
    try:
        with a.begin() as conn:
            conn.execute(text("CREATE TABLE t (v text)"))
            conn.execute(text("INSERT INTO t VALUES ('only in a')"))
        with b.begin() as conn:
            conn.execute(text("CREATE TABLE t (v text)"))
        with a.connect() as conn:
            assert conn.scalars(text("SELECT v FROM t")).all() == ["only in a"]
        with b.connect() as conn:
            assert conn.scalars(text("SELECT v FROM t")).all() == []
    finally:
        a.dispose()
        # b still holds a pooled connection: drop_database must close it.
        assert other_name is not None
        postgres_cluster.drop_database(other_name)
        b.dispose()
    assert other_name not in postgres_cluster.list_databases()


@pytest.mark.postgres
def test_drop_database_is_idempotent(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.create_database("ncp_test_drop_me")
    assert url.endswith("/ncp_test_drop_me")
    postgres_cluster.drop_database("ncp_test_drop_me")
    postgres_cluster.drop_database("ncp_test_drop_me")
    assert "ncp_test_drop_me" not in postgres_cluster.list_databases()


@pytest.mark.postgres
def test_own_cluster_listens_on_loopback_only(postgres_cluster: PostgresCluster) -> None:
    if not postgres_cluster.owned:
        pytest.skip("NCP_TEST_POSTGRES_URL: an external server")
    assert postgres_cluster.server_url.host == "127.0.0.1"
    assert postgres_cluster.startup_seconds is not None
    with postgres_cluster._admin() as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"
        assert conn.execute("SHOW port").fetchone()[0] == str(postgres_cluster.port)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://u:p%40ss@db.example:6543/ncp?sslmode=require",
            {
                "host": "db.example",
                "port": 6543,
                "user": "u",
                "password": "p@ss",
                "dbname": "ncp",
                "sslmode": "require",
            },
        ),
        (
            "postgresql://postgres@127.0.0.1/",
            {"host": "127.0.0.1", "user": "postgres", "dbname": "postgres"},
        ),
    ],
)
def test_connect_kwargs(url: str, expected: dict[str, object]) -> None:
    assert _connect_kwargs(make_url(url)) == expected


@pytest.mark.parametrize("required", ["", "0", "1"])
def test_unavailable_postgres_skips_or_fails(
    monkeypatch: pytest.MonkeyPatch, required: str
) -> None:
    def unavailable() -> PostgresCluster:
        raise pg.PostgresUnavailable("no server here")

    monkeypatch.setattr(pg, "cluster_from_environment", unavailable)
    monkeypatch.setenv("NCP_REQUIRE_SERVICES", required)
    expected = pytest.fail.Exception if required == "1" else pytest.skip.Exception
    with pytest.raises(expected, match="no server here"):
        pg.open_cluster_or_skip()
