"""A real node A on loopback, for contract tests of the standard channel (and the gateway).

``running_node(root)`` builds test PKIs for A (AT), its peer B (BE), a second trusted peer (DE)
and an untrusted country (FR), a small generated DICOM archive indexed into A's database, and
serves A's app over HTTPS with mutual TLS exactly as ``ncp serve`` does
(:func:`ncp.serve.standard_server`). The session fixture ``node_a`` shares one such
node; tests needing a node of their own call ``running_node`` themselves.

:class:`PeerSide` plays country B's node: it signs HP assertions and TRCs with B's own key and
builds the headers of the standard channel; ``RunningNode.client("BE")`` is an HTTPS client with
B's client certificate.

The dataset (``PATIENTS``, ``STUDIES``): PAT100 has two studies; PAT101 and PAT102 share family
name and birth date (an ambiguous demographic match); PAT103's index record has no birth date.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from ncp.app import build_app
from ncp.audit.models import AuditRecord
from ncp.config import (
    DatabaseSection,
    EdgeSection,
    EdgeSettings,
    EdgeTlsSection,
    settings_from_mapping,
)
from ncp.dicom.archive import open_archive
from ncp.fhir.datatypes import zone_of
from ncp.gateway.edge import build_edge_app
from ncp.gateway.server import TlsFiles, imaging_server
from ncp.node import Node
from ncp.provider.indexer import index_source
from ncp.security.claims import HP_ASSERTION, TRC, PatientRef
from ncp.security.keys import SigningKey
from ncp.security.keystore import KeyStore
from ncp.security.mtls import bind
from ncp.security.tokens import issue
from ncp.serve import (
    gateway_app,
    node_imaging_server,
    node_viewer_server,
    standard_server,
    viewer_app,
)
from ncp.store.db import make_engine, session_factory
from tests.security_support import make_node, trust_toml, write_client
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.token_factory import hp_claims, trc_claims

A, B, OTHER, UNTRUSTED = "AT", "BE", "DE", "FR"
ISSUER = "1.2.40.0.10.1.4.3.1"
"""A's Issuer of Patient ID; FHIR system ``SYSTEM``."""
SYSTEM = f"urn:oid:{ISSUER}"
EDGE_URL = "https://edge.at.test/dicomweb"
VIEWER_URL = "https://viewer.at.test"


@dataclass(frozen=True)
class NodePatient:
    patient_id: str
    family: str
    given: str
    birth_date: str | None
    """YYYY-MM-DD, or None when the archive has none."""
    sex: str

    @property
    def ref(self) -> PatientRef:
        return PatientRef(SYSTEM, self.patient_id)


@dataclass(frozen=True)
class NodeStudy:
    uid: str
    patient_id: str
    modality: str
    instances: int = 2


PATIENTS: dict[str, NodePatient] = {
    p.patient_id: p
    for p in (
        NodePatient("PAT100", "Gruber", "Anna", "1980-05-17", "F"),
        NodePatient("PAT101", "Huber", "Max", "1975-03-02", "M"),
        NodePatient("PAT102", "Huber", "Maria", "1975-03-02", "F"),
        NodePatient("PAT103", "Novak", "Eva", None, "F"),
    )
}
STUDIES: dict[str, NodeStudy] = {
    s.uid: s
    for s in (
        NodeStudy("1.2.826.0.1.3680043.10.543.100.1", "PAT100", "CT"),
        NodeStudy("1.2.826.0.1.3680043.10.543.100.2", "PAT100", "MR", 1),
        NodeStudy("1.2.826.0.1.3680043.10.543.101.1", "PAT101", "CR", 1),
        NodeStudy("1.2.826.0.1.3680043.10.543.102.1", "PAT102", "CT", 1),
        NodeStudy("1.2.826.0.1.3680043.10.543.103.1", "PAT103", "US", 1),
    )
}


def studies_of(patient_id: str) -> list[str]:
    return [s.uid for s in STUDIES.values() if s.patient_id == patient_id]


def write_dataset(folder: Path) -> int:
    """Write the DICOM files of ``STUDIES``; returns how many instances."""
    count = 0
    for study in STUDIES.values():
        patient = PATIENTS[study.patient_id]
        birth = patient.birth_date.replace("-", "") if patient.birth_date else None
        for n in range(1, study.instances + 1):
            series = f"{study.uid}.1"
            ds = make_instance(
                patient_id=patient.patient_id,
                study_uid=study.uid,
                series_uid=series,
                sop_uid=f"{series}.{n}",
                PatientName=f"{patient.family}^{patient.given}",
                PatientBirthDate=birth,
                PatientSex=patient.sex,
                IssuerOfPatientID=ISSUER,
                Modality=study.modality,
                InstanceNumber=n,
                AccessionNumber=f"ACC{study.uid.rsplit('.', 2)[-2]}{study.uid[-1]}",
            )
            write_instance(folder / study.patient_id / f"{series}.{n}.dcm", ds)
            count += 1
    return count


# --- country B ---------------------------------------------------------------------------------


@dataclass
class PeerSide:
    """A peer's node as A's client: signs assertions with its own key for A's audience."""

    country: str
    keys_dir: Path
    signing_key: SigningKey
    audience: str

    def hp_assertion(
        self, *, now: datetime | None = None, key: SigningKey | None = None, **changes: Any
    ) -> str:
        """A signed HP identity assertion; ``changes`` replace claims (``expires_at``...)."""
        moment = now or datetime.now(UTC)
        values = {"issuer": self.country, "audience": self.audience, **changes}
        claims = hp_claims(moment, **values)
        return issue(HP_ASSERTION, claims, key or self.signing_key, now=moment)

    def trc(
        self,
        hp_token: str,
        patient: PatientRef | str = "PAT100",
        *,
        now: datetime | None = None,
        **changes: Any,
    ) -> str:
        """A signed treatment relationship confirmation bound to ``hp_token``."""
        moment = now or datetime.now(UTC)
        ref = PATIENTS[patient].ref if isinstance(patient, str) else patient
        values = {"issuer": self.country, "audience": self.audience, "patient": ref, **changes}
        claims = trc_claims(hp_token, moment, **values)
        return issue(TRC, claims, self.signing_key, now=moment)

    def headers(
        self,
        patient: PatientRef | str | None = "PAT100",
        *,
        hp: str | None = None,
        trc: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, str]:
        """Headers of a request: the HP assertion, the TRC (unless ``patient`` is None and no
        ``trc`` is given), a fresh ``X-Request-ID``."""
        hp_token = hp or self.hp_assertion()
        out = {
            "Authorization": f"Bearer {hp_token}",
            "X-Request-ID": request_id or f"test-{uuid.uuid4()}",
        }
        if trc is not None:
            out["NCP-Treatment-Relationship"] = trc
        elif patient is not None:
            out["NCP-Treatment-Relationship"] = self.trc(hp_token, patient)
        return out


# --- the running node --------------------------------------------------------------------------


@dataclass
class RunningNode:
    node: Node
    app: FastAPI
    url: str
    """A's FHIR base (``settings.urls.standard``), e.g. https://localhost:PORT/fhir."""
    origin: str
    root: Path
    ca_file: Path
    """A's CA: what a client trusts for A's server certificate."""
    b: PeerSide
    other: PeerSide
    """DE: a second peer on A's trust list."""
    creds: dict[str, tuple[Path, Path] | None]
    """Client certificates by name: BE, DE, FR (untrusted CA), AT (A's own: national system),
    'BE expired', none."""
    imaging_url: str | None = None
    """The option A gateway's base, when this build has one (``ncp.gateway.app``)."""
    viewer_url: str | None = None
    """The option B viewer's base when it is served (``running_node(viewer=True)``)."""
    edge_url: str | None = None
    """The option C edge gateway's base, when ``running_node(edge=True)`` serves one."""
    edge_audit: Any = None
    """The edge gateway's audit sessions (a sessionmaker), when it runs."""
    index_run: Any = None
    """What indexing the archive reported (``ncp.provider.indexer.IndexRun``)."""
    servers: list[uvicorn.Server] = field(default_factory=list)

    def client(self, who: str = B, *, timeout: float = 10.0) -> httpx.Client:
        """An HTTPS client of A with the named client certificate (paths: ``/fhir/...``)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        creds = self.creds[who]
        if creds is not None:
            context.load_cert_chain(*creds)
        return httpx.Client(verify=context, base_url=self.origin, timeout=timeout)

    def audit_records(self, request_id: str | None = None) -> list[AuditRecord]:
        """A's audit records (of one request), in chain order."""
        query = select(AuditRecord).order_by(AuditRecord.seq)
        if request_id is not None:
            query = query.where(AuditRecord.request_id == request_id)
        with self.node.sessions() as session:
            return list(session.scalars(query))

    def wait_for_audit(
        self, predicate: Callable[[AuditRecord], bool], *, after: int = 0, timeout: float = 5.0
    ) -> list[AuditRecord]:
        """Records past seq ``after`` matching ``predicate``, waiting for them briefly (handshake
        refusals are written from the server's thread pool after the client gave up)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.audit_records() if r.seq > after and predicate(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def last_seq(self) -> int:
        records = self.audit_records()
        return records[-1].seq if records else 0


def _peer(root: Path, country: str, audience: str) -> tuple[PeerSide, Any]:
    made = make_node(root, country)
    key = KeyStore.load(made.directory, country=country).current_signing_key()
    return PeerSide(country, made.directory, key, audience), made


def _start(server: uvicorn.Server, sock: Any) -> threading.Thread:
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("the test node did not start")
    return thread


@contextmanager
def running_node(
    root: Path,
    *,
    database_url: str | None = None,
    settings_changes: dict[str, Any] | None = None,
    before_index: Callable[[Path], str | None] | None = None,
    clock: Callable[[], datetime] | None = None,
    viewer: bool = False,
    archive_extra: Callable[[Path], object] | None = None,
    edge: bool = False,
) -> Iterator[RunningNode]:
    """Make the PKIs, the archive and the index under ``root`` and serve node A until exit.

    ``settings_changes``: extra sections merged into A's settings mapping (``tokens``...).
    ``before_index``: called with the archive folder once the dataset is written (to add
    studies); when it returns a DICOMweb URL, A's archive is that server (the caller stored the
    folder's files there) and the index is built from it. ``clock``: A's clock (aware UTC).
    ``viewer``: also serve the option B viewer on a free port, as ``ncp serve`` does (its
    ``urls.viewer`` then that port's, not :data:`VIEWER_URL`).
    ``archive_extra``: writes more files into the archive folder before it is indexed.
    ``edge``: also serve A's edge gateway (``ncp edge``'s app from an ``EdgeSettings``, before
    the same archive section), its base A's ``urls.edge``.
    """
    root.mkdir(parents=True, exist_ok=True)
    sock = bind()
    port = sock.getsockname()[1]
    origin = f"https://localhost:{port}"
    url = f"{origin}/fhir"
    image_sock = bind()
    imaging_url = f"https://localhost:{image_sock.getsockname()[1]}/dicomweb"
    viewer_sock = bind() if viewer else None
    viewer_url = (
        f"https://localhost:{viewer_sock.getsockname()[1]}/viewer" if viewer_sock else VIEWER_URL
    )
    edge_sock = bind() if edge else None
    edge_url = f"https://localhost:{edge_sock.getsockname()[1]}/dicomweb" if edge_sock else EDGE_URL

    a = make_node(root, A)
    b, b_made = _peer(root, B, url)
    other, de_made = _peer(root, OTHER, url)
    fr = make_node(root, UNTRUSTED)
    extra = root / "extra"
    past = datetime.now(UTC) - timedelta(days=30)
    creds: dict[str, tuple[Path, Path] | None] = {
        B: (b_made.path("client.pem"), b_made.path("client.key")),
        OTHER: (de_made.path("client.pem"), de_made.path("client.key")),
        UNTRUSTED: (fr.path("client.pem"), fr.path("client.key")),
        A: (a.path("client.pem"), a.path("client.key")),
        "BE expired": write_client(
            extra, "be-old", b_made.ca, B, not_before=past, not_after=past + timedelta(days=1)
        ),
        "none": None,
    }
    trust = root / "trust.toml"
    trust.write_text(
        trust_toml(
            {
                B: {
                    "standard": "https://ncp.be.test/fhir",
                    "tls_ca": str(b_made.path("ca.pem")),
                    "jwks_file": str(b_made.path("jwks.json")),
                },
                OTHER: {
                    "standard": "https://ncp.de.test/fhir",
                    "tls_ca": str(de_made.path("ca.pem")),
                    "jwks_file": str(de_made.path("jwks.json")),
                },
            }
        )
    )
    archive = root / "archive"
    write_dataset(archive)
    if archive_extra is not None:
        archive_extra(archive)
    archive_url = before_index(archive) if before_index is not None else None
    mapping: dict[str, Any] = {
        "node": {"country": A, "name": "Test node AT", "patient_id_issuer": ISSUER},
        "urls": {
            "standard": url,
            "imaging": imaging_url,
            "edge": edge_url,
            "viewer": viewer_url,
        },
        "database": {"url": database_url or f"sqlite:///{root / 'node-a.db'}"},
        "archive": (
            {"kind": "dicomweb", "url": archive_url}
            if archive_url
            else {"kind": "folder", "path": str(archive)}
        ),
        "keys": {"dir": str(a.directory)},
        "trust": {"list": str(trust)},
    }
    for section, values in (settings_changes or {}).items():
        mapping[section] = {**mapping.get(section, {}), **values}
    settings = settings_from_mapping(mapping, base_dir=root, environ={})
    node = Node.from_settings(settings, clock=clock)
    index_run = index_source(
        node.sessions,
        open_archive(settings.archive),
        zone=zone_of(settings.node.country),
        patient_id_issuer=settings.archive.patient_id_issuer,
    )
    app = build_app(node)
    running = RunningNode(
        node=node,
        app=app,
        url=url,
        origin=origin,
        root=root,
        ca_file=a.path("ca.pem"),
        b=b,
        other=other,
        creds=creds,
        index_run=index_run,
    )
    threads = []
    server = standard_server(node, app, host="127.0.0.1", port=port, log_level="warning")
    running.servers.append(server)
    threads.append(_start(server, sock))
    gateway = gateway_app(node)
    if gateway is not None:  # the option A gateway, when this build has one
        imaging = node_imaging_server(node, gateway, host="127.0.0.1", port=0, log_level="warning")
        running.servers.append(imaging)
        threads.append(_start(imaging, image_sock))
        running.imaging_url = imaging_url
    if viewer_sock is not None:
        viewer_app_ = viewer_app(node)
        assert viewer_app_ is not None
        served = node_viewer_server(
            node, viewer_app_, host="127.0.0.1", port=0, log_level="warning"
        )
        running.servers.append(served)
        threads.append(_start(served, viewer_sock))
        running.viewer_url = viewer_url
    if edge_sock is not None:
        edge_settings = EdgeSettings(
            edge=EdgeSection(country=A, audience=edge_url, jwks=a.path("jwks.json")),
            archive=settings.archive,
            tls=EdgeTlsSection(certificate=a.path("server.pem"), key=a.path("server.key")),
            database=DatabaseSection(url=f"sqlite:///{root / 'edge-audit.db'}"),
        )
        edge_app = build_edge_app(edge_settings)
        tls = TlsFiles(edge_settings.tls.certificate, edge_settings.tls.key)
        edge_server = imaging_server(
            edge_app, host="127.0.0.1", port=0, tls=tls, log_level="warning"
        )
        running.servers.append(edge_server)
        threads.append(_start(edge_server, edge_sock))
        running.edge_url = edge_url
        running.edge_audit = session_factory(make_engine(edge_settings.database.url))
    try:
        yield running
    finally:
        for srv in running.servers:
            srv.should_exit = True
        for thread in threads:
            thread.join(timeout=10)
        sock.close()
        image_sock.close()
        if viewer_sock is not None:
            viewer_sock.close()
        if edge_sock is not None:
            edge_sock.close()
        node.close()


@pytest.fixture(scope="session")
def node_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """Node A serving the standard channel on loopback, shared by the session's tests."""
    with running_node(tmp_path_factory.mktemp("node-a")) as running:
        yield running


__all__ = [
    "EDGE_URL",
    "ISSUER",
    "OTHER",
    "PATIENTS",
    "STUDIES",
    "SYSTEM",
    "UNTRUSTED",
    "VIEWER_URL",
    "A",
    "B",
    "NodePatient",
    "NodeStudy",
    "PeerSide",
    "RunningNode",
    "node_a",
    "running_node",
    "studies_of",
    "write_dataset",
]
