"""What a retrieved part says it is, read from its first bytes only: the file meta group's SOP
Instance UID and transfer syntax (:func:`file_meta`), and the data set's Study, Series and SOP
Instance UIDs (:func:`dataset_ids`).

Parsed here, not by pydicom (its reader took about a millisecond per instance, more than moving
a CT slice), and only within :data:`HEAD_LIMIT` bytes of the part. The data set is walked
element by element at its top level: sequences are skipped by their lengths or delimiters,
never searched, so a UID inside one (a Referenced Study Sequence) is never taken for the
instance's own; tags must ascend strictly (PS3.5 7.1), so no element can be given twice and
read differently by another reader.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ncp.dicom.uids import is_uid
from ncp.gateway.errors import StreamBroken

Buffer = bytes | bytearray | memoryview

HEAD_LIMIT = 64 * 1024
"""The most of a part read before it must have named itself (file meta and data set UIDs)."""

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
"""Syntaxes whose data set (after the file meta group) is deflated (PS3.5 A.5, A.7)."""

# These VRs have 2 reserved bytes and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED_OK = frozenset({b"SQ", b"UN", b"OB", b"OW"})
_SOP, _STUDY, _SERIES = 0x00080018, 0x0020000D, 0x0020000E
_WANTED = frozenset({_SOP, _STUDY, _SERIES})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 12
_VRS = _LONG_VRS | {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
    b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Structs:
    explicit: struct.Struct
    """tag group, element, VR, 2-byte length"""
    u32: struct.Struct


_LE = _Structs(struct.Struct("<HH2sH"), struct.Struct("<I"))
_BE = _Structs(struct.Struct(">HH2sH"), struct.Struct(">I"))


@dataclass(frozen=True, slots=True)
class PartIds:
    """The UIDs a part's data set gives at its top level."""

    study: str
    series: str
    sop: str


def file_meta(prefix: Buffer) -> tuple[str, str] | None:
    """``(sop_instance_uid, transfer_syntax_uid)`` from the start of a Part 10 object; None
    while ``prefix`` is too short to hold the whole file meta group. StreamBroken if it is not
    a Part 10 object (group 0002 is always Explicit VR Little Endian, PS3.10 7.1)."""
    values = meta_values(prefix)
    if values is None:
        return None
    sop = _uid_text(values.get(0x0003, b""))
    syntax = _uid_text(values.get(0x0010, b""))
    if not is_uid(sop) or not is_uid(syntax):
        raise StreamBroken("a part's file meta names no valid SOP Instance or Transfer Syntax")
    return sop, syntax


def meta_values(prefix: Buffer) -> dict[int, bytes] | None:
    """The file meta group's values by element number (0x0010: Transfer Syntax UID), as
    :func:`file_meta` reads them; None while ``prefix`` is too short. StreamBroken if it is not
    a Part 10 object with a well-formed file meta group."""
    if len(prefix) < 144:
        return None
    if prefix[128:132] != b"DICM" or prefix[132:136] != b"\x02\x00\x00\x00":
        raise StreamBroken("a part is not a DICOM Part 10 object with a file meta group")
    if prefix[136:138] != b"UL":
        raise StreamBroken("a part's file meta group length is not UL")
    end = meta_end(prefix)
    if end > HEAD_LIMIT:
        raise StreamBroken("a part's file meta group is implausibly long")
    if len(prefix) < end:
        return None
    values: dict[int, bytes] = {}
    pos = 144
    while pos < end:
        if pos + 8 > end:
            raise StreamBroken("a part's file meta group is unreadable (truncated element)")
        group, elem = struct.unpack_from("<HH", prefix, pos)
        vr = bytes(prefix[pos + 4 : pos + 6])
        if group != 2 or not vr.isalpha() or not vr.isupper():
            raise StreamBroken("a part's file meta group is unreadable (bad element)")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise StreamBroken("a part's file meta group is unreadable (truncated element)")
            (length,) = struct.unpack_from("<I", prefix, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", prefix, pos + 6)
            pos += 8
        if pos + length > end:
            raise StreamBroken("a part's file meta group is unreadable (element too long)")
        values[elem] = bytes(prefix[pos : pos + length])
        pos += length
    return values


def meta_end(probe: Buffer) -> int:
    """Where the file meta group ends (the data set begins), as far as ``probe`` tells."""
    if len(probe) < 144:
        return 144
    return 144 + int.from_bytes(probe[140:144], "little")


def dataset_ids(head: Buffer, start: int, syntax: str, *, limit: int = HEAD_LIMIT) -> PartIds | int:
    """The Study, Series and SOP Instance UIDs of the data set that begins at ``start`` of
    ``head`` (the first bytes of a part) in ``syntax``; or, when ``head`` is too short to tell,
    how many bytes of the part are needed (more than ``len(head)``).

    StreamBroken when the data set is unreadable, does not give all three (valid UIDs, UI) at
    its top level before any later tag, or would need more than ``limit`` bytes of the part."""
    if syntax in DEFLATED:
        return _deflated_ids(head, start, limit)
    try:
        return _walk(memoryview(head)[:limit], start, syntax != EXPLICIT_BE, syntax != IMPLICIT_LE)
    except _Short as short:
        if short.need > limit:
            raise _beyond(limit) from None
        return short.need


def _deflated_ids(head: Buffer, start: int, limit: int) -> PartIds | int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(bytes(head[start:limit]), limit)
    except zlib.error:
        raise StreamBroken("a part's deflated data set is unreadable") from None
    try:
        return _walk(plain, 0, True, True)
    except _Short:
        if len(plain) >= limit or len(head) >= limit or inflater.eof:
            raise _beyond(limit) from None
        return len(head) + 1


def _beyond(limit: int) -> StreamBroken:
    return StreamBroken(
        f"a part does not name its study, series and instance within its first {limit} bytes"
    )


class _Short(Exception):
    """More bytes are needed: at least ``need`` from the start of the buffer."""

    def __init__(self, need: int) -> None:
        self.need = need


def _walk(buf: Buffer, pos: int, little: bool, explicit: bool) -> PartIds:
    # The top level inlined (not _element): a CT header has 50-100 elements before (0020,000E).
    structs = _LE if little else _BE
    unpack, u32 = structs.explicit.unpack_from, structs.u32.unpack_from
    size = len(buf)
    found: dict[int, str] = {}
    last = -1
    while len(found) < 3:
        if pos + 12 > size:
            raise _Short(pos + 12)  # an element's header and a few bytes: always there
        group, elem, vr, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag <= last or group == 0xFFFE:
            raise StreamBroken("a part's data set is unreadable (tags out of order)")
        last = tag
        if not explicit:
            vr, head, length = b"", 8, u32(buf, pos + 4)[0]
        elif vr in _LONG_VRS:
            head, length = 12, u32(buf, pos + 8)[0]
        elif vr in _VRS:
            head = 8
        else:
            raise StreamBroken("a part's data set is unreadable (bad VR)")
        if tag > _SERIES:
            break
        if tag in _WANTED:
            # UN: a converter that did not know the VR; the value is the UID all the same
            # (PS3.5 6.2.2), as pydicom reads it for the index (its dictionary's VR).
            if (explicit and vr not in (b"UI", b"UN")) or length > 128:
                raise StreamBroken("a part's data set gives a UID that is not a UID")
            if pos + head + length > size:
                raise _Short(pos + head + length)
            uid = _uid_text(buf[pos + head : pos + head + length])
            if not is_uid(uid):
                raise StreamBroken("a part's data set gives a UID that is not a UID")
            found[tag] = uid
        if length == _UNDEFINED:
            pos = _skip(buf, pos, vr, head, length, little, explicit, 0)
        else:
            pos += head + length
    if len(found) < 3:
        raise StreamBroken("a part's data set does not name its study, series and instance")
    return PartIds(found[_STUDY], found[_SERIES], found[_SOP])


def top_level_values(
    head: Buffer,
    start: int,
    syntax: str,
    wanted: frozenset[int],
    *,
    limit: int = HEAD_LIMIT,
    whole: bool = False,
) -> dict[int, bytes] | int:
    """The raw values of the ``wanted`` tags at the top level of the data set that begins at
    ``start`` of ``head`` in ``syntax`` (absent tags are left out); or, when ``head`` is too
    short to reach past the highest wanted tag, how many bytes of the part are needed.

    What :func:`dataset_ids` does for the three UIDs, for any tags before the pixel data (B's
    retriever reads the patient and the SOP class too). ``whole``: ``head`` is the whole part,
    so a data set that ends before the highest wanted tag simply lacks it. StreamBroken when
    the data set is unreadable or the tags lie beyond ``limit``."""
    if syntax in DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            plain = inflater.decompress(bytes(head[start:limit]), limit)
        except zlib.error:
            raise StreamBroken("a part's deflated data set is unreadable") from None
        try:
            return _collect(plain, 0, True, True, wanted, whole and inflater.eof)
        except _Short:
            if len(plain) >= limit or len(head) >= limit or inflater.eof:
                raise _beyond(limit) from None
            return len(head) + 1
    try:
        little, explicit = syntax != EXPLICIT_BE, syntax != IMPLICIT_LE
        return _collect(memoryview(head)[:limit], start, little, explicit, wanted, whole)
    except _Short as short:
        if short.need > limit:
            raise _beyond(limit) from None
        return short.need


def _collect(
    buf: Buffer, pos: int, little: bool, explicit: bool, wanted: frozenset[int], whole: bool
) -> dict[int, bytes]:
    structs = _LE if little else _BE
    unpack, u32 = structs.explicit.unpack_from, structs.u32.unpack_from
    size = len(buf)
    highest = max(wanted)
    found: dict[int, bytes] = {}
    last = -1
    while True:
        if whole and pos == size:
            return found
        if pos + 8 > size:
            if whole:
                raise StreamBroken("a part's data set is unreadable (truncated element)")
            raise _Short(pos + 12)
        group, elem, vr, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag > highest:
            return found
        if tag <= last or group == 0xFFFE:
            raise StreamBroken("a part's data set is unreadable (tags out of order)")
        last = tag
        if not explicit:
            vr, header, length = b"", 8, u32(buf, pos + 4)[0]
        elif vr in _LONG_VRS:
            if pos + 12 > size:
                if whole:
                    raise StreamBroken("a part's data set is unreadable (truncated element)")
                raise _Short(pos + 12)
            header, length = 12, u32(buf, pos + 8)[0]
        elif vr in _VRS:
            header = 8
        else:
            raise StreamBroken("a part's data set is unreadable (bad VR)")
        if tag in wanted:
            if length == _UNDEFINED or length > 1024:
                raise StreamBroken("a part's data set gives an implausible value")
            if pos + header + length > size:
                if whole:
                    raise StreamBroken("a part's data set is unreadable (truncated element)")
                raise _Short(pos + header + length)
            found[tag] = bytes(buf[pos + header : pos + header + length])
        if length == _UNDEFINED:
            pos = _skip(buf, pos, vr, header, length, little, explicit, 0)
        else:
            pos += header + length


def _element(
    buf: Buffer, pos: int, structs: _Structs, explicit: bool
) -> tuple[int, bytes, int, int]:
    """(tag, VR or b"", header length, value length) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Short(pos + 8)
    group, elem, vr, short = structs.explicit.unpack_from(buf, pos)
    if group == 0xFFFE or not explicit:  # items and delimiters have no VR in any syntax
        return group << 16 | elem, b"", 8, structs.u32.unpack_from(buf, pos + 4)[0]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Short(pos + 12)
        return group << 16 | elem, vr, 12, structs.u32.unpack_from(buf, pos + 8)[0]
    if vr not in _VRS:
        raise StreamBroken("a part's data set is unreadable (bad VR)")
    return group << 16 | elem, vr, 8, short


def _skip(
    buf: Buffer,
    pos: int,
    vr: bytes,
    head: int,
    length: int,
    little: bool,
    explicit: bool,
    depth: int,
) -> int:
    """Where the element at ``pos`` (already read: ``head`` and ``length``) ends."""
    if length != _UNDEFINED:
        return pos + head + length
    if explicit and vr not in _UNDEFINED_OK:
        raise StreamBroken("a part's data set is unreadable (undefined length)")
    if depth >= _MAX_DEPTH:
        raise StreamBroken("a part's data set is unreadable (sequences nested too deep)")
    # An UN of undefined length holds Implicit VR Little Endian (PS3.5 6.2.2).
    inner = explicit and vr != b"UN"
    little = little or not inner
    structs = _LE if little else _BE
    pos += head
    while True:  # items, until the sequence delimiter
        item, _, item_head, item_length = _element(buf, pos, structs, False)
        if item == _SEQUENCE_END:
            return pos + 8
        if item != _ITEM:
            raise StreamBroken("a part's data set is unreadable (not an item)")
        if item_length != _UNDEFINED:
            pos += item_head + item_length
            continue
        pos += item_head
        while True:  # elements, until the item delimiter
            tag, vr, head, length = _element(buf, pos, structs, inner)
            if tag == _ITEM_END:
                pos += 8
                break
            pos = _skip(buf, pos, vr, head, length, little, inner, depth + 1)


@dataclass(frozen=True, slots=True)
class TopElement:
    """One element at the top level of a data set, as :func:`top_elements` found it."""

    vr: str | None
    """As written; None in Implicit VR (the data dictionary says)."""
    start: int
    """Where its value begins in the buffer walked."""
    length: int


def top_elements(
    buf: Buffer, start: int, syntax: str, wanted: frozenset[int], through: int, *, whole: bool
) -> dict[int, TopElement] | None:
    """The elements of ``wanted`` at the top level of the data set that begins at ``start`` of
    ``buf`` in ``syntax``, walked element by element (sequences skipped) up to the first tag
    above ``through``, or to the end of ``buf`` when it holds the ``whole`` data set.

    None whenever this walk could find other values than pydicom reading the whole file (the
    caller then reads it so): a deflated data set, one that does not begin in the VR encoding
    its syntax says (pydicom reads it in the other one), a file meta element in it, tags out
    of order, an unknown VR, a wanted element of undefined length, or an element that runs
    past ``buf`` (or ``buf`` ending before ``through`` while not ``whole``)."""
    if syntax in DEFLATED:
        return None
    little, explicit = syntax != EXPLICIT_BE, syntax != IMPLICIT_LE
    size = len(buf)
    if start + 6 <= size:
        # pydicom's test of the first element (two letters where an explicit VR stands).
        b0, b1 = buf[start + 4], buf[start + 5]
        if (0x40 < b0 < 0x5B and 0x40 < b1 < 0x5B) != explicit:
            return None
    structs = _LE if little else _BE
    unpack, u32 = structs.explicit.unpack_from, structs.u32.unpack_from
    found: dict[int, TopElement] = {}
    pos, last = start, -1
    try:
        while pos < size:
            if pos + 8 > size:
                return None
            group, elem, vr, length = unpack(buf, pos)
            tag = group << 16 | elem
            if tag <= last or group in (0x0002, 0xFFFE):
                return None
            last = tag
            if tag > through:
                return found
            if not explicit:
                vr, head, length = b"", 8, u32(buf, pos + 4)[0]
            elif vr in _LONG_VRS:
                if pos + 12 > size:
                    return None
                head, length = 12, u32(buf, pos + 8)[0]
            elif vr in _VRS:
                head = 8
            else:
                return None
            if tag in wanted:
                if length == _UNDEFINED or pos + head + length > size:
                    return None
                written = vr.decode("ascii") if explicit else None
                found[tag] = TopElement(written, pos + head, length)
            if length == _UNDEFINED:
                pos = _skip(buf, pos, vr, head, length, little, explicit, 0)
            else:
                pos += head + length
    except (_Short, StreamBroken):
        return None
    return found if whole and pos == size else None


def _uid_text(value: Buffer) -> str:
    return bytes(value).decode("ascii", "replace").strip("\x00 ")


# -- where a part's pixel data ends --------------------------------------------------------------

_FLOAT_PIXELS, _DOUBLE_PIXELS, _PIXELS = 0x7FE00008, 0x7FE00009, 0x7FE00010
_PIXEL_TAGS = frozenset({_FLOAT_PIXELS, _DOUBLE_PIXELS, _PIXELS})


def pixel_end(head: Buffer, start: int, syntax: str) -> int | None:
    """Where the value of the data set's top-level (Float, Double Float) Pixel Data element
    ends, counted from the start of ``head`` (a part's first bytes; the data set begins at
    ``start``), when ``head`` reaches that element's header and its length is defined (native
    pixel data); None otherwise: encapsulated pixel data, a deflated data set, a walk that
    needs more than ``head``, or anything odd.

    For a well-formed part this is a lower bound of its end: only elements with higher tags
    (trailing padding, signatures) may follow. The byte path moves what lies between the head
    and this point without looking at it (``os.splice``) and checks that the part ends here or
    is followed by elements (:class:`AfterPixels`)."""
    if syntax in DEFLATED:
        return None
    little, explicit = syntax != EXPLICIT_BE, syntax != IMPLICIT_LE
    structs = _LE if little else _BE
    unpack, u32 = structs.explicit.unpack_from, structs.u32.unpack_from
    buf = memoryview(head)
    size = len(buf)
    pos, last = start, -1
    try:
        while pos + 8 <= size:  # inlined as in _walk: 20 to 100 elements before the pixels
            group, elem, vr, length = unpack(buf, pos)
            tag = group << 16 | elem
            if tag <= last or group == 0xFFFE or tag > _PIXELS:
                return None
            last = tag
            if not explicit:
                vr, header, length = b"", 8, u32(buf, pos + 4)[0]
            elif vr in _LONG_VRS:
                if pos + 12 > size:
                    return None
                header, length = 12, u32(buf, pos + 8)[0]
            elif vr in _VRS:
                header = 8
            else:
                return None
            if tag in _PIXEL_TAGS:
                return None if length == _UNDEFINED else pos + header + length
            if length == _UNDEFINED:
                pos = _skip(buf, pos, vr, header, length, little, explicit, 0)
            else:
                pos += header + length
    except (_Short, StreamBroken):
        return None
    return None


class AfterPixels:
    """Checks what follows a part's pixel data up to the part's end, fed piece by piece: only
    whole elements with higher tags, in the part's syntax (defined lengths are followed; one of
    undefined length ends the check, as it could hold anything). :meth:`end` raises
    StreamBroken when the part did not end at an element's end: the bytes after the predicted
    end belong to something else (a Pixel Data length that claimed more than the part held)."""

    def __init__(self, syntax: str, after: int = _PIXELS) -> None:
        self._structs = _LE if syntax != EXPLICIT_BE else _BE
        self._explicit = syntax != IMPLICIT_LE
        self._last = after
        self._carry = b""  # an element header's first bytes
        self._skip = 0  # value bytes still to pass
        self._open = False  # an undefined length: no more checking
        self.count = 0  # bytes fed

    def feed(self, piece: Buffer) -> None:
        self.count += len(piece)
        if self._open:
            return
        view = memoryview(piece)
        i = 0
        while i < len(view):
            if self._skip:
                step = min(self._skip, len(view) - i)
                self._skip -= step
                i += step
                continue
            header = self._carry + bytes(view[i : i + 12 - len(self._carry)])
            try:
                tag, vr, size, length = _element(header, 0, self._structs, self._explicit)
            except _Short:
                self._carry, i = header, len(view)
                continue
            except StreamBroken:
                raise self._broken() from None
            if tag <= self._last or tag >> 16 == 0xFFFE:
                raise self._broken()
            self._last = tag
            i += size - len(self._carry)
            self._carry = b""
            if length == _UNDEFINED:
                if self._explicit and vr not in _UNDEFINED_OK:
                    raise self._broken()
                self._open = True
                return
            self._skip = length

    def end(self) -> None:
        if not self._open and (self._skip or self._carry):
            raise self._broken()

    @staticmethod
    def _broken() -> StreamBroken:
        return StreamBroken("a part does not end where its pixel data says (or with elements)")
