"""Part bodies spliced from the archive's socket to the client's (plain TCP): the end of each
part predicted from its data set (``parthead.pixel_end``), the bytes up to it moved by
``os.splice``, what follows checked (``parthead.AfterPixels``).

The prediction against pydicom's encoding (never beyond the part's end), a retrieve through
option A before Orthanc (the parts byte for byte as Orthanc sends them, the splice taken), and
a raw loopback archive for what Orthanc never does: elements after Pixel Data, a connection
closed inside a spliced range, a Pixel Data length that claims more than the part holds, a
stalled client, a client that leaves mid-splice.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from ncp.audit.models import Outcome
from ncp.config import DicomwebArchive, GatewaySection
from ncp.gateway.errors import StreamBroken
from ncp.gateway.parthead import AfterPixels, file_meta, meta_end, pixel_end
from ncp.gateway.relay import SPLICED
from ncp.gateway.relay import relay as fast_relay
from ncp.gateway.splice import PIPE_BYTES
from tests.gateway_support import (
    AS_STORED,
    ISSUER_OID,
    PATIENT,
    AuditDb,
    ServedGateway,
    Tls,
    bearer,
    boundary_of,
    fetch,
    http_client,
    multipart_parts,
    patient_instance,
    request_head,
    serve_gateway,
    token,
)
from tests.support.dicom_factory import encode, with_references
from tests.support.orthanc import OrthancServer

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
J2K = "1.2.840.10008.1.2.4.90"
DEFLATED = "1.2.840.10008.1.2.1.99"
ROOT = "1.2.826.0.1.3680043.10.78"


def _instance(
    sop: str,
    *,
    study: str = f"{ROOT}.1",
    series: str | None = None,
    rows: int = 256,
    columns: int = 256,
    syntax: str = EXPLICIT,
    references: int = 0,
    undefined: bool = False,
    trailing: int | None = None,
    kind: str = "native",
) -> Dataset:
    """A CT instance with ``rows`` x ``columns`` 16-bit pixels in ``syntax``: ``references``
    nested sequences before its pixel data, Data Set Trailing Padding of ``trailing`` bytes
    after it; ``kind``: native, float or double pixel data, or encapsulated (J2K syntax)."""
    pixels = (np.arange(rows * columns, dtype=np.uint32) * 2654435761 >> 16).astype(np.uint16)
    ds = patient_instance(
        study,
        series or f"{study}.1",
        sop,
        Rows=rows,
        Columns=columns,
        PixelData=pixels.tobytes(),
    )
    if references:
        with_references(ds, references, undefined=undefined)
    if kind in ("float", "double"):
        del ds.PixelData
        del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
        ds.BitsAllocated = 32 if kind == "float" else 64
        values = pixels.astype(np.float32 if kind == "float" else np.float64).tobytes()
        if kind == "float":
            ds.FloatPixelData = values
        else:
            ds.DoubleFloatPixelData = values
    if kind == "encapsulated":
        syntax = J2K
        ds.PixelData = encapsulate([b"\xff\xd8 not really j2k \xff\xd9" * 50])
        ds["PixelData"].is_undefined_length = True
    if trailing is not None:
        ds.add_new(0xFFFCFFFC, "OB", bytes(trailing))
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _trailer_bytes(trailing: int | None, syntax: str) -> int:
    header = 8 if syntax == IMPLICIT else 12
    return 0 if trailing is None else header + trailing + (trailing % 2)


# -- the prediction --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    syntax=st.sampled_from([EXPLICIT, IMPLICIT]),
    kind=st.sampled_from(["native", "native", "float", "double"]),
    references=st.integers(0, 3),
    undefined=st.booleans(),
    size=st.sampled_from([(1, 1), (8, 8), (64, 40), (256, 256)]),
    trailing=st.one_of(st.none(), st.integers(0, 300)),
    cut=st.integers(0, 200_000),
)
def test_the_predicted_end_is_where_native_pixel_data_ends_never_beyond_the_part(
    syntax: str,
    kind: str,
    references: int,
    undefined: bool,
    size: tuple[int, int],
    trailing: int | None,
    cut: int,
) -> None:
    ds = _instance(
        "1.2.3.4.5",
        rows=size[0],
        columns=size[1],
        syntax=syntax,
        references=references,
        undefined=undefined,
        trailing=trailing,
        kind=kind,
    )
    data = encode(ds)
    facts = file_meta(data)
    assert facts is not None and facts[1] == syntax
    end = pixel_end(data, meta_end(data), syntax)
    # Pixel data is the last element but for the padding: the prediction is exact.
    assert end == len(data) - _trailer_bytes(trailing, syntax)
    reread = pydicom.dcmread(BytesIO(data))
    key = {"native": "PixelData", "float": "FloatPixelData", "double": "DoubleFloatPixelData"}
    assert data[end - len(reread[key[kind]].value) : end] == reread[key[kind]].value
    # A head that does not reach the element's header: no prediction, never another one.
    head = data[: cut % (len(data) + 1)]
    partial = pixel_end(head, meta_end(data), syntax)
    assert partial is None or partial == end
    assert partial is not None or len(head) < end - len(reread[key[kind]].value)
    # What follows the prediction passes the check, split anywhere.
    after = AfterPixels(syntax)
    rest = data[end:]
    for i in range(0, len(rest), 7):
        after.feed(rest[i : i + 7])
    after.end()


@pytest.mark.parametrize("kind", ["encapsulated", "deflated"])
def test_no_prediction_for_encapsulated_or_deflated_data_sets(kind: str) -> None:
    ds = _instance("1.2.3.4.5", kind="encapsulated" if kind == "encapsulated" else "native")
    if kind == "deflated":
        ds.file_meta.TransferSyntaxUID = DEFLATED
    data = encode(ds)
    facts = file_meta(data)
    assert facts is not None
    assert pixel_end(data, meta_end(data), facts[1]) is None


def test_no_prediction_when_the_head_is_too_short_or_odd() -> None:
    data = encode(_instance("1.2.3.4.5", references=2))
    start = meta_end(data)
    end = pixel_end(data, start, EXPLICIT)
    assert end == len(data)
    pixel_header = end - 256 * 256 * 2 - 12
    assert pixel_end(data[: pixel_header + 11], start, EXPLICIT) is None  # header cut
    assert pixel_end(data[: pixel_header + 12], start, EXPLICIT) == end
    broken = bytearray(data)
    broken[start + 4 : start + 6] = b"zz"  # a VR that is none
    assert pixel_end(bytes(broken), start, EXPLICIT) is None


@settings(max_examples=100, deadline=None)
@given(offset=st.integers(1, 3000), split=st.integers(1, 5000))
def test_bytes_of_another_part_after_the_prediction_are_refused(offset: int, split: int) -> None:
    """What a Pixel Data length that claims more than the part holds leaves after the
    prediction: the middle of the next part (its preamble, file meta, data set, or pixels)."""
    other = encode(_instance("1.2.3.4.6", rows=64, columns=64))
    framing = b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\n"
    rest = (framing + other)[offset:]
    after = AfterPixels(EXPLICIT)
    with pytest.raises(StreamBroken):
        after.feed(rest[:split])
        after.feed(rest[split:])
        after.end()


# -- a raw archive on loopback -----------------------------------------------------------------

BOUNDARY = b"splice-test-boundary"
Step = bytes | float | Callable[[socket.socket], None]


def _multipart(parts: list[bytes]) -> bytes:
    out = bytearray()
    for data in parts:
        out += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
    return bytes(out + b"--" + BOUNDARY + b"--\r\n")


def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited in vain for {what}")
        time.sleep(0.005)


def _splice_started() -> Callable[[], None]:
    """A step: wait until the gateway has begun a splice (it holds the part's head and its
    prediction; what is not sent yet can only reach it through the splice)."""
    before = SPLICED.started
    return lambda _: _until(lambda: SPLICED.started > before, "a splice to start")


def _hold(archive: RawArchive) -> Callable[[socket.socket], None]:
    """A step: send nothing more until the gateway closes the connection."""

    def hold(conn: socket.socket) -> None:
        conn.settimeout(30)
        while conn.recv(65536):
            pass
        archive.peer_closed.set()

    return hold


@dataclass
class RawArchive:
    """A DICOMweb archive written with raw sockets: answers the searches a retrieve needs
    (``study``'s patient; its one series with ``count`` instances) and the retrieve with
    ``steps`` (bytes sent, seconds slept, callables waited on), then closes; framed by the
    connection's close, or by Content-Length when ``sized``."""

    study: str
    count: int
    steps: list[Step]
    sized: bool = False
    send_buffer: int | None = None  # SO_SNDBUF of the retrieve's socket; the kernel's otherwise
    sent: int = 0
    peer_closed: threading.Event = field(default_factory=threading.Event)
    server: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/dicom-web"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.send_buffer is not None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        with conn:
            head = request_head(conn)
            if head is None:
                return
            target = urlsplit(head.split(b" ")[1].decode())
            path = target.path.removeprefix("/dicom-web")
            if path == "/studies":
                self._json(conn, [self._study()])
            elif path == f"/studies/{self.study}/series":
                offset = int(parse_qs(target.query).get("offset", ["0"])[0])
                self._json(conn, [self._series()][offset:])
            elif path == f"/studies/{self.study}":
                self._retrieve(conn)
            else:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def _study(self) -> dict[str, Any]:
        return {
            "0020000D": {"vr": "UI", "Value": [self.study]},
            "00100020": {"vr": "LO", "Value": [PATIENT.value]},
            "00100021": {"vr": "LO", "Value": [ISSUER_OID]},
        }

    def _series(self) -> dict[str, Any]:
        return {
            "0020000D": {"vr": "UI", "Value": [self.study]},
            "0020000E": {"vr": "UI", "Value": [f"{self.study}.1"]},
            "00201209": {"vr": "IS", "Value": [self.count]},
        }

    @staticmethod
    def _json(conn: socket.socket, value: Any) -> None:
        body = json.dumps(value).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def _retrieve(self, conn: socket.socket) -> None:
        ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nConnection: close\r\n"
        if self.sized:
            total = sum(len(s) for s in self.steps if isinstance(s, bytes))
            head += f"Content-Length: {total}\r\n"
        conn.sendall(head.encode() + b"\r\n")
        try:
            for step in self.steps:
                if isinstance(step, bytes):
                    for i in range(0, len(step), 65536):
                        conn.sendall(step[i : i + 65536])
                        self.sent += len(step[i : i + 65536])
                elif isinstance(step, float):
                    time.sleep(step)
                else:
                    step(conn)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(30)
            while conn.recv(65536):  # until the gateway closes its end
                pass
        except OSError:
            pass
        self.peer_closed.set()


@dataclass
class Gateway:
    base: str
    audit: AuditDb
    tls: Tls | None = None

    def headers(self, study: str) -> dict[str, str]:
        return {**bearer(token(self.base, (study,))), "Accept": AS_STORED}

    def records(self, count: int) -> list[Any]:
        """The transfers' end records, once ``count`` are written (a failed transfer's record
        is written after the client saw the failure; its begin record, before)."""

        def ends() -> list[Any]:
            return [r for r in self.audit.records() if r.action == "image-retrieve"]

        _until(lambda: len(ends()) >= count, f"{count} audit records")
        return ends()


@pytest.fixture
def gateway_for(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[ServedGateway] = []

    def make(archive_url: str, *, splice: bool = True, tls: Tls | None = None) -> Gateway:
        served = serve_gateway(
            tmp_path,
            DicomwebArchive(kind="dicomweb", url=archive_url),
            tls,
            limits=GatewaySection(archive_timeout_s=10.0),
            relay=fast_relay if splice else functools.partial(fast_relay, splice=False),
        )
        started.append(served)
        return Gateway(served.base, served.audit, tls)

    yield make
    for served in started:
        served.stop()


def _closed(ctype: str, body: bytes) -> bool:
    """Whether ``body`` ends with the close delimiter of our answer (its boundary: ``ctype``)."""
    return body.rstrip().endswith(b"--" + boundary_of(ctype).encode() + b"--")


def _fetch(gateway: Gateway, study: str) -> tuple[int, str, bytes, Exception | None]:
    with http_client(gateway.tls) as http:
        return fetch(http, f"{gateway.base}/studies/{study}", gateway.headers(study))


def _fetch_whole(gateway: Gateway, study: str) -> list[bytes]:
    """The parts of a retrieve that must succeed: 200, the body whole."""
    status, ctype, received, error = _fetch(gateway, study)
    assert status == 200 and error is None
    return multipart_parts(ctype, received)


def _fetch_broken(gateway: Gateway, study: str) -> Any:
    """The audit record of a retrieve that must break once begun: 200, then no close
    delimiter, recorded as a serious failure."""
    status, ctype, received, error = _fetch(gateway, study)
    # The answer began; then it broke: no last chunk, no close delimiter.
    assert status == 200 and error is not None
    assert not _closed(ctype, received)
    record = gateway.records(1)[-1]
    assert record.outcome == Outcome.SERIOUS_FAILURE
    return record


# -- through option A before Orthanc ---------------------------------------------------------


@pytest.mark.orthanc
def test_a_study_from_orthanc_is_spliced_and_arrives_byte_for_byte(
    orthanc: OrthancServer, gateway_for: Callable[..., Gateway], tmp_path: Path
) -> None:
    study = f"{ROOT}.50"
    shapes: list[dict[str, Any]] = [
        dict(syntax=EXPLICIT),
        dict(syntax=EXPLICIT, references=2, undefined=True),
        dict(syntax=IMPLICIT, references=1),
        dict(syntax=EXPLICIT, rows=512, columns=512),
        dict(syntax=IMPLICIT, rows=512, columns=384),
        dict(syntax=EXPLICIT, references=3),
    ] * 2
    # Parts larger than any read (1 MiB): whatever the timing, each has bytes left in the
    # socket once its head is read, so each is spliced.
    large: list[dict[str, Any]] = [
        dict(syntax=EXPLICIT, rows=2048, columns=1024),
        dict(syntax=IMPLICIT, rows=1024, columns=2048, references=2),
        dict(syntax=EXPLICIT, rows=1536, columns=1024, references=1, undefined=True),
    ]
    shapes += large
    paths = []
    for n, shape in enumerate(shapes, start=1):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(encode(_instance(f"{study}.1.{n}", study=study, **shape)))
        paths.append(path)
    orthanc.upload(paths)
    try:
        direct = httpx.get(
            f"{orthanc.dicomweb_url}/studies/{study}", headers={"Accept": AS_STORED}, timeout=30
        )
        assert direct.status_code == 200
        archived = multipart_parts(direct.headers["content-type"], direct.content)
        by_sop = {pydicom.dcmread(BytesIO(p)).SOPInstanceUID: p for p in archived}
        assert len(by_sop) == len(shapes)

        for splice in (True, False):
            gateway = gateway_for(orthanc.dicomweb_url, splice=splice)
            before = SPLICED.ranges, SPLICED.bytes
            status, ctype, body, error = _fetch(gateway, study)
            assert status == 200 and error is None
            parts = multipart_parts(ctype, body)
            got = {pydicom.dcmread(BytesIO(p)).SOPInstanceUID: p for p in parts}
            assert len(parts) == len(shapes) and got == by_sop  # byte for byte
            record = gateway.records(1)[-1]
            assert record.outcome == Outcome.SUCCESS
            assert record.num_instances == len(shapes)
            assert record.details["dicom_bytes"] == sum(len(p) for p in archived)
            assert record.size_bytes == len(body)
            spliced = SPLICED.ranges - before[0], SPLICED.bytes - before[1]
            if splice:
                assert spliced[0] >= len(large) and spliced[1] >= 2 << 20  # the path was taken
            else:
                assert spliced == (0, 0)
    finally:
        orthanc.delete_study(study)


# -- what Orthanc never does, from a raw archive ------------------------------------------------


def _study_parts(study: str, count: int, **shape: Any) -> list[bytes]:
    return [encode(_instance(f"{study}.1.{n}", study=study, **shape)) for n in range(1, count + 1)]


_CLOSE = b"--" + BOUNDARY + b"--\r\n"


def _cut_in(parts: list[bytes], n: int) -> int:
    """An offset in ``_multipart(parts)`` 70 + 4000 bytes past the parts before part ``n``
    (for part 0 past the empty body's close delimiter): past part ``n``'s header and head, so
    the rest of it reaches the gateway only through the splice."""
    return len(_multipart(parts[:n])) - (len(_CLOSE) if n else 0) + 70 + 4000


@pytest.mark.parametrize("sized", [False, True])
def test_elements_after_pixel_data_are_passed_on_after_the_splice(
    gateway_for: Callable[..., Gateway], sized: bool
) -> None:
    study = f"{ROOT}.60"
    parts = _study_parts(study, 3, trailing=5000, references=1)
    body = _multipart(parts)
    cut = _cut_in(parts, 1)
    archive = RawArchive(study, 3, [body[:cut], _splice_started(), body[cut:]], sized=sized)
    gateway = gateway_for(archive.url)
    before = SPLICED.ranges
    try:
        assert _fetch_whole(gateway, study) == parts
        assert SPLICED.ranges > before
        assert gateway.records(1)[-1].outcome == Outcome.SUCCESS
    finally:
        archive.close()


def test_an_archive_closing_inside_a_spliced_range_breaks_the_transfer(
    gateway_for: Callable[..., Gateway],
) -> None:
    study = f"{ROOT}.61"
    parts = _study_parts(study, 2)
    body = _multipart(parts)
    cut = _cut_in(parts, 1)
    steps: list[Step] = [body[:cut], _splice_started(), body[cut : cut + 20000]]
    archive = RawArchive(study, 2, steps)
    gateway = gateway_for(archive.url)
    try:
        record = _fetch_broken(gateway, study)
        assert "spliced range" in (record.reason or "")
    finally:
        archive.close()


@pytest.mark.parametrize("liar", [0, 1, 2])
def test_a_pixel_data_length_claiming_more_than_the_part_holds_breaks_the_transfer(
    gateway_for: Callable[..., Gateway], liar: int
) -> None:
    """The liar's predicted end lies in the next part (or past the archive's body, for the
    last one): the splice swallows the real delimiter, and what follows the prediction is
    not the part's end: the transfer breaks, never a clean shorter study."""
    study = f"{ROOT}.62"
    parts = _study_parts(study, 3)
    lying = bytearray(parts[liar])
    at = bytes(lying).rindex(b"\xe0\x7f\x10\x00OW\x00\x00") + 8
    claimed = int.from_bytes(lying[at : at + 4], "little") + 1000
    lying[at : at + 4] = claimed.to_bytes(4, "little")
    parts[liar] = bytes(lying)
    body = _multipart(parts)
    cut = _cut_in(parts, liar)
    archive = RawArchive(study, 3, [body[:cut], _splice_started(), body[cut:]])
    gateway = gateway_for(archive.url)
    try:
        reason = _fetch_broken(gateway, study).reason or ""
        if liar == 2:  # the prediction lies past the body's end
            assert "spliced range" in reason
        else:
            assert "does not end where its pixel data says" in reason
    finally:
        archive.close()


_SMALL_BUFFER = 1 << 18  # the test's own sockets: fixed, so the kernel does not grow them
_GATEWAY_HELD = 4 << 20  # the gateway's own buffers: a read, a part head, the write buffer


def _kernel_max(tcp: str, core: str) -> int:
    """The most a socket's buffer can hold: grown by the kernel (``tcp_rmem``/``tcp_wmem``) or
    set by its owner (``rmem_max``/``wmem_max``, doubled by the kernel)."""
    grown = int(Path(f"/proc/sys/net/ipv4/{tcp}").read_text().split()[2])
    return max(grown, 2 * int(Path(f"/proc/sys/net/core/{core}").read_text()))


def _held_on_the_way() -> int:
    """The most bytes that can lie between an archive and a client that has stopped reading,
    the gateway holding no more than its own few buffers: both test sockets' fixed buffers
    (doubled by the kernel), the gateway's receive buffer, its pipe and its send buffer."""
    rmem, wmem = _kernel_max("tcp_rmem", "rmem_max"), _kernel_max("tcp_wmem", "wmem_max")
    return 4 * _SMALL_BUFFER + rmem + PIPE_BYTES + wmem + _GATEWAY_HELD


def test_a_stalled_client_stalls_the_archive_then_gets_the_whole_study(
    gateway_for: Callable[..., Gateway],
) -> None:
    study = f"{ROOT}.63"
    # Parts of 1.5 MiB: larger than a read, so whatever the timing, parts are spliced. The
    # study outgrows what the buffers on the way can hold by 8 MiB (the kernel's own limits
    # set them: loopback buffers grow to tens of MiB on some machines).
    bound = _held_on_the_way()
    count = -(-(bound + (8 << 20)) // (1536 * 512 * 2))
    parts = _study_parts(study, count, rows=1536, columns=512)
    body = _multipart(parts)
    assert len(body) > bound + (8 << 20)
    archive = RawArchive(study, count, [body], send_buffer=_SMALL_BUFFER)
    gateway = gateway_for(archive.url)
    before = SPLICED.ranges
    small = httpx.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALL_BUFFER)]
    )
    try:
        url = f"{gateway.base}/studies/{study}"
        with (
            httpx.Client(timeout=60.0, transport=small) as http,
            http.stream("GET", url, headers=gateway.headers(study)) as r,
        ):
            pieces = r.iter_raw()
            received = bytearray(next(pieces))
            # The client reads no more: the archive must stop once the buffers on the way
            # are full, long before the study ends.
            last = -1
            while archive.sent != last:
                last = archive.sent
                time.sleep(0.5)
            assert archive.sent <= bound
            for piece in pieces:
                received.extend(piece)
            assert multipart_parts(r.headers["content-type"], bytes(received)) == parts
        assert SPLICED.ranges > before
        assert gateway.records(1)[-1].outcome == Outcome.SUCCESS
    finally:
        archive.close()


def test_a_client_leaving_mid_splice_ends_the_transfer_and_the_archive_read(
    gateway_for: Callable[..., Gateway],
) -> None:
    study = f"{ROOT}.64"
    parts = _study_parts(study, 2, rows=1024, columns=512)
    body = _multipart(parts)
    cut = 70 + 4000
    archive = RawArchive(study, 2, [body[:cut], _splice_started()])
    archive.steps.append(_hold(archive))
    gateway = gateway_for(archive.url)
    started, ranges = SPLICED.started, SPLICED.ranges
    try:
        url = f"{gateway.base}/studies/{study}"
        with (
            httpx.Client(timeout=30.0) as http,
            http.stream("GET", url, headers=gateway.headers(study)) as r,
        ):
            assert r.status_code == 200
            next(r.iter_raw())
            _until(lambda: SPLICED.started > started, "the splice")
        # The client is gone (its connection closed mid-body): the gateway ends the transfer
        # and closes the archive's connection, though the archive has not sent the rest.
        assert archive.peer_closed.wait(30)
        record = gateway.records(1)[-1]
        assert record.outcome == Outcome.SERIOUS_FAILURE
        assert record.reason == "client went away"
        assert SPLICED.ranges == ranges  # the range never completed
    finally:
        archive.close()


def test_under_tls_nothing_is_spliced_and_the_study_arrives_whole(
    gateway_for: Callable[..., Gateway], tmp_path: Path
) -> None:
    study = f"{ROOT}.65"
    parts = _study_parts(study, 6, rows=512, columns=512)
    archive = RawArchive(study, 6, [_multipart(parts)])
    gateway = gateway_for(archive.url, tls=Tls(tmp_path / "pki"))
    started = SPLICED.started
    try:
        assert _fetch_whole(gateway, study) == parts
        assert SPLICED.started == started  # bytes on a TLS connection are encrypted, never spliced
        assert gateway.records(1)[-1].outcome == Outcome.SUCCESS
    finally:
        archive.close()


@pytest.mark.parametrize("mover", ["stream", "relay"])
def test_a_mover_that_cannot_splice_reads_a_range_and_the_body_reads_on_after_it(
    mover: str,
) -> None:
    """Ranges are made only for a mover that splices; any other still moves them (read from
    the socket), and the archive's body continues after them, its Content-Length kept."""
    import asyncio

    from ncp.gateway import stream
    from ncp.gateway.relay import ArchiveRange, Upstream

    async def scenario() -> list[bytes]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        up = Upstream(
            ours, 200, "OK", [("content-length", "10")], b"", timeout=5.0, chunk_bytes=4096
        )
        out: list[bytes] = []
        try:
            theirs.sendall(b"0123")
            body = up.body()
            out.append(await anext(body))
            assert up.range(7) is None  # more than the body has left
            taken = up.range(4)
            assert isinstance(taken, ArchiveRange)
            taken.prefix = b"<"
            theirs.sendall(b"456789")

            async def chunks() -> Any:
                yield taken

            async def send(message: Any) -> None:
                if message.get("body"):
                    out.append(bytes(message["body"]))

            move = stream.relay if mover == "stream" else fast_relay
            assert await move(chunks(), send) == 5
            assert taken.done
            out.extend([piece async for piece in body])
        finally:
            await up.aclose()
            theirs.close()
        return out

    assert asyncio.run(scenario()) == [b"0123", b"<", b"4567", b"89"]
