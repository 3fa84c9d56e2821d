"""FHIR R4 search parameters of the metadata list, parsed into a :class:`SearchQuery`.

Strict by default: an unknown parameter, modifier, prefix or sort key is a :class:`SearchError`
(400), because FHIR's lenient mode would silently *widen* a query on patient data. With
``lenient=True`` (``Prefer: handling=lenient``) only unknown parameter *names* are dropped and
listed in ``SearchQuery.ignored``; malformed values of known parameters are still errors.

Semantics (R4 "Search"):

- repeating a parameter means AND, a comma inside one value means OR; ``\\,`` ``\\|`` ``\\$``
  ``\\\\`` escape those characters; a parameter with an empty value is ignored;
- tokens are ``code``, ``system|code`` or ``|code`` (no system); codes compare exactly;
- dates take the prefixes eq ne gt lt ge le sa eb and any precision from ``YYYY`` to an instant;
  the value is the range its precision implies (``2023-04`` is all of April). A value with a
  time zone is an instant; one without is compared with the stored local value as is.

``_count`` defaults to :data:`DEFAULT_COUNT` and is capped at :data:`MAX_COUNT` (FHIR lets a
server return fewer); ``_count=0`` answers the total only, like ``_summary=count``. Paging is by
``_offset`` (HAPI's name): the totals are exact and the index changes rarely, so offsets are
enough and the links stay readable.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

from ncp.errors import NcpError
from ncp.fhir.datatypes import DATE_TIME, first_moment
from ncp.fhir.identifiers import is_fhir_id, issuer_of, patient_resource_id, patient_system

ResourceType = Literal["DocumentReference", "ImagingStudy"]
RESOURCE_TYPES: tuple[ResourceType, ...] = ("DocumentReference", "ImagingStudy")

DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_OFFSET = 1_000_000
MAX_PARAMETERS = 64
"""More parameters than any real list query needs; bounds the SQL a request can build."""
MAX_ALTERNATIVES = 100
MAX_VALUE_CHARS = 1024

TOKEN_PARAMETERS: dict[ResourceType, frozenset[str]] = {
    "DocumentReference": frozenset(
        {
            "modality",
            "bodysite",
            "anatomical-region",  # IHE MADO's name for bodysite
            "event",
            "setting",
            "study-instance-uid",
            "accession-number",
            "type",
            "format",
            "status",
            "_id",
        }
    ),
    "ImagingStudy": frozenset(
        {
            "modality",
            "bodysite",
            "study-type",
            "requesting-specialty",
            "identifier",
            "status",
            "_id",
        }
    ),
}
DATE_PARAMETERS: dict[ResourceType, str] = {"DocumentReference": "date", "ImagingStudy": "started"}
TEXT_PARAMETERS = frozenset({"_text", "_content"})
REFERENCE_PARAMETERS = frozenset({"patient", "subject"})
"""Each also as ``<name>.identifier`` (chain) and ``<name>:identifier`` (modifier)."""
RELATED_PARAMETER = "related"
"""DocumentReference ``related``: ``ImagingStudy/<Study Instance UID>``."""
SORT_KEYS: dict[ResourceType, dict[str, str]] = {
    "DocumentReference": {
        "date": "date",
        "modality": "modality",
        "description": "title",
        "title": "title",
    },
    "ImagingStudy": {"started": "date", "modality": "modality", "description": "title"},
}
"""Accepted ``_sort`` names and the sort column each means (date, modality or title)."""
INCLUDES: dict[ResourceType, dict[str, str]] = {
    "DocumentReference": {
        "DocumentReference:subject": "patient",
        "DocumentReference:subject:Patient": "patient",
        "DocumentReference:patient": "patient",
        "DocumentReference:patient:Patient": "patient",
        "DocumentReference:related": "study",
        "DocumentReference:related:ImagingStudy": "study",
    },
    "ImagingStudy": {
        "ImagingStudy:patient": "patient",
        "ImagingStudy:patient:Patient": "patient",
        "ImagingStudy:subject": "patient",
        "ImagingStudy:subject:Patient": "patient",
    },
}
REVINCLUDES: dict[ResourceType, dict[str, str]] = {
    "DocumentReference": {},
    "ImagingStudy": {
        "DocumentReference:related": "documents",
        "DocumentReference:related:ImagingStudy": "documents",
    },
}
RESULT_PARAMETERS = frozenset(
    {"_sort", "_count", "_offset", "_summary", "_total", "_include", "_revinclude"}
)
TRANSPORT_PARAMETERS = frozenset({"_format", "_pretty"})
"""Answered by the HTTP layer; accepted and left out of the query and its links."""

DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
DatePrefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]
SortColumn = Literal["date", "modality", "title"]


class SearchError(NcpError):
    """A search request the node refuses; ``parameter`` names it, ``reason`` says why.

    ``code`` is the OperationOutcome issue code: ``not-supported`` for an unknown parameter,
    modifier or prefix, ``invalid`` for a malformed value. Answered with 400.
    """

    def __init__(self, parameter: str, reason: str, *, code: str = "invalid") -> None:
        super().__init__(f"search parameter {parameter!r}: {reason}")
        self.parameter = parameter
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class Token:
    """One token alternative. ``system`` None: any system; ``""``: explicitly no system."""

    system: str | None
    code: str


@dataclass(frozen=True, slots=True)
class DateRange:
    """One date alternative: the prefix and the half-open range ``[low, high)`` the value's
    precision implies. ``high`` None: beyond year 9999. Aware bounds came with a time zone."""

    prefix: DatePrefix
    low: datetime
    high: datetime | None


@dataclass(frozen=True, slots=True)
class PatientTarget:
    """One way a request names the patient: a Patient resource id, or an identifier whose
    ``issuer`` is None when the request gave no system (any issuer matches)."""

    resource_id: str | None = None
    issuer: str | None = None
    value: str | None = None

    def names(self, issuer: str, value: str) -> bool:
        if self.resource_id is not None:
            try:
                system = patient_system(issuer)
            except ValueError:
                return False
            return self.resource_id == patient_resource_id(system, value)
        return self.value == value and (self.issuer is None or self.issuer == issuer)


@dataclass(frozen=True, slots=True)
class TokenFilter:
    name: str
    alternatives: tuple[Token, ...]


@dataclass(frozen=True, slots=True)
class DateFilter:
    name: str
    alternatives: tuple[DateRange, ...]


@dataclass(frozen=True, slots=True)
class TextFilter:
    """Free text: each alternative is a tuple of normalised words that must all occur."""

    name: str
    alternatives: tuple[tuple[str, ...], ...]


Filter = TokenFilter | DateFilter | TextFilter


@dataclass(frozen=True, slots=True)
class SortKey:
    column: SortColumn
    descending: bool


@dataclass(frozen=True)
class SearchQuery:
    """A parsed search: filters (AND of OR-lists), the patient it names, order, page, includes.

    ``params`` are the accepted parameters in a canonical order, without paging: what the
    self/next/previous links repeat (:meth:`canonical_params`).
    """

    resource_type: ResourceType
    filters: tuple[Filter, ...] = ()
    patients: tuple[tuple[PatientTarget, ...], ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = DEFAULT_COUNT
    offset: int = 0
    summary_count: bool = False
    include_patient: bool = False
    include_studies: bool = False
    revinclude_documents: bool = False
    params: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    default_status: bool = field(default=False)
    """True when DocumentReference had no ``status``: only current entries are listed."""

    def allows_patient(self, issuer: str, value: str) -> bool:
        """True unless a patient parameter names someone other than (issuer, value).

        The route compares with the TRC's patient; :func:`ncp.provider.search.run_search`
        answers an empty page when this is False.
        """
        return all(any(t.names(issuer, value) for t in alts) for alts in self.patients)

    @property
    def names_patient(self) -> bool:
        return bool(self.patients)

    def canonical_params(self, offset: int | None = None) -> list[tuple[str, str]]:
        """The query's parameters for a link to the page at ``offset`` (this page if None)."""
        out = list(self.params)
        out.append(("_count", str(self.count)))
        at = self.offset if offset is None else offset
        if at:
            out.append(("_offset", str(at)))
        return out


# --- parsing -------------------------------------------------------------------------------------


def parse_search(
    resource_type: str, params: Sequence[tuple[str, str]], *, lenient: bool = False
) -> SearchQuery:
    """Parse a search request's parameters (query string or form body, in order).

    Raises :class:`SearchError` for anything the node does not support or cannot read.
    """
    if resource_type not in RESOURCE_TYPES:
        raise SearchError("resource type", f"{resource_type!r} cannot be searched here")
    rtype: ResourceType = resource_type  # type: ignore[assignment]
    if len(params) > MAX_PARAMETERS:
        raise SearchError("(request)", f"more than {MAX_PARAMETERS} parameters")
    parser = _Parser(rtype, lenient)
    for name, value in params:
        if len(value) > MAX_VALUE_CHARS:
            raise SearchError(name, f"value longer than {MAX_VALUE_CHARS} characters")
        parser.add(name, value)
    return parser.query()


class _Parser:
    def __init__(self, rtype: ResourceType, lenient: bool) -> None:
        self.rtype = rtype
        self.lenient = lenient
        self.filters: list[Filter] = []
        self.patients: list[tuple[PatientTarget, ...]] = []
        self.accepted: list[tuple[str, str]] = []
        self.ignored: list[str] = []
        self.sort: tuple[SortKey, ...] | None = None
        self.count: int | None = None
        self.offset: int | None = None
        self.summary_count = False
        self.includes: set[str] = set()
        self.revincludes: set[str] = set()
        self.seen_status = False
        self.seen_once: set[str] = set()

    def add(self, name: str, value: str) -> None:
        if name in TRANSPORT_PARAMETERS:
            return
        if value == "":  # R4: a parameter without a value is ignored
            return
        if name in RESULT_PARAMETERS:
            self._result(name, value)
            return
        base, _, modifier = name.partition(":")
        if self._filter(name, base, modifier, value):
            self.accepted.append((name, value))
            return
        if self.lenient:
            self.ignored.append(name)
            return
        raise SearchError(name, f"not supported on {self.rtype}", code="not-supported")

    def _filter(self, name: str, base: str, modifier: str, value: str) -> bool:
        rtype = self.rtype
        if base in TOKEN_PARAMETERS[rtype]:
            _no_modifier(name, modifier)
            alts = tuple(_token(name, raw) for raw in _alternatives(name, value))
            self.filters.append(TokenFilter(_canonical_token_name(base), alts))
            self.seen_status |= base == "status"
            return True
        if base == DATE_PARAMETERS[rtype]:
            _no_modifier(name, modifier)
            dates = tuple(_date(name, raw) for raw in _alternatives(name, value))
            self.filters.append(DateFilter("date", dates))
            return True
        if base in TEXT_PARAMETERS:
            _no_modifier(name, modifier)
            texts = tuple(_words(name, _unescape(raw)) for raw in _alternatives(name, value))
            self.filters.append(TextFilter("_text", texts))
            return True
        if base == RELATED_PARAMETER and rtype == "DocumentReference":
            if modifier not in ("", "ImagingStudy"):
                raise SearchError(name, f"modifier :{modifier} not supported", code="not-supported")
            uids = tuple(_related(name, _unescape(raw)) for raw in _alternatives(name, value))
            self.filters.append(TokenFilter("study-instance-uid", uids))
            return True
        chain = base.removesuffix(".identifier")
        if chain in REFERENCE_PARAMETERS:
            by_identifier = chain != base or modifier == "identifier"
            if chain == base and modifier not in ("", "identifier", "Patient"):
                raise SearchError(name, f"modifier :{modifier} not supported", code="not-supported")
            if chain != base:
                _no_modifier(name, modifier)
            raws = _alternatives(name, value)
            targets = tuple(
                _patient_identifier(name, raw) if by_identifier else _patient_id(name, raw)
                for raw in raws
            )
            self.patients.append(targets)
            return True
        return False

    def _result(self, name: str, value: str) -> None:
        if name not in ("_include", "_revinclude"):
            if name in self.seen_once:
                raise SearchError(name, "may be given once")
            self.seen_once.add(name)
        if name == "_sort":
            self.sort = _sort_keys(self.rtype, value)
            self.accepted.append((name, value))
        elif name == "_count":
            self.count = min(_integer(name, value, MAX_COUNT * 1000), MAX_COUNT)
        elif name == "_offset":
            self.offset = _integer(name, value, MAX_OFFSET)
        elif name == "_summary":
            if value not in ("count", "false"):
                raise SearchError(name, f"only 'count' and 'false' supported, not {value!r}")
            self.summary_count = value == "count"
            self.accepted.append((name, value))
        elif name == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise SearchError(name, "must be none, estimate or accurate")
        elif name == "_include":
            self.includes.add(_lookup(name, INCLUDES[self.rtype], value))
            self.accepted.append((name, value))
        else:  # _revinclude
            self.revincludes.add(_lookup(name, REVINCLUDES[self.rtype], value))
            self.accepted.append((name, value))

    def query(self) -> SearchQuery:
        count = DEFAULT_COUNT if self.count is None else self.count
        default_status = self.rtype == "DocumentReference" and not self.seen_status
        filters = list(self.filters)
        if default_status:
            filters.append(TokenFilter("status", (Token(None, "current"),)))
        sort = self.sort if self.sort is not None else (SortKey("date", True),)
        return SearchQuery(
            resource_type=self.rtype,
            filters=tuple(filters),
            patients=tuple(self.patients),
            sort=sort,
            count=count,
            offset=self.offset or 0,
            summary_count=self.summary_count or count == 0,
            include_patient="patient" in self.includes,
            include_studies="study" in self.includes,
            revinclude_documents="documents" in self.revincludes,
            params=tuple(sorted(self.accepted, key=lambda p: p[0])),
            ignored=tuple(self.ignored),
            default_status=default_status,
        )


def _canonical_token_name(base: str) -> str:
    return "bodysite" if base == "anatomical-region" else base


def _no_modifier(name: str, modifier: str) -> None:
    if modifier:
        raise SearchError(name, f"modifier :{modifier} not supported", code="not-supported")


def _lookup(name: str, table: dict[str, str], value: str) -> str:
    if value not in table:
        known = ", ".join(sorted(table)) or "none"
        raise SearchError(
            name, f"{value!r} not supported (supported: {known})", code="not-supported"
        )
    return table[value]


def _integer(name: str, value: str, limit: int) -> int:
    if not value.isascii() or not value.isdigit():
        raise SearchError(name, f"must be a whole number >= 0, not {value!r}")
    number = int(value)
    if number > limit:
        raise SearchError(name, f"must be at most {limit}")
    return number


def _sort_keys(rtype: ResourceType, value: str) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    seen: set[str] = set()
    for part in value.split(","):
        descending = part.startswith("-")
        key = part.removeprefix("-")
        if key not in SORT_KEYS[rtype]:
            known = ", ".join(sorted(SORT_KEYS[rtype]))
            raise SearchError("_sort", f"cannot sort by {key!r} (supported: {known})")
        column = SORT_KEYS[rtype][key]
        if column in seen:
            raise SearchError("_sort", f"{key!r} given twice")
        seen.add(column)
        keys.append(SortKey(column, descending))  # type: ignore[arg-type]
    return tuple(keys)


# --- values --------------------------------------------------------------------------------------


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped ``separator``; escapes are kept for the next level."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(ch)
            current.append(next(chars, ""))
        elif ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _alternatives(name: str, value: str) -> list[str]:
    alts = _split(value, ",")
    if len(alts) > MAX_ALTERNATIVES:
        raise SearchError(name, f"more than {MAX_ALTERNATIVES} alternatives")
    if any(a == "" for a in alts):
        raise SearchError(name, "empty alternative in a comma-separated list")
    return alts


def _token(name: str, raw: str) -> Token:
    parts = _split(raw, "|")
    if len(parts) == 1:
        return Token(None, _unescape(parts[0]))
    if len(parts) == 2:
        system, code = (_unescape(p) for p in parts)
        if not code:
            raise SearchError(name, "a token needs a code (system| alone is not supported)")
        return Token(system, code)
    raise SearchError(name, f"{raw!r} is not a token (code, system|code or |code)")


def _related(name: str, value: str) -> Token:
    target = value.removeprefix("ImagingStudy/")
    if target == value or not is_fhir_id(target):
        raise SearchError(name, "must be ImagingStudy/<id>")
    return Token(None, target)


def _patient_id(name: str, raw: str) -> PatientTarget:
    value = _unescape(raw)
    target = value.removeprefix("Patient/")
    if not is_fhir_id(target):
        raise SearchError(name, "must be Patient/<id> or <id> (a FHIR id)")
    return PatientTarget(resource_id=target)


def _patient_identifier(name: str, raw: str) -> PatientTarget:
    token = _token(name, raw)
    if token.system is None:
        return PatientTarget(value=token.code)
    return PatientTarget(issuer=issuer_of(token.system), value=token.code)


def _date(name: str, raw: str) -> DateRange:
    value = _unescape(raw)
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    if prefix == "ap":
        raise SearchError(name, "prefix 'ap' (approximately) not supported", code="not-supported")
    if prefix not in DATE_PREFIXES:
        raise SearchError(name, f"unknown prefix {prefix!r}", code="not-supported")
    match = DATE_TIME.match(text)
    if match is None:
        raise SearchError(name, f"{text!r} is not a FHIR date, dateTime or instant")
    low, high = _date_range(name, match)
    return DateRange(prefix, low, high)  # type: ignore[arg-type]


def _date_range(name: str, match: re.Match[str]) -> tuple[datetime, datetime | None]:
    g = match.groupdict()
    zone = _zone(name, g["tz"]) if g["tz"] else None
    try:
        low = first_moment(match, zone)
    except ValueError as exc:
        raise SearchError(name, f"{match.string!r} is not a valid date ({exc})") from exc
    if g["f"] is not None:
        step: timedelta | None = timedelta(microseconds=1)
    elif g["S"] is not None:
        step = timedelta(seconds=1)
    elif g["H"] is not None:
        step = timedelta(minutes=1)
    elif g["d"] is not None:
        step = timedelta(days=1)
    else:
        step = None
    if step is not None:
        try:
            return low, low + step
        except OverflowError:
            return low, None
    if g["m"] is not None:
        nxt = (low.year + 1, 1) if low.month == 12 else (low.year, low.month + 1)
    else:
        nxt = (low.year + 1, 1)
    if nxt[0] > 9999:
        return low, None
    return low, low.replace(year=nxt[0], month=nxt[1])


def _zone(name: str, text: str) -> timezone:
    if text == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise SearchError(name, f"time zone {text!r} out of range")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def normalise_text(text: str) -> str:
    """Case- and accent-insensitive form used by ``_text``: NFKD without combining marks,
    case-folded (``Ä`` and ``a`` match, ``ß`` and ``ss`` match)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _words(name: str, text: str) -> tuple[str, ...]:
    words = tuple(normalise_text(text).split())
    if not words:
        raise SearchError(name, "needs at least one word")
    return words
