"""Decoding one frame of pixel data with pydicom and its decoders (pylibjpeg with its libjpeg,
openjpeg and RLE plugins): JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE, and
native data in any byte order, deflated or not.

Only the frame asked for is decoded: pydicom's ``pixel_array(file, index=i)`` reads the header,
then seeks to that frame (native data) or to its fragments (encapsulated data, by the Basic or
Extended Offset Table or by walking the fragments). A deflated data set must be inflated whole
first, so it is read whole. YBR colour is converted to RGB by pydicom.

Native little-endian grayscale and 8-bit RGB data (nearly every CT, MR, CR and DX file) take a
shorter path: the header the viewer keeps already says how a frame is laid out
(:func:`native_layout`), so a frame is the bytes at its offset read as an array
(:func:`native_frame`), with pydicom's correction of unused high bits; no header is parsed
again. Everything else goes through pydicom.

Whatever fails becomes :class:`Undecodable` with a short reason (the viewer shows a
placeholder saying so and logs it); pydicom and the plugins raise many kinds of exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ncp.errors import NcpError

log = logging.getLogger(__name__)

_PIXEL_MODULE = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_ONE_SAMPLE = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})


class Undecodable(NcpError):
    """A frame that cannot be decoded; ``reason`` is short enough to show on a placeholder."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_file_frame(fh: BinaryIO, index: int, transfer_syntax: str) -> NDArray[Any]:
    """Frame ``index`` (0-based) of the Part 10 object in ``fh`` (a seekable file)."""
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        try:
            return _checked(pixel_array(fh, index=index))
        except Undecodable:
            raise
        except Exception as exc:
            # The frame-only path is stricter than a whole read about some real files (a
            # Basic Offset Table padded with zeros, a deflated object not said to be one):
            # read the object whole and decode again before giving up.
            log.debug("frame-only decode failed (%s); reading the object whole", exc)
            fh.seek(0)
    try:
        return _checked(pixel_array(dcmread(fh), index=index))
    except Undecodable:
        raise
    except Exception as exc:
        raise _undecodable(exc) from None


@dataclass(frozen=True, slots=True)
class NativeLayout:
    """Where the frames of native (uncompressed, little-endian) pixel data are, as the header
    says: every frame ``frame_bytes`` long, one after another."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    """Of one frame as stored: (rows, columns), (rows, columns, 3), or (3, rows, columns) for
    colour by plane."""
    frame_bytes: int
    frames: int
    unused_bits: int
    """Bits Allocated minus Bits Stored: the high bits pydicom clears (or sign-extends)."""
    by_plane: bool = False
    """Colour stored plane by plane (Planar Configuration 1): shown pixel by pixel."""

    @property
    def value_length(self) -> int:
        """The Pixel Data element's length: all frames, padded to an even length."""
        total = self.frame_bytes * self.frames
        return total + total % 2


def native_layout(header: Dataset, transfer_syntax: str) -> NativeLayout | None:
    """The layout of the frames of an image stored natively in little-endian byte order, for
    the images :func:`native_frame` reads exactly as pydicom does (grayscale and palette
    images of 8, 16 or 32 bits, RGB of 8 bits); None for everything else (compressed, big
    endian, deflated, 1-bit, YBR, float pixel data), which pydicom decodes."""
    if transfer_syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        rows, cols = int(header.Rows), int(header.Columns)
        samples = int(header.get("SamplesPerPixel") or 1)
        allocated, stored = int(header.BitsAllocated), int(header.BitsStored)
        signed = int(header.get("PixelRepresentation") or 0) == 1
        photometric = str(header.PhotometricInterpretation).strip()
        planar = int(header.get("PlanarConfiguration") or 0)
        frames = max(1, int(header.get("NumberOfFrames") or 1))
    except (AttributeError, TypeError, ValueError):
        return None
    if rows < 1 or cols < 1 or allocated not in (8, 16, 32) or not 1 <= stored <= allocated:
        return None
    if samples == 1 and photometric in _ONE_SAMPLE:
        shape: tuple[int, ...] = (rows, cols)
    elif samples == 3 and photometric == "RGB" and allocated == 8 and planar in (0, 1):
        shape = (3, rows, cols) if planar == 1 else (rows, cols, 3)
    else:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    frame_bytes = rows * cols * samples * allocated // 8
    by_plane = samples == 3 and planar == 1
    return NativeLayout(dtype, shape, frame_bytes, frames, allocated - stored, by_plane)


def native_frame(layout: NativeLayout, data: bytes | memoryview) -> NDArray[Any]:
    """One frame's bytes (``layout.frame_bytes`` of them) as pydicom's ``pixel_array`` gives
    it: unused high bits cleared (unsigned) or sign-extended (signed), colour by pixel."""
    if len(data) < layout.frame_bytes:
        raise Undecodable("the pixel data is shorter than its header says")
    frame = np.frombuffer(data, layout.dtype, count=layout.frame_bytes // layout.dtype.itemsize)
    frame = frame.reshape(layout.shape)
    if layout.unused_bits:
        frame = frame.copy()
        np.left_shift(frame, layout.unused_bits, out=frame)
        np.right_shift(frame, layout.unused_bits, out=frame)
    if layout.by_plane:
        frame = np.ascontiguousarray(frame.transpose(1, 2, 0))
    # Frames are kept in memory and shared between threads: nobody may change one.
    frame.flags.writeable = False
    return frame


def pixel_data_start(
    read_at: Callable[[int, int], bytes], size: int, layout: NativeLayout, syntax: str
) -> int | None:
    """Where the native Pixel Data value of a Part 10 object of ``size`` bytes starts, when it
    is the object's last element (as nearly always); None otherwise, and pydicom reads it.
    ``read_at(offset, n)``: n bytes of the object from ``offset``.

    The value is the last ``value_length`` bytes when the element just before them is Pixel
    Data (7FE0,0010) of exactly that length: 12 bytes of tag, VR OB or OW, two reserved bytes
    and length (explicit VR), or 8 of tag and length (implicit VR). A header that says the
    frames are laid out otherwise than the object holds them fails this check.
    """
    length = layout.value_length
    head = 8 if syntax == ImplicitVRLittleEndian else 12
    start = size - length
    if start < 132 + head:  # preamble, DICM and a file meta group come first
        return None
    element = read_at(start - head, head)
    if element[:4] != b"\xe0\x7f\x10\x00" or int.from_bytes(element[-4:], "little") != length:
        return None
    if head == 12 and (element[4:6] not in (b"OB", b"OW") or element[6:8] != b"\0\0"):
        return None
    return start


def decode_frame_bytes(header: Dataset, transfer_syntax: str, data: bytes) -> NDArray[Any]:
    """One frame's bytes as a DICOMweb archive sends them (WADO-RS frames, as stored): the raw
    pixels of native data, or the codestream of an encapsulated frame."""
    layout = native_layout(header, transfer_syntax)
    if layout is not None:
        return native_frame(layout, data)
    try:
        syntax = UID(transfer_syntax)
        ds = Dataset()
        for keyword in _PIXEL_MODULE:
            if keyword in header:
                setattr(ds, keyword, header.get(keyword))
        ds.NumberOfFrames = 1
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([data]) if syntax.is_compressed else data
        if syntax.is_compressed:
            ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB" if syntax.is_compressed or ds.get("BitsAllocated") == 8 else "OW"
        return _checked(pixel_array(ds, index=0))
    except Exception as exc:
        raise _undecodable(exc) from None


def _checked(frame: NDArray[Any]) -> NDArray[Any]:
    if frame.ndim not in (2, 3) or frame.size == 0:
        raise Undecodable(f"the decoded frame has an unexpected shape {frame.shape}")
    return frame


def _undecodable(exc: BaseException) -> Undecodable:
    text = " ".join(str(exc).split())
    # pydicom lists each plugin's failure: the first line says enough for a placeholder.
    first = text.split("  ")[0] if text else type(exc).__name__
    reason = f"{type(exc).__name__}: {first}"[:240]
    log.warning("frame not decoded: %s", reason)
    return Undecodable(reason)
