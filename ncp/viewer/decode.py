"""Decoding one frame of pixel data with pydicom and its decoders (pylibjpeg with its libjpeg,
openjpeg and RLE plugins): JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE, and
native data in any byte order, deflated or not.

Only the frame asked for is decoded: pydicom's ``pixel_array(file, index=i)`` reads the header,
then seeks to that frame (native data) or to its fragments (encapsulated data, by the Basic or
Extended Offset Table or by walking the fragments). A deflated data set must be inflated whole
first, so it is read whole. YBR colour is converted to RGB by pydicom.

Whatever fails becomes :class:`Undecodable` with a short reason (the viewer shows a
placeholder saying so and logs it); pydicom and the plugins raise many kinds of exception.
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

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


def decode_frame_bytes(header: Dataset, transfer_syntax: str, data: bytes) -> NDArray[Any]:
    """One frame's bytes as a DICOMweb archive sends them (WADO-RS frames, as stored): the raw
    pixels of native data, or the codestream of an encapsulated frame."""
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
