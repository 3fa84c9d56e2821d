"""The search engine behind the metadata list: a parsed query → one page of index rows.

Two searches, both scoped to exactly one patient (the caller has checked it is the TRC's):

- ``DocumentReference``: one entry per report version that passes the status filter (by
  default the latest version of each report) and one entry per indexed study (its manifest),
  filtered, sorted and paged together in one ``UNION ALL``;
- ``ImagingStudy``: the studies, with series and instances loaded for the manifest builder.

The database sorts and pages; Python only resolves what SQL cannot do the same way on SQLite
and PostgreSQL: accent-insensitive free text, and the hashed ids of manifest entries. Text
sorts compare code points on both engines (``COLLATE "C"`` on PostgreSQL), missing values sort
last in both directions, and ties are broken by business identifiers (report id and version,
Study Instance UID), so pages are stable across replicas and index rebuilds.

Filters see what the entries show (:mod:`ncp.fhir.listing`, :mod:`ncp.fhir.manifest`): a report
entry takes modality, body part, study type, requesting specialty and accession number from its
indexed study when the report lacks them; an empty modality list is shown (and found) as OT;
``bodysite`` takes DICOM Body Part Examined codes or the SNOMED CT codes the ConceptMap maps
them to. ``_text`` / ``_content`` (the same here) match words, case- and accent-insensitively,
in report titles, and in study descriptions, procedure meanings and series descriptions.

Dates: report dates are stored in UTC, study dates in the archive's local time. A search date
with a time zone is converted to UTC for reports and to ``zone`` (the archive's, see
:func:`ncp.fhir.datatypes.zone_of`) for studies; a date without one is compared as written.
Sorting by date compares true instants: a report's UTC date with a study's start in UTC, which
is the instant its entries show (Study Date/Time, else its earliest series start, read in
``zone`` with ``fold=0`` where a DST change makes the wall clock ambiguous or skips it:
:func:`ncp.fhir.datatypes.utc_of`). The index keeps that instant (``study.started_utc``, with the
zone it was computed in); a study of the patient whose instant was not computed in ``zone``
(indexed before revision 0005, by a run given no zone, or in another zone) has it computed here
for the search, so a sort never compares a missing or stale instant. Equal instants fall to the
tie-breaks. The date filter is unchanged: it compares the stored wall-clock values as above.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Select,
    SQLColumnExpression,
    and_,
    case,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, defer, joinedload, selectinload
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from ncp.fhir import canonical
from ncp.fhir.conformance import load_definitions
from ncp.fhir.datatypes import DICOM, LOINC, SNOMED, scheme_system, utc_of, zone_name
from ncp.fhir.identifiers import (
    STUDY_UID_SYSTEM,
    imaging_study_id,
    manifest_reference_id,
    uid_of,
)
from ncp.fhir.manifest import MAX_ACCESSION, OTHER_MODALITY, accession_identifier
from ncp.fhir.terminology import default_terminology
from ncp.provider.search_params import (
    DateFilter,
    DateRange,
    Filter,
    SearchError,
    SearchQuery,
    Token,
    TokenFilter,
    normalise_text,
    parse_search,
)
from ncp.store.models import (
    EntryKind,
    Instance,
    Patient,
    Report,
    ReportVersion,
    Series,
    Study,
)

__all__ = [
    "DOCUMENT_TYPE_CODE",
    "MANIFEST_FORMAT_CODE",
    "EntryKey",
    "ManifestMatch",
    "PageKeys",
    "Paging",
    "PatientInclude",
    "ReportMatch",
    "SearchError",
    "SearchPage",
    "SearchQuery",
    "StudyMatch",
    "document_status",
    "find_page",
    "load_page",
    "parse_search",
    "run_search",
]

DOCUMENT_TYPE_CODE = "18748-4"
"""LOINC type of every list entry, report and manifest (IHE MADO)."""
MANIFEST_FORMAT_SYSTEM = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
MANIFEST_FORMAT_CODE = "urn:ihe:rad:MADO:fhir-manifest:2026"
"""``content.format`` of manifest entries (profiles.md): ``format=`` finds them."""
DOCUMENT_STATUS_SYSTEM = "http://hl7.org/fhir/document-reference-status"
STUDY_STATUS_SYSTEM = "http://hl7.org/fhir/imagingstudy-status"
BODY_PART_MAP = canonical.concept_map("dicom-body-part-to-snomed")
_SCHEME_DESIGNATORS = ("LN", "SCT", "SRT", "DCM", "RADLEX", "RDLX")

_REPORT, _MANIFEST, _STUDY = EntryKind.REPORT, EntryKind.MANIFEST, EntryKind.STUDY
_KINDS = {int(k): k for k in EntryKind}
_Col = SQLColumnExpression[Any]
"""A column (mapped attribute or expression) of a row kind."""


# --- results ---------------------------------------------------------------------------------


def document_status(version: ReportVersion) -> str:
    """``DocumentReference.status`` of a report version's entry: ``superseded`` unless it is
    the latest; the latest is ``entered-in-error`` when the report was withdrawn so, else
    ``current``. Manifest entries are always ``current``. The listing builder uses this too."""
    if not version.latest:
        return "superseded"
    return "entered-in-error" if version.status == "entered-in-error" else "current"


@dataclass(frozen=True)
class ReportMatch:
    """A report entry: one version of a report (``version.report is report``), and the
    patient's indexed study with the report's Study Instance UID, if indexed (what
    :func:`ncp.fhir.listing.report_reference` takes as ``study``). ``version.content`` is
    deferred: the list does not need the document."""

    report: Report
    version: ReportVersion
    study: Study | None = None

    @property
    def status(self) -> str:
        return document_status(self.version)


@dataclass(frozen=True)
class ManifestMatch:
    """A manifest entry: the DocumentReference of an indexed study. ``study.patient`` is in
    the session already; the series are not loaded (the entry needs the study's columns)."""

    study: Study


@dataclass(frozen=True)
class StudyMatch:
    """A study for an ImagingStudy: series sorted by number then UID; ``instances`` by Series
    Instance UID, each sorted by instance number then SOP Instance UID (the ``instances``
    argument of :func:`ncp.fhir.manifest.imaging_study`)."""

    study: Study
    series: tuple[Series, ...]
    instances: Mapping[str, tuple[Instance, ...]]

    def instances_of(self, series: Series) -> tuple[Instance, ...]:
        return self.instances.get(series.series_uid, ())


@dataclass(frozen=True)
class PatientInclude:
    """The searched patient, for ``_include=...:patient``. ``patient`` is the index row, None
    when the patient has reports but no indexed study (build the Patient from the report)."""

    issuer: str
    value: str
    patient: Patient | None


Match = ReportMatch | ManifestMatch | StudyMatch
Included = PatientInclude | StudyMatch | ReportMatch | ManifestMatch


@dataclass(frozen=True)
class Paging:
    """Where a page of a search stands: what the self/next/previous links need."""

    query: SearchQuery
    total: int

    @property
    def offset(self) -> int:
        return self.query.offset

    @property
    def count(self) -> int:
        return self.query.count

    @property
    def next_offset(self) -> int | None:
        if self.query.summary_count or self.offset + self.count >= self.total:
            return None
        return self.offset + self.count

    @property
    def previous_offset(self) -> int | None:
        if self.query.summary_count or self.offset == 0:
            return None
        return max(0, min(self.offset, self.total) - self.count)

    def link_params(self, offset: int | None = None) -> list[tuple[str, str]]:
        """Parameters of the link to the page at ``offset`` (this one if None)."""
        return self.query.canonical_params(offset)


@dataclass(frozen=True)
class SearchPage(Paging):
    """One page of a search: ``matches`` in order (search mode ``match``), ``included`` to add
    with search mode ``include``."""

    matches: tuple[Match, ...] = ()
    included: tuple[Included, ...] = ()


# --- SQL helpers -----------------------------------------------------------------------------


class _position(FunctionElement[int]):
    """1-based position of a substring, 0 if absent: case-sensitive on both engines (unlike
    SQLite's LIKE, which folds ASCII case)."""

    type = Integer()
    inherit_cache = True


@compiles(_position, "sqlite")
def _position_sqlite(element: _position, compiler: SQLCompiler, **kw: Any) -> str:
    haystack, needle = list(element.clauses)
    return f"instr({compiler.process(haystack, **kw)}, {compiler.process(needle, **kw)})"


@compiles(_position)
def _position_default(element: _position, compiler: SQLCompiler, **kw: Any) -> str:
    haystack, needle = list(element.clauses)
    return f"strpos({compiler.process(haystack, **kw)}, {compiler.process(needle, **kw)})"


def _has_item(column: _Col, code: str) -> ColumnElement[bool]:
    """``code`` is one item of a backslash-separated list column (DICOM multi-value style)."""
    if "\\" in code or not code:
        return false()
    return _position(literal("\\") + column + literal("\\"), literal(f"\\{code}\\")) > 0


@dataclass(frozen=True)
class _Target:
    """The columns of one kind of row, under the names the filters use: what the entry built
    by :mod:`ncp.fhir.listing` / :mod:`ncp.fhir.manifest` shows, so a filter finds exactly the
    entries that display the value."""

    kind: int
    pk: _Col
    date: _Col
    utc: bool
    modalities: _Col
    other_when_empty: bool
    """An empty modality list is shown as OT (manifests and studies)."""
    sort_modality: _Col
    """The modalities as shown, backslash-joined: what ``_sort=modality`` compares."""
    body_parts: _Col
    title: _Col
    study_uid: _Col
    accession_number: _Col
    accession_issuer: _Col
    procedure_code: _Col
    procedure_scheme: _Col
    requesting_code: _Col
    requesting_scheme: _Col
    tie_text: _Col
    tie_int: _Col
    joins_study: bool = False
    """A report row whose columns fall back on its study's (outer join)."""


def _given(col: _Col) -> ColumnElement[bool]:
    return and_(col.is_not(None), col != "")


_FALLBACK_FILTERS = frozenset(
    {"modality", "bodysite", "event", "setting", "accession-number", "identifier"}
)
"""Filters on values a report entry may take from its study: only these need the join."""


@functools.cache  # expressions are immutable: built once, reused by every search
def _report_target(fallback: bool) -> _Target:
    """A report version's values, with (``fallback``) the indexed study's where the report
    lacks them, as :func:`ncp.fhir.listing.report_reference` fills them (Study outer-joined).
    Without ``fallback`` the study is not joined: the default list does not need it, and the
    join costs more than the rest of the query."""
    v, s = ReportVersion, Study

    def own(mine: _Col, theirs: _Col, *, when: ColumnElement[bool] | None = None) -> _Col:
        if not fallback:
            return mine
        return case((when if when is not None else _given(mine), mine), else_=theirs)

    has_accession = _given(v.accession_number)
    modalities = own(v.modalities, func.coalesce(s.modalities, ""), when=v.modalities != "")
    return _Target(
        kind=_REPORT,
        pk=v.id,
        date=v.date,
        utc=True,
        modalities=modalities,
        other_when_empty=False,
        sort_modality=modalities,
        body_parts=own(v.body_parts, func.coalesce(s.body_parts, ""), when=v.body_parts != ""),
        title=v.title,
        study_uid=v.study_uid,
        accession_number=own(v.accession_number, s.accession_number, when=has_accession),
        accession_issuer=own(v.accession_issuer, s.accession_issuer, when=has_accession),
        procedure_code=own(v.procedure_code, s.procedure_code),
        procedure_scheme=own(literal("LN"), s.procedure_scheme, when=_given(v.procedure_code)),
        requesting_code=own(v.requesting_code, s.requesting_code),
        requesting_scheme=own(literal("SCT"), s.requesting_scheme, when=_given(v.requesting_code)),
        tie_text=Report.id,
        tie_int=v.version,
        joins_study=fallback,
    )


@functools.cache
def _study_target(kind: int) -> _Target:
    s = Study
    # Study Date, else the earliest series start (ncp.fhir.manifest.study_started).
    first_series = select(func.min(Series.started)).where(Series.study_pk == s.id).scalar_subquery()
    if kind == _MANIFEST:  # the attachment title of a manifest entry (listing._manifest_title)
        title: _Col = func.coalesce(
            func.nullif(s.description, ""),
            func.nullif(s.procedure_meaning, ""),
            case((s.modalities == "", OTHER_MODALITY), else_=func.replace(s.modalities, "\\", "/")),
        )
    else:
        title = func.nullif(s.description, "")
    return _Target(
        kind=kind,
        pk=s.id,
        date=func.coalesce(s.started, first_series),
        utc=False,
        modalities=s.modalities,
        other_when_empty=True,
        sort_modality=case((s.modalities == "", OTHER_MODALITY), else_=s.modalities),
        body_parts=s.body_parts,
        title=title,
        study_uid=s.study_uid,
        accession_number=s.accession_number,
        accession_issuer=s.accession_issuer,
        procedure_code=s.procedure_code,
        procedure_scheme=s.procedure_scheme,
        requesting_code=s.requesting_code,
        requesting_scheme=s.requesting_scheme,
        tie_text=s.study_uid,
        tie_int=literal(0, Integer),
    )


# --- per-search context ----------------------------------------------------------------------


@dataclass
class _Context:
    session: Session
    issuer: str
    value: str
    patient_pk: int | None
    zone: tzinfo
    _manifest_ids: dict[str, str] | None = None
    _report_texts: list[tuple[int, str]] | None = None
    _study_texts: dict[int, str] | None = None
    _issuers: dict[str, set[str | None]] | None = None
    _instant: _Col | None = None

    def study_instant(self) -> _Col:
        """A study's start in UTC, what a sort by date compares with report dates: the index's
        ``started_utc``, except for the patient's studies whose value was not computed in this
        search's zone, computed here from their local start (:func:`utc_of`, as the indexer
        does). Usually none: one small query finds that out."""
        if self._instant is not None:
            return self._instant
        first_series = (
            select(func.min(Series.started)).where(Series.study_pk == Study.id).scalar_subquery()
        )
        stale = self.session.execute(
            select(Study.id, Study.started, first_series).where(
                Study.patient_pk == self.patient_pk,
                func.coalesce(Study.utc_zone, "") != zone_name(self.zone),
            )
        ).all()
        if not stale:
            self._instant = Study.started_utc
            return self._instant
        whens: list[tuple[ColumnElement[bool], Any]] = []
        for pk, started, first in stale:
            local = started if started is not None else first
            moment = None if local is None else utc_of(local, self.zone)
            # Row ids are integers read from the index: inlined, so that a patient with many
            # such studies does not run into the engines' limits on bound parameters.
            whens.append((Study.id == literal_column(str(int(pk))), literal(moment, DateTime())))
        self._instant = case(*whens, else_=Study.started_utc)
        return self._instant

    def manifest_uid(self, resource_id: str) -> str | None:
        if self._manifest_ids is None:
            uids = self.session.scalars(
                select(Study.study_uid).where(Study.patient_pk == self.patient_pk)
            )
            self._manifest_ids = {manifest_reference_id(uid): uid for uid in uids}
        return self._manifest_ids.get(resource_id)

    def accession_issuers(self, system: str) -> tuple[set[str], bool]:
        """The stored accession issuers shown with ``system`` (as
        :func:`ncp.fhir.manifest.accession_identifier` writes them), and whether an absent
        issuer is. Few distinct issuers per patient: classified here, not in SQL."""
        if self._issuers is None:
            studies = select(Study.accession_issuer).where(Study.patient_pk == self.patient_pk)
            reports = (
                select(ReportVersion.accession_issuer)
                .join(Report, Report.id == ReportVersion.report_id)
                .where(Report.patient_id == self.value, Report.patient_issuer == self.issuer)
            )
            found = set(self.session.scalars(studies.union(reports)))
            self._issuers = {}
            for issuer in found | {None}:
                shown = accession_identifier("0", issuer)
                if shown is not None:
                    self._issuers.setdefault(shown["system"], set()).add(issuer)
        matching = self._issuers.get(system, set())
        return {i for i in matching if i is not None}, None in matching

    def text_matches(self, kind: int, alternatives: tuple[tuple[str, ...], ...]) -> list[int]:
        texts: Iterable[tuple[int, str]]
        if kind == _REPORT:
            if self._report_texts is None:
                rows = self.session.execute(
                    select(ReportVersion.id, ReportVersion.title)
                    .join(Report, Report.id == ReportVersion.report_id)
                    .where(Report.patient_id == self.value, Report.patient_issuer == self.issuer)
                )
                self._report_texts = [(pk, normalise_text(title)) for pk, title in rows]
            texts = self._report_texts
        else:
            texts = self._studies_text().items()
        return [
            pk for pk, text in texts if any(all(w in text for w in alt) for alt in alternatives)
        ]

    def _studies_text(self) -> dict[int, str]:
        if self._study_texts is None:
            parts: dict[int, list[str]] = {}
            for pk, description, meaning in self.session.execute(
                select(Study.id, Study.description, Study.procedure_meaning).where(
                    Study.patient_pk == self.patient_pk
                )
            ):
                parts[pk] = [description or "", meaning or ""]
            for study_pk, description in self.session.execute(
                select(Series.study_pk, Series.description)
                .join(Study, Study.id == Series.study_pk)
                .where(Study.patient_pk == self.patient_pk, Series.description.is_not(None))
            ):
                parts[study_pk].append(description or "")
            # Newline-joined: a word never matches across two descriptions.
            self._study_texts = {pk: normalise_text("\n".join(p)) for pk, p in parts.items()}
        return self._study_texts


# --- filters ---------------------------------------------------------------------------------


def _condition(f: Filter, t: _Target, ctx: _Context) -> ColumnElement[bool]:
    if isinstance(f, TokenFilter):
        return or_(false(), *(_token_condition(f.name, tok, t, ctx) for tok in f.alternatives))
    if isinstance(f, DateFilter):
        return or_(false(), *(_date_condition(d, t, ctx.zone) for d in f.alternatives))
    ids = ctx.text_matches(t.kind, f.alternatives)
    return t.pk.in_(ids) if ids else false()


def _date_condition(d: DateRange, t: _Target, zone: tzinfo) -> ColumnElement[bool]:
    def naive(moment: datetime) -> datetime:
        if moment.tzinfo is None:
            return moment
        return moment.astimezone(UTC if t.utc else zone).replace(tzinfo=None)

    low = naive(d.low)
    high = None if d.high is None else naive(d.high)
    col = t.date
    below_high = col < high if high is not None else col.is_not(None)
    above_high = col >= high if high is not None else false()
    match d.prefix:
        case "eq":
            return and_(col >= low, below_high)
        case "ne":
            return or_(col < low, above_high)
        case "gt" | "sa":
            return above_high
        case "lt" | "eb":
            return col < low
        case "ge":
            return col >= low
        case _:  # le
            return below_high


def _in_system(tok: Token, *systems: str) -> bool:
    return tok.system is None or tok.system in systems


def _coded(code_col: _Col, scheme_col: _Col, tok: Token) -> ColumnElement[bool]:
    match = code_col == tok.code
    if tok.system is None:  # a code of a scheme with no FHIR system is shown as text only
        return and_(match, scheme_col.in_(_SCHEME_DESIGNATORS))
    designators = [d for d in _SCHEME_DESIGNATORS if scheme_system(d) == tok.system]
    return and_(match, scheme_col.in_(designators)) if designators else false()


def _accession(t: _Target, tok: Token, ctx: _Context) -> ColumnElement[bool]:
    if len(tok.code) > MAX_ACCESSION:  # never shown: not a DICOM SH
        return false()
    number = t.accession_number == tok.code
    if tok.system is None:
        return number
    issuers, absent = ctx.accession_issuers(tok.system)
    shown = [t.accession_issuer.in_(sorted(issuers))] if issuers else []
    if absent:
        shown.append(t.accession_issuer.is_(None))
    return and_(number, or_(false(), *shown))


def _study_uid(t: _Target, tok: Token) -> ColumnElement[bool]:
    if not _in_system(tok, STUDY_UID_SYSTEM):
        return false()
    return t.study_uid == (uid_of(tok.code) or tok.code)


@functools.cache
def _body_part_index() -> tuple[frozenset[str], Mapping[str, frozenset[str]]]:
    """DICOM Body Part Examined codes, and SNOMED CT code → the DICOM codes mapped to it."""
    concept_map = load_definitions().resource(BODY_PART_MAP, "ConceptMap")
    terminology = default_terminology()
    codes: set[str] = set()
    reverse: dict[str, set[str]] = {}
    for group in concept_map.get("group", []):
        for element in group.get("element", []):
            code = element["code"]
            codes.add(code)
            for system, target, _eq in terminology.translate(BODY_PART_MAP, group["source"], code):
                if system == SNOMED:
                    reverse.setdefault(target, set()).add(code)
    return frozenset(codes), {k: frozenset(v) for k, v in reverse.items()}


def _body_parts(tok: Token) -> frozenset[str]:
    dicom_system = canonical.code_system("dicom-body-part-examined")
    _codes, from_snomed = _body_part_index()
    found: set[str] = set()
    if tok.system in (None, dicom_system):
        found.add(tok.code)
    if tok.system in (None, SNOMED):
        found |= from_snomed.get(tok.code, frozenset())
    return frozenset(found)


def _token_condition(name: str, tok: Token, t: _Target, ctx: _Context) -> ColumnElement[bool]:
    manifest_only = true() if t.kind == _MANIFEST else false()
    match name:
        case "modality":
            if not _in_system(tok, DICOM):
                return false()
            if t.other_when_empty and tok.code == OTHER_MODALITY:
                return or_(t.modalities == "", _has_item(t.modalities, tok.code))
            return _has_item(t.modalities, tok.code)
        case "bodysite":
            parts = sorted(_body_parts(tok))
            return or_(false(), *(_has_item(t.body_parts, p) for p in parts))
        case "event" | "study-type":
            return _coded(t.procedure_code, t.procedure_scheme, tok)
        case "setting" | "requesting-specialty":
            return _coded(t.requesting_code, t.requesting_scheme, tok)
        case "study-instance-uid":
            return _study_uid(t, tok)
        case "accession-number":
            return _accession(t, tok, ctx)
        case "identifier":
            if tok.system == STUDY_UID_SYSTEM:
                return _study_uid(t, tok)
            if tok.system is None:
                return or_(_study_uid(t, tok), _accession(t, tok, ctx))
            return _accession(t, tok, ctx)
        case "type":
            if tok.code == DOCUMENT_TYPE_CODE and _in_system(tok, LOINC):
                return true()
            return false()
        case "format":
            if tok.code == MANIFEST_FORMAT_CODE and _in_system(tok, MANIFEST_FORMAT_SYSTEM):
                return manifest_only
            return false()
        case "status":
            return _status(tok, t)
        case _:  # _id
            if t.kind == _REPORT:
                return Report.id == tok.code
            if t.kind == _STUDY:
                return t.study_uid == tok.code
            uid = ctx.manifest_uid(tok.code)
            return t.study_uid == uid if uid is not None else false()


def _status(tok: Token, t: _Target) -> ColumnElement[bool]:
    if t.kind == _STUDY:
        return (
            true() if _in_system(tok, STUDY_STATUS_SYSTEM) and tok.code == "available" else false()
        )
    if not _in_system(tok, DOCUMENT_STATUS_SYSTEM):
        return false()
    if t.kind == _MANIFEST:
        return true() if tok.code == "current" else false()
    withdrawn = ReportVersion.status == "entered-in-error"
    # Wrapped so that SQLite cannot pick the (latest, date) index and walk every patient's
    # latest versions: the patient's reports (report.patient_id index) must drive the join.
    latest: ColumnElement[bool] = func.coalesce(ReportVersion.latest, false())
    match tok.code:
        case "current":
            return and_(latest, not_(withdrawn))
        case "superseded":
            return not_(latest)
        case "entered-in-error":
            return and_(latest, withdrawn)
        case _:
            return false()


# --- the search ------------------------------------------------------------------------------


def _branch(query: SearchQuery, t: _Target, ctx: _Context) -> Select[Any]:
    # "date" is what a sort compares: an instant in UTC (a report's date is one already).
    by_date = not query.summary_count and any(k.column == "date" for k in query.sort)
    date = ctx.study_instant() if by_date and not t.utc else t.date
    columns: tuple[Any, ...] = (
        literal(t.kind, Integer).label("kind"),
        t.pk.label("pk"),
        date.label("date"),
        t.sort_modality.label("modality"),
        t.title.label("title"),
        t.tie_text.label("tie_text"),
        t.tie_int.label("tie_int"),
        t.study_uid.label("study_uid"),
    )
    conditions = [_condition(f, t, ctx) for f in query.filters]
    if t.kind == _REPORT:
        stmt = (
            select(*columns)
            .select_from(ReportVersion)
            .join(Report, Report.id == ReportVersion.report_id)
            .where(Report.patient_id == ctx.value, Report.patient_issuer == ctx.issuer)
            .where(*conditions)
        )
        if t.joins_study:
            on = and_(
                Study.study_uid == ReportVersion.study_uid, Study.patient_pk == ctx.patient_pk
            )
            stmt = stmt.outerjoin(Study, on)
        return stmt
    return select(*columns).where(Study.patient_pk == ctx.patient_pk).where(*conditions)


class EntryKey(NamedTuple):
    """One entry of a page, named without loading it: what the loader and the store of
    rendered entries (:mod:`ncp.provider.list_entries`) take. ``pk`` is the report version's or
    the study's; ``report_id`` and ``version`` are set for report entries only. (A named tuple:
    a page makes a thousand of them.)"""

    kind: EntryKind
    pk: int
    study_uid: str | None
    report_id: str | None = None
    version: int | None = None

    @property
    def resource_type(self) -> str:
        return "ImagingStudy" if self.kind == EntryKind.STUDY else "DocumentReference"

    @property
    def resource_id(self) -> str:
        """The entry's FHIR id, as the builders of :mod:`ncp.fhir.listing` and
        :mod:`ncp.fhir.manifest` give it."""
        if self.kind == EntryKind.REPORT:
            assert self.report_id is not None
            return self.report_id
        assert self.study_uid is not None
        if self.kind == EntryKind.MANIFEST:
            return manifest_reference_id(self.study_uid)
        return imaging_study_id(self.study_uid)


@dataclass(frozen=True)
class PageKeys(Paging):
    """One page of a search as keys: ``matches`` in order, ``included`` to add (the patient,
    and the entries ``_include``/``_revinclude`` bring). ``patient_pk`` is the patient's index
    row, if indexed: a report entry shows that patient's study with the report's UID only."""

    patient_pk: int | None = None
    matches: tuple[EntryKey, ...] = ()
    included: tuple[EntryKey | PatientInclude, ...] = ()


def run_search(
    session: Session,
    query: SearchQuery,
    *,
    patient: tuple[str, str],
    zone: tzinfo = UTC,
) -> SearchPage:
    """Run ``query`` over the index for the patient ``(issuer, value)`` (as the index keeps
    them: ``issuer_of(system)``, value). A query naming another patient finds nothing."""
    return load_page(session, find_page(session, query, patient=patient, zone=zone))


def find_page(
    session: Session,
    query: SearchQuery,
    *,
    patient: tuple[str, str],
    zone: tzinfo = UTC,
) -> PageKeys:
    """The page of ``query`` for the patient ``(issuer, value)``, as keys: the index rows are
    found, sorted and paged, not loaded."""
    issuer, value = patient
    if not query.allows_patient(issuer, value):
        return PageKeys(query=query, total=0)
    patient_row = session.scalars(
        select(Patient).where(Patient.patient_id == value, Patient.issuer == issuer)
    ).one_or_none()
    ctx = _Context(session, issuer, value, None if patient_row is None else patient_row.id, zone)

    targets: list[_Target] = []
    if query.resource_type == "DocumentReference":
        fallback = any(f.name in _FALLBACK_FILTERS for f in query.filters) or any(
            k.column == "modality" for k in query.sort
        )
        targets.append(_report_target(fallback))
        if patient_row is not None:
            targets.append(_study_target(_MANIFEST))
    elif patient_row is not None:
        targets.append(_study_target(_STUDY))
    if not targets:
        return PageKeys(query=query, total=0)
    branches = [_branch(query, t, ctx) for t in targets]
    rows = (union_all(*branches) if len(branches) > 1 else branches[0]).subquery("entries")

    if query.summary_count:
        total = session.scalar(select(func.count()).select_from(rows)) or 0
        return PageKeys(query=query, total=total)

    postgres = session.get_bind().dialect.name == "postgresql"

    def bytewise(col: ColumnElement[Any]) -> ColumnElement[Any]:
        return col.collate("C") if postgres else col

    order: list[ColumnElement[Any]] = []
    for key in query.sort:
        raw = rows.c[key.column]
        order.append(case((raw.is_(None), 1), else_=0))  # missing values last, both ways
        col = raw if key.column == "date" else bytewise(raw)
        order.append(col.desc() if key.descending else col.asc())
    order += [bytewise(rows.c.tie_text), rows.c.kind, rows.c.tie_int]
    # The total rides along with the page (a window count): one pass over the union, not two.
    page = session.execute(
        select(
            rows.c.kind,
            rows.c.pk,
            rows.c.study_uid,
            rows.c.tie_text,
            rows.c.tie_int,
            func.count().over().label("total"),
        )
        .order_by(*order)
        .limit(query.count)
        .offset(query.offset)
    ).all()
    if page:
        total = page[0].total
    elif query.offset == 0:
        total = 0
    else:  # past the end: the window saw no row
        total = session.scalar(select(func.count()).select_from(rows)) or 0

    matches = tuple(
        EntryKey(_REPORT, pk, uid, tie_text, tie_int)
        if kind == _REPORT
        else EntryKey(_KINDS[kind], pk, uid)
        for kind, pk, uid, tie_text, tie_int, _total in page
    )
    included = _included(query, ctx, patient_row, matches)
    return PageKeys(query, total, ctx.patient_pk, matches, included)


def load_page(session: Session, keys: PageKeys) -> SearchPage:
    """The page's index rows, loaded in a few queries whatever its size."""
    loader = _Loader(session, keys)
    matches = loader.matches(keys.matches)
    included = loader.matches(keys.included)
    return SearchPage(query=keys.query, total=keys.total, matches=matches, included=included)


class _Loader:
    """Loads the rows of entry keys in a few queries, whatever their number."""

    def __init__(self, session: Session, keys: PageKeys) -> None:
        self.session = session
        self.patient_pk = keys.patient_pk

    def versions(self, pks: Sequence[int]) -> dict[int, ReportVersion]:
        if not pks:
            return {}
        stmt = (
            select(ReportVersion)
            .where(ReportVersion.id.in_(pks))
            .options(joinedload(ReportVersion.report), defer(ReportVersion.content))
        )
        return {v.id: v for v in self.session.scalars(stmt)}

    def studies(self, pks: Sequence[int]) -> dict[int, Study]:
        if not pks:
            return {}
        return {s.id: s for s in self.session.scalars(select(Study).where(Study.id.in_(pks)))}

    def studies_by_uid(self, uids: Iterable[str | None]) -> dict[str, Study]:
        """The patient's studies with these UIDs (never another patient's)."""
        wanted = sorted({u for u in uids if u is not None})
        if not wanted or self.patient_pk is None:
            return {}
        stmt = select(Study).where(Study.patient_pk == self.patient_pk, Study.study_uid.in_(wanted))
        return {s.study_uid: s for s in self.session.scalars(stmt)}

    def study_matches(self, studies: Iterable[Study]) -> dict[int, StudyMatch]:
        """Studies with their series (selectin) and instances (one query)."""
        studies = list(studies)
        if studies:  # make sure the series are loaded in one query
            self.session.scalars(
                select(Study)
                .where(Study.id.in_([s.id for s in studies]))
                .options(selectinload(Study.series))
            ).all()
        series_pks = [s.id for st in studies for s in st.series]
        by_series: dict[int, list[Instance]] = {}
        if series_pks:
            stmt = select(Instance).where(Instance.series_pk.in_(series_pks))
            for inst in self.session.scalars(stmt):
                by_series.setdefault(inst.series_pk, []).append(inst)
        out: dict[int, StudyMatch] = {}
        for st in studies:
            series = tuple(
                sorted(st.series, key=lambda s: (s.number is None, s.number or 0, s.series_uid))
            )
            instances = {
                s.series_uid: tuple(sorted(by_series.get(s.id, ()), key=_instance_order))
                for s in series
            }
            out[st.id] = StudyMatch(st, series, instances)
        return out

    def matches(self, keys: Sequence[EntryKey | PatientInclude]) -> tuple[Any, ...]:
        entries = [k for k in keys if isinstance(k, EntryKey)]
        versions = self.versions([k.pk for k in entries if k.kind == _REPORT])
        studies = self.studies([k.pk for k in entries if k.kind != _REPORT])
        of_reports = self.studies_by_uid(v.study_uid for v in versions.values())
        full = self.study_matches(studies[k.pk] for k in entries if k.kind == _STUDY)
        out: list[Any] = []
        for k in keys:
            if isinstance(k, PatientInclude):
                out.append(k)
            elif k.kind == _REPORT:
                v = versions[k.pk]
                out.append(ReportMatch(v.report, v, of_reports.get(v.study_uid or "")))
            elif k.kind == _MANIFEST:
                out.append(ManifestMatch(studies[k.pk]))
            else:
                out.append(full[k.pk])
        return tuple(out)


def _instance_order(i: Instance) -> tuple[bool, int, str]:
    return (i.instance_number is None, i.instance_number or 0, i.sop_uid)


def _included(
    query: SearchQuery,
    ctx: _Context,
    patient_row: Patient | None,
    matches: tuple[EntryKey, ...],
) -> tuple[EntryKey | PatientInclude, ...]:
    if not matches:
        return ()
    out: list[EntryKey | PatientInclude] = []
    if query.include_patient:
        out.append(PatientInclude(ctx.issuer, ctx.value, patient_row))
    if query.include_studies and patient_row is not None:
        uids: list[str] = []
        for m in matches:
            if m.study_uid is not None and m.study_uid not in uids:
                uids.append(m.study_uid)
        found: dict[str, int] = {
            uid: pk
            for uid, pk in ctx.session.execute(
                select(Study.study_uid, Study.id).where(
                    Study.patient_pk == patient_row.id, Study.study_uid.in_(uids)
                )
            )
        }
        out.extend(EntryKey(EntryKind.STUDY, found[uid], uid) for uid in uids if uid in found)
    if query.revinclude_documents:
        page_studies = [m for m in matches if m.kind == _STUDY]
        stmt = (
            select(
                ReportVersion.id,
                ReportVersion.study_uid,
                ReportVersion.report_id,
                ReportVersion.version,
                ReportVersion.date,
            )
            .join(Report, Report.id == ReportVersion.report_id)
            .where(
                Report.patient_id == ctx.value,
                Report.patient_issuer == ctx.issuer,
                ReportVersion.study_uid.in_([m.study_uid for m in page_studies]),
                ReportVersion.latest,
                ReportVersion.status != "entered-in-error",
            )
        )
        # Plain tuples (date, report id, key): a page brings a thousand of them.
        reports: dict[str | None, list[tuple[datetime, str, EntryKey]]] = {}
        for pk, uid, report_id, version, date in ctx.session.execute(stmt):
            key = EntryKey(EntryKind.REPORT, pk, uid, report_id, version)
            reports.setdefault(uid, []).append((date, report_id, key))
        for study in page_studies:
            out.append(EntryKey(EntryKind.MANIFEST, study.pk, study.study_uid))
            of_study = reports.get(study.study_uid, [])
            if len(of_study) > 1:
                of_study.sort(key=lambda r: r[1])
                of_study.sort(key=lambda r: r[0], reverse=True)  # stable: newest first
            out.extend(r[2] for r in of_study)
    return tuple(out)
