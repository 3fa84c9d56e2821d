"""Shared by the gateway tests: a test PKI, studies on disk and in Orthanc, signed image access
tokens, an audit database, and gateways served over real TLS on loopback.

Country A is AT. Patient PAT200 has two studies (two series, three instances; one series, one
instance); PAT201 has one study. A third study belongs to "pat200" (lower case) and is named in
a token for PAT200: Orthanc would match it loosely, the gateway must not.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.models import AuditRecord
from ncp.audit.record import Auditor
from ncp.security import pki
from ncp.security.claims import IMAGE_ACCESS, VIEWER_LAUNCH, ImageAccess, PatientRef, ViewerLaunch
from ncp.security.keys import KeySet, PublicKey, SigningKey
from ncp.security.keystore import jwks_document
from ncp.security.tokens import issue
from ncp.store.db import make_engine, migrate, session_factory
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.token_factory import new_key

if TYPE_CHECKING:
    from fastapi import FastAPI

A = "AT"
ISSUER_OID = "1.2.40.0.10.1.4.3.1"
SYSTEM = f"urn:oid:{ISSUER_OID}"
PATIENT = PatientRef(SYSTEM, "PAT200")
OTHER_PATIENT = PatientRef(SYSTEM, "PAT201")

ROOT = "1.2.826.0.1.3680043.10.77"
STUDY_1 = f"{ROOT}.1"
STUDY_2 = f"{ROOT}.2"
OTHER_STUDY = f"{ROOT}.3"
"""PAT201's study."""
LOOSE_STUDY = f"{ROOT}.4"
"""A study of patient "pat200": not PAT200's, though Orthanc would match it."""
SERIES_1A, SERIES_1B = f"{STUDY_1}.1", f"{STUDY_1}.2"
SERIES_2A = f"{STUDY_2}.1"
OTHER_SERIES = f"{OTHER_STUDY}.1"

A_KEY: SigningKey = new_key("at-gw-1")
A_KEYS = KeySet(A, {A_KEY.kid: PublicKey(A_KEY.kid, A_KEY.private_key.public_key())})
STRANGER_KEY: SigningKey = new_key("at-gw-1")
"""Same kid, another key: what a forger would sign with."""


@dataclass(frozen=True)
class Instance:
    patient: str
    study: str
    series: str
    sop: str
    path: Path


def patient_instance(study: str, series: str, sop: str, **attrs: Any) -> Dataset:
    """An instance of PAT200 (A's patient identifier); ``attrs`` as ``make_instance`` takes."""
    return make_instance(
        patient_id=PATIENT.value,
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        IssuerOfPatientID=ISSUER_OID,
        **attrs,
    )


def write_studies(root: Path) -> list[Instance]:
    """The test studies as Part 10 files below ``root``; what was written."""
    plan = [
        ("PAT200", STUDY_1, SERIES_1A, 2, "CT", "20240102"),
        ("PAT200", STUDY_1, SERIES_1B, 1, "CT", "20240102"),
        ("PAT200", STUDY_2, SERIES_2A, 1, "MR", "20230505"),
        ("PAT201", OTHER_STUDY, OTHER_SERIES, 1, "CT", "20240102"),
        ("pat200", LOOSE_STUDY, f"{LOOSE_STUDY}.1", 1, "CT", "20240102"),
    ]
    written = []
    for patient, study, series, count, modality, date in plan:
        for n in range(1, count + 1):
            sop = f"{series}.{n}"
            ds = make_instance(
                patient_id=patient,
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                Modality=modality,
                StudyDate=date,
                InstanceNumber=n,
                IssuerOfPatientID=ISSUER_OID,
                StudyDescription=f"study {study[-1]}",
            )
            path = write_instance(root / study / series / f"{n}.dcm", ds)
            written.append(Instance(patient, study, series, sop, path))
    return written


def token(
    audience: str,
    studies: tuple[str, ...] = (STUDY_1, STUDY_2, LOOSE_STUDY),
    *,
    patient: PatientRef = PATIENT,
    key: SigningKey = A_KEY,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(minutes=5),
    **changes: Any,
) -> str:
    moment = now or datetime.now(UTC)
    values: dict[str, Any] = {
        "issuer": A,
        "audience": audience,
        "subject": "BE-HP-0042",
        "issued_at": moment,
        "expires_at": moment + lifetime,
        "requesting_country": "BE",
        "patient": patient,
        "studies": studies,
        "purpose_of_use": "TREAT",
        "priority": "routine",
        "option": "A",
    }
    values.update(changes)
    return issue(IMAGE_ACCESS, ImageAccess(**values), key, now=moment)


def launch_token(audience: str, now: datetime) -> str:
    """A one-time viewer launch token of A for PAT200's first study, valid 60 s from ``now``."""
    launch = ViewerLaunch(
        issuer=A,
        audience=audience,
        subject="BE-HP-0042",
        issued_at=now,
        expires_at=now + timedelta(seconds=60),
        requesting_country="BE",
        patient=PATIENT,
        studies=(STUDY_1,),
        purpose_of_use="TREAT",
    )
    return issue(VIEWER_LAUNCH, launch, A_KEY, now=now)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def write_jwks(path: Path, *keys: SigningKey) -> Path:
    path.write_bytes(jwks_document((k.kid, k.private_key.public_key()) for k in keys))
    return path


@dataclass
class AuditDb:
    sessions: sessionmaker[Session]
    auditor: Auditor

    def records(self) -> list[AuditRecord]:
        with self.sessions() as session:
            return list(session.scalars(select(AuditRecord).order_by(AuditRecord.seq)))


def audit_db(path: Path, country: str = A) -> AuditDb:
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    sessions = session_factory(engine)
    return AuditDb(sessions, Auditor(sessions, country=country))


@dataclass
class Tls:
    """A's test PKI: a server certificate for localhost and the CA to trust it."""

    directory: Path
    ca: Path = field(init=False)
    cert: Path = field(init=False)
    key: Path = field(init=False)

    def __post_init__(self) -> None:
        if not (self.directory / pki.KEYS_TOML).exists():
            pki.init_keys_folder(self.directory, A, ("localhost",))
        self.ca = self.directory / pki.CA_CERT
        self.cert = self.directory / pki.SERVER_CERT
        self.key = self.directory / pki.SERVER_KEY

    def client(self, **kwargs: Any) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.ca))
        return httpx.Client(verify=context, timeout=30.0, **kwargs)


def http_client(tls: Tls | None) -> httpx.Client:
    """A client for a server on loopback: trusting A's CA under TLS, plain HTTP otherwise."""
    return tls.client() if tls else httpx.Client(timeout=30.0)


def fetch(
    http: httpx.Client, url: str, headers: dict[str, str]
) -> tuple[int, str, bytes, Exception | None]:
    """A GET read to its end as sent: status, content type, the bytes received and the error
    that broke the transfer, if one did."""
    received = bytearray()
    with http.stream("GET", url, headers=headers) as r:
        try:
            for chunk in r.iter_raw():
                received.extend(chunk)
        except httpx.HTTPError as exc:
            return r.status_code, r.headers.get("content-type", ""), bytes(received), exc
        return r.status_code, r.headers.get("content-type", ""), bytes(received), None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket is held until all are bound, since calls of
    :func:`free_port` one after another may be given the same port again (a process bound
    two of its listeners to one port that way and died of "address already in use")."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Served:
    """An ASGI app on loopback, in a thread, under the server ``ncp serve`` and ``ncp edge``
    run their gateways with (``ncp.gateway.server.imaging_server``): over TLS, or plain HTTP
    when ``tls`` is None; ``http="auto"``: uvicorn's own protocol, as an archive stand-in is
    served."""

    def __init__(
        self, app: Any, tls: Tls | None, port: int, *, http: Any = None, log_level: str = "warning"
    ) -> None:
        from ncp.gateway.server import TlsFiles, imaging_server

        self.server = imaging_server(
            app,
            host="127.0.0.1",
            port=port,
            tls=TlsFiles(tls.cert, tls.key) if tls is not None else None,
            log_level=log_level,
            **({"protocol": http} if http else {}),
        )
        # Clients in tests keep connections alive; do not wait for them at the end.
        self.server.config.timeout_graceful_shutdown = 1
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app: Any, tls: Tls, port: int) -> Iterator[Served]:
    served = Served(app, tls, port)
    try:
        yield served
    finally:
        served.stop()


def gateway_app(archive: Any, base: str, audit: AuditDb, **options: Any) -> FastAPI:
    """Country A's gateway before ``archive``, at ``base``: it trusts A's keys and audits to
    ``audit``; ``options``: more of ``build_gateway_app``'s (limits, side, relay, index)."""
    from ncp.gateway.app import build_gateway_app

    return build_gateway_app(
        archive=archive,
        public_base=base,
        issuer=A,
        keys=A_KEYS,
        auditor=audit.auditor,
        **options,
    )


def local_base(port: int, tls: Tls | None, path: str = "dicomweb") -> str:
    """A base URL on loopback: under TLS by the name A's server certificate holds."""
    return f"https://localhost:{port}/{path}" if tls else f"http://127.0.0.1:{port}/{path}"


@dataclass
class ServedGateway:
    """What ``serve_gateway`` started; ``stop`` ends it."""

    base: str
    audit: AuditDb
    app: Any
    served: Served

    def stop(self) -> None:
        self.served.stop()


def serve_gateway(
    root: Path, archive: Any, tls: Tls | None, *, path: str = "dicomweb", **options: Any
) -> ServedGateway:
    """``gateway_app`` served on a free loopback port (plain HTTP when ``tls`` is None), its
    audit database a new file below ``root``."""
    port = free_port()
    base = local_base(port, tls, path)
    audit = audit_db(root / f"audit-{port}.db")
    app = gateway_app(archive, base, audit, **options)
    return ServedGateway(base, audit, app, Served(app, tls, port))


def request_head(conn: socket.socket) -> bytes | None:
    """What a client sent on ``conn`` up to the end of its request head; None if it closed
    first (for archives played on raw sockets)."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = conn.recv(65536)
        if not piece:
            return None
        head += piece
    return head


def boundary_of(ctype: str) -> str:
    """The boundary a multipart Content-Type names."""
    msg = Message()
    msg["content-type"] = ctype
    boundary = msg.get_param("boundary")
    assert isinstance(boundary, str)
    return boundary


def multipart_parts(ctype: str, body: bytes) -> list[bytes]:
    """The parts of a complete multipart body (close delimiter required), each one DICOM."""
    dash = b"--" + boundary_of(ctype).encode()
    assert body.rstrip().endswith(dash + b"--"), "no close delimiter"
    pieces = body.split(b"\r\n" + dash)
    assert pieces[0].startswith(dash)
    out = []
    for piece in [pieces[0][len(dash) :], *pieces[1:]]:
        if piece.startswith(b"--"):
            break
        head, _, payload = piece.partition(b"\r\n\r\n")
        assert b"content-type: application/dicom" in head.lower()
        out.append(payload)
    return out


AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Gateways:
    """Three gateways on one set of studies: ``A`` (option A) and ``C`` (the edge) before
    Orthanc, ``folder`` (option A) before the same files as a folder archive."""

    tls: Tls
    orthanc: Any
    instances: list[Instance]
    bases: dict[str, str]
    audits: dict[str, AuditDb]
    apps: dict[str, Any]

    def client(self, name: str, studies: tuple[str, ...] = (STUDY_1, STUDY_2)) -> Any:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.verify = str(self.tls.ca)
        # requests lets REQUESTS_CA_BUNDLE from the environment win over session.verify.
        session.trust_env = False
        base = self.bases[name]
        client = DICOMwebClient(base, session=session, headers=bearer(token(base, studies)))
        client.set_http_retry_params(retry=False)
        return client

    def sops(self, study: str, series: str | None = None) -> set[str]:
        return {
            i.sop
            for i in self.instances
            if i.study == study and (series is None or i.series == series)
        }


def start_gateways(root: Path, orthanc: Any, **limits: Any) -> Iterator[Gateways]:
    from ncp.audit.models import Side
    from ncp.config import DicomwebArchive, FolderArchive, GatewaySection

    orthanc.clear()
    instances = write_studies(root / "archive")
    orthanc.upload(i.path for i in instances)
    tls = Tls(root / "pki")
    settings = GatewaySection(**{"max_transfers": 4, "chunk_bytes": 64 * 1024, **limits})
    archives: dict[str, Any] = {
        "A": DicomwebArchive(kind="dicomweb", url=orthanc.dicomweb_url),
        "C": DicomwebArchive(kind="dicomweb", url=orthanc.dicomweb_url),
        "folder": FolderArchive(path=root / "archive"),
    }
    served: dict[str, ServedGateway] = {}
    try:
        for name, archive in archives.items():
            served[name] = serve_gateway(
                root,
                archive,
                tls,
                path="edge" if name == "C" else "dicomweb",
                side=Side.EDGE if name == "C" else Side.GATEWAY,
                limits=settings,
            )
        yield Gateways(
            tls,
            orthanc,
            instances,
            {name: g.base for name, g in served.items()},
            {name: g.audit for name, g in served.items()},
            {name: g.app for name, g in served.items()},
        )
    finally:
        for g in served.values():
            g.stop()
