"""A transfer cut short by a crash leaves its trace (issue 13, item 11): ``ncp edge`` and
``ncp serve`` run as processes, a client reads the first megabytes of a 40 MB study, the
process is killed (SIGKILL: nothing of it runs after), and its audit database holds the
transfer's begin record, written before the first byte was sent."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from ncp.audit.chain import verify
from ncp.audit.models import AuditRecord
from ncp.security import pki
from ncp.security.keystore import KeyStore
from ncp.store.db import make_engine, session_factory
from tests.gateway_support import (
    AS_STORED,
    PATIENT,
    Tls,
    bearer,
    free_port,
    free_ports,
    patient_instance,
    token,
    write_jwks,
)
from tests.security_support import trust_toml
from tests.support.dicom_factory import write_instance
from tests.support.token_factory import new_key

BIG = "1.2.826.0.1.3680043.10.131.1"
FILES = 20
PIXELS = 2 * 1024 * 1024  # 2 MB a file: 40 MB a study, far more than socket buffers hold
READ_BEFORE_KILL = 2 * 1024 * 1024


def _write_big_study(root: Path) -> None:
    for n in range(FILES):
        ds = patient_instance(
            BIG, f"{BIG}.1", f"{BIG}.1.{n + 1}", Rows=1024, Columns=1024, PixelData=bytes(PIXELS)
        )
        write_instance(root / f"{n}.dcm", ds)


@dataclass
class Served:
    base: str
    ca: Path
    audit_url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path


def _start(root: Path, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = root / "process.log"
    # The console script of the installation under test (a PATH lookup may find another one).
    command = [str(Path(sys.executable).with_name("ncp")), *args, "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return process, log


def _wait_ready(served: Served) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(verify=ssl.create_default_context(cafile=served.ca), timeout=5) as http:
        while True:
            if served.process.poll() is not None:
                raise RuntimeError(f"the process exited: {served.log.read_text()[-2000:]}")
            try:
                http.get(f"{served.base}/studies")
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {served.log.read_text()[-2000:]}") from None
                time.sleep(0.1)


def _edge(root: Path) -> Served:
    tls = Tls(root / "pki")
    key = new_key("at-crash-1")
    write_jwks(root / "jwks.json", key)
    port = free_port()
    base = f"https://localhost:{port}/dicomweb"
    (root / "edge.toml").write_text(
        f"""
[edge]
country = "AT"
audience = "{base}"
jwks = "jwks.json"

[archive]
kind = "folder"
path = "archive"

[tls]
certificate = "{tls.cert}"
key = "{tls.key}"

[listen]
host = "127.0.0.1"

[database]
url = "sqlite:///edge-audit.db"
"""
    )
    process, log = _start(root, ["edge", "--config", str(root / "edge.toml")])
    grant = token(base, (BIG,), key=key, option="C")
    return Served(base, tls.ca, f"sqlite:///{root / 'edge-audit.db'}", grant, process, log)


def _node(root: Path) -> Served:
    a = pki.init_keys_folder(root / "keys", "AT")
    be = pki.init_keys_folder(root / "be", "BE")
    (root / "trust.toml").write_text(
        trust_toml(
            {
                "BE": {
                    "standard": "https://ncp.be.test/fhir",
                    "tls_ca": str(be.directory / "ca.pem"),
                    "jwks_file": str(be.directory / "jwks.json"),
                }
            }
        )
    )
    standard, imaging = free_ports(2)
    base = f"https://localhost:{imaging}/dicomweb"
    (root / "node.toml").write_text(
        f"""
[node]
country = "AT"
name = "crash test"
demo = true  # test keys (ncp keys init) are refused otherwise
patient_id_issuer = "{PATIENT.system.removeprefix("urn:oid:")}"

[urls]
standard = "https://localhost:{standard}/fhir"
imaging = "{base}"

[listen]
host = "127.0.0.1"

[database]
url = "sqlite:///node.db"

[archive]
kind = "folder"
path = "archive"

[keys]
dir = "keys"

[trust]
list = "trust.toml"
"""
    )
    process, log = _start(root, ["serve", "--config", str(root / "node.toml")])
    key = KeyStore.load(a.directory, country="AT").current_signing_key()
    grant = token(base, (BIG,), key=key, option="A")
    audit = f"sqlite:///{root / 'node.db'}"
    return Served(base, a.directory / "ca.pem", audit, grant, process, log)


@pytest.fixture(params=["edge", "node"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    _write_big_study(tmp_path / "archive")
    made = _edge(tmp_path) if request.param == "edge" else _node(tmp_path)
    try:
        _wait_ready(made)
        yield made
    finally:
        if made.process.poll() is None:
            made.process.kill()
        made.process.wait(timeout=30)


def test_a_transfer_cut_short_by_a_crash_leaves_its_begin_record(served: Served) -> None:
    rid = f"crash-{uuid.uuid4()}"
    received = 0
    headers = {**bearer(served.token), "Accept": AS_STORED, "X-Request-ID": rid}
    with (
        httpx.Client(verify=ssl.create_default_context(cafile=served.ca), timeout=30) as http,
        http.stream("GET", f"{served.base}/studies/{BIG}", headers=headers) as answer,
    ):
        assert answer.status_code == 200, answer.read()[:500]
        try:
            for chunk in answer.iter_raw():
                received += len(chunk)
                if received >= READ_BEFORE_KILL:
                    # The gateway is mid-transfer (the client stopped reading): kill it.
                    served.process.send_signal(signal.SIGKILL)
                    served.process.wait(timeout=30)
                    break
        except httpx.HTTPError:
            pass
    assert served.process.returncode == -signal.SIGKILL
    assert READ_BEFORE_KILL <= received < FILES * PIXELS
    engine = make_engine(served.audit_url)
    try:
        with session_factory(engine)() as session:
            records = list(
                session.scalars(
                    select(AuditRecord)
                    .where(AuditRecord.request_id == rid)
                    .order_by(AuditRecord.seq)
                )
            )
            assert verify(session).ok
    finally:
        engine.dispose()
    assert [r.action for r in records] == ["image-transfer-begin"], [
        (r.action, r.outcome) for r in records
    ]
    [begin] = records
    assert begin.studies == [BIG] and begin.patient_id == PATIENT.value
    assert begin.token_jti is not None and begin.details["service"] == "WADO-RS"
