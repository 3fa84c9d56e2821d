"""DicomwebSource: the index read from a DICOMweb archive equals the index of the same files in a
folder, and nothing the archive or a caller says is trusted blindly.

The ``orthanc`` tests run against a real Orthanc with its DICOMweb plugin
(tests/support/orthanc.py); the malformed-answer tests run against a tiny stub HTTP server in this
file.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pwd
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from ncp.dicom.dicomweb import DicomwebSource, _iter_parts, parse_locator
from ncp.dicom.folder import FolderSource
from ncp.dicom.mapping import IndexRecord, map_header
from ncp.dicom.source import ArchiveSource, InstanceHeader, SkippedEntry, SourceEntry
from ncp.errors import ArchiveError, ConfigError, UnreadableInstance
from tests.support.orthanc import OrthancServer, OrthancUnavailable

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

# -- test instances ----------------------------------------------------------------------------

_ROOT = "1.2.826.0.1.3680043.10.543"
"""UID root of the test instances (pydicom's UID root plus a private branch)."""


def uid(*parts: object) -> str:
    return ".".join([_ROOT, *map(str, parts)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_instance(
    path: Path,
    *,
    patient_id: str,
    name: str,
    study: str,
    series: str,
    sop: str,
    sop_class: str = CTImageStorage,
    syntax: str = ExplicitVRLittleEndian,
    charset: str | None = None,
    modality: str = "CT",
    number: int = 1,
    series_number: int = 1,
    frames: int | None = None,
    private: bool = False,
) -> Path:
    """A small image instance carrying every attribute the index keeps."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = patient_id, name, "HOSP-A"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.AccessionNumber = f"ACC-{study[-3:]}"
    issuer = Dataset()
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.3.4", "ISO"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.StudyID, ds.StudyDate, ds.StudyTime = "S1", "20240102", "101112.123"
    ds.StudyDescription = "Thorax"
    ds.ProcedureCodeSequence = [_code("24627-2", "LN", "CT Chest")]
    ds.RequestingService = "Radiology"
    ds.RequestingServiceCodeSequence = [_code("394914008", "SCT", "Radiology")]
    ds.ReferringPhysicianName = "Dupont^Marie"
    referring = Dataset()
    referring.InstitutionName = "Referring Hospital"
    ds.ReferringPhysicianIdentificationSequence = [referring]
    ds.InstitutionName = "Performing Hospital"
    ds.Manufacturer = "NCP"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, series_number, "axial"
    ds.BodyPartExamined, ds.Laterality = "chest", "R"  # lower case: the index upper-cases it
    ds.SeriesDate, ds.SeriesTime = "20240102", "1012"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = (np.arange(16 * 16 * (frames or 1), dtype=np.uint16) % 4096).tobytes()
    if private:
        ds.add_new(0x00090010, "LO", "NCP TEST PRIVATE")
        ds.add_new(0x00091001, "LO", "private text")
        ds.add_new(0x00091002, "OB", b"\x01\x02\x03\x04")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Corpus:
    folder: Path
    by_sop: dict[str, Path] = field(default_factory=dict)
    study_of_patient: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return sorted(self.by_sop.values())


def _pydicom_sample(name: str) -> Path | None:
    try:
        found = get_testdata_file(name, download=False)
    except Exception:
        return None
    return Path(found) if found else None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Three patients, five studies, several series, six transfer syntaxes; one non-ASCII
    (ISO_IR 192) name, one multi-frame instance, private tags; two pydicom sample files."""
    folder = tmp_path_factory.mktemp("dicomweb-corpus")
    c = Corpus(folder)

    def add(filename: str, **kw: Any) -> None:
        path = write_instance(folder / filename, **kw)
        c.by_sop[kw["sop"]] = path

    utf8 = "ISO_IR 192"
    for i in range(3):
        add(f"a-ct-{i}.dcm", patient_id="pat200", name="Müller^Jürgen=山田^太郎", study=uid(1),
            series=uid(1, 1), sop=uid(1, 1, i + 1), charset=utf8, number=i + 1)  # fmt: skip
    add("a-mr.dcm", patient_id="pat200", name="Müller^Jürgen", study=uid(1), series=uid(1, 2),
        sop=uid(1, 2, 1), sop_class=MRImageStorage, syntax=ImplicitVRLittleEndian, charset=utf8,
        modality="MR", series_number=2)  # fmt: skip
    add("b-mf.dcm", patient_id="PAT200", name="Smith^John", study=uid(2), series=uid(2, 1),
        sop=uid(2, 1, 1), frames=3, private=True)  # fmt: skip
    add("c-deflated.dcm", patient_id="pat-c", name="Østergård^Åse", study=uid(3),
        series=uid(3, 1), sop=uid(3, 1, 1), syntax=DeflatedExplicitVRLittleEndian,
        charset=utf8)  # fmt: skip
    add("c-big-endian.dcm", patient_id="pat-c", name="Østergård^Åse", study=uid(3),
        series=uid(3, 2), sop=uid(3, 2, 1), syntax=ExplicitVRBigEndian, charset=utf8,
        series_number=2)  # fmt: skip
    c.study_of_patient = {"pat200": uid(1), "PAT200": uid(2)}
    # Real-world headers: a JPEG Baseline secondary capture, a Latin-1 CT with GE private tags.
    for sample in ("SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm"):
        src = _pydicom_sample(sample)
        assert src is not None, f"pydicom test file {sample} missing (offline copy expected)"
        dest = folder / sample
        shutil.copy(src, dest)
        c.by_sop[str(pydicom.dcmread(dest, stop_before_pixels=True).SOPInstanceUID)] = dest
    return c


def folder_records(c: Corpus) -> dict[str, IndexRecord]:
    source = FolderSource(c.folder)
    out: dict[str, IndexRecord] = {}
    for h in source.read_headers([e for e in source.entries() if isinstance(e, SourceEntry)]):
        assert isinstance(h, InstanceHeader), h
        record = map_header(h)
        out[record.instance.sop_uid] = record
    return out


def headers_by_sop(results: list[InstanceHeader | SkippedEntry]) -> dict[str, InstanceHeader]:
    skipped = [r for r in results if isinstance(r, SkippedEntry)]
    assert not skipped, skipped
    return {r.entry.locator.split("/")[2]: r for r in results if isinstance(r, InstanceHeader)}


@pytest.fixture
def loaded(orthanc_empty: OrthancServer, corpus: Corpus) -> Iterator[DicomwebSource]:
    assert orthanc_empty.upload(corpus.paths) == len(corpus.by_sop)
    with DicomwebSource(orthanc_empty.dicomweb_url) as source:
        yield source


class RequestLog:
    """Every URL a source asks for, through dicomweb-client (requests) and httpx alike."""

    def __init__(self, source: DicomwebSource) -> None:
        self.urls: list[str] = []
        source._client._session.hooks["response"].append(self._requests_hook)
        source._http.event_hooks["request"].append(
            lambda request: self.urls.append(str(request.url))
        )

    def _requests_hook(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self.urls.append(response.request.url)
        return response


# -- against Orthanc ---------------------------------------------------------------------------


@pytest.mark.orthanc
def test_is_an_archive_source(loaded: DicomwebSource) -> None:
    assert isinstance(loaded, ArchiveSource)
    assert loaded.name == "dicomweb"


@pytest.mark.orthanc
def test_entries_list_exactly_the_uploaded_instances(
    loaded: DicomwebSource, corpus: Corpus
) -> None:
    listed = list(loaded.entries())
    assert all(isinstance(e, SourceEntry) for e in listed), listed
    locators = [e.locator for e in listed if isinstance(e, SourceEntry)]
    assert locators == sorted(locators), "entries come in locator order"
    assert len(set(locators)) == len(locators)
    assert {loc.split("/")[2] for loc in locators} == set(corpus.by_sop)
    assert all(e.fingerprint == "" for e in listed if isinstance(e, SourceEntry))
    for loc in locators:
        ds = pydicom.dcmread(corpus.by_sop[loc.split("/")[2]], stop_before_pixels=True)
        assert loc == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"
    assert list(loaded.entries()) == listed, "the same archive is listed the same way twice"


@pytest.mark.orthanc
@pytest.mark.parametrize("mode", ["auto", "series", "instance"])
def test_index_from_orthanc_equals_index_from_folder(
    loaded: DicomwebSource, corpus: Corpus, mode: str
) -> None:
    loaded.retrieve_mode = mode  # type: ignore[assignment]
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    headers = headers_by_sop(list(loaded.read_headers(entries)))
    expected = folder_records(corpus)
    assert set(headers) == set(expected)
    differ = {
        corpus.by_sop[sop].name: (map_header(h), expected[sop])
        for sop, h in headers.items()
        if map_header(h) != expected[sop]
    }
    assert not differ, "index from DICOMweb (left) != index from folder (right): " + repr(differ)
    for sop, header in headers.items():
        assert header.size_bytes == corpus.by_sop[sop].stat().st_size
        # Like a folder read: no file meta group, no pixel data, nothing after it.
        assert not [e.tag for e in header.dataset if e.tag.group == 2 or e.tag >= 0x7FE00008]
    syntaxes = {h.transfer_syntax_uid for h in headers.values()}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"} <= syntaxes
    assert len(syntaxes) >= 5
    frames = {r.instance.number_of_frames for r in expected.values()}
    assert 3 in frames


@pytest.mark.orthanc
def test_non_ascii_names_survive(loaded: DicomwebSource, corpus: Corpus) -> None:
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    records = [map_header(h) for h in headers_by_sop(list(loaded.read_headers(entries))).values()]
    names = {(r.patient.family_name, r.patient.given_name) for r in records}
    assert ("Müller", "Jürgen") in names
    assert ("Østergård", "Åse") in names


@pytest.mark.orthanc
def test_loose_identifier_matching_does_not_leak(loaded: DicomwebSource, corpus: Corpus) -> None:
    """Orthanc matches PatientID case-insensitively; the index must keep pat200 and PAT200 apart,
    each with its own study only."""
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    records = [map_header(h) for h in headers_by_sop(list(loaded.read_headers(entries))).values()]
    studies_of: dict[str, set[str]] = {}
    for r in records:
        studies_of.setdefault(r.patient.patient_id, set()).add(r.study.study_uid)
    assert studies_of["pat200"] == {corpus.study_of_patient["pat200"]}
    assert studies_of["PAT200"] == {corpus.study_of_patient["PAT200"]}


@pytest.mark.orthanc
def test_paging_lists_everything(loaded: DicomwebSource, corpus: Corpus) -> None:
    log = RequestLog(loaded)
    loaded.page_size = 2
    locators = [e.locator for e in loaded.entries() if isinstance(e, SourceEntry)]
    assert {loc.split("/")[2] for loc in locators} == set(corpus.by_sop)
    assert any("offset=2" in u for u in log.urls), "paging was exercised"
    # Nothing but paging and the fields wanted: no matching key (no PatientID, no wildcard) is
    # ever sent, so Orthanc's loose matching has nothing to match on.
    params = {
        key for u in log.urls for key, _ in parse_qsl(urlsplit(u).query, keep_blank_values=True)
    }
    assert params <= {"limit", "offset", "includefield"}, params


@pytest.mark.orthanc
@pytest.mark.usefixtures("orthanc")  # skips (or fails, in CI) like the others without Orthanc
def test_orthanc_that_cannot_start_reports_its_log() -> None:
    """The fixture's error names the cause: here the HTTP port is taken."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workdir = Path(tempfile.mkdtemp(prefix="ncp-orthanc-", dir="/tmp"))
        server = OrthancServer(workdir, port, port + 1 if port < 65535 else port - 1)
        owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        runas = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups"] if owner else []
        try:
            with pytest.raises(
                OrthancUnavailable, match=r"(?s)exited with status.*Orthanc version"
            ):
                server._launch([*runas, "Orthanc"], owner)
        finally:
            server.stop()
    assert not workdir.exists()


@pytest.mark.orthanc
def test_bulk_data_is_never_fetched(loaded: DicomwebSource) -> None:
    log = RequestLog(loaded)
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    headers = headers_by_sop(list(loaded.read_headers(entries)))
    assert log.urls and not [u for u in log.urls if "/bulk" in u or "/frames" in u]
    # Orthanc gives the private OB value as a BulkDataURI: it is left empty, not followed.
    private = next(h for h in headers.values() if (0x0009, 0x1002) in h.dataset)
    assert private.dataset[0x00091002].value in (None, b"")
    assert private.dataset[0x00091001].value == "private text"


@pytest.mark.orthanc
def test_a_few_instances_of_a_big_series_are_retrieved_one_by_one(
    loaded: DicomwebSource, corpus: Corpus
) -> None:
    log = RequestLog(loaded)
    one = next(
        e
        for e in loaded.entries()
        if isinstance(e, SourceEntry) and e.locator.endswith(uid(1, 1, 2))
    )
    (header,) = loaded.read_headers([one])
    assert isinstance(header, InstanceHeader)
    assert map_header(header) == folder_records(corpus)[uid(1, 1, 2)]
    retrieves = [u for u in log.urls if "/metadata" not in u and "/series/" in u]
    assert retrieves == [
        f"{loaded.url}/studies/{uid(1)}/series/{uid(1, 1)}/instances/{uid(1, 1, 2)}"
    ]


@pytest.mark.orthanc
def test_a_study_read_in_several_batches_fetches_its_metadata_once(
    loaded: DicomwebSource, corpus: Corpus
) -> None:
    log = RequestLog(loaded)
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    study1 = [e for e in entries if e.locator.startswith(uid(1) + "/")]
    assert len(study1) == 4
    expected = folder_records(corpus)
    for batch in (study1[:2], study1[2:]):
        for h in loaded.read_headers(batch):
            assert isinstance(h, InstanceHeader)
            assert map_header(h) == expected[h.entry.locator.split("/")[2]]
    assert len([u for u in log.urls if u.endswith(f"/studies/{uid(1)}/metadata")]) == 1
    # A new listing starts afresh: metadata is never older than the listing.
    list(loaded.entries())
    list(loaded.read_headers(study1[:1]))
    assert len([u for u in log.urls if u.endswith(f"/studies/{uid(1)}/metadata")]) == 2


_forked: DicomwebSource | None = None


def _keep_forked(source: DicomwebSource) -> None:
    global _forked
    _forked = source


def _read_in_child(locator: str) -> tuple[str, int, int]:
    assert _forked is not None
    (result,) = _forked.read_headers([SourceEntry(locator, "")])
    assert isinstance(result, InstanceHeader), result
    return locator, result.size_bytes, os.getpid()


@pytest.mark.orthanc
def test_usable_from_forked_index_workers(loaded: DicomwebSource, corpus: Corpus) -> None:
    """The indexer reads headers in forked worker processes: each opens its own connections
    (the parent's, already open, are left alone and still work afterwards)."""
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]  # parent connects
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        2, mp_context=context, initializer=_keep_forked, initargs=(loaded,)
    ) as pool:
        results = list(pool.map(_read_in_child, [e.locator for e in entries]))
    sizes = {loc.split("/")[2]: size for loc, size, _ in results}
    assert sizes == {sop: p.stat().st_size for sop, p in corpus.by_sop.items()}
    assert os.getpid() not in {pid for _, _, pid in results}
    assert all(isinstance(h, InstanceHeader) for h in loaded.read_headers(entries))


@pytest.mark.orthanc
def test_study_deleted_between_listing_and_reading(
    loaded: DicomwebSource, orthanc_empty: OrthancServer
) -> None:
    entries = [e for e in loaded.entries() if isinstance(e, SourceEntry)]
    orthanc_empty.delete_study(uid(1))
    results = list(loaded.read_headers(entries))
    assert len(results) == len(entries)
    gone = [r for r in results if r.entry.locator.startswith(uid(1) + "/")]
    assert gone and all(isinstance(r, SkippedEntry) for r in gone)
    assert {r.reason for r in gone if isinstance(r, SkippedEntry)} == {
        "study no longer in the archive"
    }
    assert all(isinstance(r, InstanceHeader) for r in results if r not in gone)


@pytest.mark.orthanc
def test_unknown_instances_are_skipped(loaded: DicomwebSource) -> None:
    asked = [
        SourceEntry(f"{uid(1)}/{uid(1, 1)}/{uid(1, 1, 99)}", ""),  # study exists, instance not
        SourceEntry(f"{uid(1)}/{uid(1, 9)}/{uid(1, 1, 1)}", ""),  # instance in another series
        SourceEntry(f"{uid(77)}/{uid(77, 1)}/{uid(77, 1, 1)}", ""),  # no such study
    ]
    results = {r.entry.locator: r for r in loaded.read_headers(asked)}
    assert all(isinstance(r, SkippedEntry) for r in results.values())
    reasons = [results[e.locator].reason for e in asked]  # type: ignore[union-attr]
    assert "not in the archive's metadata" in reasons[0]
    assert f"in series {uid(1, 1)}" in reasons[1]
    assert reasons[2] == "study no longer in the archive"


@pytest.mark.orthanc
def test_empty_archive(orthanc_empty: OrthancServer) -> None:
    with DicomwebSource(orthanc_empty.dicomweb_url) as source:
        assert list(source.entries()) == []
        assert list(source.read_headers([])) == []


# -- archive down ------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_archive_down_raises_archive_error_naming_it() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
    with DicomwebSource(url, timeout_s=2) as source:
        with pytest.raises(ArchiveError) as exc:
            list(source.entries())
        message = str(exc.value)
        assert url in message and "listing studies" in message and "cannot connect" in message
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
        entry = SourceEntry(f"{uid(1)}/{uid(1, 1)}/{uid(1, 1, 1)}", "")
        with pytest.raises(ArchiveError, match=f"{url}: reading the metadata of study"):
            list(source.read_headers([entry]))


def test_credentials_in_the_url_are_refused_without_showing_them() -> None:
    with pytest.raises(ConfigError) as exc:
        DicomwebSource("http://user:s3cret@127.0.0.1:8042/dicom-web")
    assert "s3cret" not in str(exc.value) and "http://127.0.0.1:8042/dicom-web" in str(exc.value)


def test_redirects_are_not_followed(stub: StubArchive) -> None:
    stub.routes["/dicom-web/studies"] = lambda: (302, "text/plain", b"")
    with pytest.raises(ArchiveError, match="redirect"):
        list(DicomwebSource(stub.url).entries())


@pytest.mark.parametrize(
    "url", ["ftp://host/dicom-web", "dicom-web", "http:///x", "http://host/x?token=1", ""]
)
def test_malformed_archive_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        DicomwebSource(url)


# -- a stub archive for answers Orthanc never gives --------------------------------------------

Route = Callable[[], tuple[int, str, bytes]]


class StubArchive:
    """A DICOMweb-ish server on 127.0.0.1 answering from a table of routes (path → answer)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests.append(self.path)
                route = stub.routes.get(self.path.split("?")[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if 300 <= status < 400:
                    self.send_header("Location", "http://elsewhere.invalid/dicom-web/studies")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def json(self, path: str, value: Any, status: int = 200) -> None:
        body = json.dumps(value).encode()
        self.routes[f"/dicom-web{path}"] = lambda: (status, "application/dicom+json", body)

    def raw(self, path: str, status: int, ctype: str, body: bytes) -> None:
        self.routes[f"/dicom-web{path}"] = lambda: (status, ctype, body)

    def multipart(self, path: str, parts: list[bytes]) -> None:
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                b"--"
                + boundary.encode()
                + b"\r\nContent-Type: application/dicom\r\n\r\n"
                + p
                + b"\r\n"
                for p in parts
            )
            + b"--"
            + boundary.encode()
            + b"--\r\n"
        )
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        self.raw(path, 200, ctype, body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubArchive]:
    archive = StubArchive()
    try:
        yield archive
    finally:
        archive.close()


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def meta_item(study: str | None, series: str | None, sop: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00080016": _ui(CTImageStorage),
        "00100020": {"vr": "LO", "Value": ["P1"]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
    }
    for tag, value in (("0020000D", study), ("0020000E", series), ("00080018", sop)):
        if value is not None:
            item[tag] = _ui(value)
    return item


def part10(sop: str, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, sop, "P1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


S, R = "1.2.3", "1.2.3.1"


def test_malformed_metadata_items_become_skipped_entries(stub: StubArchive) -> None:
    good, other_study, in_other = "1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"
    stub.json(
        f"/studies/{S}/metadata",
        [
            meta_item(S, R, good),
            meta_item(S, R, None),  # no SOP Instance UID
            meta_item("9.9", R, other_study),  # for another study than asked
            meta_item(S, R, "1.2.*"),  # not a UID
            "not an object",
            {"00080018": {"vr": "UI", "Value": "1.2.3.1.3"}},  # Value not a list
            meta_item(S, R, in_other) | {"00100010": {"vr": "PN", "Value": 7}},  # bad DICOM JSON
        ],
    )
    stub.multipart(f"/studies/{S}/series/{R}", [part10(good)])
    asked = [
        SourceEntry(f"{S}/{R}/{sop}", "") for sop in (good, other_study, in_other, "1.2.3.1.4")
    ]
    results = {
        r.entry.locator.split("/")[2]: r for r in DicomwebSource(stub.url).read_headers(asked)
    }
    assert len(results) == 4
    header = results[good]
    assert isinstance(header, InstanceHeader)
    assert header.size_bytes == len(part10(good))
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert map_header(header).patient.patient_id == "P1"
    skipped = {sop: r.reason for sop, r in results.items() if isinstance(r, SkippedEntry)}
    assert "Study Instance UID 9.9" in skipped[other_study]
    assert "malformed DICOM JSON" in skipped[in_other]
    assert "not in the archive's metadata" in skipped["1.2.3.1.4"]
    assert "malformed item" in skipped["1.2.3.1.4"]


@pytest.mark.parametrize(
    ("status", "ctype", "body", "expected"),
    [
        (200, "application/dicom+json", b"<html>oops</html>", "not valid DICOM JSON"),
        (200, "application/dicom+json", b'"a string"', "not a JSON array"),
        (200, "application/dicom+json", b'{"a": 1}', "not in the archive's metadata"),
        (500, "text/plain", b"Traceback (most recent call last): secret", "HTTP 500"),
        (403, "text/plain", b"forbidden", "HTTP 403"),
    ],
)
def test_nonsense_metadata_answers(
    stub: StubArchive, status: int, ctype: str, body: bytes, expected: str
) -> None:
    stub.raw(f"/studies/{S}/metadata", status, ctype, body)
    entry = SourceEntry(f"{S}/{R}/1.2.3.1.1", "")
    try:
        results = list(DicomwebSource(stub.url).read_headers([entry]))
    except ArchiveError as exc:
        assert expected in str(exc) and stub.url in str(exc)
        assert "secret" not in str(exc)
        assert exc.__cause__ is None  # no chained traceback of the HTTP library
        assert exc.__context__ is None or exc.__suppress_context__
    else:
        assert len(results) == 1 and isinstance(results[0], SkippedEntry)
        assert expected in results[0].reason


def test_nonsense_retrieve_answers(stub: StubArchive) -> None:
    sops = ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"]
    stub.json(f"/studies/{S}/metadata", [meta_item(S, R, s) for s in sops])
    stub.multipart(
        f"/studies/{S}/series/{R}",
        [
            b"not a DICOM file at all",
            part10(sops[0]),
            part10("7.7.7"),  # an instance nobody asked for
            part10(sops[1]),
            part10(sops[1]),  # twice
        ],
    )
    asked = [SourceEntry(f"{S}/{R}/{s}", "") for s in sops]
    results = {
        r.entry.locator.split("/")[2]: r for r in DicomwebSource(stub.url).read_headers(asked)
    }
    assert isinstance(results[sops[0]], InstanceHeader)
    assert results[sops[1]].reason == "the archive returned this instance twice"  # type: ignore[union-attr]
    assert "not returned" in results[sops[2]].reason  # type: ignore[union-attr]

    stub.raw(f"/studies/{S}/series/{R}", 200, "application/dicom", part10(sops[0]))
    with pytest.raises(ArchiveError, match="not multipart/related"):
        list(DicomwebSource(stub.url).read_headers(asked))
    stub.raw(f"/studies/{S}/series/{R}", 200, "multipart/related; boundary=abc", b"--abc\r\n\r\nxx")
    with pytest.raises(ArchiveError, match="malformed multipart"):
        list(DicomwebSource(stub.url).read_headers(asked))
    stub.raw(f"/studies/{S}/series/{R}", 406, "text/plain", b"")
    with pytest.raises(ArchiveError, match="as stored"):
        list(DicomwebSource(stub.url).read_headers(asked))


def test_a_single_instance_with_a_wrong_part_says_why(stub: StubArchive) -> None:
    sops = [f"1.2.3.1.{i}" for i in range(1, 5)]
    stub.json(f"/studies/{S}/metadata", [meta_item(S, R, s) for s in sops])
    stub.multipart(f"/studies/{S}/series/{R}/instances/{sops[0]}", [b"garbage"])
    results = list(DicomwebSource(stub.url).read_headers([SourceEntry(f"{S}/{R}/{sops[0]}", "")]))
    assert len(results) == 1 and isinstance(results[0], SkippedEntry)
    assert "no readable file meta" in results[0].reason


def test_timeout_raises_archive_error(stub: StubArchive) -> None:
    def slow() -> tuple[int, str, bytes]:
        time.sleep(2)
        return 200, "application/dicom+json", b"[]"

    stub.routes["/dicom-web/studies"] = slow
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=r"listing studies .*timed out after 0.3 s"):
        list(DicomwebSource(stub.url, timeout_s=0.3).entries())
    assert time.monotonic() - started < 1.5


def test_listing_answers_are_checked(stub: StubArchive) -> None:
    stub.json(
        "/studies",
        [
            {"0020000D": _ui(S), "00201208": {"vr": "IS", "Value": [3]}},
            {"0020000D": _ui("1.2.*")},  # wildcard: never used in a URL
            {"0020000D": _ui("../../x")},
            {"00100020": {"vr": "LO", "Value": ["no study uid"]}},
        ],
    )
    # The QIDO-RS listing comes up short of the study's count (a server-side cap): the rest is
    # taken from the study metadata.
    stub.json(
        f"/studies/{S}/instances",
        [meta_item(None, R, "1.2.3.1.1"), meta_item("9.9", R, "1.2.3.1.9"), meta_item(S, R, None)],
    )
    stub.json(
        f"/studies/{S}/metadata", [meta_item(S, R, "1.2.3.1.1"), meta_item(S, R, "1.2.3.1.2")]
    )
    listed = list(DicomwebSource(stub.url).entries())
    good = [e.locator for e in listed if isinstance(e, SourceEntry)]
    assert good == [f"{S}/{R}/1.2.3.1.1", f"{S}/{R}/1.2.3.1.2"]
    reasons = [e.reason for e in listed if isinstance(e, SkippedEntry)]
    assert len(reasons) == 6, reasons
    assert any("names study 9.9" in r for r in reasons)
    assert any("counts 3 instances in this study but lists only 2" in r for r in reasons)
    assert not [p for p in stub.requests if "*" in p or ".." in p or "%" in p]


def test_an_archive_ignoring_offset_is_refused(stub: StubArchive) -> None:
    stub.json("/studies", [{"0020000D": _ui(S)}, {"0020000D": _ui("1.2.4")}])
    source = DicomwebSource(stub.url)
    source.page_size = 2
    with pytest.raises(ArchiveError, match="ignores the QIDO-RS offset"):
        list(source.entries())


@pytest.mark.parametrize(
    "locator",
    [
        "1.2.3*/1.2/1.3",
        "1.2.3/1.2/1.3*",
        "1.2.3/?/1.3",
        "../x",
        "1.2.3/../1.3",
        "1.2.3/1.2/1.3/extra",
        "1.2.3/1.2",
        "1.2.3/1.2/1.3?include=all",
        "1.2.3/1.2/%2e%2e",
        "1.2.3/1.2/" + "1" * 65,
        "",
        "1.2.3/1.2/1.3\n",
        "１.２/1.2/1.3",  # fullwidth digits
    ],
)
def test_refused_locators_never_reach_the_archive(stub: StubArchive, locator: str) -> None:
    with pytest.raises(UnreadableInstance):
        parse_locator(locator)
    results = list(DicomwebSource(stub.url).read_headers([SourceEntry(locator, "")]))
    assert len(results) == 1 and isinstance(results[0], SkippedEntry)
    assert stub.requests == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_locator_accepts_only_three_plain_uids(text: str) -> None:
    try:
        parts = parse_locator(text)
    except UnreadableInstance:
        return
    assert "/".join(parts) == text
    assert all(p and len(p) <= 64 and set(p) <= set("0123456789.") for p in parts)


# -- the streaming multipart reader ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=5),
    chunk=st.integers(min_value=1, max_value=700),
    preamble=st.booleans(),
)
def test_multipart_parts_are_counted_exactly_whatever_the_chunking(
    sizes: list[int], chunk: int, preamble: bool
) -> None:
    boundary = b"b0undary-xyz"
    bodies = [bytes((i * 7 + n) % 256 for n in range(size)) for i, size in enumerate(sizes)]
    # Bodies that contain CRLF and dashes but never the whole delimiter.
    bodies = [b.replace(b"\r\n--b0undary-xyz", b"") + b"\r\n--b0und" for b in bodies]
    body = b"preamble text\r\n" if preamble else b""
    for i, b in enumerate(bodies):
        body += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + b + b"\r\n"
        del i
    body += b"--" + boundary + b"--\r\nepilogue"
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    parts = list(_iter_parts(chunks, boundary))
    assert [p.size for p in parts] == [len(b) for b in bodies]
    assert [p.prefix for p in parts] == [b[: 64 * 1024] for b in bodies]
    assert all(p.content_type == "application/dicom" for p in parts)
