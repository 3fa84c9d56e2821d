"""Transcoding a stored instance for a retrieve that does not accept its transfer syntax.

DICOMweb's default representation of an instance is Explicit VR Little Endian (PS3.18
8.7.3.5.2), and clients ask for it (dicomweb-client does by default). A DICOMweb archive
transcodes itself; a folder of files needs this module: pydicom decodes the pixel data with
the pylibjpeg plugins (libjpeg: JPEG and JPEG-LS; openjpeg: JPEG 2000 and HTJ2K; rle: RLE
Lossless; decision 0008) and writes the instance again, uncompressed, in the syntax asked for.

One instance at a time and only when asked: a retrieve that accepts the stored syntax
(``transfer-syntax=*`` or the stored one) never comes here and keeps the zero-copy path.
Explicit VR Big Endian (retired) is not converted: pydicom cannot swap every element's bytes.
"""

from __future__ import annotations

import io
import os
import warnings
from functools import cache
from pathlib import Path

import pydicom
from pydicom.uid import UID as DicomUID
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ncp.errors import NcpError

TARGETS = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
"""What a stored instance can be transcoded to: the uncompressed little endian syntaxes."""
_PLAIN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
"""Stored syntaxes pydicom reads without a pixel data decoder."""


class TranscodeError(NcpError):
    """The stored instance cannot be written in the syntax asked for (why, in the text)."""


@cache
def can_decode(syntax: str) -> bool:
    """Whether an instance stored in ``syntax`` can be transcoded to :data:`TARGETS` here."""
    if syntax in _PLAIN:
        return True
    if syntax == ExplicitVRBigEndian:
        return False
    uid = DicomUID(syntax)
    if not uid.is_compressed:
        return False
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_transcode(stored: str, target: str) -> bool:
    return target in TARGETS and (stored == target or can_decode(stored))


def syntax_name(syntax: str) -> str:
    """A transfer syntax's name, for messages (its UID when pydicom does not know it)."""
    name = DicomUID(syntax).name
    return name if name and name != syntax else syntax


def transcode(path: Path, target: str) -> bytes:
    """The Part 10 object at ``path`` (opened without following a link) written in ``target``
    (one of :data:`TARGETS`): pixel data decoded, everything else kept, the file meta group
    saying the new syntax. TranscodeError when that cannot be done."""
    if target not in TARGETS:
        raise TranscodeError(f"this node transcodes to uncompressed syntaxes only, not {target}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # real files' tolerated oddities are the index's
            ds = pydicom.dcmread(fh)
            stored = str(ds.file_meta.TransferSyntaxUID)
            if not can_transcode(stored, target):
                raise TranscodeError(f"no decoder here for {syntax_name(stored)}")
            if DicomUID(stored).is_compressed:
                # The same instance in another syntax: its SOP Instance UID stays (PS3.5 10;
                # pydicom would make a new one by default).
                ds.decompress(generate_instance_uid=False)
            ds.file_meta.TransferSyntaxUID = DicomUID(target)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
    except TranscodeError:
        raise
    except OSError as exc:
        raise TranscodeError(f"the stored file cannot be read ({exc.strerror})") from None
    except Exception as exc:  # a decoder or writer refusing this file: pydicom raises many kinds
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise TranscodeError(f"{type(exc).__name__}: {text[:200]}") from None
    return out.getvalue()
