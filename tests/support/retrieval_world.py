"""A world for the retriever's fault tests: node A served over TLS (standard channel and option A
gateway) on an Orthanc archive of its own, a second Orthanc as country B's archive, and the
studies the tests pull:

- ``big``: PAT100's large study, ``BIG_SERIES`` series of ``BIG_PER_SERIES`` instances;
- ``small``: ``SMALL_STUDIES`` studies of PAT100 with ``SMALL_INSTANCES`` instances each (the
  lanes and the two-worker tests give each job its own study);
- ``tampered``: a study whose second instance A's archive changed after A indexed it (its SOP
  class is another): what A's manifest says and what A sends disagree.

``clock`` is A's clock: a test may move it (an image token then expires at A's gateway). A's
image tokens live 30 seconds (the shortest A allows) and A tolerates no clock skew, so that a
token expires at A's gateway after a small move of A's clock; B's nodes here tolerate a minute
(``leeway_s``), so they still accept the tokens A signs meanwhile.

B is a node of its own (``tests.support.peer_stub.b_node``, its config on disk, the real peer
client); as a process it is ``python -m ncp jobs work --config ...``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from tests.support.dicom_factory import encode, make_instance, write_instance
from tests.support.node import ISSUER, PATIENTS, RunningNode, running_node
from tests.support.orthanc import ENV_REQUIRE, OrthancServer, OrthancUnavailable
from tests.support.peer_stub import NodeB, b_node, write_b_config

ROOT = Path(__file__).resolve().parents[2]
BIG = "1.2.826.0.1.3680043.10.543.100.900"
TAMPERED = "1.2.826.0.1.3680043.10.543.100.901"
BIG_SERIES = 6
BIG_PER_SERIES = 100
SMALL_STUDIES = 52
SMALL_INSTANCES = 8


def small_study(i: int) -> str:
    return f"1.2.826.0.1.3680043.10.543.100.{1000 + i}"


@dataclass
class ShiftClock:
    """A's clock: real time plus ``offset``."""

    offset: timedelta = field(default_factory=timedelta)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class World:
    node: RunningNode
    archive_a: OrthancServer
    archive_b: OrthancServer
    clock: ShiftClock
    root: Path

    def b(self, root: Path, **config: Any) -> NodeB:
        """A node B for this world (see the module doc); the caller closes it."""
        return b_node(root, self.node, **{**B_DEFAULTS, **config})

    def b_config(self, root: Path, **config: Any) -> Path:
        return write_b_config(root, self.node, **{**B_DEFAULTS, **config})


B_DEFAULTS: dict[str, Any] = {
    "leeway_s": 60,
    "renew_before_s": 5,
    "retry_backoff_s": 0.5,
    "retry_backoff_max_s": 2.0,
    "request_timeout_s": 10.0,
}


def _write(folder: Path, study: str, series: int, per_series: int, size: int) -> None:
    patient = PATIENTS["PAT100"]
    rng = np.random.default_rng(7)
    for s in range(1, series + 1):
        series_uid = f"{study}.{s}"
        for n in range(1, per_series + 1):
            ds = make_instance(
                patient_id=patient.patient_id,
                study_uid=study,
                series_uid=series_uid,
                sop_uid=f"{series_uid}.{n}",
                PatientName=f"{patient.family}^{patient.given}",
                PatientBirthDate="19800517",
                PatientSex=patient.sex,
                IssuerOfPatientID=ISSUER,
                Modality="CT",
                SeriesNumber=s,
                InstanceNumber=n,
                AccessionNumber=f"ACC{study[-4:]}",
            )
            if size != 8:
                ds.Rows = ds.Columns = size
                ds.PixelData = rng.integers(0, 4096, size * size, dtype=np.uint16).tobytes()
            write_instance(folder / "extra" / study / f"{series_uid}.{n}.dcm", ds)


def _upload(server: OrthancServer, files: list[Path]) -> None:
    with httpx.Client(base_url=server.rest_url, timeout=60) as client:

        def one(path: Path) -> None:
            r = client.post(
                "/instances",
                content=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            r.raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, files))


def tamper(world: World) -> str:
    """Replace the tampered study's second instance in A's archive by one of another SOP class
    (same UIDs, same patient); returns its SOP Instance UID."""
    sop = f"{TAMPERED}.1.2"
    server = world.archive_a
    r = server.http.post("/tools/lookup", content=sop, headers={"Content-Type": "text/plain"})
    r.raise_for_status()
    for hit in r.json():
        if hit.get("Type") == "Instance":
            server.http.delete(f"/instances/{hit['ID']}").raise_for_status()
    patient = PATIENTS["PAT100"]
    ds = make_instance(
        patient_id=patient.patient_id,
        study_uid=TAMPERED,
        series_uid=f"{TAMPERED}.1",
        sop_uid=sop,
        PatientName=f"{patient.family}^{patient.given}",
        PatientBirthDate="19800517",
        PatientSex=patient.sex,
        IssuerOfPatientID=ISSUER,
        SeriesNumber=1,
        InstanceNumber=2,
        AccessionNumber="ACC0901",
        SOPClassUID=SecondaryCaptureImageStorage,
    )
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    r = server.http.post(
        "/instances", content=encode(ds), headers={"Content-Type": "application/dicom"}
    )
    r.raise_for_status()
    return sop


def _orthanc() -> OrthancServer:
    try:
        return OrthancServer.start()
    except OrthancUnavailable as e:
        reason = f"Orthanc unavailable: {e}"
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"{reason} ({ENV_REQUIRE}=1)", pytrace=False)
        pytest.skip(reason)


@contextlib.contextmanager
def make_world(root: Path) -> Iterator[World]:
    archive_a = _orthanc()
    archive_b = _orthanc()
    clock = ShiftClock()

    def fill(folder: Path) -> str:
        _write(folder, BIG, BIG_SERIES, BIG_PER_SERIES, 128)
        _write(folder, TAMPERED, 1, 3, 8)
        for i in range(SMALL_STUDIES):
            _write(folder, small_study(i), 1, SMALL_INSTANCES, 8)
        _upload(archive_a, sorted(folder.rglob("*.dcm")))
        return archive_a.dicomweb_url

    try:
        with running_node(
            root / "a",
            before_index=fill,
            clock=clock,
            settings_changes={
                "gateway": {"archive_timeout_s": 5.0},
                "tokens": {"image_access_lifetime_s": 30, "leeway_s": 0},
            },
        ) as node:
            yield World(node, archive_a, archive_b, clock, root)
    finally:
        archive_a.stop()
        archive_b.stop()


# -- B as a process ---------------------------------------------------------------------------


def start_b(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``ncp ARGS`` (node B's) as a child process, as an operator runs it."""
    command = [sys.executable, "-m", "ncp", *args]
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the worker process says its lanes run."""
    deadline = time.monotonic() + timeout
    while b"ncp jobs work:" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"B's worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
