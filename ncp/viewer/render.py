"""A decoded frame to display values: the grayscale and colour pipelines of DICOM PS3.3 C.11.

Grayscale (MONOCHROME1, MONOCHROME2), in the standard's order:

1. **Modality LUT** (C.11.1): the Modality LUT Sequence when present, else Rescale Slope and
   Intercept; stored values become modality values (HU for CT). pydicom's ``apply_modality_lut``
   does it.
2. **VOI** (C.11.2): a window (centre, width) with the VOI LUT Function ``LINEAR``,
   ``LINEAR_EXACT`` or ``SIGMOID`` (C.11.2.1.2 and C.11.2.1.3, written out below), or the VOI
   LUT Sequence; modality values become display values 0..255.
3. **Presentation**: MONOCHROME1 shows low values bright, so its display values are inverted;
   a MONOCHROME2 image whose Presentation LUT Shape is INVERSE likewise.

The window is the caller's (a window preset, a drag in the viewer, PS3.18 ``window=``), else
the image's own first Window Center/Width, else its VOI LUT, else the frame's value range.

Integer frames (nearly all) are rendered through a lookup table over the frame's value range:
the pipeline runs once per distinct stored value, then one indexing pass maps the frame, so a
16-bit 512x512 CT frame costs about a millisecond whatever the window function.

Colour: RGB (YBR is converted to RGB by pydicom while decoding) is scaled to 8 bits; PALETTE
COLOR goes through its palette (pydicom's ``apply_color_lut``). No VOI applies to colour
(PS3.3 C.11.2 is grayscale only), so a window asked for a colour image is ignored.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
"""VOI LUT Function (0028,1056) defined terms."""
_LUT_SPAN = 1 << 17
"""Widest range of stored values rendered through a lookup table; wider frames (32-bit data)
are computed value by value."""

Display = NDArray[np.uint8]
"""Rows x columns (grayscale) or rows x columns x 3 (RGB), 0..255."""


class RenderError(ValueError):
    """The frame cannot be rendered as its header describes it (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window: centre and width in modality values, and its function."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ValueError(f"window function must be one of {', '.join(FUNCTIONS)}")
        if not (np.isfinite(self.center) and np.isfinite(self.width)):
            raise ValueError("window centre and width must be finite numbers")
        # C.11.2.1.2: LINEAR needs a width of at least 1, the others a positive width.
        if self.width < 1 if self.function == "LINEAR" else self.width <= 0:
            minimum = "at least 1" if self.function == "LINEAR" else "positive"
            raise ValueError(f"a {self.function} window's width must be {minimum}")


@dataclass(frozen=True, slots=True)
class Presets:
    """The windows an image offers (Window Center/Width pairs with their explanations) and
    whether it has a VOI LUT; the first window is the image's default."""

    windows: tuple[tuple[Window, str], ...]
    has_voi_lut: bool


def is_grayscale(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip() in ("MONOCHROME1", "MONOCHROME2")


def image_presets(ds: Dataset) -> Presets:
    """The image's own windows, in the order given; malformed pairs are left out."""
    centers = _numbers(ds.get("WindowCenter"))
    widths = _numbers(ds.get("WindowWidth"))
    explanations = _texts(ds.get("WindowCenterWidthExplanation"))
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper() or "LINEAR"
    if function not in FUNCTIONS:
        function = "LINEAR"  # an unknown function is read as the default one (C.11.2.1.3)
    windows: list[tuple[Window, str]] = []
    for i, (center, width) in enumerate(zip(centers, widths, strict=False)):
        try:
            window = Window(center, width, function)
        except ValueError:
            continue
        windows.append((window, explanations[i] if i < len(explanations) else ""))
    voi = ds.get("VOILUTSequence")
    return Presets(tuple(windows), bool(voi) and len(voi) > 0)


def render(ds: Dataset, frame: NDArray[Any], window: Window | None = None) -> Display:
    """The display values of one decoded frame of the image ``ds`` describes.

    ``frame``: as pydicom decodes it (rows x columns, or rows x columns x samples, with YBR
    already converted to RGB). ``window``: the caller's; None for the image's default.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if frame.ndim != 2:
            raise RenderError(f"a {photometric} frame must have one sample per pixel")
        return _grayscale(ds, frame, window, invert=_inverted(ds, photometric))
    if photometric == "PALETTE COLOR":
        if frame.ndim != 2:
            raise RenderError("a PALETTE COLOR frame must have one sample per pixel")
        try:
            rgb = apply_color_lut(frame, ds)
        except Exception as exc:  # a missing or malformed palette: pydicom raises many kinds
            raise RenderError(f"the palette cannot be applied: {exc}") from None
        return _to_8_bits(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise RenderError(f"a {photometric} frame must have three samples per pixel")
        return _to_8_bits(frame, int(ds.get("BitsStored") or 8))
    raise RenderError(f"photometric interpretation {photometric or '(none)'} is not supported")


def pixel_aspect(ds: Dataset) -> float:
    """How much taller than wide a pixel is (PS3.3 C.7.6.3.1.2 and 10.7.1.3): the ratio of
    Pixel Spacing's row spacing to its column spacing (or of Imager Pixel Spacing's, or of
    the shared functional groups' Pixel Measures), else Pixel Aspect Ratio's vertical to
    horizontal; 1 when the header says nothing usable. Kept within 1/10 to 10."""
    candidates = [ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")]
    shared = ds.get("SharedFunctionalGroupsSequence")
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        candidates.append(shared[0].PixelMeasuresSequence[0].get("PixelSpacing"))
    candidates.append(ds.get("PixelAspectRatio"))
    for value in candidates:
        pair = _numbers(value)
        if len(pair) == 2 and all(np.isfinite(pair)) and pair[0] > 0 and pair[1] > 0:
            ratio = pair[0] / pair[1]
            return 1.0 if abs(ratio - 1.0) < 1e-3 else float(min(10.0, max(0.1, ratio)))
    return 1.0


def default_window(ds: Dataset, frame: NDArray[Any]) -> Window | None:
    """The window :func:`render` uses when none is given: the image's first, or None when the
    image has a VOI LUT; else the frame's range of modality values."""
    presets = image_presets(ds)
    if presets.windows:
        return presets.windows[0][0]
    if presets.has_voi_lut:
        return None
    lo, hi = _modality_range(ds, frame)
    return Window((lo + hi) / 2, max(hi - lo, 1e-6), "LINEAR_EXACT")


# -- grayscale ----------------------------------------------------------------------------------


def _inverted(ds: Dataset, photometric: str) -> bool:
    # MONOCHROME1 is inverted for display; its Presentation LUT Shape (INVERSE, as DX requires)
    # says the same thing again, not a second inversion.
    if photometric == "MONOCHROME1":
        return True
    return str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"


def _grayscale(ds: Dataset, frame: NDArray[Any], window: Window | None, *, invert: bool) -> Display:
    if frame.size == 0:
        raise RenderError("the frame has no pixels")
    chosen = window or default_window(ds, frame)
    if frame.dtype.kind in "iu" and frame.dtype.itemsize <= 2:
        # 8 and 16-bit frames: a table over every bit pattern of the type, built once per
        # header and window, then one gather; no pass over the frame to find its range.
        unsigned = np.dtype(f"u{frame.dtype.itemsize}")
        lut = _table(ds, chosen, invert, frame.dtype)
        return np.take(lut, frame.view(unsigned))
    if frame.dtype.kind in "iub":
        lo, hi = int(frame.min()), int(frame.max())
        if hi - lo < _LUT_SPAN:
            domain = np.arange(lo, hi + 1, dtype=np.int64)
            lut = _display(ds, domain, chosen, invert)
            index = frame.astype(np.int64) - lo if lo else frame
            return lut[index]
    return _display(ds, frame, chosen, invert)


_TABLES: OrderedDict[tuple[Any, ...], Display] = OrderedDict()
_TABLES_LOCK = threading.Lock()
_TABLES_KEPT = 64


def _table(ds: Dataset, window: Window | None, invert: bool, dtype: np.dtype[Any]) -> Display:
    """Display values for every bit pattern of ``dtype`` (256 or 65536 entries), in the order of
    the patterns read as unsigned. Kept for headers whose rescale values are equal: the images
    of a series share one table per window."""
    bits = dtype.itemsize * 8
    patterns = np.arange(1 << bits, dtype=np.dtype(f"u{dtype.itemsize}"))
    if "ModalityLUTSequence" in ds or window is None:
        # Tables from a header's own LUT data are not kept: their key would be the data.
        return _display(ds, patterns.view(dtype).astype(np.int64), window, invert)
    rescale = (str(ds.get("RescaleSlope", "")), str(ds.get("RescaleIntercept", "")))
    key = (rescale, window, invert, dtype.str)
    with _TABLES_LOCK:
        found = _TABLES.get(key)
        if found is not None:
            _TABLES.move_to_end(key)
            return found
    table = _display(ds, patterns.view(dtype).astype(np.int64), window, invert)
    with _TABLES_LOCK:
        _TABLES[key] = table
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return table


def _display(ds: Dataset, stored: NDArray[Any], window: Window | None, invert: bool) -> Display:
    values = _modality(ds, stored)
    out = voi_window(values, window) if window is not None else _voi_lut(ds, values)
    if invert:
        out = 255.0 - out
    return np.rint(out).astype(np.uint8)


def _modality(ds: Dataset, stored: NDArray[Any]) -> NDArray[np.float64]:
    try:
        values = apply_modality_lut(stored, ds)
    except Exception as exc:  # a malformed Modality LUT: pydicom raises many kinds
        raise RenderError(f"the modality LUT cannot be applied: {exc}") from None
    return np.asarray(values, dtype=np.float64)


def _modality_range(ds: Dataset, frame: NDArray[Any]) -> tuple[float, float]:
    if frame.dtype.kind in "iub":
        lo, hi = int(frame.min()), int(frame.max())
        ends = _modality(ds, np.arange(lo, hi + 1, dtype=np.int64)) if hi - lo < _LUT_SPAN else None
        if ends is not None:
            return float(ends.min()), float(ends.max())
    values = _modality(ds, frame)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def voi_window(x: NDArray[np.float64], window: Window) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3 (SIGMOID) with the output range
    0..255 (y_min 0, y_max 255)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR_EXACT":
        y = ((x - c) / w + 0.5) * 255.0
        return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    # LINEAR: the classic window, whose edges sit half a unit inside (C.11.2.1.2.1).
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else np.zeros_like(x)
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, y))


def _voi_lut(ds: Dataset, values: NDArray[np.float64]) -> NDArray[np.float64]:
    """The first VOI LUT of the VOI LUT Sequence (C.11.2.1.1): values below the first mapped
    value take the first entry, above the last the last; entries scaled from the LUT's bit
    depth to 0..255."""
    try:
        item = ds.VOILUTSequence[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        entries = descriptor[0] or 65536  # 0 means 2^16 entries (C.11.1.1.1)
        first, bits = descriptor[1], descriptor[2]
        data = _lut_data(item, entries)
    except Exception as exc:
        raise RenderError(f"the VOI LUT cannot be read: {exc}") from None
    if not 8 <= bits <= 16:
        raise RenderError(f"the VOI LUT's entries have {bits} bits, not 8 to 16")
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    scaled: NDArray[np.float64] = np.clip(data[index] * (255.0 / ((1 << bits) - 1)), 0.0, 255.0)
    return scaled


def _lut_data(item: Dataset, entries: int) -> NDArray[np.float64]:
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        data = np.frombuffer(raw, dtype="<u2").astype(np.float64)
    else:
        data = np.asarray(list(raw) if not isinstance(raw, int) else [raw], dtype=np.float64)
    if data.size < entries:
        raise ValueError(f"LUT Data holds {data.size} entries, the descriptor says {entries}")
    return data[:entries]


# -- colour ------------------------------------------------------------------------------------


def _to_8_bits(rgb: NDArray[Any], bits: int) -> Display:
    if rgb.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(rgb)
    top = float((1 << min(max(bits, 1), 32)) - 1)
    scaled = np.clip(rgb.astype(np.float64) * (255.0 / top), 0.0, 255.0)
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8))


# -- header values ------------------------------------------------------------------------------


def _numbers(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    out: list[float] = []
    for item in items:
        try:
            out.append(float(item))
        except (TypeError, ValueError):
            out.append(float("nan"))  # refused by Window(): the pair is left out
    return out


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]
