"""B's retriever piece by piece: the synchronous multipart reader (agreeing with the gateway's),
instance headers and verification against a manifest, the folder store, reconciliation."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from ncp.consumer.localstore import FolderStore, InstanceKey, Verified
from ncp.consumer.manifests import manifest_from_json, manifest_to_json
from ncp.consumer.model import ManifestInstance, ManifestSeries, StudyManifest
from ncp.consumer.multipart import ChunkSource, MultipartError, PartReader
from ncp.consumer.reconcile import LocalIdentity, reconcile
from ncp.consumer.verify import StudyCheck, Unreadable, read_header
from ncp.gateway.multipart import MultipartReader, MultipartWriter, PartHead
from ncp.security.claims import PatientRef
from tests.support.dicom_factory import encode, make_instance, with_references

STUDY = "1.2.826.0.1.3680043.10.1.1"
SERIES = f"{STUDY}.1"
PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT-1")
CT = "1.2.840.10008.5.1.4.1.1.2"

# -- multipart ----------------------------------------------------------------------------------


def _frame(parts: list[bytes]) -> tuple[bytes, bytes]:
    writer = MultipartWriter("application/dicom")
    body = b"".join(writer.open_part(PartHead("application/dicom")) + p for p in parts)
    return body + writer.close(), writer.boundary.encode()


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    out, start = [], 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        out.append(data[start:cut])
        start = cut
    out.append(data[start:])
    return out


def _sync(chunks: list[bytes], boundary: bytes, buffer_bytes: int = 0) -> list[bytes] | str:
    # buffer_bytes=0: the smallest buffer the reader takes, so that bodies cross its refills.
    reader = PartReader(ChunkSource(chunks), boundary, buffer_bytes=buffer_bytes)
    try:
        out = []
        while reader.next_part() is not None:
            out.append(b"".join(bytes(p) for p in reader.body()))
        return out
    except MultipartError as exc:
        return f"error: {type(exc).__name__}"


def _async(chunks: list[bytes], boundary: bytes) -> list[bytes] | str:
    async def source() -> AsyncIterator[bytes]:
        for c in chunks:
            yield c

    async def run() -> list[bytes]:
        reader = MultipartReader(source(), boundary)
        out = []
        while await reader.next_part() is not None:
            out.append(b"".join([bytes(p) async for p in reader.body()]))
        return out

    try:
        return asyncio.run(run())
    except MultipartError as exc:
        return f"error: {type(exc).__name__}"


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=300), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    truncate=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
)
def test_the_part_reader_reads_what_the_writer_framed_like_the_gateways_reader(
    parts: list[bytes], cuts: list[int], truncate: int | None
) -> None:
    body, boundary = _frame(parts)
    if truncate is not None:
        body = body[:truncate]
    chunks = _cut(body, cuts)
    got = _sync(chunks, boundary)
    assert got == _async(chunks, boundary)
    if truncate is None:
        assert got == parts


def test_a_body_cut_inside_a_part_is_an_error() -> None:
    body, boundary = _frame([b"x" * 5000])
    reader = PartReader(ChunkSource(_cut(body[:3000], [1000, 2000])), boundary)
    assert reader.next_part() is not None
    with pytest.raises(MultipartError):
        list(reader.body())


# -- headers and verification --------------------------------------------------------------------


def _bytes(**changes: object) -> bytes:
    sop = str(changes.pop("sop", f"{SERIES}.1"))
    attrs: dict[str, object] = {"IssuerOfPatientID": "1.2.40.0.10.1.4.3.1", **changes}
    ds = make_instance(patient_id="PAT-1", study_uid=STUDY, series_uid=SERIES, sop_uid=sop, **attrs)
    return encode(ds)


def _manifest(*sops: str, size: int | None = None, sop_class: str = CT) -> StudyManifest:
    instances = tuple(ManifestInstance(s, sop_class, size=size) for s in sops)
    return StudyManifest(STUDY, PATIENT, (ManifestSeries(SERIES, "CT", instances),))


def test_a_header_is_read_from_the_first_bytes_in_each_syntax() -> None:
    for syntax in (None, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = make_instance(
            patient_id="PAT-1",
            study_uid=STUDY,
            series_uid=SERIES,
            sop_uid=f"{SERIES}.1",
            IssuerOfPatientID="1.2.40.0.10.1.4.3.1",
        )
        if syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        data = encode(with_references(ds, 2, foreign_ids=True))
        header = read_header(data, whole=True)
        assert not isinstance(header, int)
        assert (header.sop_uid, header.study_uid, header.series_uid) == (
            f"{SERIES}.1",
            STUDY,
            SERIES,
        )
        assert (header.patient_id, header.patient_issuer, header.sop_class_uid) == (
            "PAT-1",
            "1.2.40.0.10.1.4.3.1",
            CT,
        )
        # Given too few bytes, it asks for more rather than guess.
        short = read_header(data[:200], whole=False)
        assert isinstance(short, int) and short > 200


@pytest.mark.parametrize(
    "data",
    [b"", b"not dicom at all" * 20, b"\x00" * 128 + b"DICM" + b"\x02\x00" * 20],
    ids=["empty", "text", "broken-meta"],
)
def test_what_is_not_dicom_is_unreadable(data: bytes) -> None:
    with pytest.raises(Unreadable):
        read_header(data, whole=True)


def test_verification_names_each_kind_of_problem() -> None:
    check = StudyCheck(_manifest(f"{SERIES}.1", f"{SERIES}.2", f"{SERIES}.3"))

    def header(**changes: object):  # type: ignore[no-untyped-def]
        found = read_header(_bytes(**changes), whole=True)
        assert not isinstance(found, int)
        return found

    assert check.check(header()) is None
    again = check.check(header())
    assert again is not None and (again.kind, again.detail) == ("extra", "sent more than once")
    extra = check.check(header(sop=f"{SERIES}.9"))
    assert extra is not None and extra.kind == "extra" and extra.sop_uid == f"{SERIES}.9"
    other_patient = check.check(header(sop=f"{SERIES}.2", PatientID="PAT-2"))
    assert other_patient is not None and other_patient.kind == "different"
    assert "PAT-2" not in other_patient.detail  # patient data stays out of reasons
    issuer = check.check(header(sop=f"{SERIES}.2", IssuerOfPatientID="9.9"))
    assert issuer is not None and "Issuer" in issuer.detail
    sop_class = check.check(header(sop=f"{SERIES}.2", SOPClassUID=MRImageStorage))
    assert sop_class is not None and "SOP class" in sop_class.detail
    series = check.check(header(sop=f"{SERIES}.2", SeriesInstanceUID=f"{SERIES}.7"))
    assert series is not None and "series" in series.detail
    assert check.check(header(sop=f"{SERIES}.2", IssuerOfPatientID=None)) is None
    missing = check.missing({f"{SERIES}.1", f"{SERIES}.2"})
    assert [(p.kind, p.sop_uid) for p in missing] == [("missing", f"{SERIES}.3")]


def test_file_meta_and_data_set_must_name_the_same_instance() -> None:
    data = _bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    # pydicom mends the file meta on writing: change the bytes it wrote (same length).
    at = data.index(f"{SERIES}.1".encode(), 0, meta_end)
    data = data[:at] + f"{SERIES}.2".encode() + data[at + len(SERIES) + 2 :]
    header = read_header(data, whole=True)
    assert not isinstance(header, int)
    problem = StudyCheck(_manifest(f"{SERIES}.1", f"{SERIES}.2")).check(header)
    assert problem is not None and problem.kind == "different" and "file meta" in problem.detail


def test_a_size_other_than_the_manifests_is_different() -> None:
    data = _bytes()
    check = StudyCheck(_manifest(f"{SERIES}.1", size=len(data) + 1))
    header = read_header(data, whole=True)
    assert not isinstance(header, int) and check.check(header) is None
    problem = check.check_size(f"{SERIES}.1", len(data))
    assert problem is not None and problem.kind == "different" and "bytes" in problem.detail


def test_a_manifest_survives_its_json_form() -> None:
    manifest = _manifest(f"{SERIES}.1", f"{SERIES}.2", size=10)
    assert manifest_from_json(manifest_to_json(manifest)) == manifest


# -- folder store -------------------------------------------------------------------------------


def _staged(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def test_the_folder_store_renames_verified_files_into_place(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "store")
    staging = tmp_path / "store" / ".incoming" / "job"
    key = InstanceKey(STUDY, SERIES, f"{SERIES}.1")
    store.put([Verified(_staged(staging, "a.part", b"one"), key, 3)])
    assert store.path_of(key).read_bytes() == b"one"
    assert store.existing(STUDY) == {f"{SERIES}.1"}
    assert not list(staging.iterdir())
    # The same instance again replaces the file: still one.
    store.put([Verified(_staged(staging, "b.part", b"one"), key, 3)])
    assert list(store.files(STUDY)) == [store.path_of(key)]
    assert store.remove_study(STUDY) == 1
    assert store.existing(STUDY) == set() and not (tmp_path / "store" / STUDY).exists()


def test_the_folder_store_flushes_each_new_folder_entry_before_it_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ncp.consumer.localstore as localstore

    flushed: list[Path] = []
    real = localstore._fsync_dir
    monkeypatch.setattr(localstore, "_fsync_dir", lambda p: (flushed.append(p), real(p)))
    root = tmp_path / "store"
    staging = root / ".incoming" / "job"
    series = root / STUDY / SERIES

    def put(store: FolderStore, n: int) -> set[Path]:
        flushed.clear()
        key = InstanceKey(STUDY, SERIES, f"{SERIES}.{n}")
        store.put([Verified(_staged(staging, f"{n}.part", b"x"), key, 1)])
        assert store.path_of(key).read_bytes() == b"x"
        return set(flushed)

    store = FolderStore(root)
    # New folders: the series folder (its new file) and each folder that gained an entry.
    assert put(store, 1) == {series, root / STUDY, root}
    # Later batches: the series folder's new entries only.
    assert put(store, 2) == {series}
    # A purged study pulled again: its new folders' entries are flushed again.
    store.remove_study(STUDY)
    assert put(store, 3) == {series, root / STUDY, root}
    # A store opened again (another process, after a crash) flushes them once more.
    assert put(FolderStore(root), 4) == {series, root / STUDY, root}


def test_uids_are_the_only_names_a_store_accepts() -> None:
    with pytest.raises(ValueError):
        InstanceKey("../../etc", SERIES, "1.2")
    with pytest.raises(ValueError):
        InstanceKey(STUDY, SERIES, "1..2")


def test_a_failing_disk_consumes_the_staging_files(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / STUDY).write_text("a file where a folder must go")
    staged = _staged(tmp_path / "staging", "a.part", b"x")
    from ncp.consumer.localstore import StoreError

    with pytest.raises(StoreError):
        store.put([Verified(staged, InstanceKey(STUDY, SERIES, f"{SERIES}.1"), 1)])
    assert not staged.exists()


# -- reconciliation -----------------------------------------------------------------------------


def test_reconciliation_writes_bs_identifier_and_keeps_as_in_other_ids(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(_bytes())
    before = pydicom.dcmread(path)
    reconcile(path, PATIENT, LocalIdentity("BE-123", "2.16.56.1.1.1"))
    after = pydicom.dcmread(path)
    assert (after.PatientID, after.IssuerOfPatientID) == ("BE-123", "2.16.56.1.1.1")
    [other] = after.OtherPatientIDsSequence
    assert (other.PatientID, other.IssuerOfPatientID) == ("PAT-1", "1.2.40.0.10.1.4.3.1")
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert after[uid].value == before[uid].value
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.PixelData == before.PixelData
    # Twice is once: A's identifier is not added again.
    reconcile(path, PATIENT, LocalIdentity("BE-123", "2.16.56.1.1.1"))
    assert len(pydicom.dcmread(path).OtherPatientIDsSequence) == 1


def test_the_part_reader_hands_out_views_of_its_own_buffer_not_copies() -> None:
    big = os.urandom(3 << 20)
    body, boundary = _frame([big, b"small"])
    # Read as http.client's response reads: readinto fills the buffer (io.BytesIO does too).
    reader = PartReader(io.BytesIO(body), boundary, buffer_bytes=1 << 20)
    assert reader.next_part() is not None
    got, pieces = bytearray(), 0
    for piece in reader.body():
        assert isinstance(piece, memoryview) and piece.obj is reader._buf  # no copy
        got += piece  # used before the next read: the buffer is refilled in place
        pieces += 1
    assert got == big
    assert pieces <= 4  # pieces of about the buffer's size
    assert reader.next_part() is not None
    assert b"".join(bytes(p) for p in reader.body()) == b"small"
    assert reader.next_part() is None


