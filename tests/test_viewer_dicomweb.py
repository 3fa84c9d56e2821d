"""The viewer's frame source over a real DICOMweb archive (Orthanc): the same images as from a
folder of the same files, pixel for pixel, in compressed transfer syntaxes too; frames are
fetched one at a time as stored, and palettes come from the whole object."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ncp.config import DicomwebArchive
from ncp.dicom.folder import FolderSource
from ncp.viewer.frames import DicomwebFrames, FolderFrames, ScanCatalogue, frame_source
from ncp.viewer.render import render
from tests.support.dicom_factory import write_instance
from tests.support.orthanc import OrthancServer
from tests.support.viewer import CT_SERIES, CT_STUDY, ct_instance, ct_slices

pytestmark = [pytest.mark.orthanc, pytest.mark.filterwarnings("ignore::UserWarning:pydicom")]

FILES = (
    "693_J2KI.dcm",  # JPEG 2000, signed CT
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR
    "SC_rgb_rle_2frame.dcm",  # multi-frame
    "examples_palette.dcm",  # PALETTE COLOR: the palette is bulk data
)


@pytest.fixture
def archive(orthanc_empty: OrthancServer, tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    for i, plane in enumerate(ct_slices(4, 64), start=1):
        write_instance(folder / f"ct{i}.dcm", ct_instance(plane, number=i))
    for name in FILES:
        found = get_testdata_file(name, download=False)
        assert found is not None
        shutil.copy(found, folder / name)
    assert orthanc_empty.upload(sorted(folder.iterdir())) == 4 + len(FILES)
    return folder


def _renders(source: object, study: str) -> dict[tuple[str, int], np.ndarray]:
    async def run() -> dict[tuple[str, int], np.ndarray]:
        images = await source.study(study)  # type: ignore[attr-defined]
        assert images is not None
        out = {}
        for image in images.images:
            for index in {0, image.frames - 1}:
                frame = await source.frame(image, index)  # type: ignore[attr-defined]
                out[(image.sop, index)] = render(image.header, frame, None)
        await source.aclose()  # type: ignore[attr-defined]
        return out

    return asyncio.run(run())


def test_orthanc_frames_render_as_the_folder_files(
    orthanc_empty: OrthancServer, archive: Path
) -> None:
    studies = {CT_STUDY}
    for name in FILES:
        studies.add(str(pydicom.dcmread(archive / name, stop_before_pixels=True).StudyInstanceUID))
    web = frame_source(DicomwebArchive(kind="dicomweb", url=orthanc_empty.dicomweb_url))
    assert isinstance(web, DicomwebFrames)
    compared = 0
    for study in sorted(studies):
        folder = FolderFrames(FolderSource(archive), ScanCatalogue(FolderSource(archive)))
        expected = _renders(folder, study)
        got = _renders(DicomwebFrames(orthanc_empty.dicomweb_url, timeout_s=30), study)
        assert got.keys() == expected.keys(), study
        for key, image in expected.items():
            assert np.array_equal(got[key], image), (study, key)
            compared += 1
    assert compared >= 4 + len(FILES)


def test_an_unknown_study_is_none_and_the_series_order_holds(
    orthanc_empty: OrthancServer, archive: Path
) -> None:
    async def run() -> None:
        source = DicomwebFrames(orthanc_empty.dicomweb_url)
        assert await source.study("1.2.3.4.5.6.7") is None
        images = await source.study(CT_STUDY)
        assert images is not None
        assert [i.sop for i in images.images] == [f"{CT_SERIES}.{n}" for n in range(1, 5)]
        await source.aclose()

    asyncio.run(run())
