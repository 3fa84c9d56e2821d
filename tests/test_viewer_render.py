"""Rendering correctness: known pixel values through the PS3.3 C.11 pipelines, for generated
files and for pydicom's own test files in every transfer syntax its wheel ships.

Expected values are computed here from the standard's formulas and the files' own tables, not
by the code under test: slope and intercept, the Modality LUT Sequence, window limits for
LINEAR / LINEAR_EXACT / SIGMOID, the VOI LUT Sequence, MONOCHROME1 inversion, the palette.
Compressed files must render as their uncompressed twins: exactly when the compression is
lossless, within a tolerance when it is lossy.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ncp.viewer.decode import Undecodable, decode_file_frame
from ncp.viewer.frames import FolderFrames, ImageRef
from ncp.viewer.render import RenderError, Window, default_window, render, voi_window
from ncp.viewer.render_output import (
    BadParameter,
    NotAcceptable,
    choose_media_type,
    encode,
    fit,
    parse_viewport,
    parse_window,
    placeholder,
)
from ncp.viewer.render_service import RenderService
from tests.support.dicom_factory import make_instance, write_instance


def grey(**attrs: Any) -> Dataset:
    ds = make_instance(**attrs)
    return ds


def linear_reference(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.2.1, written out for one value, output 0..255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0


# -- the pipeline on generated images -----------------------------------------------------------


def test_rescale_slope_and_intercept_then_the_window_limits() -> None:
    ds = grey(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    # Stored values whose modality values are HU -200, -160, 39.5, 40, 239, 240, 1000.
    stored = np.array([[412, 432, 531.75, 532, 631.5, 632, 1012]]).round().astype(np.uint16)
    hu = stored * 2.0 - 1024
    shown = render(ds, stored, None)
    expected = [round(linear_reference(v, 40, 400)) for v in hu[0]]
    assert shown[0].tolist() == expected
    assert shown[0][0] == 0 and shown[0][-1] == 255  # below and above the window
    # The window's exact edges (C.11.2.1.2.1): x <= c - 0.5 - (w-1)/2 is the minimum.
    assert linear_reference(-160.0, 40, 400) == 0.0 and linear_reference(239.0, 40, 400) == 255.0


def test_a_window_given_overrides_the_image_and_the_functions_differ() -> None:
    ds = grey(RescaleSlope=1, RescaleIntercept=0, WindowCenter=2000, WindowWidth=10)
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        window = Window(1000, 500, function)
        shown = render(ds, stored, window).astype(float)
        x = stored.astype(float)
        if function == "LINEAR_EXACT":
            ref = np.where(x <= 750, 0, np.where(x > 1250, 255, ((x - 1000) / 500 + 0.5) * 255))
        elif function == "SIGMOID":
            ref = 255 / (1 + np.exp(-4 * (x - 1000) / 500))
        else:
            ref = np.vectorize(lambda v: linear_reference(v, 1000, 500))(x)
        assert np.abs(shown - np.rint(ref)).max() <= 1, function
    sig = render(ds, np.array([[1000]], dtype=np.uint16), Window(1000, 500, "SIGMOID"))
    assert sig[0, 0] == round(255 / 2)  # the sigmoid's centre is half way


def test_monochrome1_is_inverted_and_presentation_inverse_too() -> None:
    stored = np.array([[0, 1000, 4095]], dtype=np.uint16)
    window = Window(2048, 4096, "LINEAR_EXACT")
    mono2 = render(grey(), stored, window)
    mono1 = render(grey(PhotometricInterpretation="MONOCHROME1"), stored, window)
    assert (mono1.astype(int) + mono2.astype(int) == 255).all()
    assert mono1[0, 0] == 255 and mono1[0, 2] < 5  # low values bright
    inverse = render(grey(PresentationLUTShape="INVERSE"), stored, window)
    assert (inverse == mono1).all()
    # MONOCHROME1 with Presentation LUT Shape INVERSE (as DX writes it) is inverted once.
    both = render(
        grey(PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE"),
        stored,
        window,
    )
    assert (both == mono1).all()


def test_modality_lut_sequence_replaces_rescale() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 16]  # 4 entries, first stored value 10
    item.ModalityLUTType = "HU"
    item.LUTData = [100, 200, 300, 400]
    ds = grey(ModalityLUTSequence=Sequence([item]), RescaleSlope=None, RescaleIntercept=None)
    stored = np.array([[5, 10, 11, 12, 13, 50]], dtype=np.uint16)
    shown = render(ds, stored, Window(250, 300, "LINEAR_EXACT"))
    # Below the first value: the first entry; above the last: the last (C.11.1.1).
    modality = np.array([100, 100, 200, 300, 400, 400], dtype=float)
    expected = np.clip(((modality - 250) / 300 + 0.5) * 255, 0, 255)
    expected = np.where(modality <= 100, 0, np.where(modality > 400, 255, expected))
    assert shown[0].tolist() == np.rint(expected).astype(int).tolist()


def test_voi_lut_sequence_when_no_window_is_given() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 100, 8]
    item.LUTData = [0, 128, 255]
    ds = grey(VOILUTSequence=Sequence([item]), WindowCenter=None, WindowWidth=None)
    stored = np.array([[50, 100, 101, 102, 400]], dtype=np.uint16)
    assert default_window(ds, stored) is None
    assert render(ds, stored, None)[0].tolist() == [0, 0, 128, 255, 255]
    # A window asked for wins over the LUT.
    assert render(ds, stored, Window(101, 3, "LINEAR_EXACT"))[0, 2] == 128


def test_without_any_window_the_frame_range_is_shown() -> None:
    ds = grey(WindowCenter=None, WindowWidth=None, RescaleIntercept=-1024, RescaleSlope=1)
    stored = np.array([[100, 600, 1100]], dtype=np.uint16)
    shown = render(ds, stored, None)
    assert shown[0, 0] == 0 and shown[0, 2] == 255 and 120 <= shown[0, 1] <= 135


def test_signed_and_32_bit_frames() -> None:
    ds = grey(PixelRepresentation=1, BitsAllocated=16, BitsStored=16, HighBit=15)
    stored = np.array([[-1000, 0, 1000]], dtype=np.int16)
    assert render(ds, stored, Window(0, 2000, "LINEAR_EXACT"))[0].tolist() == [0, 128, 255]
    wide = np.array([[0, 1 << 20, 1 << 21]], dtype=np.uint32)
    shown = render(grey(BitsAllocated=32, BitsStored=32, HighBit=31), wide, None)
    assert shown[0].tolist() == [0, 128, 255]


def test_palette_color_uses_the_files_own_palette() -> None:
    path = get_testdata_file("examples_palette.dcm", download=False)
    assert path is not None
    ds = pydicom.dcmread(path)
    index = ds.pixel_array
    shown = render(ds, index, None)
    red = np.frombuffer(ds.RedPaletteColorLookupTableData, dtype="<u2")
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    y, x = np.unravel_index(np.argmax(index), index.shape)
    entry = int(red[min(max(int(index[y, x]) - first, 0), red.size - 1)])
    expected = entry >> 8 if bits == 16 else entry
    assert shown.shape == (*index.shape, 3)
    assert abs(int(shown[y, x, 0]) - expected) <= 1


def test_rgb_16_bit_is_scaled_and_unknown_photometric_refused() -> None:
    ds = grey(PhotometricInterpretation="RGB", SamplesPerPixel=3, BitsStored=16)
    frame = np.zeros((2, 2, 3), dtype=np.uint16)
    frame[0, 0] = (65535, 0, 32768)
    assert render(ds, frame, None)[0, 0].tolist() == [255, 0, 128]
    with pytest.raises(RenderError, match="not supported"):
        render(grey(PhotometricInterpretation="HSV"), np.zeros((2, 2), np.uint16), None)


def test_window_rules() -> None:
    with pytest.raises(ValueError):
        Window(0, 0.5, "LINEAR")  # LINEAR needs at least 1
    assert Window(0, 0.5, "LINEAR_EXACT").width == 0.5
    with pytest.raises(ValueError):
        Window(0, 10, "CUBIC")
    x = np.array([39.0, 40.0, 41.0])
    assert voi_window(x, Window(40, 1, "LINEAR")).tolist() == [0.0, 255.0, 255.0]


# -- pydicom's test files -----------------------------------------------------------------------

LOSSLESS_TWINS = {
    # compressed file: its uncompressed twin (pydicom's own pairs)
    "MR_small_RLE.dcm": "MR_small.dcm",
    "MR_small_jp2klossless.dcm": "MR_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",
    "MR_small_bigendian.dcm": "MR_small.dcm",
    "MR_small_implicit.dcm": "MR_small.dcm",
    "MR_small_expb.dcm": "MR_small.dcm",
    "SC_rgb_gdcm_KY.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_gdcm.dcm": "SC_rgb_rle.dcm",
    "rtdose_rle.dcm": "rtdose.dcm",
    "rtdose_expb.dcm": "rtdose.dcm",
    "liver_expb_1frame.dcm": "liver_1frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",
}
LOSSY_TWINS = {
    "SC_rgb_jpeg_dcmtk.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_jls_lossy_line.dcm": "SC_rgb_rle.dcm",
    "SC_rgb_jls_lossy_sample.dcm": "SC_rgb_rle.dcm",
}


def _file(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not in this pydicom wheel")
    return Path(found)


def _render_file(path: Path, index: int = 0, window: Window | None = None) -> np.ndarray:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = str(header.file_meta.TransferSyntaxUID)
    with path.open("rb") as fh:
        frame = decode_file_frame(fh, index, syntax)
    return render(header, frame, window)


def _pixel_files() -> list[str]:
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for found in pydicom.data.get_testdata_files("*"):
            path = Path(found)
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:
                continue
            if "Rows" in ds and "file_meta" in dir(ds) and "TransferSyntaxUID" in ds.file_meta:
                names.append(path.name)
    return sorted(set(names))


def test_every_transfer_syntax_of_the_wheel_is_covered() -> None:
    syntaxes = set()
    for name in _pixel_files():
        ds = pydicom.dcmread(_file(name), stop_before_pixels=True)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    required = {
        "1.2.840.10008.1.2",  # implicit little endian
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",  # deflate
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.70",  # JPEG lossless
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE
    }
    assert required <= syntaxes


KNOWN_BROKEN = {
    # Files pydicom itself ships as broken: each must become a placeholder, never an error.
    "JPEG-lossy.dcm": "libjpeg",
    "JPEG2000-embedded-sequence-delimiter.dcm": "",
    "MR_truncated.dcm": "",
    "badVR.dcm": "",
}


@pytest.mark.parametrize("name", _pixel_files())
def test_each_test_file_renders_or_says_why_not(name: str, tmp_path: Path) -> None:
    path = _file(name)
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    shown = _service_render(tmp_path, path, header)
    if name in KNOWN_BROKEN:
        assert shown.placeholder, f"{name} should become a placeholder"
        assert KNOWN_BROKEN[name] in shown.placeholder
    else:
        assert shown.placeholder is None, shown.placeholder
    image = Image.open(io.BytesIO(shown.body))
    assert image.format == "PNG" and image.size[0] > 0


def _service_render(tmp_path: Path, path: Path, header: Dataset) -> Any:
    class One:
        async def locators(self, study: str) -> list[str]:
            return ["x.dcm"]

    (tmp_path / "x.dcm").write_bytes(path.read_bytes())
    frames = FolderFrames(tmp_path, One())
    syntax = str(header.file_meta.TransferSyntaxUID)
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    del header.file_meta
    try:
        count = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        count = 1
    image = ImageRef("1.2", "1.2.3", "1.2.3.4", "x.dcm", syntax, header)
    service = RenderService(frames, memory_bytes=1 << 24)
    return asyncio.run(service.render(image, count - 1, media_type="image/png"))


@pytest.mark.parametrize(("compressed", "plain"), sorted(LOSSLESS_TWINS.items()))
def test_lossless_files_render_exactly_as_their_twins(compressed: str, plain: str) -> None:
    frames = int(pydicom.dcmread(_file(plain), stop_before_pixels=True).get("NumberOfFrames", 1))
    for index in {0, frames - 1}:
        a = _render_file(_file(compressed), index)
        b = _render_file(_file(plain), index)
        assert a.shape == b.shape
        assert np.array_equal(a, b), (compressed, index)


@pytest.mark.parametrize(("compressed", "plain"), sorted(LOSSY_TWINS.items()))
def test_lossy_files_render_close_to_their_twins(compressed: str, plain: str) -> None:
    a = _render_file(_file(compressed)).astype(int)
    b = _render_file(_file(plain)).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 6, compressed


def test_a_ct_file_renders_with_its_own_rescale(tmp_path: Path) -> None:
    path = _file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    window = Window(40, 400)
    shown = _render_file(path, 0, window).astype(float)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ref = np.rint(np.vectorize(lambda v: linear_reference(v, 40, 400))(hu))
    assert np.array_equal(shown, ref)


def test_jpeg_2000_ct_matches_pydicom_decode_and_rescale() -> None:
    path = _file("693_J2KI.dcm")
    ds = pydicom.dcmread(path)
    shown = _render_file(path, 0, Window(50, 350)).astype(float)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ref = np.rint(np.vectorize(lambda v: linear_reference(v, 50, 350))(hu))
    assert np.array_equal(shown, ref)


def test_one_frame_of_a_multi_frame_object(tmp_path: Path) -> None:
    path = _file("SC_rgb_rle_2frame.dcm")
    ds = pydicom.dcmread(path)
    with path.open("rb") as fh:
        second = decode_file_frame(fh, 1, str(ds.file_meta.TransferSyntaxUID))
    assert np.array_equal(second, ds.pixel_array[1])
    ybr = _file("examples_ybr_color.dcm")
    whole = pydicom.dcmread(ybr).pixel_array
    with ybr.open("rb") as fh:
        frame = decode_file_frame(fh, 29, "1.2.840.10008.1.2.4.50")
    assert frame.shape == whole[29].shape and np.abs(frame.astype(int) - whole[29]).max() <= 1


def test_a_corrupt_file_is_undecodable_with_a_reason(tmp_path: Path) -> None:
    ds = make_instance()
    write_instance(tmp_path / "a.dcm", ds)
    data = (tmp_path / "a.dcm").read_bytes()
    (tmp_path / "a.dcm").write_bytes(data[: len(data) - 40])
    with (tmp_path / "a.dcm").open("rb") as fh, pytest.raises(Undecodable) as refused:
        decode_file_frame(fh, 0, "1.2.840.10008.1.2.1")
    assert refused.value.reason


# -- output ------------------------------------------------------------------------------------


def test_parameters_of_rendered_resources() -> None:
    assert parse_window("40,400") == Window(40, 400, "LINEAR")
    assert parse_window("40,400,linear-exact").function == "LINEAR_EXACT"
    assert parse_window("-600,1500,sigmoid").function == "SIGMOID"
    for bad in ("40", "a,b", "40,0", "40,400,cubic", "1e999,4"):
        with pytest.raises(BadParameter):
            parse_window(bad)
    assert parse_viewport("128,128").region is None
    assert parse_viewport("64,64,10,10,-20,20").region == (10, 10, -20, 20)
    for bad in ("0,10", "10", "5000,10", "10,10,-1,0,5,5"):
        with pytest.raises(BadParameter):
            parse_viewport(bad)
    assert choose_media_type(None) == "image/jpeg"
    assert choose_media_type("image/png") == "image/png"
    assert choose_media_type("image/webp;q=0.5, image/png;q=0.9") == "image/png"
    assert choose_media_type("image/*") == "image/jpeg"
    for refused in ("application/dicom", 'multipart/related; type="application/dicom"',
                    "application/octet-stream", "image/png;q=0"):  # fmt: skip
        with pytest.raises(NotAcceptable):
            choose_media_type(refused)


def test_viewport_fits_and_flips() -> None:
    image = np.arange(100 * 50, dtype=np.uint8).reshape(100, 50)
    assert fit(image, parse_viewport("20,20")).shape == (20, 10)
    region = fit(image, parse_viewport("50,100,0,0,50,100"))
    assert np.array_equal(region, image)
    flipped = fit(image, parse_viewport("50,100,0,0,-50,100"))
    assert np.array_equal(flipped, image[:, ::-1])


def test_encodings_and_the_placeholder() -> None:
    image = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    png = Image.open(io.BytesIO(encode(image, "image/png")))
    assert png.format == "PNG" and np.array_equal(np.asarray(png), image)
    assert Image.open(io.BytesIO(encode(image, "image/jpeg", 80))).format == "JPEG"
    webp = Image.open(io.BytesIO(encode(image, "image/webp", 100)))
    assert webp.format == "WEBP" and np.array_equal(np.asarray(webp.convert("L")), image)
    sign = placeholder(300, 200, ["This image cannot be displayed", "RuntimeError: " + "x" * 400])
    assert sign.shape == (200, 300) and sign.max() > 200 and sign.min() < 60
    assert math.isclose(float(np.median(sign)), 40, abs_tol=1)
