"""One rule per case of servability, shared by the index, option A (with the node's index) and
the edge (without one) (issue 13, item 3). Each case is a real file where one exists:
pydicom's own test files.

- ``badVR.dcm``: its file meta names another SOP Instance UID than its data set, and its
  Number of Frames is ``1A`` (an IS pydicom's JSON writer rejects; the folder catalogue lost
  the whole header with it, Patient ID included, and the gateway answered 403 "another
  patient" for the right one);
- ``rtplan.dcm``: the same SOP disagreement, Implicit VR;
- an Explicit VR file whose UIDs are encoded UN (option A served it, the edge refused it);
- a file that does not name its UIDs within the gateways' 64 KiB: reported by ``ncp index``.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from ncp.audit.models import Side
from ncp.cli import main
from ncp.config import FolderArchive
from ncp.dicom.folder import FolderSource
from ncp.gateway.studyindex import NodeIndex
from ncp.provider.indexer import IndexRun, index_source
from ncp.security.claims import PatientRef
from ncp.store.db import make_engine, migrate, session_factory
from ncp.store.models import Instance
from tests.gateway_support import (
    AS_STORED,
    ServedGateway,
    bearer,
    multipart_parts,
    serve_gateway,
    token,
)
from tests.support.dicom_factory import make_instance, write_instance

ISSUER = "1.2.40.0.10.1.4.3.1"
SYSTEM = f"urn:oid:{ISSUER}"
UN_STUDY = "1.2.826.0.1.3680043.10.543.700.1"
FAR_STUDY = "1.2.826.0.1.3680043.10.543.701.1"


def _pydicom_file(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found is not None, name
    return Path(str(found))


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def write_un_uids(archive: Path) -> Path:
    """An Explicit VR Little Endian file whose Study, Series and SOP Instance UIDs are UN (as
    a converter that did not know the VR writes them; pydicom itself writes UI, so the bytes
    are changed after writing: UN has a 4-byte length, and nothing at the top level of a data
    set counts the bytes of its elements)."""
    ds = make_instance(
        patient_id="UN1",
        study_uid=UN_STUDY,
        series_uid=f"{UN_STUDY}.1",
        sop_uid=f"{UN_STUDY}.1.1",
        IssuerOfPatientID=ISSUER,
    )
    path = write_instance(archive / "un" / "1.dcm", ds)
    data = path.read_bytes()
    start = 132 + 12 + int.from_bytes(data[140:144], "little")  # after the file meta group
    for tag in (0x00080018, 0x0020000D, 0x0020000E):
        group, element = tag >> 16, tag & 0xFFFF
        header = struct.pack("<HH", group, element) + b"UI"
        at = data.index(header, start)
        (length,) = struct.unpack_from("<H", data, at + 6)
        unknown = struct.pack("<HH", group, element) + b"UN\0\0" + struct.pack("<I", length)
        data = data[:at] + unknown + data[at + 8 :]
    path.write_bytes(data)
    return path


def write_far_uids(archive: Path) -> Path:
    """A file whose data set names its Study Instance UID only after 70 KB of comments."""
    ds = make_instance(
        patient_id="FAR1",
        study_uid=FAR_STUDY,
        series_uid=f"{FAR_STUDY}.1",
        sop_uid=f"{FAR_STUDY}.1.1",
        IssuerOfPatientID=ISSUER,
        PatientComments="x" * 70_000,
    )
    return write_instance(archive / "far" / "1.dcm", ds)


@dataclass
class Case:
    name: str
    path: Path
    patient: str
    study: str
    sop: str
    """The data set's SOP Instance UID."""


@dataclass
class Setup:
    root: Path
    archive: Path
    run: IndexRun
    sessions: Any
    cases: dict[str, Case]
    gateways: dict[str, ServedGateway]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("servable")
    archive = root / "archive"
    archive.mkdir()
    paths = {
        "badVR": shutil.copy(_pydicom_file("badVR.dcm"), archive / "badVR.dcm"),
        "rtplan": shutil.copy(_pydicom_file("rtplan.dcm"), archive / "rtplan.dcm"),
        "un": write_un_uids(archive),
        "far": write_far_uids(archive),
    }
    cases = {}
    for name, path in paths.items():
        ds = _read(Path(path))
        cases[name] = Case(
            name, Path(path), str(ds.PatientID), ds.StudyInstanceUID, ds.SOPInstanceUID
        )
    engine = make_engine(f"sqlite:///{root / 'index.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    run = index_source(sessions, FolderSource(archive), patient_id_issuer=ISSUER)
    folder = FolderArchive(path=archive, patient_id_issuer=ISSUER)
    gateways = {
        "A": serve_gateway(root, folder, None, index=NodeIndex(sessions)),
        "edge": serve_gateway(root, folder, None, path="edge", side=Side.EDGE),
    }
    try:
        yield Setup(root, archive, run, sessions, cases, gateways)
    finally:
        for gateway in gateways.values():
            gateway.stop()
        engine.dispose()


def test_the_real_files_are_the_cases_they_stand_for(setup: Setup) -> None:
    for name in ("badVR", "rtplan"):
        case = setup.cases[name]
        meta = pydicom.dcmread(case.path, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID != case.sop, name


def test_the_index_takes_the_data_sets_sop_and_says_so(setup: Setup) -> None:
    """An instance is its data set's SOP Instance UID (what a DICOMweb archive indexes it
    under too); the file meta's other UID is noted, not refused."""
    with setup.sessions() as session:
        indexed = set(session.scalars(select(Instance.sop_uid)))
    assert {setup.cases[n].sop for n in ("badVR", "rtplan", "un", "far")} <= indexed
    for name in ("badVR", "rtplan"):
        notes = [n for loc, n in setup.run.notes if loc == setup.cases[name].path.name]
        assert any(n.startswith("file meta names SOP Instance UID") for n in notes), notes


@pytest.mark.parametrize("gateway", ["A", "edge"])
@pytest.mark.parametrize("name", ["badVR", "rtplan", "un"])
def test_both_gateways_serve_what_the_index_accepts(setup: Setup, gateway: str, name: str) -> None:
    case = setup.cases[name]
    served = setup.gateways[gateway]
    signed = token(served.base, (case.study,), patient=PatientRef(SYSTEM, case.patient))
    with httpx.Client(timeout=30.0) as client:
        r = client.get(
            f"{served.base}/studies/{case.study}",
            headers={**bearer(signed), "Accept": AS_STORED},
        )
        assert r.status_code == 200, r.text
        parts = multipart_parts(r.headers["content-type"], r.content)
        assert parts == [case.path.read_bytes()]
        meta = client.get(f"{served.base}/studies/{case.study}/metadata", headers=bearer(signed))
        assert meta.status_code == 200, meta.text
        assert meta.json()[0]["00100020"]["Value"] == [case.patient]
    request_id = r.headers["X-Request-ID"]
    (record,) = [
        a for a in served.audit.records() if a.request_id == request_id and a.num_instances
    ]
    assert record.details["instances"] == [case.sop]  # the data set's, as the index has it


def test_an_instance_the_gateways_cannot_serve_is_reported_at_index_time(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    far = setup.cases["far"]
    unservable = dict(setup.run.unservable)
    assert list(unservable) == [far.path.relative_to(setup.archive).as_posix()]
    assert "within its first" in unservable[far.path.relative_to(setup.archive).as_posix()]
    served = setup.gateways["edge"]
    signed = token(served.base, (far.study,), patient=PatientRef(SYSTEM, far.patient))
    r = httpx.get(
        f"{served.base}/studies/{far.study}",
        headers={**bearer(signed), "Accept": AS_STORED},
        timeout=30.0,
    )
    assert r.status_code == 502  # what the index said the gateways would do
    locator = far.path.relative_to(setup.archive).as_posix()
    for form in ("text", "json"):
        config = setup.root / f"node-{form}.toml"
        config.write_text(
            f"""
[node]
country = "AT"

[database]
url = "sqlite:///{setup.root / f"cli-{form}.db"}"

[archive]
kind = "folder"
path = "{setup.archive}"
patient_id_issuer = "{ISSUER}"
""",
            encoding="utf-8",
        )
        args = ["index", "--config", str(config), "--workers", "1"]
        assert main([*args, "--json"] if form == "json" else args) == 0
        out = capsys.readouterr().out
        if form == "json":
            assert json.loads(out)["unservable"] == [
                {"locator": locator, "reason": unservable[locator]}
            ]
        else:
            assert f"not servable by the gateways {locator}:" in out


def test_the_parts_name_themselves_in_every_file_the_index_accepts(setup: Setup) -> None:
    """The rule the gateways check parts by, run over the indexed files, agrees with the
    index's report: every file but the one reported gives its data set's UIDs."""
    from ncp.gateway.servable import part_problem

    reported = {loc for loc, _ in setup.run.unservable}
    with setup.sessions() as session:
        for locator in session.scalars(select(Instance.locator)):
            head = (setup.archive / locator).read_bytes()[: 64 * 1024]
            assert (part_problem(head) is not None) == (locator in reported), locator
