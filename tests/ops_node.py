"""Node A as the installed ``ncp serve`` runs it, a process of its own, for the operations tests
(logs, metrics, readiness, graceful shutdown): production-like keys (no demo flag needed), the
test dataset of ``tests.support.node`` plus an optional large study, the index built by
``ncp index``, the operations listener on a free port, and country B's identity to call it.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ncp.cli import main
from ncp.security.claims import PatientRef
from ncp.security.keystore import KeyStore
from tests.gateway_support import free_port
from tests.ops_support import A, B, production_keys, toml_text
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.node import ISSUER, SYSTEM, PeerSide, write_dataset

BIG_PATIENT = "PAT200"
BIG_STUDY = "1.2.826.0.1.3680043.10.543.200.1"
NCP = str(Path(sys.executable).with_name("ncp"))
"""The console script of the installation under test (a PATH lookup may find another one)."""


def write_big_study(archive: Path, instances: int, pixels: int = 1024) -> int:
    """``instances`` CT images of ``pixels``x``pixels`` 16-bit pixels (2 MiB each at 1024) for
    PAT200; returns the bytes of pixel data written."""
    series = f"{BIG_STUDY}.1"
    data = np.random.default_rng(7).integers(0, 4096, (pixels, pixels), dtype=np.uint16)
    for n in range(1, instances + 1):
        ds = make_instance(
            patient_id=BIG_PATIENT,
            study_uid=BIG_STUDY,
            series_uid=series,
            sop_uid=f"{series}.{n}",
            PatientName="Big^Study",
            IssuerOfPatientID=ISSUER,
            InstanceNumber=n,
            AccessionNumber="ACCBIG",
            Rows=pixels,
            Columns=pixels,
            PixelData=data.tobytes(),
        )
        write_instance(archive / BIG_PATIENT / f"{n}.dcm", ds)
    return instances * data.nbytes


@dataclass
class ServedNode:
    root: Path
    config: Path
    process: subprocess.Popen[bytes]
    stderr: Path
    origin: str
    """``https://localhost:PORT`` of the standard channel (FHIR base: ``/fhir``)."""
    imaging: str
    """The option A gateway's DICOMweb base."""
    ops: str
    """``http://127.0.0.1:PORT`` of the operations listener."""
    ca_file: Path
    b: PeerSide
    b_creds: tuple[Path, Path]

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        context.load_cert_chain(*self.b_creds)
        return context

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """HTTPS with B's client certificate, base the standard channel's origin."""
        return httpx.Client(verify=self.context(), base_url=self.origin, timeout=timeout)

    def ops_get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(self.ops + path, timeout=timeout, trust_env=False)

    def log_lines(self) -> list[str]:
        return self.stderr.read_text(encoding="utf-8", errors="replace").splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        """Every line of the node's stderr as JSON (a line that is not JSON fails the test).
        A last line the node is still writing (no newline yet) is left for the next read."""
        text = self.stderr.read_text(encoding="utf-8", errors="replace")
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def records_where(
        self, wanted: Callable[[dict[str, Any]], bool], *, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """The log records ``wanted`` picks, once there are any: a request's log line is
        written as its answer goes out, so it may land a moment after the client has read it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.log_records() if wanted(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def token(self, patient: str, studies: list[str], option: str = "A") -> str:
        body = {
            "resourceType": "Parameters",
            "parameter": [
                *({"name": "study", "valueString": uid} for uid in studies),
                {"name": "option", "valueCode": option},
                {"name": "purpose", "valueCode": "TREAT"},
            ],
        }
        ref = PatientRef(SYSTEM, patient)
        with self.client() as http:
            answer = http.post("/fhir/$imaging-access", json=body, headers=self.b.headers(ref))
        assert answer.status_code == 200, answer.text
        values = {p["name"]: p for p in answer.json()["parameter"]}
        return str(values["token"]["valueString"])

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)


def _ports() -> tuple[int, int, int]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    standard, imaging, ops = sorted(ports)
    return standard, imaging, ops


def wait_alive(node: ServedNode, timeout: float = 120.0) -> None:
    """Until /healthz answers (the node loads its profiles first: slow on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        if node.process.poll() is not None:
            raise RuntimeError(f"ncp serve exited {node.process.returncode}:\n" + _tail(node))
        try:
            if node.ops_get("/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("ncp serve did not answer /healthz:\n" + _tail(node))
        time.sleep(0.1)


def _tail(node: ServedNode) -> str:
    return "\n".join(node.log_lines()[-30:])


@contextmanager
def served_node(
    root: Path,
    *,
    archive: dict[str, Any] | None = None,
    database_url: str | None = None,
    big_instances: int = 0,
    log_format: str = "json",
    log_level: str = "info",
    ops: dict[str, Any] | None = None,
) -> Iterator[ServedNode]:
    """Write node A's folder under ``root``, index it and run ``ncp serve`` until exit (then
    SIGKILL if it is still there: the tests that stop it gracefully do so themselves)."""
    root.mkdir(parents=True, exist_ok=True)
    standard, imaging, ops_port = _ports()
    origin = f"https://localhost:{standard}"
    production_keys(root / "keys", A)
    b_ca = production_keys(root / "b-keys", B)
    del b_ca
    b_key = KeyStore.load(root / "b-keys", country=B).current_signing_key()
    b = PeerSide(B, root / "b-keys", b_key, f"{origin}/fhir")
    (root / "trust.toml").write_text(
        toml_text(
            {
                "format": 1,
                "peers": {
                    B: {
                        "standard": "https://ncp.be.example/fhir",
                        "tls_ca": "b-keys/ca.pem",
                        "jwks_file": "b-keys/jwks.json",
                    }
                },
            }
        )
    )
    if archive is None:
        write_dataset(root / "archive")
        if big_instances:
            write_big_study(root / "archive", big_instances)
        archive = {"kind": "folder", "path": "archive"}
    settings: dict[str, Any] = {
        "node": {"country": A, "name": "NCPeH-AT ops test", "patient_id_issuer": ISSUER},
        "urls": {
            "standard": f"{origin}/fhir",
            "imaging": f"https://localhost:{imaging}/dicomweb",
        },
        "listen": {
            "host": "127.0.0.1",
            "standard_port": standard,
            "imaging_port": imaging,
            "ops_port": ops_port,
        },
        "database": {"url": database_url or "sqlite:///node.db"},
        "archive": archive,
        "keys": {"dir": "keys"},
        "trust": {"list": "trust.toml"},
        "ops": {"readiness_cache_s": 0, **(ops or {})},
    }
    config = root / "node.toml"
    config.write_text(toml_text(settings))
    assert main(["index", "--config", str(config), "--workers", "1"]) == 0
    stderr = root / "serve.stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [
                NCP,
                "serve",
                "--config",
                str(config),
                "--log-format",
                log_format,
                "--log-level",
                log_level,
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    node = ServedNode(
        root=root,
        config=config,
        process=process,
        stderr=stderr,
        origin=origin,
        imaging=f"https://localhost:{imaging}/dicomweb",
        ops=f"http://127.0.0.1:{ops_port}",
        ca_file=root / "keys" / "ca.pem",
        b=b,
        b_creds=(root / "b-keys" / "client.pem", root / "b-keys" / "client.key"),
    )
    try:
        wait_alive(node)
        yield node
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
