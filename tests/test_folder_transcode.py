"""A folder archive transcodes when the retrieve asks for another syntax (issue 13, item 4).

DICOMweb's default for ``application/dicom`` is Explicit VR Little Endian and dicomweb-client
asks for it: a compressed study in the folder archive answered 406. Now each instance not
stored in an accepted syntax is decoded (pylibjpeg's plugins) and written uncompressed, one at
a time as the answer goes out, each part saying its syntax; a retrieve that accepts the stored
syntax keeps the zero-copy path. Real compressed files: pydicom's own test files.
"""

from __future__ import annotations

import asyncio
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from ncp.config import FolderArchive
from ncp.dicom import transcode as transcoder
from ncp.dicom.folder import FolderSource
from ncp.gateway import catalogue
from ncp.gateway.catalogue import FolderUpstream
from ncp.provider.indexer import index_source
from ncp.security.claims import PatientRef
from ncp.store.db import make_engine, migrate, session_factory
from tests.gateway_support import (
    AS_STORED,
    ServedGateway,
    bearer,
    boundary_of,
    serve_gateway,
    token,
)
from tests.support.dicom_factory import make_instance

ISSUER = "1.2.40.0.10.1.4.3.1"
SYSTEM = f"urn:oid:{ISSUER}"
DEFAULT = 'multipart/related; type="application/dicom"'
COMPRESSED = ("MR_small_jp2klossless.dcm", "examples_jpeg2k.dcm", "SC_rgb_rle_2frame.dcm")
BIG_ENDIAN_STUDY = "1.2.826.0.1.3680043.10.543.800.1"


def _read(data: bytes | Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(BytesIO(data) if isinstance(data, bytes) else data)


@dataclass
class Study:
    path: Path
    patient: str
    uid: str
    sop: str
    syntax: str


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Study]]:
    root = tmp_path_factory.mktemp("transcode") / "archive"
    root.mkdir()
    studies = {}
    for name in COMPRESSED:
        found = get_testdata_file(name, download=False)
        assert found is not None
        path = Path(shutil.copy(str(found), root / name))
        ds = _read(path)
        studies[name] = Study(
            path,
            str(ds.PatientID),
            ds.StudyInstanceUID,
            ds.SOPInstanceUID,
            str(ds.file_meta.TransferSyntaxUID),
        )
    big = make_instance(
        patient_id="BE1",
        study_uid=BIG_ENDIAN_STUDY,
        series_uid=f"{BIG_ENDIAN_STUDY}.1",
        sop_uid=f"{BIG_ENDIAN_STUDY}.1.1",
    )
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = root / "big-endian.dcm"
    big.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
    studies["big"] = Study(path, "BE1", BIG_ENDIAN_STUDY, big.SOPInstanceUID, ExplicitVRBigEndian)
    return root, studies


@pytest.fixture(scope="module")
def gateway(archive: tuple[Path, dict[str, Study]]) -> Iterator[ServedGateway]:
    root, _ = archive
    served = serve_gateway(root.parent, FolderArchive(path=root, patient_id_issuer=ISSUER), None)
    try:
        yield served
    finally:
        served.stop()


def _get(gateway: ServedGateway, study: Study, accept: str) -> httpx.Response:
    signed = token(gateway.base, (study.uid,), patient=PatientRef(SYSTEM, study.patient))
    return httpx.get(
        f"{gateway.base}/studies/{study.uid}",
        headers={**bearer(signed), "Accept": accept},
        timeout=60.0,
    )


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of a complete multipart answer."""
    dash = b"--" + boundary_of(response.headers["content-type"]).encode()
    body = response.content
    assert body.rstrip().endswith(dash + b"--")
    out = []
    for piece in body.split(dash)[1:-1]:
        head, _, payload = piece.partition(b"\r\n\r\n")
        ctype = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type:")
        )
        out.append((ctype, payload.removesuffix(b"\r\n")))
    return out


@pytest.mark.parametrize("name", COMPRESSED)
def test_the_default_representation_is_transcoded(
    gateway: ServedGateway, archive: tuple[Path, dict[str, Study]], name: str
) -> None:
    study = archive[1][name]
    r = _get(gateway, study, DEFAULT)
    assert r.status_code == 200, r.text
    ((ctype, data),) = _parts(r)
    assert ctype == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    sent, stored = _read(data), _read(study.path)
    assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sent.SOPInstanceUID == study.sop and sent.PatientID == study.patient
    assert np.array_equal(sent.pixel_array, stored.pixel_array)
    record = [a for a in gateway.audit.records() if a.action == "image-retrieve"][-1]
    assert record.details["transfer_syntax"] == ExplicitVRLittleEndian
    assert record.details["instances"] == [study.sop]


@pytest.mark.parametrize("name", COMPRESSED)
def test_the_stored_syntax_keeps_the_stored_bytes(
    gateway: ServedGateway, archive: tuple[Path, dict[str, Study]], name: str
) -> None:
    study = archive[1][name]
    for accept in (AS_STORED, f"{DEFAULT}; transfer-syntax={study.syntax}"):
        r = _get(gateway, study, accept)
        assert r.status_code == 200, r.text
        assert _parts(r) == [
            (f"application/dicom; transfer-syntax={study.syntax}", study.path.read_bytes())
        ]


def test_a_syntax_this_node_cannot_produce_is_refused_before_anything_is_sent(
    gateway: ServedGateway, archive: tuple[Path, dict[str, Study]]
) -> None:
    study = archive[1]["MR_small_jp2klossless.dcm"]
    jpeg_ls = f"{DEFAULT}; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert _get(gateway, study, jpeg_ls).status_code == 406
    big = archive[1]["big"]
    r = _get(gateway, big, DEFAULT)
    assert r.status_code == 406
    assert "Explicit VR Big Endian" in r.text
    assert _get(gateway, big, AS_STORED).status_code == 200


def test_the_index_reports_what_is_served_as_stored_only(
    archive: tuple[Path, dict[str, Study]], tmp_path: Path
) -> None:
    root = archive[0]
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    migrate(engine)
    run = index_source(session_factory(engine), FolderSource(root), patient_id_issuer=ISSUER)
    engine.dispose()
    reported = dict(run.unservable)
    assert list(reported) == ["big-endian.dcm"]
    assert "Explicit VR Big Endian" in reported["big-endian.dcm"]
    assert "as stored" in reported["big-endian.dcm"]


def test_instances_are_transcoded_one_at_a_time_as_the_answer_goes(
    archive: tuple[Path, dict[str, Study]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Never the whole study in memory: the next instance is decoded only once the previous
    one was taken."""
    compressed = archive[1]["examples_jpeg2k.dcm"]
    folder = tmp_path / "three"
    for n in range(3):
        ds = _read(compressed.path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{compressed.sop}.{n}"
        ds.save_as(folder / f"{n}.dcm" if folder.exists() else _mkdir(folder) / f"{n}.dcm")
    calls: list[str] = []
    real = transcoder.transcode

    def counted(path: Path, target: str) -> bytes:
        calls.append(path.name)
        return real(path, target)

    monkeypatch.setattr(catalogue, "transcode", counted)

    async def run() -> list[int]:
        upstream = FolderUpstream(folder)
        parts = await upstream.retrieve(compressed.uid, None, None, ExplicitVRLittleEndian)
        seen = []
        async for part in parts:
            seen.append(len(calls))
            async for _ in part.body:
                pass
        return seen

    # When part n comes, only the n before it were decoded (each decoded as its body is read).
    assert asyncio.run(run()) == [0, 1, 2]
    assert len(calls) == 3


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
