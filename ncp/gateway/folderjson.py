"""A folder archive's instances as DICOM JSON (PS3.18 F.2), without reading and converting
every instance's whole header (decision 0014).

QIDO-RS answers with a few attributes (:data:`QIDO_TAGS`: those each level returns by default,
and what the gateway checks). The folder catalogue keeps only those of each instance
(:func:`read_qido_header`, :func:`qido_json`): read from the file's first 64 KiB by the
gateway's own element walk (:func:`ncp.gateway.parthead.top_elements`: no pydicom reader,
which took about 0.3 ms an instance), and converted by pydicom element by element, each
distinct raw value once (an instance repeats its series' and study's values: the conversion,
about 2 ms for a whole header, was most of the catalogue's start-up). A file the walk cannot
read exactly as pydicom would is read by pydicom, as before. The whole header of an instance
is read and converted only when asked for (:func:`whole_json`: WADO-RS metadata, a search
for other attributes).

Both convert as ``Dataset.to_json_dict(suppress_invalid_tags=True)`` did: each element under
pydicom's strict reading, and an element pydicom cannot write is left out alone (the Patient
ID and the rest stay: :mod:`ncp.gateway.servable`). What was left out is said in one warning
line per instance, naming the file and the elements (pydicom logged an ERROR line for each
element and enclosing sequence); the catalogue's read says nothing where nothing of
:data:`QIDO_TAGS` is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import MediaStorageDirectoryStorage
from pydicom.valuerep import AMBIGUOUS_VR

from ncp.dicom.folder import FolderSource
from ncp.dicom.source import InstanceHeader, SkippedEntry, SourceEntry
from ncp.errors import UnreadableInstance
from ncp.gateway.parthead import (
    EXPLICIT_BE,
    HEAD_LIMIT,
    IMPLICIT_LE,
    meta_end,
    meta_values,
    top_elements,
)

log = logging.getLogger(__name__)


def _tags(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The attributes QIDO-RS returns by default at each level (PS3.18 10.6.3.3), with the Issuer
# of Patient ID the gateway's patient check needs.
STUDY_TAGS = _tags(
    "00080005 00080020 00080030 00080050 00080051 00080090 00080201 00081030 00100010 "
    "00100020 00100021 00100030 00100040 0020000D 00200010"
)
SERIES_TAGS = _tags(
    "00080005 00080060 0008103E 00180015 0020000D 0020000E 00200011 00200060 00400244 00400245"
)
INSTANCE_TAGS = _tags(
    "00080005 00080016 00080018 0020000D 0020000E 00200013 00280008 00280010 00280011 00280100"
)
_PIXEL_REPRESENTATION = 0x00280103
QIDO_TAGS = STUDY_TAGS | SERIES_TAGS | INSTANCE_TAGS | {f"{_PIXEL_REPRESENTATION:08X}"}
"""What the catalogue holds of each instance. Pixel Representation is read with them: pydicom
consults it when it converts a sequence (an ambiguous US or SS inside), so a sequence read
without it could come out otherwise than from the whole header. Everything the identity
mapping (:func:`ncp.dicom.mapping.map_instance`) reads is among them."""
_READ = frozenset(int(tag, 16) for tag in QIDO_TAGS)
_THROUGH = max(_READ)
_CONVERTED = _READ - {0x0020000D, 0x0020000E, 0x00080018}

_MEMO_LIMIT = 65_536
_MEMO_VALUE_BYTES = 1024
"""Raw values up to this size are converted once; longer ones each time (they rarely repeat)."""
_LOCK = threading.Lock()
"""Serialises conversions: pydicom's strict reading is a process-wide setting that each one
sets and restores (two at once could leave it on)."""
_memo: dict[tuple[Any, ...], tuple[bool, Any]] = {}
_encodings: dict[tuple[Any, ...], str | list[str]] = {}
_CHARSET = BaseTag(0x00080005)
_SAID_LIMIT = 65_536
_said: set[tuple[str, str, str]] = set()
"""(file, fingerprint, what) already said to have lost values: one line per instance."""
_quiet = threading.local()


class _PydicomConversionLog(logging.Filter):
    """Drops pydicom's own lines about elements it could not convert while one of ours runs:
    :func:`_convert` says what was left out, once per instance."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_quiet, "on", False):
            return True
        return not str(record.msg).startswith("Error while processing tag")


logging.getLogger("pydicom").addFilter(_PydicomConversionLog())


def read_qido_header(source: FolderSource, entry: SourceEntry) -> InstanceHeader | SkippedEntry:
    """The :data:`QIDO_TAGS` of one file of ``source`` (as an InstanceHeader whose data set
    holds those only), read from its first :data:`HEAD_LIMIT` bytes; when the element walk
    cannot read them exactly as pydicom would, the whole header read by pydicom
    (:meth:`FolderSource.read_headers`: the same skips, for the same reasons)."""
    try:
        fd = os.open(source.path_of(entry.locator), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb", buffering=0) as fh:
            size = os.fstat(fd).st_size
            head = b""
            while len(head) < min(size, HEAD_LIMIT):
                piece = fh.read(min(size, HEAD_LIMIT) - len(head))
                if not piece:
                    break
                head += piece
    except (OSError, UnreadableInstance):
        head, size = b"", -1  # pydicom's read says why, as the indexer reports it
    light = _light_header(entry, head, size) if size >= 0 else None
    if light is not None:
        return light
    return next(iter(source.read_headers([entry])))


def _light_header(entry: SourceEntry, head: bytes, size: int) -> InstanceHeader | None:
    try:
        meta = meta_values(head)
    except Exception:
        return None
    if meta is None:
        return None
    syntax = _uid(meta.get(0x0010))
    if syntax is None or _uid(meta.get(0x0002)) == MediaStorageDirectoryStorage:
        return None  # pydicom's read refuses it, with its reason
    found = top_elements(
        memoryview(head), meta_end(head), syntax, _READ, _THROUGH, whole=len(head) == size
    )
    if found is None:
        return None
    implicit, little = syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
    raws: dict[BaseTag, Any] = {}
    for tag in sorted(found):
        element = found[tag]
        key = BaseTag(tag)
        value = head[element.start : element.start + element.length]
        raws[key] = RawDataElement(
            key, element.vr, element.length, value, element.start, implicit, little
        )
    dataset = Dataset(raws)
    dataset.set_original_encoding(implicit, little, _encoding(raws))
    return InstanceHeader(entry, dataset, size, syntax, _uid(meta.get(0x0003)))


def _uid(value: bytes | None) -> str | None:
    """A UID of the file meta group as :func:`ncp.dicom.elements.uid_value` reads it."""
    if value is None:
        return None
    return value.decode("latin-1").replace("\x00", "").strip() or None


def _encoding(raws: dict[BaseTag, Any]) -> str | list[str]:
    """The data set's character set as pydicom's reader sets it (``read_dataset``)."""
    raw = raws.get(_CHARSET)
    if raw is None:
        return "iso8859"
    key = (raw.VR, raw.value, raw.is_implicit_VR, raw.is_little_endian)
    known = _encodings.get(key)
    if known is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = convert_raw_data_element(raw).value
            known = convert_encodings(value)  # type: ignore[arg-type]
        if len(_encodings) >= _MEMO_LIMIT:
            _encodings.clear()
        _encodings[key] = known
    return list(known) if isinstance(known, list) else known


def qido_json(header: InstanceHeader) -> dict[str, Any]:
    """The :data:`QIDO_TAGS` of ``header`` that it has, as DICOM JSON; without the Study,
    Series and SOP Instance UIDs, which the catalogue sets as the index reads them."""
    return _convert(header, _CONVERTED, "QIDO")


def whole_json(header: InstanceHeader) -> dict[str, Any]:
    """The whole header (no pixel data, no file meta) as DICOM JSON, element by element as
    ``Dataset.to_json_dict(suppress_invalid_tags=True)`` writes it."""
    return _convert(header, None, "metadata")


def _convert(header: InstanceHeader, wanted: frozenset[int] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dropped: list[str] = []
    ds = header.dataset
    # As stored (items() converts nothing), in the data set's order, as to_json_dict goes.
    elements = [(int(t), e) for t, e in ds.items() if wanted is None or int(t) in wanted]
    encoding = ds.original_character_set
    pixels = ds.get_item(_PIXEL_REPRESENTATION)
    context = (
        ds.original_encoding,
        tuple(encoding) if isinstance(encoding, list) else encoding,
        (pixels.VR, pixels.value) if isinstance(pixels, RawDataElement) else repr(pixels),
    )
    with _LOCK, _strict():
        for tag, element in elements:
            key = _memo_key(tag, element, context)
            done = _memo.get(key) if key is not None else None
            if done is None:
                try:
                    done = (True, ds[tag].to_json_dict(None, 1024))
                except Exception as exc:
                    done = (False, str(exc).split(". Please see")[0][:200])
                if key is not None:
                    if len(_memo) >= _MEMO_LIMIT:
                        _memo.clear()
                    _memo[key] = done
            ok, value = done
            if ok:
                out[f"{tag:08X}"] = value
            else:
                name = keyword_for_tag(tag) or "private or unknown"
                dropped.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {name}: {value}")
    said = (header.entry.locator, header.entry.fingerprint, what)
    if dropped and said not in _said:
        if len(_said) >= _SAID_LIMIT:
            _said.clear()
        _said.add(said)
        log.warning(
            "folder archive: %s: left out of its %s (values pydicom cannot write as DICOM "
            "JSON): %s",
            header.entry.locator,
            what,
            "; ".join(dropped),
        )
    return out


@contextmanager
def _strict() -> Iterator[None]:
    with config.strict_reading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quiet.on = True
        try:
            yield
        finally:
            _quiet.on = False


def _memo_key(tag: int, element: Any, context: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What the conversion of ``element`` depends on (with ``context``: the data set's VR
    encoding and byte order, its character set, and its Pixel Representation for a sequence),
    or None when it may depend on more of the data set: a converted element, a private tag
    (its VR comes from its private creator), an ambiguous VR (pydicom resolves it from other
    elements), an undefined length, a long value."""
    if not isinstance(element, RawDataElement) or not _self_contained(tag):
        return None
    value = element.value
    if value is None or len(value) != element.length or element.length > _MEMO_VALUE_BYTES:
        return None
    if (element.is_implicit_VR, element.is_little_endian) != context[0]:
        return None  # a sequence item's element: not the data set's encoding
    return (tag, element.VR, value, context)


@lru_cache(maxsize=8192)
def _self_contained(tag: int) -> bool:
    """Whether pydicom converts an element of ``tag`` from its own bytes (and the character
    set, and for a sequence the Pixel Representation: the memo's context) alone."""
    if tag >> 16 & 1:
        return False  # private: its VR comes from its private creator
    try:
        return dictionary_VR(tag) not in AMBIGUOUS_VR  # resolved from other elements
    except KeyError:
        return True  # not in the dictionary: its VR is the one written (or UN)
