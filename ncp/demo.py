"""``ncp demo``: country A on embedded defaults (SQLite, a folder archive, generated data), running.

One command prepares a data folder and starts what exists so far, each as a child process of
``ncp`` as an operator would run it:

- node A (``ncp serve``): the standard channel with mutual TLS and its DICOMweb gateway (option A);
- A's edge gateway (``ncp edge``, option C) before the same folder archive.

The data folder (``--data``, default ``demo-data``)::

    dicom/  reports/  manifest.json    generated once (``ncp examples generate``)
    country-a/node.toml                node A's config, rewritten at every start (ports)
    country-a/keys/                    A's test PKI (``ncp keys init``), made once
    country-a/trust.toml               A's trust list: the test peer BE
    country-a/index.db                 A's study index, reports and audit trail
    country-b/keys/                    a test PKI for a country B peer (BE): the identity a
                                       client uses to call A (its client certificate, signing key)
    country-b/node.toml, trust.toml    country B's node (BE), trusting A: `ncp pull` with this
                                       config pulls from the running demo into
                                       country-b/retrieved/ (rewritten at every start)
    edge/edge.toml                     the edge gateway's config, rewritten at every start
    edge/tls/                          its server certificate, issued by A's test CA
    edge/edge-audit.db                 its own audit trail
    logs/<service>.stdout|stderr.log   each child's output
    demo.json                          while the services run: each with its role and URLs,
                                       and every file above

Ports: ``--base-port N`` (default 8443) gives the standard channel N, the gateway N+1 and the edge
N+2, and the demo stops with an error naming the port if one is taken; ``--base-port 0`` takes
free ports. Ctrl-C (SIGINT) or SIGTERM stops every child (terminate, wait, kill) and exits 0; if
a child dies, the others are stopped and the demo exits 1 with the child's last stderr lines.

Country B's node runs no service yet: ``ncp pull --config country-b/node.toml`` runs a retrieval
job in its own process (the demo prints the command). The portal joins later; the layout stays.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import NodeSettings, load_edge_settings, load_settings
from ncp.dicom.archive import open_archive
from ncp.errors import ConfigError, NcpError
from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER, generate_examples
from ncp.fhir.datatypes import zone_of
from ncp.fhir.identifiers import patient_system
from ncp.provider.indexer import index_source
from ncp.provider.list_entries import render_studies
from ncp.security import pki
from ncp.security.keystore import KeyStore, load_certificates, load_private_key
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Patient, Study
from ncp.store.queries import patient_studies

COUNTRY_A = "AT"
ISSUER_A = DEFAULT_PATIENT_ID_ISSUER
COUNTRY_B = "BE"
ISSUER_B = "2.16.56.1.1.1"
HOST = "127.0.0.1"
"""Every service binds loopback only: the demo's keys are test keys."""
PUBLIC_HOST = "localhost"
"""The host in the URLs; the test server certificates name both."""
DEFAULT_BASE_PORT = 8443
B_STANDARD = "https://localhost:9443/fhir"
"""Country B's URL in A's trust list; B's node is not started yet (later work)."""

READY_TIMEOUT_S = 300.0
"""A node loads its profiles and terminology before it answers, and both gateways read what
QIDO answers with of every instance of the folder archive into their catalogue before they
serve (a few seconds for the demo's archive, decision 0014); generous for a busy machine."""
STOP_TIMEOUT_S = 10.0
STDERR_TAIL_LINES = 20

EXIT_OK, EXIT_FAILED = 0, 1


class DemoError(NcpError):
    """A service of the demo could not be started or did not become ready."""


class PortTaken(ConfigError):
    """A fixed port of the demo is in use by another process."""


# --- the data folder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything of one demo lives, under ``data``."""

    data: Path

    @property
    def dicom(self) -> Path:
        return self.data / "dicom"

    @property
    def reports(self) -> Path:
        return self.data / "reports"

    @property
    def node_a(self) -> Path:
        return self.data / "country-a"

    @property
    def node_a_config(self) -> Path:
        return self.node_a / "node.toml"

    @property
    def keys_a(self) -> Path:
        return self.node_a / "keys"

    @property
    def trust_a(self) -> Path:
        return self.node_a / "trust.toml"

    @property
    def keys_b(self) -> Path:
        return self.data / "country-b" / "keys"

    @property
    def node_b(self) -> Path:
        return self.data / "country-b"

    @property
    def node_b_config(self) -> Path:
        return self.node_b / "node.toml"

    @property
    def trust_b(self) -> Path:
        return self.node_b / "trust.toml"

    @property
    def edge(self) -> Path:
        return self.data / "edge"

    @property
    def edge_config(self) -> Path:
        return self.edge / "edge.toml"

    @property
    def edge_cert(self) -> Path:
        return self.edge / "tls" / "server.pem"

    @property
    def edge_key(self) -> Path:
        return self.edge / "tls" / "server.key"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def demo_json(self) -> Path:
        return self.data / "demo.json"


@dataclass(frozen=True)
class Ports:
    standard: int
    imaging: int
    edge: int

    @property
    def standard_url(self) -> str:
        return f"https://{PUBLIC_HOST}:{self.standard}/fhir"

    @property
    def imaging_url(self) -> str:
        return f"https://{PUBLIC_HOST}:{self.imaging}/dicomweb"

    @property
    def edge_url(self) -> str:
        return f"https://{PUBLIC_HOST}:{self.edge}/dicomweb"


def choose_ports(base: int, host: str = HOST) -> Ports:
    """``base``, ``base+1``, ``base+2``, each checked free; ``base`` 0: three free ports."""
    if base == 0:
        # Hold all three sockets until the last is bound, so the kernel gives three different ports.
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for s in socks:
                s.bind((host, 0))
            numbers = [int(s.getsockname()[1]) for s in socks]
        finally:
            for s in socks:
                s.close()
        return Ports(*numbers)
    if not 1 <= base <= 65533:
        raise PortTaken(f"--base-port {base}: must be 0 (free ports) or 1..65533")
    for port in (base, base + 1, base + 2):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As uvicorn binds: a port left in TIME_WAIT by the last demo is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise PortTaken(
                    f"port {port} on {host} is taken ({exc.strerror}); the demo uses "
                    f"{base}..{base + 2}: stop what holds it, or choose --base-port N "
                    "(or --base-port 0 for free ports)"
                ) from exc
    return Ports(base, base + 1, base + 2)


_NODE_A = """\
# Country A of the demo, written by `ncp demo` at every start (the ports may change): edits here
# are lost. Paths are relative to this file.
[node]
country = "{country}"
name = "NCPeH-{country} imaging (demo)"
patient_id_issuer = "{issuer}"
# Test keys and test peers: only `ncp demo` writes this (ncp check-config refuses them otherwise).
demo = true

[urls]
standard = "{standard}"
imaging = "{imaging}"
edge = "{edge}"

[listen]
host = "{host}"
standard_port = {standard_port}
imaging_port = {imaging_port}

[database]
url = "sqlite:///index.db"

[archive]
kind = "folder"
path = "../dicom"
# Assigning authority of Patient IDs that carry no Issuer of Patient ID (the edge says the same).
patient_id_issuer = "{issuer}"

[reports]
kind = "folder"
path = "../reports"

[keys]
dir = "keys"

[trust]
list = "trust.toml"
"""

_TRUST_A = """\
# Country A's trust list in the demo, written by `ncp demo` (format: docs/trust.md).
format = 1

# The test peer: country B's node is not started yet, but its keys are real (../country-b/keys),
# so a client holding them calls A exactly as B's node will.
[peers.{peer}]
standard = "{standard}"
tls_ca = "../country-b/keys/ca.pem"
jwks_file = "../country-b/keys/jwks.json"
"""

_EDGE = """\
# Country A's edge gateway (option C) in the demo, written by `ncp demo` at every start.
[edge]
country = "{country}"
audience = "{audience}"
jwks = "../country-a/keys/jwks.json"
name = "edge gateway {country} (demo)"
demo = true

[archive]
kind = "folder"
path = "../dicom"
# As node A's [archive]: the same patient check for IDs without Issuer of Patient ID.
patient_id_issuer = "{issuer}"

[tls]
certificate = "tls/server.pem"
key = "tls/server.key"

[listen]
host = "{host}"
port = {port}

[database]
url = "sqlite:///edge-audit.db"
"""


_NODE_B = """\
# Country B of the demo, written by `ncp demo` at every start (A's ports may change): edits here
# are lost. It runs no service yet: `ncp pull --config` this file pulls from the running demo.
[node]
country = "{country}"
name = "NCPeH-{country} imaging (demo)"
patient_id_issuer = "{issuer}"

[database]
url = "sqlite:///node-b.db"

[archive]
kind = "folder"
path = "archive"

[keys]
dir = "keys"

[trust]
list = "trust.toml"

[consumer]
peers = ["{peer}"]

[retrieval]
retention_days = 7

[retrieval.store]
kind = "folder"
path = "retrieved"

# The health professional `ncp pull` acts for (a command line has no login; a demo identity).
[retrieval.cli_hp]
id = "BE-DEMO-HP-1"
name = "Dr. Demo Peeters"
organisation = "Demo hospital {country}"
organisation_id = "urn:oid:2.16.56.1.1.1.99"
point_of_care = "Emergency department (demo)"
locale = "nl-BE"
"""

_TRUST_B = """\
# Country B's trust list in the demo, written by `ncp demo` (format: docs/trust.md).
format = 1

[peers.{peer}]
standard = "{standard}"
imaging = "{imaging}"
tls_ca = "../country-a/keys/ca.pem"
jwks_file = "../country-a/keys/jwks.json"
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _edge_certificate(layout: Layout) -> None:
    """The edge gateway's own server certificate from A's test CA: it never holds A's node keys."""
    if layout.edge_cert.exists() and layout.edge_key.exists():
        return
    ca_key = load_private_key(layout.keys_a / pki.CA_KEY)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DemoError(f"{layout.keys_a / pki.CA_KEY}: the test CA key must be EC")
    ca = pki.Authority(load_certificates(layout.keys_a / pki.CA_CERT)[0], ca_key)
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(ca, key.public_key(), COUNTRY_A)
    layout.edge_cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.write_file(layout.edge_cert, pki.cert_pem(cert))
    pki.write_private_key(layout.edge_key, key)


def prepare(layout: Layout, ports: Ports, *, patients: int, seed: int, big: int) -> NodeSettings:
    """Data and keys once; configs and trust list at every start. Returns A's settings."""
    if not layout.dicom.is_dir():
        print(f"generating example data for country {COUNTRY_A} into {layout.data} ...", flush=True)
        s = generate_examples(
            layout.data,
            patients=patients,
            seed=seed,
            big_patient_studies=big,
            country=COUNTRY_A,
            patient_id_issuer=ISSUER_A,
        )
        print(
            f"  {s.patients} patients, {s.studies} studies, {s.instances} instances, "
            f"{s.reports} reports in {s.report_versions} versions (a report corrected or "
            "amended keeps each version)"
        )
    for keys, country in ((layout.keys_a, COUNTRY_A), (layout.keys_b, COUNTRY_B)):
        if not (keys / pki.KEYS_TOML).exists():
            pki.init_keys_folder(keys, country)
            print(f"test PKI for {country} in {keys}")
    _edge_certificate(layout)
    _write(layout.trust_a, _TRUST_A.format(peer=COUNTRY_B, standard=B_STANDARD))
    _write(
        layout.node_a_config,
        _NODE_A.format(
            country=COUNTRY_A,
            issuer=ISSUER_A,
            standard=ports.standard_url,
            imaging=ports.imaging_url,
            edge=ports.edge_url,
            host=HOST,
            standard_port=ports.standard,
            imaging_port=ports.imaging,
        ),
    )
    _write(
        layout.edge_config,
        _EDGE.format(
            country=COUNTRY_A,
            audience=ports.edge_url,
            host=HOST,
            port=ports.edge,
            issuer=ISSUER_A,
        ),
    )
    _write(
        layout.trust_b,
        _TRUST_B.format(peer=COUNTRY_A, standard=ports.standard_url, imaging=ports.imaging_url),
    )
    _write(
        layout.node_b_config,
        _NODE_B.format(country=COUNTRY_B, issuer=ISSUER_B, peer=COUNTRY_A),
    )
    # Read back as the services will: a config the node would refuse fails here, named.
    load_edge_settings(layout.edge_config)
    load_settings(layout.node_b_config)
    return load_settings(layout.node_a_config)


def _load_reports(settings: NodeSettings, sessions: sessionmaker[Session]) -> None:
    """The report folder into A's report store, through the ingest path (validated, versioned).
    Loading again stores nothing new."""
    if settings.reports.kind != "folder" or settings.reports.path is None:
        return
    from ncp.provider.reports import load_folder
    from ncp.validation.engine import Validator

    print("loading the imaging reports (each validated against its profile) ...", flush=True)
    summary = load_folder(
        sessions,
        settings.reports.path,
        validator=Validator.default(),
        now=lambda: datetime.now(UTC),
    )
    print(
        f"reports of country {COUNTRY_A}: {summary.stored} report versions stored (of "
        f"{len(summary.reports)} reports), {summary.unchanged} already stored, "
        f"{len(summary.failed)} refused; a report corrected or amended keeps each version"
    )
    for failure in summary.failed[:10]:
        print(f"  refused {failure.path}: {failure.reason}")


@dataclass(frozen=True)
class TopPatient:
    patient_id: str
    issuer: str
    studies: int
    newest: str | None = None
    """The Study Instance UID of the patient's newest study."""


def index_and_list(settings: NodeSettings) -> TopPatient:
    """Index A's archive and print the list of the patient with the most studies."""
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        sessions = session_factory(engine)
        zone = zone_of(settings.node.country)
        run = index_source(
            sessions,
            open_archive(settings.archive),
            zone=zone,
            patient_id_issuer=settings.archive.patient_id_issuer,
        )
        rendered = render_studies(settings, sessions, run.touched)
        print(
            f"index of country {COUNTRY_A}: {run.added} added, {run.updated} updated, "
            f"{run.unchanged} unchanged, {run.removed} removed, {len(run.skipped)} skipped; "
            f"{rendered} list entries rendered"
        )
        _load_reports(settings, sessions)
        issuer = settings.node.patient_id_issuer
        with sessions() as session:
            top = session.execute(
                select(
                    Patient.patient_id,
                    Patient.family_name,
                    Patient.given_name,
                    func.count(Study.id),
                )
                .join(Study, Study.patient_pk == Patient.id)
                .where(Patient.issuer == issuer)
                .group_by(Patient.id, Patient.patient_id, Patient.family_name, Patient.given_name)
                .order_by(func.count(Study.id).desc(), Patient.patient_id)
            ).first()
            if top is None:
                raise DemoError("the index is empty: nothing to show")
            pid, family, given, count = top
            studies = patient_studies(session, pid, issuer)
    finally:
        engine.dispose()
    print(f"\npatient {pid} ({given} {family}): {count} studies; the ten newest:")
    for st in studies[:10]:
        when = st.started.strftime("%Y-%m-%d") if st.started else "----------"
        print(
            f"  {when}  {st.modalities:<6} {(st.description or '')[:34]:<34} "
            f"{st.num_series:>2} series {st.num_instances:>4} instances "
            f"{st.size_bytes / 1e6:6.1f} MB"
        )
    return TopPatient(pid, issuer, int(count), studies[0].study_uid if studies else None)


# --- the services --------------------------------------------------------------------------------

Command = Callable[[str, Path], list[str]]
"""The command line of a service: (``serve`` or ``edge``, its config file) -> argv."""


def ncp_command(kind: str, config: Path) -> list[str]:
    """The real services: ``ncp serve|edge --config FILE`` with this interpreter."""
    return [sys.executable, "-m", "ncp", kind, "--config", str(config)]


@dataclass(frozen=True)
class Endpoint:
    """One URL a service answers on and how the demo knows it answers."""

    name: str
    url: str
    probe: str
    """``metadata``: GET <url>/metadata over mutual TLS must answer 200. ``unauthorized``: GET
    <url>/studies without a token must answer 401 (a gateway that serves without a token is
    broken, not ready)."""


@dataclass
class Service:
    name: str
    role: str
    kind: str
    config: Path
    endpoints: tuple[Endpoint, ...]
    process: subprocess.Popen[bytes] | None = None
    stderr_log: Path | None = None
    stdout_log: Path | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGTERM if the demo dies without stopping it (kill -9, a crash).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Starts the services as child processes, each in its own process group, and stops them."""

    def __init__(self, logs: Path, command: Command, stop: threading.Event) -> None:
        self.logs = logs
        self.command = command
        self.stop_requested = stop
        self.services: list[Service] = []

    def start(self, service: Service) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        service.stdout_log = self.logs / f"{service.name}.stdout.log"
        service.stderr_log = self.logs / f"{service.name}.stderr.log"
        argv = self.command(service.kind, service.config)
        with service.stdout_log.open("wb") as out, service.stderr_log.open("wb") as err:
            service.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=service.config.parent,
                # Own group: a terminal's Ctrl-C reaches the demo only, which stops the children
                # in order; and stopping a child stops anything it started.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.services.append(service)

    def dead(self) -> Service | None:
        for service in self.services:
            if service.process is not None and service.process.poll() is not None:
                return service
        return None

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every child's group, wait, then SIGKILL what is left."""
        running = [s for s in self.services if s.process is not None]
        for service in running:
            assert service.process is not None
            _signal_group(service.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in running:
            assert service.process is not None
            try:
                service.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{service.name} did not stop in {timeout:.0f} s: killed", file=sys.stderr)
                _signal_group(service.process, signal.SIGKILL)
                service.process.wait()
            # The group may outlive its leader (a worker the child started): end it too.
            _signal_group(service.process, signal.SIGKILL)

    def wait_ready(self, service: Service, context: ssl.SSLContext, timeout: float) -> None:
        for endpoint in service.endpoints:
            try:
                self._wait_endpoint(service, endpoint, context, timeout)
            except DemoError as exc:
                raise _NotReady(service, exc) from exc
            print(f"ready: {endpoint.name} {endpoint.url}", flush=True)

    def _wait_endpoint(
        self, service: Service, endpoint: Endpoint, context: ssl.SSLContext, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        base = endpoint.url.rstrip("/")
        path, expected = ("/metadata", 200) if endpoint.probe == "metadata" else ("/studies", 401)
        with httpx.Client(verify=context, timeout=2.0) as client:
            while True:
                if self.stop_requested.is_set():
                    raise _Interrupted
                if service.process is not None and service.process.poll() is not None:
                    raise _ChildDied(service)
                try:
                    answer = client.get(base + path)
                except httpx.TransportError:
                    answer = None
                if answer is not None:
                    if answer.status_code == expected:
                        return
                    raise DemoError(
                        f"{endpoint.name}: GET {base + path} answered {answer.status_code}, "
                        f"expected {expected}"
                    )
                if time.monotonic() > deadline:
                    raise DemoError(f"{endpoint.name}: no answer at {base + path} in {timeout} s")
                self.stop_requested.wait(0.2)


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while starting."""


class _NotReady(Exception):
    def __init__(self, service: Service, error: DemoError) -> None:
        super().__init__(str(error))
        self.service = service
        self.error = error


class _ChildDied(Exception):
    def __init__(self, service: Service) -> None:
        super().__init__(service.name)
        self.service = service


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own group (start_new_session): its pgid is its pid, a group we made.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def probe_context(layout: Layout) -> ssl.SSLContext:
    """How the demo (and any client) reaches A: A's CA as the only anchor, B's client certificate
    (the test peer) for the mutual TLS of the standard channel."""
    context = ssl.create_default_context(cafile=str(layout.keys_a / pki.CA_CERT))
    context.load_cert_chain(layout.keys_b / pki.CLIENT_CERT, layout.keys_b / pki.CLIENT_KEY)
    return context


def services_for(layout: Layout, ports: Ports) -> list[Service]:
    return [
        Service(
            name="node-a",
            role=f"node of country {COUNTRY_A}: standard channel (FHIR, mutual TLS) and "
            "DICOMweb gateway (option A)",
            kind="serve",
            config=layout.node_a_config,
            endpoints=(
                Endpoint("node-a.standard", ports.standard_url, "metadata"),
                Endpoint("node-a.imaging", ports.imaging_url, "unauthorized"),
            ),
        ),
        Service(
            name="edge-a",
            role=f"edge gateway of country {COUNTRY_A} (option C), before A's archive",
            kind="edge",
            config=layout.edge_config,
            endpoints=(Endpoint("edge-a", ports.edge_url, "unauthorized"),),
        ),
    ]


def _tail(path: Path | None, lines: int = STDERR_TAIL_LINES) -> list[str]:
    if path is None or not path.exists():
        return []
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]


# --- demo.json -----------------------------------------------------------------------------------


def describe(
    layout: Layout, services: Sequence[Service], settings: NodeSettings, top: TopPatient
) -> dict[str, Any]:
    """What a client (a test, a script, a person) needs to use the running demo."""
    b_keys = KeyStore.load(layout.keys_b, country=COUNTRY_B)
    a = layout.keys_a
    return {
        "format": 1,
        "data": str(layout.data),
        "services": [
            {
                "name": s.name,
                "role": s.role,
                "country": COUNTRY_A,
                "pid": s.process.pid if s.process else None,
                "config": str(s.config),
                "urls": {e.name: e.url for e in s.endpoints},
                "logs": {"stdout": str(s.stdout_log), "stderr": str(s.stderr_log)},
            }
            for s in services
        ],
        "nodes": {
            COUNTRY_A: {
                "config": str(layout.node_a_config),
                "urls": settings.urls.model_dump(),
                "database": settings.database.url,
                "keys": str(a),
                "ca_certificate": str(a / pki.CA_CERT),
                "server_certificate": str(a / pki.SERVER_CERT),
                "server_key": str(a / pki.SERVER_KEY),
                "client_certificate": str(a / pki.CLIENT_CERT),
                "client_key": str(a / pki.CLIENT_KEY),
                "jwks": str(a / pki.JWKS_JSON),
                "trust_list": str(layout.trust_a),
            }
        },
        "country_b": {
            COUNTRY_B: {
                "note": "country B's node: no service yet; `ncp pull --config` its config "
                "pulls from the running demo",
                "config": str(layout.node_b_config),
                "trust_list": str(layout.trust_b),
                "keys": str(layout.keys_b),
                "store": str(layout.node_b / "retrieved"),
            }
        },
        "edge": {
            COUNTRY_A: {
                "config": str(layout.edge_config),
                "certificate": str(layout.edge_cert),
                "key": str(layout.edge_key),
                "jwks": str(a / pki.JWKS_JSON),
            }
        },
        "test_peer": {
            "country": COUNTRY_B,
            "note": "a ready-made identity of a country B node: call A's standard channel with "
            "its client certificate, sign HP assertions and TRCs with its signing key "
            "(audience: A's standard URL)",
            "keys": str(layout.keys_b),
            "ca_certificate": str(layout.keys_b / pki.CA_CERT),
            "client_certificate": str(b_keys.client.cert_path),
            "client_key": str(b_keys.client.key_path),
            "signing_key": str(
                layout.keys_b / pki.SIGNING_DIR / f"{b_keys.current_signing_key().kid}.key"
            ),
            "signing_kid": b_keys.current_signing_key().kid,
            "jwks": str(layout.keys_b / pki.JWKS_JSON),
            "audience": settings.urls.standard,
            "trust_anchor": str(a / pki.CA_CERT),
        },
        "patient": {
            "id": top.patient_id,
            "issuer": top.issuer,
            "system": patient_system(top.issuer),
            "studies": top.studies,
        },
    }


# --- the command ---------------------------------------------------------------------------------


def run_demo(
    data: Path,
    *,
    patients: int = 8,
    seed: int = 1,
    big_patient_studies: int = 300,
    base_port: int = DEFAULT_BASE_PORT,
    setup_only: bool = False,
    command: Command = ncp_command,
    ready_timeout: float = READY_TIMEOUT_S,
) -> int:
    """Prepare, start, wait for Ctrl-C; ``command`` replaces ``ncp serve|edge`` (tests)."""
    layout = Layout(data.resolve())
    if setup_only and base_port:
        # Nothing binds now: write the ports the services would use, taken or not.
        ports = Ports(base_port, base_port + 1, base_port + 2)
    else:
        ports = choose_ports(base_port)
    settings = prepare(layout, ports, patients=patients, seed=seed, big=big_patient_studies)
    top = index_and_list(settings)
    print(f"\nconfig: {layout.node_a_config}")
    if setup_only:
        print(f"more:   ncp studies --config {layout.node_a_config} --patient {top.patient_id}")
        return EXIT_OK

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = Supervisor(layout.logs, command, stop)
    # demo.json exists exactly while the services run: its appearance says they are ready.
    layout.demo_json.unlink(missing_ok=True)
    try:
        return _run(layout, ports, settings, top, supervisor, stop, ready_timeout)
    finally:
        supervisor.stop_all()
        layout.demo_json.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    layout: Layout,
    ports: Ports,
    settings: NodeSettings,
    top: TopPatient,
    supervisor: Supervisor,
    stop: threading.Event,
    ready_timeout: float,
) -> int:
    context = probe_context(layout)
    services = services_for(layout, ports)
    try:
        for service in services:
            supervisor.start(service)
        for service in services:
            supervisor.wait_ready(service, context, ready_timeout)
    except _Interrupted:
        print("interrupted while starting: stopping", flush=True)
        return EXIT_OK
    except _ChildDied as died:
        return _report_death(died.service)
    except _NotReady as failed:
        print(f"ncp demo: {failed.error}", file=sys.stderr)
        return _report_death(failed.service)
    layout.demo_json.write_text(
        json.dumps(describe(layout, services, settings, top), indent=1) + "\n", encoding="utf-8"
    )
    print(f"\ndemo.json: {layout.demo_json}")
    if top.newest:
        print(
            f"pull:   ncp pull --config {layout.node_b_config} --peer {COUNTRY_A} "
            f"--patient '{patient_system(top.issuer)}|{top.patient_id}' --study {top.newest}"
        )
    print("running; Ctrl-C stops every service", flush=True)
    while not stop.wait(0.25):
        dead = supervisor.dead()
        if dead is not None:
            return _report_death(dead)
    print("stopping", flush=True)
    return EXIT_OK


def _report_death(service: Service) -> int:
    assert service.process is not None
    code = service.process.poll()
    state = "is running" if code is None else f"exited with code {code}"
    print(f"{service.name} {state}; its last stderr lines:", file=sys.stderr)
    for line in _tail(service.stderr_log):
        print(f"  {line}", file=sys.stderr)
    return EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return run_demo(
            args.data,
            patients=args.patients,
            seed=args.seed,
            big_patient_studies=args.big_patient_studies,
            base_port=args.base_port,
            setup_only=args.setup_only,
        )
    except KeyboardInterrupt:
        # Ctrl-C while preparing: no service was started yet.
        print("interrupted", file=sys.stderr)
        return 130
