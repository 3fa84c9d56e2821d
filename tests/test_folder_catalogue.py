"""The folder catalogue reads only what QIDO-RS answers with, and answers as before (issue 13,
item 6).

The catalogue used to read every header with pydicom and convert it whole to DICOM JSON before
the gateway served (about 2 ms an instance: 35-54 s for the demo's archive). It now reads the
QIDO attributes from each file's first bytes and converts each distinct value once; the whole
header only when asked. What must not change: every answer. :class:`Previous` is the catalogue
as it was (each header read by pydicom and converted whole at the scan, answers picked from
that), and every study of real-world and generated files is asked at every level, with default
attributes, others, ``all``, and as metadata, of both.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from ncp.dicom.folder import FolderSource
from ncp.dicom.source import InstanceHeader, SkippedEntry, SourceEntry
from ncp.examples.catalogue import MODALITIES
from ncp.examples.generate import generate_examples
from ncp.gateway import catalogue
from ncp.gateway.catalogue import FolderUpstream, _Instance
from ncp.gateway.folderjson import QIDO_TAGS
from tests.support.dicom_factory import make_instance, write_instance

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
ROOT = "1.2.826.0.1.3680043.10.543.800"


def _read_whole(source: FolderSource, entry: SourceEntry) -> InstanceHeader | SkippedEntry:
    return next(iter(source.read_headers([entry])))


def _whole_json(header: InstanceHeader) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return header.dataset.to_json_dict(suppress_invalid_tags=True)


class Previous(FolderUpstream):
    """The catalogue before this change: every header read by pydicom and converted whole at
    the scan; every answer (QIDO at every level, metadata) picked from that."""

    def _scan(self) -> None:
        with patch.multiple(catalogue, read_qido_header=_read_whole, qido_json=_whole_json):
            super()._scan()

    def _whole(self, instance: _Instance) -> dict[str, Any] | None:
        return instance.qido  # the whole header, converted at the scan


def _crafted(folder: Path) -> None:
    """Files the element walk must leave to pydicom or read as pydicom does."""
    folder.mkdir(parents=True)

    def instance(n: int, **attrs: Any) -> Dataset:
        return make_instance(
            patient_id="CRAFT",
            study_uid=f"{ROOT}.{n}",
            series_uid=f"{ROOT}.{n}.1",
            sop_uid=f"{ROOT}.{n}.1.1",
            **attrs,
        )

    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS"
    # A wanted sequence of undefined length: read by pydicom.
    ds = instance(1, IssuerOfAccessionNumberSequence=Sequence([issuer]))
    ds["IssuerOfAccessionNumberSequence"].is_undefined_length = True
    write_instance(folder / "undefined-sequence.dcm", ds)
    # Implicit VR; non-ASCII names in UTF-8.
    ds = instance(2, PatientName="Żak^Marie", ReferringPhysicianName="Ørsted^Hans")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    write_instance(folder / "implicit.dcm", ds)
    # Explicit VR big endian (retired, still read).
    ds = instance(3, PatientName="Müller^Jörg", SpecificCharacterSet="ISO_IR 100")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    write_instance(folder / "big-endian.dcm", ds)
    # A private element beyond the walk's 64 KiB before the study's UIDs: read by pydicom.
    ds = instance(4)
    block = ds.private_block(0x0019, "NCP TEST", create=True)
    block.add_new(0x01, "OB", b"\x00" * 70_000)
    write_instance(folder / "long-private.dcm", ds)
    # The same sequence bytes under two Pixel Representations, in Implicit VR: its ambiguous
    # US-or-SS element is unsigned in one and signed in the other (what a value memo must see).
    for n, representation in ((5, 0), (6, 1)):
        item = Dataset()
        item.LocalNamespaceEntityID = "RIS"
        item.add_new(0x00280106, "US", 0xFFFF)  # Smallest Image Pixel Value: US or SS
        ds = instance(n, PixelRepresentation=representation)
        ds.IssuerOfAccessionNumberSequence = Sequence([item])
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        write_instance(folder / f"pixel-representation-{representation}.dcm", ds)
    # An IS pydicom's JSON writer rejects, among the QIDO attributes.
    ds = instance(7)
    tag = BaseTag(0x00280008)
    ds[tag] = RawDataElement(tag, "IS", 2, b"1A", 0, False, True)  # type: ignore[assignment]
    write_instance(folder / "bad-is.dcm", ds)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalogue") / "archive"
    (root / "pydicom").mkdir(parents=True)
    for path in sorted((PYDICOM_DATA / "test_files").glob("*.dcm")):
        shutil.copy(path, root / "pydicom" / path.name)
    for path in sorted((PYDICOM_DATA / "charset_files").glob("*.dcm")):
        shutil.copy(path, root / "pydicom" / f"charset-{path.name}")
    examples = root.parent / "examples"
    generate_examples(examples, patients=2, seed=5, big_patient_studies=len(MODALITIES))
    shutil.copytree(examples / "dicom", root / "examples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _crafted(root / "crafted")
    return root


@pytest.fixture(scope="module")
def both(archive: Path) -> tuple[FolderUpstream, FolderUpstream]:
    new, previous = FolderUpstream(archive), Previous(archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.run(new.warm())
        asyncio.run(previous.warm())
    return new, previous


STUDY_FIELDS: list[set[str]] = [
    set(),
    {"all"},
    {"00081032", "00080021"},  # Procedure Code Sequence, Series Date: not kept
    {"00280103", "00201206", "00080061"},  # kept but not returned by default; computed
    {"00100010", "00080020", "00100021"},
]
SERIES_FIELDS: list[set[str]] = [set(), {"all"}, {"00080021", "00201209"}, {"00280103"}]
INSTANCE_FIELDS: list[set[str]] = [set(), {"all"}, {"00080008", "00200032"}, {"00280008"}]


def _answers(upstream: FolderUpstream) -> dict[str, Any]:
    """Everything the catalogue answers for every study it holds."""

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for study in sorted(upstream._studies):
            tree = upstream._studies[study]
            for n, fields in enumerate(STUDY_FIELDS):
                out[f"{study} study {n}"] = await upstream.study(study, fields)
            for n, fields in enumerate(SERIES_FIELDS):
                out[f"{study} series {n}"] = await upstream.search(study, "series", None, fields)
            for n, fields in enumerate(INSTANCE_FIELDS):
                out[f"{study} instances {n}"] = await upstream.search(
                    study, "instances", None, fields
                )
            out[f"{study} metadata"] = await upstream.metadata(study, None, None)
            series = sorted(tree)[0]
            sop = sorted(tree[series])[0]
            out[f"{study} series metadata"] = await upstream.metadata(study, series, None)
            out[f"{study} instance metadata"] = await upstream.metadata(study, series, sop)
            out[f"{study} series instances"] = await upstream.search(
                study, "instances", series, {"00080008"}
            )
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asyncio.run(run())


def test_the_catalogue_holds_the_same_instances(
    both: tuple[FolderUpstream, FolderUpstream],
) -> None:
    new, previous = both
    assert len(new._by_locator) > 500
    assert {
        loc: (i.study, i.series, i.sop, i.transfer_syntax) for loc, i in new._by_locator.items()
    } == {
        loc: (i.study, i.series, i.sop, i.transfer_syntax)
        for loc, i in previous._by_locator.items()
    }
    for locator, instance in new._by_locator.items():
        whole = previous._by_locator[locator].qido
        assert instance.qido == {t: v for t, v in whole.items() if t in QIDO_TAGS}, locator


def test_every_answer_is_the_previous_catalogues(
    both: tuple[FolderUpstream, FolderUpstream],
) -> None:
    new, previous = both
    expected = _answers(previous)
    found = _answers(new)
    assert found.keys() == expected.keys()
    for key, answer in expected.items():
        assert json.dumps(found[key]) == json.dumps(answer), key  # in the same order too
    # The crafted cases are there, and each reads as it should.
    signed = found[f"{ROOT}.6 study 0"][0]["00080051"]["Value"][0]["00280106"]
    unsigned = found[f"{ROOT}.5 study 0"][0]["00080051"]["Value"][0]["00280106"]
    assert (signed, unsigned) == ({"vr": "SS", "Value": [-1]}, {"vr": "US", "Value": [65535]})
    assert found[f"{ROOT}.2 study 4"][0]["00100010"]["Value"] == [{"Alphabetic": "Żak^Marie"}]
    bad = found[f"{ROOT}.7 instances 0"][0]
    assert "00280008" not in bad and bad["00080018"]["Value"] == [f"{ROOT}.7.1.1"]


def test_metadata_is_read_when_asked_and_kept_within_its_bound(
    archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FolderUpstream(archive, metadata_cache=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.run(upstream.warm())
    reads: list[str] = []
    real = FolderSource.read_headers

    def counted(self: FolderSource, entries: Any) -> Iterator[InstanceHeader | SkippedEntry]:
        entries = list(entries)
        reads.extend(e.locator for e in entries)
        return real(self, entries)

    monkeypatch.setattr(FolderSource, "read_headers", counted)
    study = next(s for s, tree in upstream._studies.items() if sum(map(len, tree.values())) > 8)
    count = sum(map(len, upstream._studies[study].values()))

    async def run() -> list[Any]:
        first = await upstream.metadata(study, None, None)
        again = await upstream.metadata(study, None, None)
        await upstream.search(study, "instances", None, set())  # from the catalogue
        assert again == first
        return first

    items = asyncio.run(run())
    assert len(items) == count and len(reads) == 2 * count  # a bound of 4: read twice
    assert len(upstream._wholes) == 4
    # Complete: the whole header, as pydicom writes it.
    path = upstream.source.path_of(reads[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict()
    assert items[0] == whole and list(items[0]) == list(whole)
