"""The gateway's byte path as deployed (decision 0006): served under ``RelayH11Protocol`` (as
``ncp serve`` and ``ncp edge`` serve it), DICOMweb archives read through the relay's raw
connection, folder files sent by ``sendfile`` (plain TCP) or read and encrypted (TLS), and
option A's instance lists from the node's index.

Also the pieces that make it fast and must stay exact: the file meta parser (against pydicom)
and the multipart reader that hands on views into what it read (bodies full of near-delimiters,
split anywhere).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.models import AuditRecord, Outcome, Side
from ncp.config import DicomwebArchive, FolderArchive, GatewaySection
from ncp.dicom.archive import open_archive
from ncp.dicom.uids import is_uid
from ncp.gateway.errors import StreamBroken
from ncp.gateway.multipart import MultipartReader, MultipartWriter, PartHead
from ncp.gateway.parthead import PartIds, dataset_ids, meta_end
from ncp.gateway.stream import DicomPart, Expected, Tally, dicom_answer, file_meta
from ncp.gateway.studyindex import NodeIndex
from ncp.provider.indexer import index_source
from ncp.store.db import make_engine, migrate, session_factory
from tests.gateway_support import (
    AS_STORED,
    SERIES_1A,
    STUDY_1,
    STUDY_2,
    AuditDb,
    Instance,
    ServedGateway,
    Tls,
    bearer,
    fetch,
    http_client,
    multipart_parts,
    patient_instance,
    serve_gateway,
    token,
    write_studies,
)
from tests.support import node as node_support
from tests.support.dicom_factory import encode, make_instance, with_references, write_instance
from tests.support.orthanc import OrthancServer

# -- file meta: our parser against pydicom's -------------------------------------------------

_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.1.99",
]


def _pydicom_meta(data: bytes) -> tuple[str, str]:
    fp = BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)


def _part10(sop: str, syntax: str, private: bytes, name: str) -> bytes:
    """Preamble, ``DICM`` and a file meta group as pydicom writes them, then some data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    if name:
        meta.ImplementationVersionName = name
    if private:  # an OB element: the long length form
        meta.PrivateInformationCreatorUID = "1.2.3.4"
        meta.PrivateInformation = private
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + b"\x08\x00\x16\x00UI\x02\x001\x00"


@settings(max_examples=100, deadline=None)
@given(
    sop=st.from_regex(r"1\.2\.[1-9][0-9]{0,20}(\.[1-9][0-9]{0,10}){0,6}", fullmatch=True).filter(
        lambda uid: len(uid) <= 64
    ),
    syntax=st.sampled_from(_SYNTAXES),
    private=st.binary(max_size=300),
    name=st.text(alphabet="ABCDEFGHIJ_0123456789", max_size=16),
)
def test_file_meta_reads_what_pydicom_reads(
    sop: str, syntax: str, private: bytes, name: str
) -> None:
    data = _part10(sop, syntax, private, name)
    assert file_meta(data) == _pydicom_meta(data) == (sop, syntax)
    # Too short to hold the group: wait for more, never guess.
    end = 144 + int.from_bytes(data[140:144], "little")
    assert file_meta(data[: end - 1]) is None


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=400), value=st.integers(0, 255))
def test_a_corrupt_file_meta_is_a_broken_stream_or_still_names_valid_uids(
    position: int, value: int
) -> None:
    data = bytearray(
        encode(
            make_instance(
                patient_id="P", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.9"
            )
        )
    )
    data[position % 400] = value
    try:
        found = file_meta(bytes(data))
    except StreamBroken:
        return
    if found is not None:
        sop, syntax = found
        assert all(c.isdigit() or c == "." for c in sop + syntax)


# -- data set head: our reader against pydicom's ------------------------------------------

_DATA_SET_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.90",
]


def _with_references(ds: Any, depth: int, undefined: bool, blob: int) -> Any:
    """``ds`` with UIDs of other studies and series nested in sequences before its own (a
    reader that searched the bytes, or took the first Study Instance UID, would be fooled),
    and a private blob of ``blob`` bytes before them."""
    with_references(ds, depth, undefined=undefined, foreign_ids=True)
    ds.SourceImageSequence = Sequence([])
    if blob:
        ds.add_new(0x00090010, "LO", "NCP TEST")
        ds.add_new(0x00091000, "OB", bytes(blob))
    return ds


@settings(max_examples=120, deadline=None)
@given(
    syntax=st.sampled_from(_DATA_SET_SYNTAXES),
    depth=st.integers(0, 4),
    undefined=st.booleans(),
    blob=st.sampled_from([0, 1, 1000, 40_000]),
    cut=st.integers(0, 100_000),
)
def test_dataset_ids_read_what_pydicom_reads(
    syntax: str, depth: int, undefined: bool, blob: int, cut: int
) -> None:
    ds = make_instance(patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    ds = _with_references(ds, depth, undefined, blob)
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == "1.2.840.10008.1.2.4.90":
        ds.PixelData = encapsulate([b"\xff\xd8 not really j2k \xff\xd9"])
        ds["PixelData"].is_undefined_length = True
    data = encode(ds)
    ours = file_meta(data)
    assert ours is not None
    found = dataset_ids(data, meta_end(data), ours[1])
    read = pydicom.dcmread(BytesIO(data))
    assert found == PartIds(read.StudyInstanceUID, read.SeriesInstanceUID, read.SOPInstanceUID)
    # Any shorter head: asks for more bytes than it has, never answers differently.
    head = data[: cut % len(data)]
    try:
        partial = dataset_ids(head, meta_end(data), ours[1])
    except StreamBroken:  # only a deflated data set, when cut: it may not inflate
        assert syntax == "1.2.840.10008.1.2.1.99"
        return
    assert partial == found or (isinstance(partial, int) and partial > len(head))


def test_a_data_set_that_does_not_name_itself_within_the_bound_is_refused() -> None:
    ds = make_instance(patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    data = encode(_with_references(ds, 1, True, 70_000))
    with pytest.raises(StreamBroken, match="within its first"):
        dataset_ids(data, meta_end(data), "1.2.840.10008.1.2.1")
    with pytest.raises(StreamBroken, match="within its first 1000 bytes"):
        dataset_ids(encode(ds), meta_end(data), "1.2.840.10008.1.2.1", limit=1000)
    # No Series Instance UID at the top level (one inside a sequence does not count).
    del ds.SeriesInstanceUID
    data = encode(ds)
    with pytest.raises(StreamBroken, match="does not name"):
        dataset_ids(data, meta_end(data), "1.2.840.10008.1.2.1")


@settings(max_examples=400, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=2000),
    value=st.integers(0, 255),
    syntax=st.sampled_from(_DATA_SET_SYNTAXES[:3]),
)
def test_a_corrupt_data_set_is_refused_or_still_names_valid_uids(
    position: int, value: int, syntax: str
) -> None:
    ds = make_instance(patient_id="P", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.9")
    ds = _with_references(ds, 2, position % 2 == 0, 0)
    ds.file_meta.TransferSyntaxUID = syntax
    data = bytearray(encode(ds))
    start = meta_end(data)
    data[start + position % (len(data) - start)] = value
    try:
        found = dataset_ids(bytes(data), start, syntax)
    except StreamBroken:
        return
    if isinstance(found, PartIds):
        assert all(is_uid(uid) for uid in (found.study, found.series, found.sop))
    else:
        assert found > len(data)


# -- multipart: views, near-delimiters, any split -------------------------------------------


async def _split(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        yield data[start:cut]
        start = cut
    yield data[start:]


async def _read(data: bytes, cuts: list[int], boundary: bytes) -> list[bytes]:
    reader = MultipartReader(_split(data, cuts), boundary)
    bodies = []
    while await reader.next_part() is not None:
        bodies.append(b"".join([bytes(p) async for p in reader.body()]))
    return bodies


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bodies_full_of_near_delimiters_survive_any_split(data: st.DataObject) -> None:
    writer = MultipartWriter("application/dicom")
    delimiter = b"\r\n--" + writer.boundary.encode()
    fragments = st.one_of(
        st.sampled_from([delimiter[:k] for k in range(1, len(delimiter))]),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"-", b"--", delimiter[1:]]),
        st.binary(max_size=40),
    )
    bodies = data.draw(
        st.lists(st.lists(fragments, max_size=8).map(b"".join), min_size=1, max_size=4)
    )
    assume(all(delimiter not in body for body in bodies))
    framed = (
        b"".join(writer.open_part(PartHead("application/dicom")) + body for body in bodies)
        + writer.close()
    )
    cuts = data.draw(st.lists(st.integers(0, len(framed)), max_size=40))
    assert asyncio.run(_read(framed, cuts, writer.boundary.encode())) == bodies


# -- the gateways as deployed ----------------------------------------------------------------


@dataclass
class Deployed:
    tls: Tls
    instances: list[Instance]
    bases: dict[str, str]
    audits: dict[str, AuditDb]
    orthanc: OrthancServer
    archive_root: Path

    def http(self, name: str) -> httpx.Client:
        return http_client(self.tls if self.bases[name].startswith("https:") else None)

    def retrieve(self, name: str, path: str, studies: tuple[str, ...]) -> httpx.Response:
        base = self.bases[name]
        headers = {**bearer(token(base, studies)), "Accept": AS_STORED}
        with self.http(name) as http:
            return http.get(f"{base}{path}", headers=headers)


GATEWAYS = {
    # name: (archive, TLS, uses the node index)
    "A": ("orthanc", True, True),
    "A_plain": ("orthanc", False, True),
    "C": ("orthanc", True, False),
    "folder": ("folder", True, True),
    "folder_plain": ("folder", False, True),
}


@pytest.fixture(scope="module")
def deployed(
    orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    root = tmp_path_factory.mktemp("bytepath")
    orthanc.clear()
    instances = write_studies(root / "archive")
    orthanc.upload(i.path for i in instances)
    engine, sessions = _indexed(root / "archive", root / "index.db")
    tls = Tls(root / "pki")
    limits = GatewaySection(max_transfers=4, chunk_bytes=64 * 1024)
    served: dict[str, ServedGateway] = {}
    try:
        for name, (kind, secure, indexed) in GATEWAYS.items():
            archive: Any = (
                FolderArchive(path=root / "archive")
                if kind == "folder"
                else DicomwebArchive(kind="dicomweb", url=orthanc.dicomweb_url)
            )
            served[name] = serve_gateway(
                root,
                archive,
                tls if secure else None,
                side=Side.EDGE if name == "C" else Side.GATEWAY,
                limits=limits,
                index=NodeIndex(sessions) if indexed else None,
            )
        bases = {name: g.base for name, g in served.items()}
        audits = {name: g.audit for name, g in served.items()}
        yield Deployed(tls, instances, bases, audits, orthanc, root / "archive")
    finally:
        for g in served.values():
            g.stop()
        engine.dispose()


def _indexed(archive: Path, database: Path) -> tuple[Engine, sessionmaker[Session]]:
    """A node index database at ``database``, filled by ``ncp index`` from the folder
    ``archive``."""
    engine = make_engine(f"sqlite:///{database}")
    migrate(engine)
    sessions = session_factory(engine)
    index_source(sessions, open_archive(FolderArchive(kind="folder", path=archive)))
    return engine, sessions


def _parts(response: httpx.Response) -> list[bytes]:
    return multipart_parts(response.headers["content-type"], response.content)


@pytest.mark.orthanc
@pytest.mark.parametrize("name", list(GATEWAYS))
def test_a_study_arrives_whole_and_exact_through_each_gateway(
    deployed: Deployed, name: str
) -> None:
    r = deployed.retrieve(name, f"/studies/{STUDY_1}", (STUDY_1,))
    assert r.status_code == 200, r.text
    parts = _parts(r)
    expected = {i.sop: i.path.read_bytes() for i in deployed.instances if i.study == STUDY_1}
    got = {pydicom.dcmread(BytesIO(p)).SOPInstanceUID: p for p in parts}
    assert set(got) == set(expected) and len(parts) == len(expected)
    for sop, data in got.items():
        if GATEWAYS[name][0] == "folder":
            assert data == expected[sop]  # the stored file, byte for byte
        else:
            ours = pydicom.dcmread(BytesIO(expected[sop]))
            assert pydicom.dcmread(BytesIO(data)).PixelData == ours.PixelData
    record = deployed.audits[name].records()[-1]
    assert record.outcome == Outcome.SUCCESS
    assert sorted(record.details["instances"]) == sorted(expected)
    assert record.details["listed_by"] == ("index" if GATEWAYS[name][2] else "archive")
    assert record.size_bytes == len(r.content)


@pytest.mark.orthanc
@pytest.mark.parametrize("name", ["A", "folder_plain", "C"])
def test_series_and_instances_are_mapped_through_the_index_or_archive(
    deployed: Deployed, name: str
) -> None:
    sops = sorted(i.sop for i in deployed.instances if i.series == SERIES_1A)
    r = deployed.retrieve(name, f"/studies/{STUDY_1}/series/{SERIES_1A}", (STUDY_1,))
    assert r.status_code == 200
    assert sorted(pydicom.dcmread(BytesIO(p)).SOPInstanceUID for p in _parts(r)) == sops
    one = f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{sops[0]}"
    assert len(_parts(deployed.retrieve(name, one, (STUDY_1,)))) == 1
    # An instance of another study, asked for below this one: not found, nothing sent.
    other = next(i for i in deployed.instances if i.study == STUDY_2)
    wrong = f"/studies/{STUDY_1}/series/{SERIES_1A}/instances/{other.sop}"
    assert deployed.retrieve(name, wrong, (STUDY_1,)).status_code == 404


@pytest.mark.orthanc
def test_a_stale_index_breaks_one_transfer_then_the_archive_lists_the_study(
    deployed: Deployed,
) -> None:
    # An instance the archive got after the last `ncp index`: the index does not name it.
    late = patient_instance(STUDY_2, f"{STUDY_2}.9", f"{STUDY_2}.9.1")
    path = write_instance(deployed.archive_root.parent / "late" / "late.dcm", late)
    try:
        deployed.orthanc.upload([path])
        base = deployed.bases["A"]
        headers = {**bearer(token(base, (STUDY_2,))), "Accept": AS_STORED}
        received = bytearray()
        with (
            deployed.tls.client() as http,
            http.stream("GET", f"{base}/studies/{STUDY_2}", headers=headers) as r,
        ):
            # 502 when the new instance comes first; else a broken body, never a clean,
            # shorter study.
            if r.status_code == 200:
                with pytest.raises(httpx.HTTPError):
                    for chunk in r.iter_raw():
                        received.extend(chunk)
                assert not received.rstrip().endswith(b"--")
            else:
                assert r.status_code == 502
        # The study is listed by the archive now: the retrieve is whole, with the new instance.
        again = deployed.retrieve("A", f"/studies/{STUDY_2}", (STUDY_2,))
        assert again.status_code == 200
        sops = {pydicom.dcmread(BytesIO(p)).SOPInstanceUID for p in _parts(again)}
        assert f"{STUDY_2}.9.1" in sops
        assert deployed.audits["A"].records()[-1].details["listed_by"] == "archive"
    finally:
        deployed.orthanc.delete_study(STUDY_2)
        deployed.orthanc.upload(i.path for i in deployed.instances if i.study == STUDY_2)
        shutil.rmtree(path.parent, ignore_errors=True)


# -- a failing archive still breaks the client's transfer, under the relay's protocol ------


@pytest.mark.parametrize("secure", [True, False])
def test_an_archive_failing_mid_stream_breaks_the_transfer_under_the_relay(
    tmp_path: Path, secure: bool
) -> None:
    from tests.test_gateway_streaming import STUDY, Script, serve_scripted

    script = Script(behaviour={"2": "truncate", "3": "foreign", "4": "short"})
    archive, archive_url = serve_scripted(script)
    tls = Tls(tmp_path / "pki")
    served = serve_gateway(
        tmp_path,
        DicomwebArchive(kind="dicomweb", url=archive_url),
        tls if secure else None,
        limits=GatewaySection(archive_timeout_s=5.0),
    )
    base, audit = served.base, served.audit
    try:
        for number in (1, 2, 3, 4):
            study = f"{STUDY}.{number}"
            headers = {**bearer(token(base, (study,))), "Accept": AS_STORED}
            with http_client(tls if secure else None) as http:
                status, _, received, error = fetch(http, f"{base}/studies/{study}", headers)
            if number == 1:
                assert error is None and received.rstrip().endswith(b"--")
            else:
                # The first part went out; then the answer broke: no close delimiter, no end.
                assert status == 200 and error is not None, number
                assert not received.rstrip().endswith(b"--")
        # A failed transfer's record is written after the client saw the failure: wait for it.
        deadline = time.monotonic() + 10

        def ends() -> list[Any]:
            return [r for r in audit.records() if r.action == "image-retrieve"]

        while len(ends()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        outcomes = [rec.outcome for rec in ends()]
        assert outcomes == [Outcome.SUCCESS] + [Outcome.SERIOUS_FAILURE] * 3
        # Each transfer's begin was recorded before its first byte.
        begins = [r for r in audit.records() if r.action == "image-transfer-begin"]
        assert len(begins) == 4
    finally:
        served.stop()
        archive.stop()


def test_the_node_index_lists_a_study_and_says_when_it_does_not_hold_one(
    tmp_path: Path,
) -> None:
    instances = write_studies(tmp_path / "archive")
    engine, sessions = _indexed(tmp_path / "archive", tmp_path / "index.db")
    index = NodeIndex(sessions)
    found = asyncio.run(index.instances(STUDY_1))
    assert found == {i.sop: i.series for i in instances if i.study == STUDY_1}
    assert asyncio.run(index.instances("1.2.3.999")) is None
    engine.dispose()


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=25))
def test_parts_split_anywhere_are_checked_and_passed_on_unchanged(cuts: list[int]) -> None:
    files = [_part10(f"1.2.3.{n}", "1.2.840.10008.1.2.1", b"\x07" * 50, "NCP") for n in (1, 2)]

    async def run() -> tuple[bytes, Tally]:
        async def parts() -> AsyncIterator[DicomPart]:
            for data in files:
                yield DicomPart(_split(data, cuts))

        writer = MultipartWriter("application/dicom")
        tally = Tally()
        listed = Expected("1.2.3", listed=frozenset({"1.2.3.1", "1.2.3.2"}))
        out = [
            bytes(c)  # type: ignore[arg-type]
            async for c in dicom_answer(parts(), listed, writer, tally)
        ]
        return b"".join(out), tally

    body, tally = asyncio.run(run())
    assert tally.sops == ["1.2.3.1", "1.2.3.2"]
    assert tally.dicom_bytes == sum(map(len, files))
    assert all(data in body for data in files)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=42_000), max_size=25))
def test_parts_split_anywhere_are_named_by_their_data_sets(cuts: list[int]) -> None:
    """Without a list: each part's data set names it, wherever the archive's reads cut its
    head (here a head of 40 kB, a private blob before the Study Instance UID)."""
    files = []
    for n, blob in ((1, 40_000), (2, 0), (3, 1)):
        ds = make_instance(
            patient_id="P", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=f"1.2.3.4.{n}"
        )
        files.append(encode(_with_references(ds, 1, n == 2, blob)))

    async def run() -> tuple[bytes, Tally]:
        async def parts() -> AsyncIterator[DicomPart]:
            for data in files:
                yield DicomPart(_split(data, cuts))

        tally = Tally()
        expected = Expected("1.2.3", "1.2.3.4", counts={"1.2.3.4": 3})
        writer = MultipartWriter("application/dicom")
        out = [bytes(c) async for c in dicom_answer(parts(), expected, writer, tally)]  # type: ignore[arg-type]
        return b"".join(out), tally

    body, tally = asyncio.run(run())
    assert tally.sops == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]
    assert all(data in body for data in files)
    assert body.endswith(b"--\r\n")


# -- `ncp serve`: the imaging listener as serve.py wires it ---------------------------------

node_a = node_support.node_a  # a real node A on loopback, its imaging server from serve.py


def test_ncp_serve_streams_a_study_listed_by_its_index(node_a: node_support.RunningNode) -> None:
    assert node_a.imaging_url is not None
    studies = node_support.studies_of("PAT100")[:1]
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "study", "valueString": studies[0]},
            {"name": "option", "valueCode": "A"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    with node_a.client() as http:
        headers = node_a.b.headers("PAT100")
        answer = http.post("/fhir/$imaging-access", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    values = {
        p["name"]: next(v for k, v in p.items() if k.startswith("value"))
        for p in answer.json()["parameter"]
    }
    context = ssl.create_default_context(cafile=node_a.ca_file)
    with httpx.Client(verify=context, timeout=30.0) as client:
        r = client.get(
            f"{node_a.imaging_url}/studies/{studies[0]}",
            headers={**bearer(values["token"]), "Accept": AS_STORED},
        )
    assert r.status_code == 200, r.text
    parts = _parts(r)
    assert parts and all(pydicom.dcmread(BytesIO(p)).StudyInstanceUID == studies[0] for p in parts)
    with node_a.node.sessions() as session:
        record = session.scalars(
            select(AuditRecord)
            .where(AuditRecord.request_id == r.headers["X-Request-ID"])
            .where(AuditRecord.action == "image-retrieve")
        ).one()
    assert record.details["listed_by"] == "index"
    assert record.num_instances == len(parts)
