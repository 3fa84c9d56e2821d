"""A throwaway Orthanc archive with its DICOMweb plugin, for tests.

``OrthancServer.start()`` runs the Debian ``Orthanc`` binary in the foreground from the config
template ``orthanc.json`` next to this file, on free HTTP and DICOM ports, with its storage and
index in a temporary folder. Orthanc binds 0.0.0.0 whatever its config says; the config refuses
remote clients (``RemoteAccessAllowed: false``), and the ports are fresh per run. When the tests run
as root (CI containers), Orthanc runs as ``nobody`` through ``setpriv``, which execs Orthanc, so the
PID we hold is Orthanc's own and ``stop()`` signals and waits on exactly that process.

The pytest fixtures at the bottom are re-exported by ``tests/conftest.py``:

- ``orthanc`` (session): the server; skips the tests that need it when Orthanc cannot be started,
  or fails them when ``NCP_REQUIRE_SERVICES=1`` (CI) so they never skip silently;
- ``orthanc_empty`` (function): the same server, emptied before the test.

``OrthancServer.start(tls=True)`` serves HTTPS instead (Orthanc's ``SslEnabled``; a test CA and a
certificate for ``localhost`` and ``127.0.0.1`` made with ``ncp.security.pki``, the CA in
:attr:`OrthancServer.ca_file`); the fixtures stay plain HTTP. Debian 12's Orthanc serves HTTPS
through civetweb 1.15, which loads ``libssl.so`` by name at run time and looks up
``SSL_get_peer_certificate``, a name OpenSSL 3 no longer exports (it became a macro for
``SSL_get1_peer_certificate``): the worker thread calls a null pointer after the first handshake
and Orthanc dies. So with ``tls`` a C compiler builds a two-line ``libssl.so`` giving that name
back (and a ``libcrypto.so`` that only pulls in ``libcrypto.so.3``), found first through
``LD_LIBRARY_PATH``; no compiler means :class:`OrthancUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ENV_REQUIRE = "NCP_REQUIRE_SERVICES"
TEMPLATE = Path(__file__).with_name("orthanc.json")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
POSTGRESQL_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
RUN_AS_USER = "nobody"
RUN_AS_GROUP = "nogroup"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# The one name civetweb 1.15 looks up that OpenSSL 3 does not export; same reference semantics.
_SSL_SHIM = """
typedef struct ssl_st SSL;
typedef struct x509_st X509;
extern X509 *SSL_get1_peer_certificate(const SSL *s);
X509 *SSL_get_peer_certificate(const SSL *s) { return SSL_get1_peer_certificate(s); }
"""


class OrthancUnavailable(RuntimeError):
    """Orthanc could not be found, started or reached; the message says why."""


def _free_port() -> int:
    # Orthanc listens on all interfaces: ask the kernel for a port free on all of them.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    """Whether every folder from / down to ``path`` lets other users through (o+x)."""
    for d in (path, *path.parents):
        try:
            if not d.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


class OrthancServer:
    """One Orthanc process on loopback. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(
        self,
        tmpdir: Path,
        http_port: int,
        dicom_port: int,
        tls: bool = False,
        index_database: str | None = None,
    ) -> None:
        self.tmpdir = tmpdir
        self.index_database = index_database
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.tls = tls
        self.config_path = tmpdir / "orthanc.json"
        self.logfile = tmpdir / "orthanc.log"
        # With ``tls``: the test CA a client must trust, and Orthanc's certificate and key in one
        # PEM (what ``SslCertificate`` wants). Written at launch.
        self.ca_file: Path | None = tmpdir / "ca.pem" if tls else None
        self.server_pem = tmpdir / "server.pem"
        self._verify: ssl.SSLContext | bool = True
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.shutdown_seconds: float | None = None
        self._stopped = False
        self._http: httpx.Client | None = None
        self._command: list[str] = []
        self._owner: pwd.struct_passwd | None = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def start(
        cls, attempts: int = 3, *, tls: bool = False, index_database: str | None = None
    ) -> OrthancServer:
        """Start Orthanc on free ports; retried on fresh ports if it exits during start-up.
        ``tls``: serve HTTPS (REST and DICOMweb) with a fresh test certificate.
        ``index_database``: keep Orthanc's index in this PostgreSQL database (a SQLAlchemy
        URL, empty) through Debian's ``orthanc-postgresql`` plugin, as a production archive
        does; the files stay in the storage folder."""
        if index_database is not None and not POSTGRESQL_INDEX_PLUGIN.is_file():
            raise OrthancUnavailable(
                f"the PostgreSQL index plugin {POSTGRESQL_INDEX_PLUGIN} is missing: "
                "apt-get install orthanc-postgresql"
            )
        binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise OrthancUnavailable(
                "the Orthanc binary is not installed: apt-get install orthanc orthanc-dicomweb"
            )
        if not DICOMWEB_PLUGIN.is_file():
            raise OrthancUnavailable(
                f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing: "
                "apt-get install orthanc-dicomweb"
            )
        runas: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
            if setpriv is None:
                raise OrthancUnavailable("running as root and 'setpriv' (util-linux) is missing")
            try:
                owner = pwd.getpwnam(RUN_AS_USER)
            except KeyError:
                raise OrthancUnavailable(f"running as root and no '{RUN_AS_USER}' user") from None
            # setpriv execs Orthanc: the child PID is Orthanc's. --pdeathsig: Orthanc gets SIGTERM
            # if the test process dies without stopping it (strictly: when the thread that
            # started it ends, so start servers from the main thread).
            runas = [
                setpriv,
                f"--reuid={RUN_AS_USER}",
                f"--regid={RUN_AS_GROUP}",
                "--init-groups",
                "--pdeathsig=TERM",
            ]
        base = Path(tempfile.gettempdir()).resolve()
        if owner is not None and not _traversable_by_others(base):
            base = Path("/tmp")  # TMPDIR under /root: nobody could not reach it
        last: Exception | None = None
        for _ in range(attempts):
            tmpdir = Path(tempfile.mkdtemp(prefix="ncp-orthanc-", dir=base))
            server = cls(tmpdir, _free_port(), _free_port(), tls=tls, index_database=index_database)
            try:
                server._launch([*runas, binary], owner)
                return server
            except OrthancUnavailable as e:
                last = e
                server.stop()
        raise OrthancUnavailable(str(last))

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(TEMPLATE.read_text())
        cfg.update(
            StorageDirectory=str(self.tmpdir / "storage"),
            IndexDirectory=str(self.tmpdir / "index"),
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            RemoteAccessAllowed=False,
            AuthenticationEnabled=False,
            Plugins=[str(DICOMWEB_PLUGIN)],
            SslEnabled=self.tls,
        )
        if self.tls:
            cfg["SslCertificate"] = str(self.server_pem)
        if self.index_database is not None:
            from sqlalchemy.engine import make_url

            url = make_url(self.index_database)
            cfg["Plugins"] = [str(DICOMWEB_PLUGIN), str(POSTGRESQL_INDEX_PLUGIN)]
            cfg["PostgreSQL"] = {
                "EnableIndex": True,
                "EnableStorage": False,
                "Host": url.host or "127.0.0.1",
                "Port": url.port or 5432,
                "Database": url.database,
                "Username": url.username or "postgres",
                "Password": url.password or "",
                "Lock": False,  # several Orthancs may share the index
            }
        cfg["DicomWeb"] = {
            **cfg.get("DicomWeb", {}),
            "Enable": True,
            "Root": "/dicom-web/",
            "Host": f"127.0.0.1:{self.http_port}",
            "Ssl": self.tls,  # the scheme of the URLs Orthanc writes into its answers
        }
        return cfg

    def _launch(self, command: list[str], owner: pwd.struct_passwd | None) -> None:
        t0 = time.monotonic()
        self._command, self._owner = command, owner
        for sub in ("storage", "index"):
            (self.tmpdir / sub).mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        owned = [self.tmpdir, *(self.tmpdir / d for d in ("storage", "index")), self.config_path]
        env: dict[str, str] | None = None
        if self.tls:
            self._write_certificate()
            owned.append(self.server_pem)
            env = self._build_ssl_shim()
        if owner is not None:
            for p in owned:
                os.chown(p, owner.pw_uid, owner.pw_gid)
        try:
            with open(self.logfile, "ab") as log:
                self.process = subprocess.Popen(
                    [*command, str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.tmpdir,
                    env=env,
                    start_new_session=True,  # Ctrl-C in the terminal reaches pytest, not Orthanc
                )
        except OSError as e:
            raise OrthancUnavailable(f"cannot run Orthanc: {e}") from e
        atexit.register(self.stop)
        self._wait_ready(START_TIMEOUT)
        self.startup_seconds = time.monotonic() - t0

    def _write_certificate(self) -> None:
        from ncp.security import pki

        assert self.ca_file is not None
        ca = pki.make_ca("AT", common_name="NCP-TEST Orthanc CA")
        key = pki.new_ec_key()
        cert = pki.issue_server_certificate(ca, key.public_key(), "AT")
        self.ca_file.write_bytes(pki.cert_pem(ca.certificate))
        pki.write_file(self.server_pem, pki.cert_pem(cert) + pki.private_pem(key), private=True)
        self._verify = ssl.create_default_context(cafile=str(self.ca_file))

    def _build_ssl_shim(self) -> dict[str, str]:
        """The environment that makes civetweb load our ``libssl.so`` (module docstring)."""
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OrthancUnavailable("Orthanc over HTTPS needs a C compiler (cc) for its shim")
        lib = self.tmpdir / "ssl-shim"
        lib.mkdir()
        (lib / "shim.c").write_text(_SSL_SHIM)
        for name, source, needed in (
            ("libssl.so", str(lib / "shim.c"), "ssl"),
            ("libcrypto.so", "/dev/null", "crypto"),
        ):
            command = [compiler, "-shared", "-fPIC", "-o", str(lib / name), "-x", "c", source]
            done = subprocess.run(
                [*command, "-Wl,--no-as-needed", f"-l:lib{needed}.so.3"],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise OrthancUnavailable(f"cannot build the {name} shim: {done.stderr[-500:]}")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            code = self.process.poll()
            if code is not None:
                raise OrthancUnavailable(
                    f"Orthanc exited with status {code} during start-up; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.rest_url}/system", timeout=0.5, verify=self.verify)
                if r.status_code == 200 and "DicomAet" in r.json():
                    r = httpx.get(f"{self.dicomweb_url}/studies", timeout=5.0, verify=self.verify)
                    if r.status_code == 200:
                        return
                    last = f"DICOMweb plugin answers {r.status_code} on /dicom-web/studies"
                else:
                    last = f"GET /system answered {r.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise OrthancUnavailable(
                    f"Orthanc on {self.rest_url} not ready after {timeout:.0f} s ({last}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    # -- use -------------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """Orthanc's own REST API, e.g. ``http://127.0.0.1:PORT`` (``https://`` with ``tls``)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb (PS3.18) base, e.g. ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.rest_url}/dicom-web"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client passes as ``verify`` to trust this server (its CA with ``tls``)."""
        return self._verify

    @property
    def http(self) -> httpx.Client:
        """A client of the REST API (kept open: keep-alive makes test setup faster)."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.rest_url, timeout=60.0, verify=self.verify)
        return self._http

    def upload(self, paths: Iterable[Path | str]) -> int:
        """Store each file with ``POST /instances``; return how many Orthanc accepted (new or
        already stored). Raises ``RuntimeError`` naming the file Orthanc refused."""
        count = 0
        for path in paths:
            body = Path(path).read_bytes()
            for attempt in range(3):
                # Storing a file again is harmless (AlreadyStored): a kept-alive connection
                # that Orthanc closed just as the request went out is tried again, as a
                # client of a busy archive does.
                try:
                    r = self.http.post(
                        "/instances", content=body, headers={"Content-Type": "application/dicom"}
                    )
                    break
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    if attempt == 2:
                        raise
            if r.status_code != 200:
                raise RuntimeError(f"Orthanc refused {path}: {r.status_code} {r.text[:500]}")
            status = r.json().get("Status")
            if status not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc did not store {path}: {status}")
            count += 1
        return count

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        r = self.http.get("/patients")
        r.raise_for_status()
        for patient in r.json():
            self.http.delete(f"/patients/{patient}").raise_for_status()
        r = self.http.get("/instances")
        r.raise_for_status()
        if r.json():
            raise RuntimeError(f"Orthanc still holds {len(r.json())} instances after clear()")

    def delete_study(self, study_uid: str) -> None:
        """Delete the study with this Study Instance UID (matched exactly, on our side)."""
        r = self.http.post(
            "/tools/lookup", content=study_uid, headers={"Content-Type": "text/plain"}
        )
        r.raise_for_status()
        for hit in r.json():
            if hit.get("Type") == "Study":
                self.http.delete(f"/studies/{hit['ID']}").raise_for_status()

    def halt(self) -> None:
        """Stop Orthanc (SIGTERM, as an operator's restart does) and keep its storage, for
        :meth:`relaunch`: an archive that goes away in the middle of a transfer."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._http is not None:
            self._http.close()
            self._http = None

    def relaunch(self) -> None:
        """Start Orthanc again on the same ports and storage after :meth:`halt`."""
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        self._launch(self._command, self._owner)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM Orthanc and wait for it (bounded), SIGKILL after; remove its folder.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        if self._http is not None:
            self._http.close()
            self._http = None
        proc = self.process
        try:
            if proc is not None and proc.poll() is None:
                t0 = time.monotonic()
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
                self.shutdown_seconds = time.monotonic() - t0
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- pytest fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """A running Orthanc with DICOMweb for the whole test session."""
    try:
        server = OrthancServer.start()
    except OrthancUnavailable as e:
        reason = f"Orthanc unavailable: {e}"
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"{reason} ({ENV_REQUIRE}=1)", pytrace=False)
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_empty(orthanc: OrthancServer) -> OrthancServer:
    """The session's Orthanc, emptied before the test."""
    orthanc.clear()
    return orthanc
