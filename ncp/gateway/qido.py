"""QIDO-RS parameters (PS3.18 8.3.4) and their matching, done exactly on our side.

The caller's matching values never reach the archive: the gateway asks the archive for the
token's studies by UID only, with the attributes it needs as ``includefield``, and matches the
answers here (PS3.4 C.2.2.2): single value matching case-sensitive, ``*`` and ``?`` wildcards,
UID lists, date and time ranges, universal matching for an empty value. Fuzzy matching is not
offered (the answer says so in a ``Warning`` header, as PS3.18 8.3.4.1 asks).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from ncp.dicom.uids import is_uid
from ncp.gateway.dicomjson import values
from ncp.gateway.errors import BadRequest

MAX_LIMIT = 10_000
"""Most results in one answer, also when no ``limit`` is given (more: ask with ``offset``)."""
TRUNCATED_WARNING = (
    '299 ncp: "The number of results exceeded the maximum supported by the server. '
    'Additional results can be requested."'
)
_TAG = re.compile(r"[0-9A-Fa-f]{8}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_STARS = 8
Matcher = Callable[[list[Any]], bool]


@dataclass
class Query:
    """A parsed QIDO-RS query string."""

    matchers: dict[str, Matcher] = field(default_factory=dict)
    uids: dict[str, frozenset[str]] = field(default_factory=dict)
    """UID list matches by tag (StudyInstanceUID narrows the token's studies)."""
    include: set[str] = field(default_factory=set)
    """Tags asked for with ``includefield`` or as matching keys; ``all`` for every one."""
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    capped: bool = False
    """``limit`` asked for more than MAX_LIMIT results and was lowered to it."""

    def matches(self, item: dict[str, Any]) -> bool:
        return all(match(values(item, tag)) for tag, match in self.matchers.items())

    @property
    def end(self) -> int:
        """One past the last match of the page: at most MAX_LIMIT results, whatever is asked."""
        return self.offset + (MAX_LIMIT if self.limit is None else self.limit)

    def page(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return items[self.offset : self.end]

    def truncated(self, matched: int) -> bool:
        """Whether the server's maximum, not the caller's ``limit``, left out some of
        ``matched`` results (PS3.18 8.3.4.4: the answer then says so in a Warning)."""
        return (self.limit is None or self.capped) and matched > self.end


def tag_of(key: str) -> str:
    """The 8-hex-digit tag of an attribute given by keyword or tag; BadRequest otherwise."""
    if _TAG.match(key):
        tag = key.upper()
        try:
            dictionary_VR(int(tag, 16))
        except KeyError:
            raise BadRequest("unknown attribute tag in the query") from None
        return tag
    number = tag_for_keyword(key)
    if number is None:
        raise BadRequest("unknown attribute keyword in the query")
    return f"{number:08X}"


def parse_query(params: Sequence[tuple[str, str]]) -> Query:
    query = Query()
    seen: set[str] = set()
    for key, value in params:
        if _CONTROL.search(value) or len(value) > 1024:
            raise BadRequest("control characters or an overlong value in the query")
        if key == "includefield":
            for name in filter(None, (v.strip() for v in value.split(","))):
                query.include.add("all" if name == "all" else tag_of(name))
        elif key in ("limit", "offset"):
            # isascii: "²".isdigit() and "①".isdigit() are true, and int() refuses them.
            if not (value.isascii() and value.isdigit()) or len(value) > 9:
                raise BadRequest(f"{key} must be a non-negative integer")
            if key == "limit":
                query.limit = min(int(value), MAX_LIMIT)
                query.capped = int(value) > MAX_LIMIT
            else:
                query.offset = int(value)
        elif key == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadRequest("fuzzymatching must be true or false")
            query.fuzzy = value == "true"
        else:
            if "." in key and not _TAG.match(key):
                raise BadRequest("sequence matching is not offered")
            tag = tag_of(key)
            if tag in seen:
                raise BadRequest("a matching key given twice")
            seen.add(tag)
            query.include.add(tag)
            vr = dictionary_VR(int(tag, 16))
            if value == "":
                continue  # universal matching: return the attribute
            if vr == "SQ":
                raise BadRequest("sequence matching is not offered")
            if vr == "UI":
                uids = frozenset(filter(None, re.split(r"[,\\]", value)))
                if not uids or not all(is_uid(u) for u in uids):
                    raise BadRequest("a UID matching value is not a list of UIDs")
                query.uids[tag] = uids
                query.matchers[tag] = _any_of(uids)
            elif vr in ("DA", "TM", "DT") and "-" in value:
                query.matchers[tag] = _range(value)
            else:
                query.matchers[tag] = _single(value)
    return query


def _any_of(uids: frozenset[str]) -> Matcher:
    return lambda found: any(isinstance(v, str) and v.strip("\x00 ") in uids for v in found)


def _single(value: str) -> Matcher:
    if value.count("*") > _MAX_STARS:
        # Each '*' is a '.*' to backtrack over: a few hundred would hold the loop for minutes.
        raise BadRequest(f"at most {_MAX_STARS} '*' wildcards in a matching value")
    if "*" in value or "?" in value:
        pattern = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value),
            re.DOTALL,
        )
        return lambda found: any(pattern.fullmatch(_text(v)) is not None for v in found)
    return lambda found: any(_text(v) == value for v in found)


def _range(value: str) -> Matcher:
    low, _, high = value.partition("-")
    if not re.fullmatch(r"[0-9.:+ ]*", low + high):
        raise BadRequest("a date or time range is malformed")

    def match(found: list[Any]) -> bool:
        for v in found:
            text = _text(v)
            if low and text < low:
                continue
            if high and text[: len(high)] > high:
                continue
            return True
        return False

    return match


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip("\x00 ")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return str(value)
    return ""
