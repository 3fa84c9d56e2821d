"""Fast, tolerant access to element values as text.

Values are read from the raw elements with the public ``Dataset.get_item`` and decoded here:
pydicom's general conversion costs about 40 us an element (it looks the character set up again
for each one), which made mapping a header three times slower than reading the file. Elements
that are already converted (data sets built from DICOM JSON) take the ordinary path.
"""

from __future__ import annotations

from pydicom import charset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

SPECIFIC_CHARACTER_SET = 0x00080005
TRANSFER_SYNTAX_UID = 0x00020010
MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_DELIMITERS = {0x5C, 0x5E, 0x3D}  # backslash, caret, equals: ISO 2022 resets after these
_CACHE = "_ncp_encodings"


def encodings_of(ds: Dataset) -> list[str]:
    """The Python codecs of the data set's Specific Character Set (cached on the data set)."""
    cached: list[str] | None = getattr(ds, _CACHE, None)
    if cached is None:
        raw = text_value(ds, SPECIFIC_CHARACTER_SET, None)
        terms = [t.strip() for t in raw.split("\\")] if raw else [""]
        try:
            cached = charset.convert_encodings(terms)
        except LookupError:
            cached = charset.convert_encodings([""])
        object.__setattr__(ds, _CACHE, cached)
    return cached


def inherit_encodings(item: Dataset, parent: Dataset) -> None:
    """Sequence items are decoded with the character set of the data set that holds them."""
    object.__setattr__(item, _CACHE, encodings_of(parent))


def text_value(ds: Dataset, tag: int, encodings: list[str] | None) -> str | None:
    """The whole value of an element as text (all values, backslash-joined), or None.

    ``encodings`` decodes the text VRs that depend on the character set; None reads them as
    Latin-1 (right for the ASCII-only VRs: UI, CS, DA, TM, IS, DS).
    """
    try:
        elem = ds.get_item(tag)
    except Exception:
        return None
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if raw is None:
            return None
        if not isinstance(raw, bytes):
            return str(raw)
        # Implicit VR files carry no VR: the data dictionary says which one the tag has.
        vr = elem.VR or _dictionary_vr(tag)
        if vr in _TEXT_VRS and encodings is not None:
            try:
                return charset.decode_bytes(raw, encodings, _DELIMITERS)
            except Exception:
                return raw.decode("latin-1")
        return raw.decode("latin-1")
    value = elem.value
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown: no character-set text we could know of
        return None


def uid_value(ds: Dataset, tag: int) -> str | None:
    """A UID value without padding (trailing NUL or space), or None when absent or empty."""
    value = text_value(ds, tag, None)
    if value is None:
        return None
    return value.replace("\x00", "").strip() or None
