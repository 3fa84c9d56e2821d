"""The viewer's first pass over a series: native frames read at their offset exactly as pydicom
decodes them, each file read once (no header parsed again, one load however many ask at
once), the series decoded ahead within a bounded memory, a series from a DICOMweb archive read
in one stream; and the page's first image and data without a round trip of the script's.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pydicom.filereader
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.pixels.utils import pixel_array
from starlette.requests import Request

from ncp.audit.models import Side
from ncp.audit.record import Auditor
from ncp.config import ViewerSection
from ncp.dicom.folder import FolderSource
from ncp.store.db import make_engine, migrate, session_factory
from ncp.viewer.access import ViewerGrant, ViewerRefused
from ncp.viewer.app import build_viewer_app
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.decode import decode_frame_bytes, native_frame, native_layout
from ncp.viewer.frames import DicomwebFrames, FolderFrames, ImageRef, _PartReader, frame_source
from ncp.viewer.render_service import RenderService
from tests.support.dicom_factory import make_instance, write_instance
from tests.support.viewer import CT_LOCALIZER, CT_SERIES, CT_STUDY, write_ct_series

NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


# -- native frames read at their offset ----------------------------------------------------------


@functools.cache
def _native_files() -> list[Path]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for found in pydicom.data.get_testdata_files("*.dcm"):
            try:
                ds = pydicom.dcmread(found, stop_before_pixels=True)
            except Exception:
                continue
            syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            if syntax in NATIVE and "Rows" in ds and native_layout(ds, syntax) is not None:
                try:
                    pixel_array(found, index=0)
                except Exception:
                    continue  # broken on purpose (a truncated file): pydicom cannot either
                out.append(Path(found))
    return sorted(out)


def _folder_frame(path: Path, index: int) -> np.ndarray:
    """A frame as the folder source reads it: the header kept from the listing, the pixels at
    their offset."""

    class One:
        async def locators(self, study: str) -> list[str]:
            return [path.name]

    header = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = str(header.file_meta.TransferSyntaxUID)
    del header.file_meta
    image = ImageRef("1.2", "1.2.3", "1.2.3.4", path.name, syntax, header)
    return asyncio.run(FolderFrames(path.parent, One()).frame(image, index))


def test_there_are_native_test_files_of_every_kind() -> None:
    kinds = set()
    for path in _native_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kinds.add((int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1))))
    assert {(8, 1), (16, 1), (32, 1), (8, 3)} <= kinds


@pytest.mark.parametrize("path", _native_files(), ids=lambda p: p.name)
def test_native_frames_are_read_as_pydicom_decodes_them(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames") or 1)
        for index in sorted({0, frames - 1}):
            expected = pixel_array(path, index=index)
            got = _folder_frame(path, index)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), index
            # The same bytes as a DICOMweb archive sends one frame.
            syntax = str(ds.file_meta.TransferSyntaxUID)
            layout = native_layout(ds, syntax)
            assert layout is not None
            raw = bytes(ds.PixelData)[index * layout.frame_bytes : (index + 1) * layout.frame_bytes]
            assert np.array_equal(decode_frame_bytes(ds, syntax, raw), expected)


def test_unused_high_bits_are_cleared_or_sign_extended_as_pydicom_does(tmp_path: Path) -> None:
    """12 bits stored in 16 with garbage in the top four: pydicom masks (unsigned) or extends
    the sign (signed); the offset path must show the same values, not the garbage."""
    values = np.array([[0x0FFF, 0x0800], [0x07FF, 0x0001]], np.uint16)
    garbage = values | np.uint16(0xA000)
    for signed in (0, 1):
        ds = make_instance(Rows=2, Columns=2, BitsStored=12, HighBit=11, PixelRepresentation=signed)
        ds.PixelData = garbage.tobytes()
        path = tmp_path / f"signed{signed}.dcm"
        write_instance(path, ds)
        expected = pixel_array(path, index=0)
        got = _folder_frame(path, 0)
        assert np.array_equal(got, expected) and got.dtype == expected.dtype
        assert int(got.max()) <= 0x0FFF


def test_colour_by_plane_and_a_file_ending_after_its_pixels(tmp_path: Path) -> None:
    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    ds = make_instance(
        Rows=4, Columns=3, SamplesPerPixel=3, PhotometricInterpretation="RGB",
        PlanarConfiguration=1, BitsAllocated=8, BitsStored=8, HighBit=7,
    )  # fmt: skip
    ds.PixelData = rgb.transpose(2, 0, 1).tobytes()
    write_instance(tmp_path / "planes.dcm", ds)
    assert np.array_equal(_folder_frame(tmp_path / "planes.dcm", 0), rgb)
    # An element after Pixel Data (trailing padding): the offset check fails, pydicom reads it.
    grey = make_instance(Rows=2, Columns=2)
    grey.PixelData = np.array([[1, 2], [3, 4]], np.uint16).tobytes()
    grey.add_new(0xFFFCFFFC, "OB", b"\0" * 8)
    write_instance(tmp_path / "padded.dcm", grey)
    assert _folder_frame(tmp_path / "padded.dcm", 0).tolist() == [[1, 2], [3, 4]]


def test_native_frame_is_read_only_and_too_short_data_is_refused() -> None:
    ds = make_instance(Rows=2, Columns=2)
    layout = native_layout(ds, "1.2.840.10008.1.2.1")
    assert layout is not None
    frame = native_frame(layout, np.arange(4, dtype=np.uint16).tobytes())
    assert not frame.flags.writeable
    from ncp.viewer.decode import Undecodable

    with pytest.raises(Undecodable):
        native_frame(layout, b"\0\0")


# -- the first pass: each file read once -----------------------------------------------------


class Portal:
    async def __call__(self, request: Request) -> ViewerGrant:
        if request.headers.get("x-portal-user") is None:
            raise ViewerRefused(401, "log in to the portal first")
        return ViewerGrant(session="portal-s", subject="hp", studies=frozenset({CT_STUDY}))


@pytest.fixture
def viewer(tmp_path: Path) -> Iterator[tuple[FastAPI, RenderService, Path]]:
    folder = tmp_path / "store"
    write_ct_series(folder, n=16, size=64)
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    service = RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 24)
    app = build_viewer_app(
        service=service,
        authorise=Portal(),
        audit=ViewAudit(Auditor(session_factory(engine), country="BE"), Side.CONSUMER),
        settings=ViewerSection(),
    )
    yield app, service, folder
    engine.dispose()


def _frame_url(sop: str, media: str = "image/jpeg") -> str:
    base = f"/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{sop}/frames/1/rendered"
    return f"{base}?accept={media}&window=40,400"


async def _settle(service: RenderService) -> None:
    """Until nothing is being read ahead."""
    for _ in range(400):
        if not getattr(service, "_loading", None) and not getattr(service, "_wanted", None):
            return
        await asyncio.sleep(0.01)


def test_a_first_pass_reads_each_file_once(
    viewer: tuple[FastAPI, RenderService, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the page scrolls a series: each frame asked for (JPEG, and the lossless PNG of the
    same frame at the same time), the page's prefetch of six each way, the server's own
    read-ahead: every file is opened once, and no header is parsed again (the one kept from
    the listing says where the pixels are). Before: pydicom parsed each file's header again
    for its pixels, and two requests for one frame read the file twice."""
    app, service, folder = viewer
    opened: Counter[str] = Counter()
    parsed: list[str] = []
    real_open, real_read = os.open, pydicom.filereader.read_dataset

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened[Path(path).name] += 1
        return real_open(path, *args, **kwargs)

    def counting_read(*args: Any, **kwargs: Any) -> Any:
        parsed.append("read_dataset")
        return real_read(*args, **kwargs)

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://b.test") as client:
            client.headers["x-portal-user"] = "hp"
            await service.study(CT_STUDY)  # the study listed: every header read once
            monkeypatch.setattr(os, "open", counting_open)
            monkeypatch.setattr(pydicom.filereader, "read_dataset", counting_read)
            # The series opens (its first frames are read ahead), then the page scrolls it.
            listed = await client.get(f"/studies/{CT_STUDY}/series/{CT_SERIES}/instances")
            sops = [item["00080018"]["Value"][0] for item in listed.json()]
            for pos, sop in enumerate(sops):
                near = [sops[p] for p in range(pos - 6, pos + 7) if 0 <= p < len(sops) and p != pos]
                answers = await asyncio.gather(
                    client.get(_frame_url(sop)),
                    client.get(_frame_url(sop, "image/png")),
                    *(client.get(_frame_url(n)) for n in near),
                )
                assert all(a.status_code == 200 for a in answers)
            await _settle(service)
            monkeypatch.undo()

    asyncio.run(run())
    files = {p.name for p in (folder / "PAT100").glob("ct-0*.dcm")}
    assert len(files) == 16
    assert {name: opened[name] for name in files} == dict.fromkeys(files, 1)
    assert parsed == []


def test_read_ahead_stays_within_a_quarter_of_the_memory(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    write_ct_series(folder, n=16, size=64)
    frame_bytes = 64 * 64 * 2
    source = frame_source(FolderSource(folder))
    service = RenderService(source, memory_bytes=12 * frame_bytes, read_ahead=8)

    async def run() -> dict[str, int]:
        images = await service.study(CT_STUDY)
        assert images is not None
        first = images.of_series(CT_SERIES)[0]
        await service.render(first, 0, media_type="image/jpeg", study=images)
        await _settle(service)
        return service.stats()

    stats = asyncio.run(run())
    # The frame asked for, then 12 / 4 = 3 ahead: not the 8 asked for by the setting.
    assert stats["loads"] == 4 and stats["frames_kept"] == 4
    assert stats["bytes_kept"] <= stats["bytes_max"]


def test_read_ahead_follows_the_direction_of_travel(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    write_ct_series(folder, n=16, size=64)
    service = RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 24, read_ahead=4)

    async def run() -> set[int]:
        images = await service.study(CT_STUDY)
        assert images is not None
        series = images.of_series(CT_SERIES)
        for pos in (12, 11):  # scrolling back
            await service.render(series[pos], 0, media_type="image/jpeg", study=images)
            await _settle(service)
        return {
            n
            for n, image in enumerate(series)
            if (service.source.name, image.sop, 0) in service.memory
        }

    kept = asyncio.run(run())
    # From 12: four ahead (13-15, the series' end) and two behind (11, 10); then, scrolling
    # back to 11: four the way the HP goes (10-7) and two the other way.
    assert kept == set(range(7, 16))


def test_a_frame_that_cannot_be_decoded_ahead_is_a_placeholder_when_asked_for(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "store"
    write_ct_series(folder, n=4, size=64)
    victim = folder / "PAT100" / "ct-002.dcm"
    victim.write_bytes(victim.read_bytes()[:-100])
    service = RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 24)

    async def run() -> list[str | None]:
        images = await service.study(CT_STUDY)
        assert images is not None
        series = images.of_series(CT_SERIES)
        shown = []
        for image in series:
            rendered = await service.render(image, 0, media_type="image/png", study=images)
            shown.append(rendered.placeholder)
        return shown

    shown = asyncio.run(run())
    assert shown[0] is None and shown[1] and shown[2] is None


# -- a DICOMweb archive: a series in one stream -------------------------------------------------


def test_multipart_parts_come_whole_whatever_the_chunks() -> None:
    parts = [b"A" * 10, b"--not-the-boundary\r\n" + b"B" * 300, b""]
    body = b"preamble\r\n"
    for part in parts:
        body += b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    body += b"--xyz--\r\n"
    for size in (1, 2, 7, 64, len(body)):
        reader = _PartReader(b"xyz", 1 << 20)
        got: list[bytes] = []
        for start in range(0, len(body), size):
            got.extend(reader.feed(body[start : start + size]))
        assert got == parts, size
    with pytest.raises(ValueError, match="too long"):
        _PartReader(b"xyz", 100).feed(b"--xyz\r\n\r\n" + b"C" * 200)


@pytest.mark.orthanc
def test_a_series_from_orthanc_comes_in_one_request(tmp_path: Path, orthanc_empty: Any) -> None:
    """Opening a series of single-frame images over a DICOMweb archive reads the series in
    one retrieve (and the first frame on its own, for the page), decoded exactly as the
    folder's files; memory bounded as for any read-ahead."""
    folder = tmp_path / "files"
    write_ct_series(folder, n=12, size=64)
    assert orthanc_empty.upload(sorted(folder.rglob("*.dcm"))) == 13
    web = frame_source(FolderSource(folder))
    service = RenderService(
        DicomwebFrames(orthanc_empty.dicomweb_url, timeout_s=30), memory_bytes=1 << 24, read_ahead=4
    )
    asked: list[str] = []

    async def record(request: httpx.Request) -> None:
        asked.append(request.url.path)

    service.source._http.event_hooks["request"].append(record)  # type: ignore[attr-defined]

    async def run() -> None:
        images = await service.study(CT_STUDY)
        assert images is not None
        series = images.of_series(CT_SERIES)
        service.read_ahead(images, series[0], 0, this_one=True)
        for _ in range(500):
            await asyncio.sleep(0.01)
            if not service._streams and not service.stats()["loading"]:
                break
        folder_images = await web.study(CT_STUDY)
        assert folder_images is not None
        for image, mine in zip(series, folder_images.of_series(CT_SERIES), strict=True):
            kept = service.memory.get(("dicomweb", image.sop, 0))
            assert kept is not None, image.sop
            assert np.array_equal(kept, await web.frame(mine, 0))
        await service.aclose()

    asyncio.run(run())
    frames = [p for p in asked if "/frames/" in p]
    assert len([p for p in asked if p.endswith(f"/studies/{CT_STUDY}/series/{CT_SERIES}")]) == 1
    assert len(frames) <= 1, frames  # the first frame, asked for on its own
    # Each image once from the stream; the first frame may also come on its own.
    assert 12 <= service.loads <= 13


# -- the page and its first image --------------------------------------------------------------


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.images: list[dict[str, str | None]] = []
        self.data: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.data.append(data)


def test_the_page_carries_its_data_and_asks_for_its_first_image(tmp_path: Path) -> None:
    """With the session on the page's request (B's portal), the page holds its data in a JSON
    data block (never run, so the CSP stands) and an ``img`` of the study's first image; a
    header value holding ``</script>`` stays data. The first image is the frame the script
    would ask for first, byte for byte."""
    folder = tmp_path / "store"
    write_ct_series(folder, n=4, size=64)
    evil = "</script><script>alert(1)</script>&<!--"
    path = folder / "PAT100" / "ct-scout.dcm"
    ds = pydicom.dcmread(path)
    ds.StudyDescription = evil
    ds.save_as(path)
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    app = build_viewer_app(
        service=RenderService(frame_source(FolderSource(folder)), memory_bytes=1 << 24),
        authorise=Portal(),
        audit=ViewAudit(Auditor(session_factory(engine), country="BE"), Side.CONSUMER),
    )
    with TestClient(app, base_url="https://b.test") as client:
        client.headers["x-portal-user"] = "hp"
        page = client.get("/", params={"study": CT_STUDY})
        assert page.status_code == 200
        parsed = _Scripts()
        parsed.feed(page.text)
        assert [s.get("type") for s in parsed.scripts] == [None, "application/json"]
        initial = json.loads(parsed.data[0])
        assert initial["study"] == CT_STUDY and initial["complete"] is True
        assert initial["seriesUid"] == CT_LOCALIZER and len(initial["instances"]) == 1
        assert initial["studies"][0]["00081030"]["Value"][0] == evil
        assert "</script><script>" not in page.text
        [img] = parsed.images
        assert img["src"] == f"studies/{CT_STUDY}/first-image" and img["fetchpriority"] == "high"
        first = client.get(f"/studies/{CT_STUDY}/first-image")
        same = client.get(initial["first"])
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        assert first.content == same.content
        assert Image.open(io.BytesIO(first.content)).size == (64, 64)
        # The script's data route answers the same, for a page that came without it.
        assert client.get("/initial", params={"study": CT_STUDY}).json() == initial
        # Without a session: the page loads with nothing of any study; its image is refused.
        del client.headers["x-portal-user"]
        bare = client.get("/", params={"study": CT_STUDY})
        parsed = _Scripts()
        parsed.feed(bare.text)
        assert set(json.loads(parsed.data[0])) == {"labels"}
        assert client.get(f"/studies/{CT_STUDY}/first-image").status_code == 401
    engine.dispose()


def test_static_files_are_kept_by_the_browser_under_their_version(
    viewer: tuple[FastAPI, RenderService, Path],
) -> None:
    app, _, _ = viewer
    with TestClient(app, base_url="https://b.test") as client:
        client.headers["x-portal-user"] = "hp"
        page = client.get("/")
        version = re.search(r'viewer\.js\?v=([0-9a-f]+)"', page.text)
        assert version is not None
        kept = client.get("/static/viewer.js", params={"v": version.group(1)})
        assert kept.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert client.get("/static/viewer.css").headers["cache-control"] == "no-cache"
        old = client.get("/static/viewer.css", params={"v": "000000000000"})
        assert old.headers["cache-control"] == "no-cache"
        # Patient data never: the page and the images stay out of the browser's disk cache.
        assert page.headers["cache-control"] == "no-store"


def test_a_study_listed_again_parses_only_the_files_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each header is parsed once while its file stays the same: a study listed again (its
    minute in memory over) stats its files and parses only a changed one. Kept headers hold
    no private elements (never shown, never used, often the bulk of a vendor's header)."""
    import ncp.viewer.frames as frames_module

    folder = tmp_path / "store"
    write_ct_series(folder, n=6, size=32)
    victim = folder / "PAT100" / "ct-003.dcm"
    ds = pydicom.dcmread(victim)
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "OB", b"\0" * 4096)
    ds.save_as(victim)
    source = frame_source(FolderSource(folder))
    parsed: list[str] = []
    real = FolderSource._read

    def counting(self: FolderSource, entry: Any) -> Any:
        parsed.append(Path(entry.locator).name)
        return real(self, entry)

    async def listing() -> Any:
        return await source.study(CT_STUDY)

    first = asyncio.run(listing())
    assert first is not None and len(first.images) == 7
    assert all(not any(e.tag.is_private for e in image.header) for image in first.images)
    monkeypatch.setattr(frames_module, "_STUDY_TTL_S", -1.0)
    monkeypatch.setattr(FolderSource, "_read", counting)
    again = asyncio.run(listing())
    assert again is not None and parsed == []
    assert [i.header for i in again.images] == [i.header for i in first.images]
    ds = pydicom.dcmread(victim)
    ds.SliceThickness = 2.5
    ds.save_as(victim)
    os.utime(victim, ns=(1, 1))  # another fingerprint even within the clock's resolution
    changed = asyncio.run(listing())
    assert changed is not None and parsed == ["ct-003.dcm"]
    found = next(i for i in changed.images if i.locator.endswith("ct-003.dcm"))
    assert float(found.header.SliceThickness) == 2.5
