"""The byte path under stress: archive failures in the middle of a transfer reach the client as
a broken body, never a shorter study; a slow archive and a full gateway answer 503 with
Retry-After; emergency tokens are served first when the gateway is saturated; memory stays
bounded whatever the study size.

The misbehaving archive is a scripted DICOMweb server (uvicorn on loopback) whose answers each
test chooses; the memory test streams a large study from a folder and from Orthanc.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ncp.audit.models import Side
from ncp.config import DicomwebArchive, FolderArchive, GatewaySection
from ncp.gateway.stream import relay
from tests.gateway_support import (
    AS_STORED,
    ISSUER_OID,
    PATIENT,
    AuditDb,
    Served,
    Tls,
    audit_db,
    bearer,
    fetch,
    free_port,
    gateway_app,
    local_base,
    patient_instance,
    serve_gateway,
    token,
)
from tests.support.dicom_factory import encode, make_instance, write_instance
from tests.support.orthanc import OrthancServer

STUDY = "1.2.826.0.1.3680043.10.88"
SERIES = f"{STUDY}.1"
BOUNDARY = "archive-boundary"


def _file(n: int, *, meta_sop: str | None = None, series: str | None = None) -> bytes:
    """Instance ``n % 100`` of study ``{STUDY}.{n // 100}`` (series ``.1`` unless ``series``);
    ``meta_sop``: another SOP Instance UID (of the same length) in its file meta."""
    study = f"{STUDY}.{n // 100}"
    ds = patient_instance(study, series or f"{study}.1", f"{study}.1.{n % 100}")
    data = encode(ds)
    if meta_sop is not None:  # written over the file meta's (pydicom writes the data set's)
        end = 144 + int.from_bytes(data[140:144], "little")
        meta = data[:end].replace(ds.SOPInstanceUID.encode(), meta_sop.encode())
        assert len(meta) == end and meta != data[:end]
        data = meta + data[end:]
    return data


def _unnamed_file(n: int) -> bytes:
    """Instance ``n`` whose Study Instance UID comes only after 70 kB of private data."""
    ds = make_instance(
        patient_id=PATIENT.value,
        study_uid=f"{STUDY}.{n // 100}",
        series_uid=f"{STUDY}.{n // 100}.1",
        sop_uid=f"{STUDY}.{n // 100}.1.{n % 100}",
    )
    ds.add_new(0x00090010, "LO", "NCP TEST")
    ds.add_new(0x00091000, "OB", bytes(70_000))
    return encode(ds)


BIG_PARTS = 30
_BIG_PIXELS = bytes(2 * 1024 * 1024)


def _big_file(number: int, n: int) -> bytes:
    """A 2 MB instance of study ``{STUDY}.{number}``."""
    return encode(
        make_instance(
            patient_id=PATIENT.value,
            study_uid=f"{STUDY}.{number}",
            series_uid=f"{STUDY}.{number}.1",
            sop_uid=f"{STUDY}.{number}.1.{n}",
            Rows=1024,
            Columns=1024,
            PixelData=_BIG_PIXELS,
        )
    )


@dataclass
class Script:
    """What the scripted archive does for each study (by its last UID component)."""

    behaviour: dict[str, str] = field(default_factory=dict)
    retrieves: list[str] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    parts_sent: int = 0


def _uid_json(study: str, n: int) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [f"{study}.1"]},
        "00080018": {"vr": "UI", "Value": [f"{study}.1.{n}"]},
    }


def _archive_parts(number: int, behaviour: str) -> list[bytes]:
    """What the scripted archive sends for study ``number``: its three instances, or what
    ``behaviour`` makes of them."""
    if behaviour == "big":
        return [_big_file(number, n) for n in range(BIG_PARTS)]
    base = 100 * number
    files = [_file(base + n) for n in range(3)]
    if behaviour == "short":  # one missing
        files = files[:2]
    elif behaviour == "foreign":  # an instance of another study
        files[2] = _file(base + 5002)
    elif behaviour == "extra":  # one more than the study has
        files.append(_file(base + 3))
    elif behaviour == "duplicate":
        files[2] = files[0]
    elif behaviour == "mismatch":  # its data set is another instance than its file meta says
        files[2] = _file(base + 7, meta_sop=f"{STUDY}.{number}.1.2")
    elif behaviour == "unnamed":  # no Study Instance UID within the gateway's bound
        files[2] = _unnamed_file(base + 2)
    elif behaviour == "other-series":  # of the study's second series
        files[2] = _file(base + 2, series=f"{STUDY}.{number}.2")
    elif behaviour == "capped":  # three series of one instance each
        files = [_file(base + n, series=f"{STUDY}.{number}.{n + 1}") for n in range(3)]
    return files


def scripted_archive(script: Script) -> Starlette:
    """Studies ``{STUDY}.K`` with three instances each (series ``.1``; ``other-series`` adds a
    series ``.2`` of one instance); ``script.behaviour[K]`` decides how the retrieve of study K
    goes: ``ok``, ``truncate``, ``short``, ``foreign``, ``extra``, ``duplicate``, ``mismatch``,
    ``unnamed``, ``other-series``, ``gate``, ``slow``, ``big``, ``capped`` (three series, its
    series list one result per answer)."""

    def kind(study: str) -> str:
        return script.behaviour.get(study.rsplit(".", 1)[-1], "ok")

    async def studies(request: Request) -> Response:
        study = request.query_params["StudyInstanceUID"]
        return JSONResponse(
            [
                {
                    "0020000D": {"vr": "UI", "Value": [study]},
                    "00100020": {"vr": "LO", "Value": [PATIENT.value]},
                    "00100021": {"vr": "LO", "Value": [ISSUER_OID]},
                }
            ]
        )

    async def series(request: Request) -> Response:
        study = request.path_params["study"]
        offset = int(request.query_params.get("offset", "0"))
        counts = {f"{study}.1": BIG_PARTS if kind(study) == "big" else 3}
        if kind(study) == "other-series":
            counts[f"{study}.2"] = 1
        if kind(study) == "capped":
            counts = {f"{study}.{n}": 1 for n in (1, 2, 3)}
        items = [
            {
                "0020000D": {"vr": "UI", "Value": [study]},
                "0020000E": {"vr": "UI", "Value": [uid]},
                "00201209": {"vr": "IS", "Value": [count]},
            }
            for uid, count in counts.items()
        ]
        # "capped": one result per answer, like an archive's LimitFindResults of 1.
        return JSONResponse(items[offset : offset + 1 if kind(study) == "capped" else None])

    async def instances(request: Request) -> Response:
        study = request.path_params["study"]
        count = BIG_PARTS if kind(study) == "big" else 3
        return JSONResponse([_uid_json(study, n) for n in range(count)])

    async def retrieve(request: Request) -> Response:
        study = request.path_params["study"]
        number = int(study.rsplit(".", 1)[-1])
        behaviour = kind(study)
        script.retrieves.append(behaviour)
        if behaviour == "slow":
            await asyncio.sleep(3)
        files = _archive_parts(number, behaviour)

        async def body() -> AsyncIterator[bytes]:
            for n, data in enumerate(files):
                yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                if behaviour == "truncate" and n == 1:
                    yield data[: len(data) // 2]
                    raise ConnectionResetError("the archive went away")
                yield data + b"\r\n"
                script.parts_sent += 1
                if behaviour == "gate" and n == 0:
                    while not script.gate.is_set():
                        await asyncio.sleep(0.01)
            yield f"--{BOUNDARY}--\r\n".encode()

        media = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        return StreamingResponse(body(), media_type=media)

    return Starlette(
        routes=[
            Route("/dicom-web/studies", studies),
            Route("/dicom-web/studies/{study}/series", series),
            Route("/dicom-web/studies/{study}/instances", instances),
            Route("/dicom-web/studies/{study}", retrieve),
            Route("/dicom-web/studies/{study}/series/{series}", retrieve),
        ]
    )


@dataclass
class Rig:
    script: Script
    base: str
    tls: Tls
    audit: AuditDb
    app: Any

    def get(self, study: int, **claims: Any) -> httpx.Response:
        with self.tls.client() as http:
            return http.get(self._url(study), headers=self._headers(study, **claims))

    def _url(self, study: int, below: str = "") -> str:
        return f"{self.base}/studies/{STUDY}.{study}{below}"

    def _headers(self, study: int, **claims: Any) -> dict[str, str]:
        return {**bearer(token(self.base, (f"{STUDY}.{study}",), **claims)), "Accept": AS_STORED}

    def stream(
        self, study: int, below: str = "", **claims: Any
    ) -> tuple[int, bytes, Exception | None]:
        """Status, body received and the error that ended it, if any; ``below``: a series path
        below the study."""
        url, headers = self._url(study, below), self._headers(study, **claims)
        with self.tls.client() as http:
            status, _, body, error = fetch(http, url, headers)
        return status, body, error


def serve_scripted(script: Script) -> tuple[Served, str]:
    """The scripted archive on loopback (plain HTTP, uvicorn's own protocol) and its URL."""
    port = free_port()
    served = Served(scripted_archive(script), None, port, http="auto", log_level="critical")
    return served, local_base(port, None, "dicom-web")


def _rig(root: Path, relay: Any = relay, **limits: Any) -> Iterator[Rig]:
    script = Script()
    archive, archive_url = serve_scripted(script)
    tls = Tls(root / "pki")
    settings = GatewaySection(**{"archive_timeout_s": 1.0, "retry_after_s": 7, **limits})
    served = serve_gateway(
        root,
        DicomwebArchive(kind="dicomweb", url=archive_url),
        tls,
        side=Side.GATEWAY,
        limits=settings,
        relay=relay,
    )
    try:
        yield Rig(script, served.base, tls, served.audit, served.app)
    finally:
        script.gate.set()
        served.stop()
        archive.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path)


def test_a_healthy_transfer_ends_with_the_close_delimiter(rig: Rig) -> None:
    status, body, error = rig.stream(1)
    assert status == 200 and error is None
    assert body.rstrip().endswith(b"--")
    assert body.count(b"Content-Type: application/dicom") == 3


@pytest.mark.parametrize(
    ("behaviour", "below"),
    [
        ("truncate", ""),
        ("short", ""),  # a series ends short
        ("foreign", ""),  # a part of another study
        ("extra", ""),  # one instance more than the series has
        ("duplicate", ""),
        ("unnamed", ""),  # no Study Instance UID within the bound
        ("other-series", f"/series/{STUDY}.2.1"),  # of another series, in a series retrieve
        ("other-series", ""),  # a study retrieve: series .1 ends short
    ],
)
def test_an_archive_failing_mid_stream_breaks_the_answer(
    rig: Rig, behaviour: str, below: str
) -> None:
    """The gateway has no index here: it checks each part's data set and the archive's
    series counts, and every way the archive's answer is wrong breaks the transfer."""
    rig.script.behaviour["2"] = behaviour
    status, body, error = rig.stream(2, below)
    assert status == 200, "the first instance was sent before the failure"
    assert error is not None, "the client must see the transfer fail"
    boundary = body.split(b"\r\n", 1)[0]
    assert boundary + b"--" not in body, "no close delimiter after a failure"
    records = [r for r in rig.audit.records() if r.action == "image-retrieve"]
    assert records[-1].outcome == 8
    assert records[-1].reason
    reasons = {
        "truncate": "in the middle of the transfer",
        "short": "of a series' 3 instances",
        "foreign": "another study",
        "extra": "more instances of a series",
        "duplicate": "twice",
        "unnamed": "within its first",
        "other-series": "another series" if below else "of a series' 3 instances",
    }
    assert reasons[behaviour] in records[-1].reason
    # The instances that went out whole before the failure (the offending part did not).
    whole = {"truncate": 1, "extra": 3, "other-series": 2 if below else 3}.get(behaviour, 2)
    assert records[-1].num_instances == whole


def test_a_part_is_the_instance_its_data_set_names(rig: Rig) -> None:
    """A file meta naming another SOP Instance UID than the data set is tolerated: the part is
    the data set's instance (as the index and the archive name it, ncp.gateway.servable)."""
    rig.script.behaviour["2"] = "mismatch"
    status, body, error = rig.stream(2)
    assert status == 200 and error is None
    assert body.rstrip().endswith(b"--")
    record = [r for r in rig.audit.records() if r.action == "image-retrieve"][-1]
    assert record.outcome == 0
    assert record.details["instances"][-1] == f"{STUDY}.2.1.7"


def test_an_archive_that_caps_results_is_asked_page_by_page(rig: Rig) -> None:
    rig.script.behaviour["11"] = "capped"
    status, body, error = rig.stream(11)
    assert status == 200 and error is None
    assert body.rstrip().endswith(b"--")
    assert body.count(b"Content-Type: application/dicom") == 3
    record = [r for r in rig.audit.records() if r.action == "image-retrieve"][-1]
    assert record.details["expected"] == 3 and record.details["listed_by"] == "archive"


def test_a_slow_archive_gets_503_with_retry_after(rig: Rig) -> None:
    rig.script.behaviour["3"] = "slow"
    response = rig.get(3)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"


def test_a_client_that_stops_reading_stops_the_gateway(tmp_path: Path) -> None:
    """Back-pressure: with the client not reading (a small receive buffer, so the kernel does
    not absorb the study), the gateway's writes block once the connection's buffers are full,
    far short of the 60 MB study; reading again resumes the transfer to its end."""
    sent = [0]

    async def counting(chunks: AsyncIterator[bytes], send: Any) -> int:
        async def counted_send(message: Any) -> None:
            await send(message)
            sent[0] += len(message.get("body", b""))

        return await relay(chunks, counted_send)

    for rig in _rig(tmp_path, relay=counting):
        rig.script.behaviour["10"] = "big"
        context = ssl.create_default_context(cafile=str(rig.tls.ca))
        small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)]
        transport = httpx.HTTPTransport(verify=context, socket_options=small)
        with (
            httpx.Client(transport=transport, timeout=60) as http,
            http.stream("GET", rig._url(10), headers=rig._headers(10)) as response,
        ):
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)  # under way; now the client reads no more for a while
            stalled = _plateau(lambda: sent[0])
            total = BIG_PARTS * len(_BIG_PIXELS)
            assert stalled < total // 2, f"{stalled} of {total} bytes written while not read"
            received = len(first) + sum(len(chunk) for chunk in chunks)
        assert received > total
        assert sent[0] > total


def _plateau(value: Any, still_s: float = 1.0, limit_s: float = 30.0) -> int:
    """The value once it has not changed for ``still_s`` seconds."""
    deadline = time.monotonic() + limit_s
    last, since = value(), time.monotonic()
    while time.monotonic() - since < still_s:
        if time.monotonic() > deadline:
            raise AssertionError("never settled")
        time.sleep(0.05)
        if value() != last:
            last, since = value(), time.monotonic()
    return int(last)


@pytest.fixture
def full_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, max_transfers=1, queue_timeout_s=0)


def test_a_full_gateway_answers_503_and_the_running_transfer_completes(full_rig: Rig) -> None:
    rig = full_rig
    rig.script.behaviour["4"] = "gate"
    results: list[tuple[int, bytes, Exception | None]] = []
    first = threading.Thread(target=lambda: results.append(rig.stream(4)))
    first.start()
    _wait_until(lambda: rig.script.parts_sent >= 1)
    busy = rig.get(5)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "7"
    rig.script.gate.set()
    first.join(timeout=30)
    assert results and results[0][0] == 200 and results[0][2] is None
    assert rig.get(5).status_code == 200, "the slot is free again"


@pytest.fixture
def queue_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, max_transfers=1, queue_timeout_s=60)


def test_emergency_tokens_are_served_first_when_saturated(queue_rig: Rig) -> None:
    rig = queue_rig
    rig.script.behaviour.update({"6": "gate", "7": "routine", "8": "stat", "9": "emergency"})
    slots = rig.app.state.gateway.slots
    threads = [threading.Thread(target=rig.stream, args=(6,))]
    threads[0].start()
    _wait_until(lambda: rig.script.parts_sent >= 1)
    for study, claims in (
        (7, {"priority": "routine"}),
        (8, {"priority": "stat"}),
        (9, {"priority": "routine", "purpose_of_use": "ETREAT"}),
    ):
        waiting = slots.waiting
        thread = threading.Thread(target=rig.stream, args=(study,), kwargs=claims)
        thread.start()
        threads.append(thread)
        _wait_until(lambda w=waiting: slots.waiting == w + 1)  # type: ignore[misc]
    rig.script.gate.set()
    for thread in threads:
        thread.join(timeout=30)
    assert rig.script.retrieves == ["gate", "emergency", "stat", "routine"]


def _wait_until(condition: Any, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# -- bounded memory -------------------------------------------------------------------------

BIG = "1.2.826.0.1.3680043.10.89"
BIG_FILES = 24
BIG_PIXELS = 1024 * 1024 * 2  # 2 MB a file, 48 MB a study


def _write_big_study(root: Path) -> list[Path]:
    paths = []
    for n in range(BIG_FILES):
        ds = patient_instance(
            BIG,
            f"{BIG}.1",
            f"{BIG}.1.{n + 1}",
            Rows=1024,
            Columns=1024,
            PixelData=bytes(BIG_PIXELS),
        )
        paths.append(write_instance(root / f"{n}.dcm", ds))
    return paths


def _peak_while_streaming(tls: Tls, base: str) -> tuple[int, int]:
    """(bytes received, peak Python memory allocated meanwhile) for one study retrieve."""
    received = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with (
            tls.client() as http,
            http.stream(
                "GET",
                f"{base}/studies/{BIG}",
                headers={**bearer(token(base, (BIG,))), "Accept": AS_STORED},
            ) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return received, peak


@pytest.mark.orthanc
def test_memory_stays_bounded_whatever_the_study_size(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    orthanc.clear()
    paths = _write_big_study(tmp_path / "archive")
    orthanc.upload(paths)
    tls = Tls(tmp_path / "pki")
    study_bytes = sum(p.stat().st_size for p in paths)
    settings = GatewaySection(chunk_bytes=256 * 1024)
    for archive in (
        FolderArchive(path=tmp_path / "archive"),
        DicomwebArchive(kind="dicomweb", url=orthanc.dicomweb_url),
    ):
        served = serve_gateway(tmp_path, archive, tls, limits=settings)
        try:
            received, peak = _peak_while_streaming(tls, served.base)
        finally:
            served.stop()
        assert received > study_bytes
        # Gateway and client together hold a few chunks, not the study.
        assert peak < study_bytes / 4, (archive.kind, peak, study_bytes)


def test_an_archive_that_cannot_be_reached_gets_503_with_retry_after(tmp_path: Path) -> None:
    base = "https://gw.at.example/dicomweb"
    app = gateway_app(
        DicomwebArchive(kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web"),
        base,
        audit_db(tmp_path / "audit.db"),
        limits=GatewaySection(retry_after_s=11),
    )

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as http:
            return await http.get(base + path, headers=bearer(token(base, (f"{STUDY}.1",))))

    # A search across studies fails too, rather than answer without the studies it missed.
    for path in (f"/studies/{STUDY}.1", f"/studies/{STUDY}.1/series", "/studies"):
        response = asyncio.run(get(path))
        assert response.status_code == 503, path
        assert response.headers["retry-after"] == "11"
