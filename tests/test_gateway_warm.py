"""The folder catalogue is built before the gateway serves (issue 13, item 6): the first search
after a start was answered only once every header of the archive had been read (about 20 s for
the demo's 7,800 instances); now the server accepts requests once the catalogue is built, and a
catalogue a minute old is refreshed behind the requests, not in front of one.

Building it before serving moved the cost into the start (35-54 s for the demo on a loaded
machine: pydicom read and converted every whole header to DICOM JSON). The catalogue now reads
only the attributes QIDO answers with, without pydicom's reader, converting each distinct value
once; a whole header is read when asked for. What pydicom cannot write is said in one line per
instance, not in pydicom's ERROR lines per element.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ncp.config import FolderArchive
from ncp.gateway.catalogue import FolderUpstream
from tests.gateway_support import (
    PATIENT,
    STUDY_1,
    bearer,
    serve_gateway,
    token,
    write_studies,
)
from tests.support.dicom_factory import make_instance, write_instance

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_the_first_search_reads_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_studies(tmp_path / "archive")
    scans: list[float] = []
    real = FolderUpstream._scan

    def counted(self: FolderUpstream) -> None:
        scans.append(time.monotonic())
        real(self)

    monkeypatch.setattr(FolderUpstream, "_scan", counted)
    served = serve_gateway(tmp_path, FolderArchive(path=tmp_path / "archive"), None)
    try:
        assert len(scans) == 1, "built while the server started"
        signed = token(served.base, (STUDY_1,))
        r = httpx.get(f"{served.base}/studies", headers=bearer(signed), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        assert len(scans) == 1, "the first search read nothing"
        catalogue = served.app.state.gateway.archive
        assert isinstance(catalogue, FolderUpstream)
        catalogue._scanned_at -= 120  # a minute old and more: refreshed in the background
        r = httpx.get(f"{served.base}/studies", headers=bearer(signed), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        deadline = time.monotonic() + 5
        while len(scans) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(scans) == 2
    finally:
        served.stop()


def test_the_gateway_is_ready_without_converting_every_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder of 120 instances: before, the start read each with pydicom and converted its
    whole header to DICOM JSON (120 of each); now neither, and few element conversions (each
    distinct value once: 120 instance numbers and the series' and study's values)."""
    archive = tmp_path / "archive"
    write_studies(archive)
    study = "1.2.826.0.1.3680043.10.543.900"
    for n in range(120):
        ds = make_instance(
            patient_id="PAT200",
            study_uid=study,
            series_uid=f"{study}.{n % 3}",
            sop_uid=f"{study}.{n % 3}.{n}",
            InstanceNumber=n,
            IssuerOfPatientID="1.2.40.0.10.1.4.3.1",
        )
        write_instance(archive / "many" / f"{n}.dcm", ds)
    calls = {"dcmread": 0, "whole header": 0, "element": 0}
    real_read, real_whole = pydicom.dcmread, Dataset.to_json_dict
    real_element = DataElement.to_json_dict

    def read(*args: Any, **kwargs: Any) -> Any:
        calls["dcmread"] += 1
        return real_read(*args, **kwargs)

    def whole(self: Dataset, *args: Any, **kwargs: Any) -> Any:
        calls["whole header"] += 1
        return real_whole(self, *args, **kwargs)

    def element(self: DataElement, *args: Any, **kwargs: Any) -> Any:
        calls["element"] += 1
        return real_element(self, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", read)
    monkeypatch.setattr(Dataset, "to_json_dict", whole)
    monkeypatch.setattr(DataElement, "to_json_dict", element)
    served = serve_gateway(tmp_path, FolderArchive(path=archive), None)
    try:
        assert calls["dcmread"] == 0 and calls["whole header"] == 0, calls
        assert calls["element"] < 2 * 120, calls  # 26 QIDO attributes an instance
        signed = token(served.base, (STUDY_1, study), patient=PATIENT)
        r = httpx.get(f"{served.base}/studies", headers=bearer(signed), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 2
        r = httpx.get(f"{served.base}/studies/{study}/instances", headers=bearer(signed))
        assert r.status_code == 200 and len(r.json()) == 120
        assert calls["dcmread"] == 0, "searches answered from the catalogue"
        # Metadata reads the headers it returns, whole (the equality with pydicom's own
        # conversion: tests/test_folder_catalogue.py).
        r = httpx.get(
            f"{served.base}/studies/{study}/series/{study}.1/metadata",
            headers=bearer(signed),
            timeout=30,
        )
        assert r.status_code == 200 and len(r.json()) == 40
        assert {"00280002", "00280004", "00280101"} <= set(r.json()[0])  # not QIDO's
        assert calls["dcmread"] == 40
    finally:
        served.stop()


def test_what_pydicom_cannot_write_is_said_once_per_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # badVR: an IS of "1A", a QIDO attribute (and, as in rtdose, a UID pydicom rejects inside
    # a sequence); rtdose: that UID only, nothing QIDO answers with. One instance, two files.
    upstreams = {}
    for name in ("badVR.dcm", "rtdose.dcm"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(PYDICOM_FILES / name, folder / name)
        upstreams[name] = FolderUpstream(folder)
    caplog.set_level(logging.INFO)

    def said() -> list[str]:
        found = [r for r in caplog.records if "processing tag" in r.getMessage()]
        found += [r for r in caplog.records if "left out" in r.getMessage()]
        assert {(r.name, r.levelname) for r in found} <= {("ncp.gateway.folderjson", "WARNING")}
        caplog.clear()
        return sorted(r.getMessage() for r in found)

    async def run(upstream: FolderUpstream) -> None:
        await upstream.warm()
        lines["scan"] = said()
        (instance,) = upstream._by_locator.values()
        for _ in range(2):  # said once
            assert len(await upstream.metadata(instance.study, None, None)) == 1
        lines["metadata"] = said()

    for name, upstream in upstreams.items():
        lines: dict[str, list[str]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asyncio.run(run(upstream))
        if name == "badVR.dcm":
            (line,) = lines["scan"]
            assert "badVR.dcm" in line and "its QIDO" in line and "(0028,0008)" in line
        else:
            assert lines["scan"] == []  # nothing lost for QIDO: nothing said
        (line,) = lines["metadata"]
        assert name in line and "its metadata" in line and "(300C,0002)" in line
