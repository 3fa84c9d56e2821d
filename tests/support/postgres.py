"""A throwaway PostgreSQL server for tests.

``PostgresCluster.start()`` runs ``initdb`` and ``pg_ctl`` on a temporary folder and listens on
127.0.0.1 on a free port, with durability switched off (a test cluster need not survive a crash).
When the process runs as root (CI containers), the server runs as the ``postgres`` OS user that the
Debian ``postgresql`` package creates, because ``initdb`` refuses root.

``NCP_TEST_POSTGRES_URL`` (a server URL such as ``postgresql+psycopg://user@host:5432/postgres``)
points the tests at an existing server instead: databases are created and dropped in it.

The pytest fixtures at the bottom are re-exported by ``tests/conftest.py``:

- ``postgres_cluster`` (session): the server; skips the tests that need it when PostgreSQL cannot
  be started, or fails them when ``NCP_REQUIRE_SERVICES=1`` (CI) so they never skip silently;
- ``postgres_url`` (function): the URL of a fresh empty database, dropped after the test;
- ``db_url`` (function, parametrized ``sqlite`` / ``postgres``): an empty database on each engine.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

ENV_URL = "NCP_TEST_POSTGRES_URL"
ENV_REQUIRE = "NCP_REQUIRE_SERVICES"
SERVER_USER = "postgres"
"""The OS user the server runs as when we are root, and the database superuser's name."""

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found, started or reached; the message says why."""


class _StartFailed(PostgresUnavailable):
    """``pg_ctl start`` failed: maybe another process took the port first, worth a retry."""


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``pg_config --bindir`` first (Debian's ``/usr/bin/pg_config`` may belong to libpq-dev of
    another major version, so the folder must really hold the server programs), then the newest
    ``/usr/lib/postgresql/*/bin``, then ``PATH``.
    """

    def has_server(d: Path) -> bool:
        return all(os.access(d / p, os.X_OK) for p in ("initdb", "pg_ctl", "postgres"))

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and has_server(Path(out)):
                return Path(out)

    def version(d: str) -> tuple[int, ...]:
        name = Path(d).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if has_server(Path(d)):
            return Path(d)

    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin/initdb may be a symlink into the real folder, next to ``postgres``.
        for cand in (Path(initdb).parent, Path(initdb).resolve().parent):
            if has_server(cand):
                return cand
    raise PostgresUnavailable(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) not found: "
        "install the Debian package 'postgresql' (or set NCP_TEST_POSTGRES_URL)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment for the server programs, without PG* variables that would redirect them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _traversable_by_others(path: Path) -> bool:
    """Whether every folder from / down to ``path`` lets other users through (o+x)."""
    p = path.resolve()
    for d in (p, *p.parents):
        try:
            if not d.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _connect_kwargs(url: URL) -> dict[str, Any]:
    """psycopg.connect() keyword arguments for a SQLAlchemy URL."""
    kw: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
    if url.host:
        kw["host"] = url.host
    if url.port:
        kw["port"] = url.port
    if url.username:
        kw["user"] = url.username
    if url.password:
        kw["password"] = url.password
    kw["dbname"] = url.database or "postgres"
    return kw


class PostgresCluster:
    """A PostgreSQL server to create test databases in: a throwaway cluster, or an existing one.

    ``PostgresCluster.start()`` starts a cluster of our own (stop it with ``stop()``);
    ``PostgresCluster.external(url)`` uses the server at ``url``, whose ``stop()`` does nothing.
    """

    def __init__(self, server_url: URL, *, owned: bool = False) -> None:
        self.server_url = server_url
        self.owned = owned
        self.bindir: Path | None = None
        self.tmpdir: Path | None = None
        self.datadir: Path | None = None
        self.logfile: Path | None = None
        self.startup_seconds: float | None = None
        self._runas: list[str] = []
        self._stopped = False

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def external(cls, url: str) -> PostgresCluster:
        """Use the server at ``url``; check that it answers."""
        u = make_url(url)
        if not u.drivername.startswith("postgresql"):
            raise PostgresUnavailable(f"{ENV_URL} is not a PostgreSQL URL: {u!r}")
        u = u.set(drivername="postgresql+psycopg", database=u.database or "postgres")
        cluster = cls(u, owned=False)
        cluster._wait_ready(START_TIMEOUT)
        return cluster

    @classmethod
    def start(cls, attempts: int = 3) -> PostgresCluster:
        """initdb and start a cluster on 127.0.0.1 on a free port; the start is retried on another
        port if it fails (a free port found can be taken by someone else before the server binds).
        """
        bindir = find_bindir()
        runas: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no '{SERVER_USER}' OS user to run PostgreSQL "
                    "as (initdb refuses root): install the Debian package 'postgresql'"
                ) from None
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
            if not runuser:
                raise PostgresUnavailable("running as root and 'runuser' (util-linux) is missing")
            runas = [runuser, "-u", SERVER_USER, "--"]

        base = Path(tempfile.gettempdir())
        if owner is not None and not _traversable_by_others(base):
            base = Path("/tmp")  # TMPDIR under /root: the postgres user could not reach it
        last: Exception | None = None
        for _ in range(attempts):
            tmpdir = Path(tempfile.mkdtemp(prefix="ncp-pg-", dir=base))
            if owner is not None:
                os.chown(tmpdir, owner.pw_uid, owner.pw_gid)
            cluster = cls(URL.create("postgresql+psycopg"), owned=True)
            cluster.bindir, cluster.tmpdir, cluster._runas = bindir, tmpdir, runas
            try:
                cluster._init_and_start()
                return cluster
            except _StartFailed as e:
                last = e
                cluster.stop()
            except BaseException:
                cluster.stop()
                raise
        raise PostgresUnavailable(str(last))

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None and self.tmpdir is not None
        cmd = [*self._runas, str(self.bindir / args[0]), *args[1:]]
        try:
            # stdin/stdout/stderr to files or /dev/null, never pipes the server could inherit.
            out = self.tmpdir / "cmd.out"
            with open(out, "w+") as f:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    cwd=self.tmpdir,  # the server user may not read our working directory
                    env=_clean_env(),
                    timeout=timeout,
                    text=True,
                    check=False,
                )
                f.seek(0)
                proc.stdout = f.read()
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostgresUnavailable(f"{args[0]} failed: {e}") from e
        return proc

    def _init_and_start(self) -> None:
        assert self.tmpdir is not None
        t0 = time.monotonic()
        self.datadir = self.tmpdir / "data"
        self.logfile = self.tmpdir / "server.log"
        port = _free_port()
        proc = self._run(
            "initdb",
            "-D", str(self.datadir),
            "-A", "trust",
            "-U", SERVER_USER,
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        if proc.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({proc.returncode}): {proc.stdout[-2000:]}")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {shlex.quote(str(self.tmpdir))} "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        proc = self._run(
            "pg_ctl", "start",
            "-D", str(self.datadir),
            "-l", str(self.logfile),
            "-o", opts,
            "-w", "-t", str(int(START_TIMEOUT)),
            timeout=START_TIMEOUT + 10,
        )  # fmt: skip
        if proc.returncode != 0:
            raise _StartFailed(
                f"pg_ctl start failed ({proc.returncode}): {proc.stdout[-1000:]}\n"
                f"server log:\n{self.log_tail()}"
            )
        self.server_url = URL.create(
            "postgresql+psycopg",
            username=SERVER_USER,
            host="127.0.0.1",
            port=port,
            database="postgres",
        )
        # If the session ends without the fixture's teardown (e.g. KeyboardInterrupt during setup).
        atexit.register(self.stop)
        self._wait_ready(START_TIMEOUT)
        self.startup_seconds = time.monotonic() - t0

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(**_connect_kwargs(self.server_url), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.Error as e:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"PostgreSQL at {self.server_url.render_as_string()} not ready after "
                        f"{timeout:.0f} s: {e}\n{self.log_tail()}"
                    ) from e
                time.sleep(0.05)

    # -- use -------------------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        return self.server_url.port

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server (password included)."""
        return self.server_url.set(database=database).render_as_string(hide_password=False)

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Any]:
        import psycopg

        with psycopg.connect(
            **_connect_kwargs(self.server_url), autocommit=True, connect_timeout=10
        ) as conn:
            yield conn

    def create_database(self, name: str | None = None) -> str:
        """Create an empty UTF-8 database (C collation, so ordering is the same everywhere) and
        return its URL. ``name`` defaults to a fresh unique one."""
        from psycopg import sql

        name = name or f"ncp_test_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            conn.execute(
                sql.SQL(
                    "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' "
                    "LC_COLLATE 'C' LC_CTYPE 'C'"
                ).format(sql.Identifier(name))
            )
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, closing connections still open to it."""
        from psycopg import sql

        with self._admin() as conn:
            if conn.info.server_version >= 130000:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            else:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def list_databases(self) -> list[str]:
        with self._admin() as conn:
            rows = conn.execute("SELECT datname FROM pg_database ORDER BY datname").fetchall()
        return [r[0] for r in rows]

    def log_tail(self, chars: int = 2000) -> str:
        if self.logfile is None:
            return ""
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop our cluster (fast shutdown, waited for) and remove its folder. Idempotent; does
        nothing for an external server."""
        if not self.owned or self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        try:
            if self.datadir is not None and (self.datadir / "postmaster.pid").exists():
                proc = self._run(
                    "pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w",
                    "-t", str(STOP_TIMEOUT), timeout=STOP_TIMEOUT + 10,
                )  # fmt: skip
                if proc.returncode != 0:
                    self._kill_postmaster()
        except PostgresUnavailable:
            self._kill_postmaster()
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Last resort: SIGQUIT (immediate shutdown) to the postmaster we started, by its PID."""
        import signal

        assert self.datadir is not None
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_from_environment() -> PostgresCluster:
    """The server the tests use: ``NCP_TEST_POSTGRES_URL`` if set, else a throwaway cluster."""
    url = os.environ.get(ENV_URL, "").strip()
    if url:
        return PostgresCluster.external(url)
    return PostgresCluster.start()


def services_required() -> bool:
    return os.environ.get(ENV_REQUIRE, "").strip() == "1"


# -- pytest fixtures (re-exported by tests/conftest.py) --------------------------------------


def open_cluster_or_skip() -> PostgresCluster:
    """``cluster_from_environment()``, or skip the calling test when PostgreSQL is unavailable;
    fail it instead under ``NCP_REQUIRE_SERVICES=1`` (CI), so that nothing skips silently there."""
    try:
        return cluster_from_environment()
    except PostgresUnavailable as e:
        reason = f"PostgreSQL unavailable: {e}"
        if services_required():
            pytest.fail(f"{reason} ({ENV_REQUIRE}=1)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The PostgreSQL server of the test session, started once (see ``open_cluster_or_skip``)."""
    cluster = open_cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a fresh empty PostgreSQL database, dropped after the test (even if the test
    leaves connections open)."""
    name = f"ncp_test_{uuid.uuid4().hex[:16]}"
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database on each engine: a SQLite file in ``tmp_path``, or a fresh
    PostgreSQL database (``postgres_url``). Only the postgres case starts the server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ncp.db'}"
    return str(request.getfixturevalue("postgres_url"))
