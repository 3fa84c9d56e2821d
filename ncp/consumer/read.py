"""Reading country A's answers on the standard channel into B's typed results
(:mod:`ncp.consumer.results`, :mod:`ncp.consumer.model`).

Tolerant of harmless quirks, strict on what matters (highdicom's principle for readers):

- **strict**, the answer is refused as :class:`~ncp.consumer.model.PeerAnswerInvalid`: anything
  about another patient than the one B asked for; a Study, Series or SOP Instance UID that is not
  a DICOM UID, or named twice; a manifest whose instance or series counts disagree with what it
  lists, or a series listing no instance (B verifies every instance against the manifest: a
  manifest it cannot check against is no manifest); a report Bundle that is not a document led by
  its Composition; an access answer without a token, a valid expiry, or an https address;
- **tolerant**, kept and noted in the result's ``quirks``: unknown elements and extensions, a
  missing optional element (description, date, size), a size written ``1234.0``, a UID value
  without its ``urn:oid:`` prefix, a SOP Class given as a bare UID, a match candidate without a
  grade (read as ``possible``: never certain by default), a history listed oldest first.

The functions take A's resources in their JSON form (``ncp.fhir.io.read_resource`` reads both JSON
and XML into it) and never raise anything but PeerAnswerInvalid on bad content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lxml import etree

from ncp.consumer.model import (
    ManifestInstance,
    ManifestSeries,
    PeerAnswerInvalid,
    StudyManifest,
)
from ncp.consumer.results import (
    Coded,
    Grade,
    ListedReport,
    ListedStudy,
    MatchOutcome,
    MatchResult,
    PatientCandidate,
    ReportDocument,
    ReportHistory,
    ReportSection,
)
from ncp.dicom.uids import is_uid
from ncp.fhir.datatypes import DATE_TIME, SIZE_BYTES_URL, first_moment
from ncp.fhir.identifiers import STUDY_UID_SYSTEM, is_fhir_id, patient_resource_id
from ncp.fhir.io import FhirReadError, read_resource
from ncp.fhir.patient_match import MATCH_GRADE_URL
from ncp.security.claims import PatientRef

MADO_FORMAT_CODE = "urn:ihe:rad:MADO:fhir-manifest"
"""Prefix of IHE MADO's FHIR-manifest format code (the year suffix varies by edition)."""
REPORT_CATEGORY = "85430-7"
SNOMED = "http://snomed.info/sct"
PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"
"""LOINC Diagnostic imaging report: the category of a report DocumentReference."""
MODALITY_EXTENSIONS = ("extension-DocumentReference.modality",)
BODY_SITE_EXTENSIONS = ("extension-DocumentReference.bodySite",)
SECTION_CODES = {
    "18726-0": "imaging study",
    "55115-0": "order",
    "11329-0": "history",
    "55111-9": "procedure",
    "18834-2": "comparison",
    "59776-5": "findings",
    "19005-8": "impression",
    "18783-1": "recommendation",
    "73568-8": "communication",
}
_GRADES: dict[str, Grade] = {
    "certain": "certain",
    "certain-match": "certain",
    "probable": "probable",
    "probable-match": "probable",
    "possible": "possible",
    "possible-match": "possible",
}
_BLOCKS = ("p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "td", "th", "dt", "dd")
_MAX_QUIRKS = 50


@dataclass
class Notes:
    """What a reader tolerated, and who answered (for the error when it cannot)."""

    peer: str
    quirks: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.quirks) < _MAX_QUIRKS and text not in self.quirks:
            self.quirks.append(text)

    def refuse(self, reason: str) -> PeerAnswerInvalid:
        return PeerAnswerInvalid(self.peer, reason)


# --- the body ------------------------------------------------------------------------------------


def parse_body(body: bytes) -> dict[str, Any]:
    """A's answer as a resource in its JSON form: FHIR JSON read by the C parser (a list page is
    megabytes: ``ncp.fhir.io``'s reader, built to report every malformed value to the validator,
    costs several times more and B needs none of that), FHIR XML by ``ncp.fhir.io``. ValueError
    when it is neither, or not a JSON object."""
    head = body.lstrip()[:1]
    if head == b"<":
        try:
            return read_resource(body, max_bytes=len(body) + 1)
        except FhirReadError as exc:
            raise ValueError(str(exc)) from None
    if head != b"{":
        raise ValueError("neither FHIR JSON nor FHIR XML")
    try:
        resource = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(resource, dict):
        raise ValueError("not a JSON object")
    return resource


# --- OperationOutcome ----------------------------------------------------------------------------


def outcome_text(resource: Mapping[str, Any] | None) -> tuple[str, str]:
    """The diagnostics of an OperationOutcome (errors first) and the first issue's code, for a
    refusal the HP reads. Empty strings when ``resource`` is no OperationOutcome."""
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "OperationOutcome":
        return "", ""
    issues = [i for i in _list(resource.get("issue")) if isinstance(i, Mapping)]
    rank = {"fatal": 0, "error": 1, "warning": 2, "information": 3}
    issues.sort(key=lambda i: rank.get(str(i.get("severity")), 4))
    texts: list[str] = []
    for issue in issues:
        text = _str(issue.get("diagnostics")) or _str(_map(issue.get("details")).get("text"))
        if text and text not in texts:
            texts.append(text)
    code = _str(issues[0].get("code")) if issues else None
    return "; ".join(texts)[:2000], code or ""


# --- Patient/$match ------------------------------------------------------------------------------


def match_result(bundle: Mapping[str, Any], *, asked_system: str | None, peer: str) -> MatchResult:
    """A's searchset of graded candidates as a MatchResult.

    The outcome is B's own reading, whatever grades A gave: no candidate is ``no-match``;
    several are ``ambiguous`` (even if one is graded certain: the HP chooses); one is its grade.
    """
    notes = Notes(peer)
    _require_bundle(bundle, "searchset", notes)
    candidates: list[PatientCandidate] = []
    for index, entry in enumerate(_entries(bundle)):
        resource = _map(entry.get("resource"))
        search = _map(entry.get("search"))
        if search.get("mode") not in (None, "match"):
            continue
        if resource.get("resourceType") != "Patient":
            notes.note(f"entry[{index}]: a {resource.get('resourceType')} among the candidates")
            continue
        candidate = _candidate(resource, search, asked_system, notes, index)
        if candidate is not None:
            candidates.append(candidate)
    outcome: MatchOutcome
    if not candidates:
        outcome = "no-match"
    elif len(candidates) > 1:
        outcome = "ambiguous"
    else:
        outcome = candidates[0].grade
    return MatchResult(outcome, tuple(candidates), tuple(notes.quirks))


def _candidate(
    patient: Mapping[str, Any],
    search: Mapping[str, Any],
    asked_system: str | None,
    notes: Notes,
    index: int,
) -> PatientCandidate | None:
    identifiers = tuple(_identifiers(patient.get("identifier")))
    if not identifiers:
        # B names the patient to A by identifier in the TRC: a candidate without one cannot be
        # chosen, so it is not offered.
        notes.note(f"entry[{index}]: a candidate without an identifier was left out")
        return None
    chosen = next((i for i in identifiers if i.system == asked_system), identifiers[0])
    grade_code = next(
        (
            _str(e.get("valueCode"))
            for e in _list(search.get("extension"))
            if isinstance(e, Mapping) and e.get("url") == MATCH_GRADE_URL
        ),
        None,
    )
    if grade_code == "certainly-not":
        notes.note(f"entry[{index}]: a candidate graded certainly-not was left out")
        return None
    grade = _GRADES.get(grade_code or "")
    if grade is None:
        notes.note(f"entry[{index}]: match grade {grade_code!r} read as possible")
        grade = "possible"
    score = search.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        score = None
    name = _map(_first(patient.get("name")))
    given = tuple(g for g in _list(name.get("given")) if isinstance(g, str))
    birth = _date_only(patient.get("birthDate"))
    return PatientCandidate(
        patient=chosen,
        grade=grade,
        score=float(score) if score is not None else None,
        family=_str(name.get("family")),
        given=given,
        name=_str(name.get("text"))
        or " ".join((*given, _str(name.get("family")) or "")).strip()
        or None,
        birth_date=birth,
        gender=_str(patient.get("gender")),
        identifiers=identifiers,
    )


# --- searchsets ----------------------------------------------------------------------------------


@dataclass
class Page:
    """One page of a searchset: its matches by type, A's warnings, the next page's URL."""

    matches: list[tuple[int, Mapping[str, Any]]]
    includes: list[Mapping[str, Any]]
    warnings: list[str]
    total: int | None
    next_url: str | None


def searchset_page(bundle: Mapping[str, Any], notes: Notes) -> Page:
    _require_bundle(bundle, "searchset", notes)
    matches: list[tuple[int, Mapping[str, Any]]] = []
    includes: list[Mapping[str, Any]] = []
    warnings: list[str] = []
    for index, entry in enumerate(_entries(bundle)):
        resource = _map(entry.get("resource"))
        mode = _map(entry.get("search")).get("mode")
        if resource.get("resourceType") == "OperationOutcome":
            text, _code = outcome_text(resource)
            if text:
                warnings.append(text)
        elif mode == "include":
            includes.append(resource)
        else:
            if mode not in ("match", None):
                notes.note(f"entry[{index}]: search mode {mode!r} read as match")
            matches.append((index, resource))
    total = bundle.get("total")
    next_url = None
    for link in _list(bundle.get("link")):
        if isinstance(link, Mapping) and link.get("relation") == "next":
            next_url = _str(link.get("url"))
    return Page(
        matches=matches,
        includes=includes,
        warnings=warnings,
        total=total if isinstance(total, int) and not isinstance(total, bool) else None,
        next_url=next_url,
    )


def list_entry(
    resource: Mapping[str, Any], patient: PatientRef, notes: Notes, where: str
) -> ListedStudy | ListedReport | None:
    """A DocumentReference of the list as a study (MADO manifest format) or a report (LOINC
    category 85430-7); None, noted, for a resource that is neither."""
    if resource.get("resourceType") != "DocumentReference":
        notes.note(f"{where}: a {resource.get('resourceType')} in the list was skipped")
        return None
    _check_subject(resource.get("subject"), patient, notes, where)
    content = _map(_first(resource.get("content")))
    attachment = _map(content.get("attachment"))
    fmt = _str(_map(content.get("format")).get("code")) or ""
    categories = [c for cat in _list(resource.get("category")) for c in _codings(cat)]
    is_report = any(c.code == REPORT_CATEGORY for c in categories)
    related = _related(resource, notes, where)
    if fmt.startswith(MADO_FORMAT_CODE) and not is_report:
        return _listed_study(resource, attachment, related, notes, where)
    if is_report:
        return _listed_report(resource, attachment, related, notes, where)
    notes.note(f"{where}: a DocumentReference that is neither a manifest nor a report")
    return None


@dataclass
class _Related:
    study_uids: list[str] = field(default_factory=list)
    accession: str | None = None
    accession_system: str | None = None


def _related(resource: Mapping[str, Any], notes: Notes, where: str) -> _Related:
    out = _Related()
    context = _map(resource.get("context"))
    for ref in _list(context.get("related")):
        ref = _map(ref)
        ident = _map(ref.get("identifier"))
        kind = ref.get("type") or (_str(ref.get("reference")) or "").partition("/")[0]
        if kind == "ImagingStudy" or ident.get("system") == STUDY_UID_SYSTEM:
            uid = _study_uid_of(ident, notes, f"{where}.context.related")
            if uid is not None and uid not in out.study_uids:
                out.study_uids.append(uid)
        elif kind == "ServiceRequest" and _str(ident.get("value")):
            out.accession = _str(ident.get("value"))
            out.accession_system = _str(ident.get("system"))
    return out


def _listed_study(
    resource: Mapping[str, Any],
    attachment: Mapping[str, Any],
    related: _Related,
    notes: Notes,
    where: str,
) -> ListedStudy:
    if len(related.study_uids) != 1:
        raise notes.refuse(
            f"{where}: a manifest entry names {len(related.study_uids)} studies, not one"
        )
    context = _map(resource.get("context"))
    modalities, body_sites = _modalities_and_sites(resource.get("extension"))
    event = [_coded(e) for e in _list(context.get("event"))]
    return ListedStudy(
        study_uid=related.study_uids[0],
        entry_id=_str(resource.get("id")) or "",
        manifest_url=_str(attachment.get("url")),
        title=_str(attachment.get("title")),
        description=_str(resource.get("description")),
        date=_moment(
            _map(context.get("period")).get("start") or resource.get("date"), notes, where
        ),
        modalities=modalities,
        body_sites=body_sites,
        study_type=event[0] if event else None,
        requesting_specialty=_coded(context.get("practiceSetting"))
        if context.get("practiceSetting")
        else None,
        size=_size(resource.get("extension"), notes, where),
        accession=related.accession,
        accession_system=related.accession_system,
        custodian=_str(_map(resource.get("custodian")).get("display")),
    )


def _listed_report(
    resource: Mapping[str, Any],
    attachment: Mapping[str, Any],
    related: _Related,
    notes: Notes,
    where: str,
) -> ListedReport:
    report_id = _str(resource.get("id"))
    url = _str(attachment.get("url"))
    version: str | None = None
    if url:
        path = urlsplit(url).path
        head, _, tail = path.rpartition("/_history/")
        if head:
            version = tail or None
            path = head
        bundle_id = path.rpartition("/")[2]
        if is_fhir_id(bundle_id):
            report_id = bundle_id
    if not report_id or not is_fhir_id(report_id):
        raise notes.refuse(f"{where}: a report entry without a usable id")
    if len(related.study_uids) > 1:
        notes.note(f"{where}: a report about {len(related.study_uids)} studies: the first kept")
    context = _map(resource.get("context"))
    modalities, body_sites = _modalities_and_sites(resource.get("extension"))
    event = [_coded(e) for e in _list(context.get("event"))]
    author = _map(_first(resource.get("author")))
    identifiers = tuple(_identifiers(resource.get("identifier")))
    size = attachment.get("size")
    return ListedReport(
        report_id=report_id,
        status=_str(resource.get("status")) or "current",
        doc_status=_str(resource.get("docStatus")),
        version=version,
        url=url,
        title=_str(attachment.get("title")) or _str(resource.get("description")),
        date=_moment(resource.get("date") or attachment.get("creation"), notes, where),
        language=_str(attachment.get("language")),
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        author=_str(author.get("display")),
        custodian=_str(_map(resource.get("custodian")).get("display")),
        study_uid=related.study_uids[0] if related.study_uids else None,
        accession=related.accession,
        accession_system=related.accession_system,
        modalities=modalities,
        body_sites=body_sites,
        event=event[0] if event else None,
        practice_setting=_coded(context.get("practiceSetting"))
        if context.get("practiceSetting")
        else None,
        identifier=identifiers[0] if identifiers else None,
        priority=_priority(resource),
    )


def _modalities_and_sites(extensions: Any) -> tuple[tuple[str, ...], tuple[Coded, ...]]:
    modalities: list[str] = []
    sites: list[Coded] = []
    for ext in _list(extensions):
        ext = _map(ext)
        url = _str(ext.get("url")) or ""
        value = ext.get("valueCodeableConcept")
        if url.endswith(MODALITY_EXTENSIONS) and value is not None:
            for coding in _codings(value):
                if coding.code and coding.code not in modalities:
                    modalities.append(coding.code)
        elif url.endswith(BODY_SITE_EXTENSIONS):
            # R5 bodySite is a CodeableReference: the concept sits in a nested "concept"
            # extension (as A writes it); a flat valueCodeableConcept is read too.
            concepts = [value] if value is not None else []
            concepts += [
                _map(inner).get("valueCodeableConcept")
                for inner in _list(ext.get("extension"))
                if _map(inner).get("url") == "concept"
            ]
            sites += [_coded(c, prefer=SNOMED) for c in concepts if c is not None]
    return tuple(modalities), tuple(sites)


def _priority(resource: Mapping[str, Any]) -> str | None:
    """The order's priority A tags a report entry with (``meta.tag``, FHIR request-priority)."""
    for tag in _list(_map(resource.get("meta")).get("tag")):
        tag = _map(tag)
        if tag.get("system") == PRIORITY_SYSTEM and _str(tag.get("code")):
            return _str(tag.get("code"))
    return None


# --- ImagingStudy manifests ----------------------------------------------------------------------


def manifest(
    resource: Mapping[str, Any], patient: PatientRef, notes: Notes, where: str = "ImagingStudy"
) -> StudyManifest:
    """A MADO-style ImagingStudy manifest as what B verifies every instance against."""
    if resource.get("resourceType") != "ImagingStudy":
        raise notes.refuse(f"{where}: a {resource.get('resourceType')}, not an ImagingStudy")
    _check_subject(resource.get("subject"), patient, notes, where)
    uids = [
        uid
        for ident in _list(resource.get("identifier"))
        if _map(ident).get("system") == STUDY_UID_SYSTEM
        for uid in [_study_uid_of(_map(ident), notes, f"{where}.identifier")]
        if uid is not None
    ]
    if len(set(uids)) != 1:
        raise notes.refuse(f"{where}: {len(set(uids))} Study Instance UIDs, not one")
    study_uid = uids[0]
    where = f"ImagingStudy {study_uid}"
    endpoints = _contained_endpoints(resource)
    seen_series: set[str] = set()
    seen_instances: set[str] = set()
    series_out: list[ManifestSeries] = []
    for index, raw in enumerate(_list(resource.get("series"))):
        series = _series(_map(raw), endpoints, notes, f"{where}.series[{index}]", seen_instances)
        if series.series_uid in seen_series:
            raise notes.refuse(f"{where}: series {series.series_uid} listed twice")
        seen_series.add(series.series_uid)
        series_out.append(series)
    if not series_out:
        raise notes.refuse(f"{where}: lists no series")
    total = sum(len(s.instances) for s in series_out)
    _check_count(resource.get("numberOfSeries"), len(series_out), "numberOfSeries", notes, where)
    _check_count(resource.get("numberOfInstances"), total, "numberOfInstances", notes, where)
    accession = None
    for ident in _list(resource.get("identifier")):
        ident = _map(ident)
        if ident.get("system") != STUDY_UID_SYSTEM and _str(ident.get("value")):
            accession = _str(ident.get("value"))
            break
    viewer = next(
        (
            _str(_map(endpoints.get(_local_ref(r))).get("address"))
            for r in _list(resource.get("endpoint"))
            if _local_ref(r) in endpoints
        ),
        None,
    )
    modalities = tuple(
        c.code for m in _list(resource.get("modality")) for c in [_coding(m)] if c.code
    )
    return StudyManifest(
        study_uid=study_uid,
        patient=patient,
        series=tuple(series_out),
        size=_size(resource.get("extension"), notes, where),
        accession=accession,
        description=_str(resource.get("description")),
        started=_moment(resource.get("started"), notes, where),
        modalities=modalities,
        viewer=viewer,
    )


def _series(
    raw: Mapping[str, Any],
    endpoints: Mapping[str, Mapping[str, Any]],
    notes: Notes,
    where: str,
    seen_instances: set[str],
) -> ManifestSeries:
    uid = _str(raw.get("uid"))
    if uid is None or not is_uid(uid):
        raise notes.refuse(f"{where}.uid: {uid!r} is not a DICOM UID")
    instances: list[ManifestInstance] = []
    for index, item in enumerate(_list(raw.get("instance"))):
        item = _map(item)
        at = f"{where}.instance[{index}]"
        sop = _str(item.get("uid"))
        if sop is None or not is_uid(sop):
            raise notes.refuse(f"{at}.uid: {sop!r} is not a DICOM UID")
        if sop in seen_instances:
            raise notes.refuse(f"{at}: SOP Instance UID {sop} listed twice")
        seen_instances.add(sop)
        sop_class = _sop_class(item.get("sopClass"), notes, at)
        instances.append(
            ManifestInstance(
                sop_instance_uid=sop,
                sop_class_uid=sop_class,
                number=_whole(item.get("number")),
                frames=_whole(item.get("numberOfFrames")),
                size=_size(item.get("extension"), notes, at),
            )
        )
    if not instances:
        raise notes.refuse(f"{where}: series {uid} lists no instances B could verify against")
    _check_count(raw.get("numberOfInstances"), len(instances), "numberOfInstances", notes, where)
    endpoint = None
    for ref in _list(raw.get("endpoint")):
        target = endpoints.get(_local_ref(ref))
        address = _str(_map(target).get("address")) if target else None
        if address is None:
            address = _str(_map(ref).get("reference")) if not _local_ref(ref) else None
        if address:
            endpoint = address
            break
    modality = _coding(raw.get("modality")).code
    return ManifestSeries(
        series_uid=uid,
        modality=modality,
        instances=tuple(instances),
        endpoint=endpoint,
        size=_size(raw.get("extension"), notes, where),
    )


def _sop_class(value: Any, notes: Notes, where: str) -> str:
    code = _coding(value).code or ""
    uid = code.removeprefix("urn:oid:")
    if uid == code and code:
        notes.note(f"{where}.sopClass: a bare UID, not urn:oid:")
    if not is_uid(uid):
        raise notes.refuse(f"{where}.sopClass: {code!r} is not a SOP Class UID")
    return uid


def _check_count(value: Any, counted: int, name: str, notes: Notes, where: str) -> None:
    if value is None:
        notes.note(f"{where}: no {name}")
        return
    if _whole(value) != counted:
        raise notes.refuse(f"{where}: {name} says {value!r} but {counted} are listed")


def _contained_endpoints(resource: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {
        _str(c.get("id")) or "": c
        for c in map(_map, _list(resource.get("contained")))
        if c.get("resourceType") == "Endpoint"
    }


def _local_ref(ref: Any) -> str:
    reference = _str(_map(ref).get("reference")) or ""
    return reference[1:] if reference.startswith("#") else ""


# --- reports -------------------------------------------------------------------------------------


def report_document(
    bundle: Mapping[str, Any], patient: PatientRef, notes: Notes, report_id: str
) -> ReportDocument:
    """An HL7 Europe imaging report document Bundle: Composition first, the patient B asked
    about, its sections as plain text."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "document":
        raise notes.refuse(f"report {report_id}: not a document Bundle")
    by_url: dict[str, Mapping[str, Any]] = {}
    resources: list[Mapping[str, Any]] = []
    for entry in _entries(bundle):
        resource = _map(entry.get("resource"))
        resources.append(resource)
        url = _str(entry.get("fullUrl"))
        if url:
            by_url[url] = resource
    if not resources or resources[0].get("resourceType") != "Composition":
        raise notes.refuse(f"report {report_id}: the document does not begin with a Composition")
    composition = resources[0]
    subject = _map(composition.get("subject"))
    person = by_url.get(_str(subject.get("reference")) or "") or next(
        (r for r in resources if r.get("resourceType") == "Patient"), {}
    )
    ids = tuple(_identifiers(person.get("identifier")))
    if patient not in ids:
        raise notes.refuse(
            f"report {report_id}: the document's patient is not the patient of the treatment "
            "relationship"
        )
    studies: list[str] = []
    accession: str | None = None
    for resource in resources:
        if resource.get("resourceType") != "ImagingStudy":
            continue
        for ident in map(_map, _list(resource.get("identifier"))):
            if ident.get("system") == STUDY_UID_SYSTEM:
                uid = _study_uid_of(ident, notes, f"report {report_id} ImagingStudy")
                if uid is not None and uid not in studies:
                    studies.append(uid)
            elif accession is None and _str(ident.get("value")):
                accession = _str(ident.get("value"))
    diagnostic = next((r for r in resources if r.get("resourceType") == "DiagnosticReport"), {})
    order = next((r for r in resources if r.get("resourceType") == "ServiceRequest"), {})
    meta = _map(bundle.get("meta"))
    identifier = _first_identifier(composition.get("identifier"))
    replaces = next(
        (
            _str(_map(rel.get("targetIdentifier")).get("value"))
            for rel in map(_map, _list(composition.get("relatesTo")))
            if rel.get("code") == "replaces"
        ),
        None,
    )
    return ReportDocument(
        report_id=_str(bundle.get("id")) or report_id,
        version=_str(meta.get("versionId")),
        status=_str(composition.get("status")) or "unknown",
        title=_str(composition.get("title")),
        date=_moment(composition.get("date"), notes, f"report {report_id}"),
        language=_str(composition.get("language")) or _str(bundle.get("language")),
        identifier=identifier,
        patient=patient,
        study_uids=tuple(studies),
        sections=tuple(
            _section(_map(s), notes, f"report {report_id}")
            for s in _list(composition.get("section"))
        ),
        accession=accession,
        authors=tuple(
            d for d in (_str(_map(a).get("display")) for a in _list(composition.get("author"))) if d
        ),
        organisation=_str(_map(composition.get("custodian")).get("display")),
        conclusion=_str(diagnostic.get("conclusion")),
        last_updated=_moment(meta.get("lastUpdated"), notes, f"report {report_id}"),
        replaces=replaces,
        priority=_str(order.get("priority")),
        bundle=dict(bundle),
        quirks=tuple(notes.quirks),
    )


def report_history(
    bundle: Mapping[str, Any], patient: PatientRef, notes: Notes, report_id: str
) -> ReportHistory:
    """A ``_history`` Bundle: every version, newest first by version number."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "history":
        raise notes.refuse(f"report {report_id}: _history did not answer a history Bundle")
    versions = []
    for index, entry in enumerate(_entries(bundle)):
        resource = _map(entry.get("resource"))
        if not resource:
            notes.note(f"entry[{index}]: a history entry without a resource (deleted?) skipped")
            continue
        versions.append(report_document(resource, patient, Notes(notes.peer), report_id))
    ordered = sorted(versions, key=lambda v: _version_number(v.version), reverse=True)
    if [v.version for v in ordered] != [v.version for v in versions]:
        notes.note("the history was not listed newest first")
    numbers = [v.version for v in ordered]
    if len(set(numbers)) != len(numbers):
        raise notes.refuse(f"report {report_id}: a version listed twice in its history")
    for version in ordered:
        for quirk in version.quirks:
            notes.note(f"version {version.version}: {quirk}")
    return ReportHistory(report_id, tuple(ordered), tuple(notes.quirks))


def _version_number(version: str | None) -> int:
    return int(version) if version is not None and version.isdigit() else -1


def _section(section: Mapping[str, Any], notes: Notes, where: str) -> ReportSection:
    code = next((c.code for c in _codings(section.get("code")) if c.code), None)
    div = _str(_map(section.get("text")).get("div"))
    empty = next((c.code for c in _codings(section.get("emptyReason")) if c.code), None)
    return ReportSection(
        code=code,
        title=_str(section.get("title")) or SECTION_CODES.get(code or ""),
        paragraphs=narrative_paragraphs(div, notes, where) if div else (),
        empty_reason=empty,
    )


def narrative_paragraphs(div: str, notes: Notes | None = None, where: str = "") -> tuple[str, ...]:
    """The text of an XHTML narrative, one string per block (paragraph, list item, cell...):
    plain text only, so that markup in A's data can never become markup on B's pages."""
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )
    try:
        root = etree.fromstring(div.encode("utf-8"), parser)
    except etree.XMLSyntaxError:
        if notes is not None:
            notes.note(f"{where}: a narrative that is not XHTML, read as text")
        text = re.sub(r"<[^>]*>", " ", div)
        return tuple(p for p in (" ".join(text.split()),) if p)
    blocks: list[str] = []
    for element in root.iter():
        tag = etree.QName(element).localname if isinstance(element.tag, str) else ""
        if tag in _BLOCKS:
            text = " ".join("".join(element.itertext()).split())
            if text:
                blocks.append(text)
    if not blocks:
        text = " ".join("".join(root.itertext()).split())
        if text:
            blocks.append(text)
    return tuple(blocks)


# --- $imaging-access -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessAnswer:
    token: str
    expires_at: datetime
    dicomweb: str | None
    viewer: str | None


def access_answer(params: Mapping[str, Any], notes: Notes) -> AccessAnswer:
    """The out Parameters of ``$imaging-access``: ``token``, ``expires`` and ``dicomweb`` (options
    A, C) or ``viewer`` (option B)."""
    if params.get("resourceType") != "Parameters":
        raise notes.refuse("$imaging-access did not answer a Parameters resource")
    values: dict[str, Any] = {}
    for param in map(_map, _list(params.get("parameter"))):
        name = _str(param.get("name"))
        if name is None:
            continue
        value = next((v for k, v in param.items() if k.startswith("value")), None)
        if name in values:
            raise notes.refuse(f"$imaging-access: parameter {name} given twice")
        values[name] = value
    token = values.get("token")
    if not isinstance(token, str) or token.count(".") != 2:
        raise notes.refuse("$imaging-access: no token (a compact JWS) in the answer")
    expires = _moment(values.get("expires"), notes, "$imaging-access.expires")
    if expires is None or expires.tzinfo is None:
        raise notes.refuse("$imaging-access: no expiry instant (with time zone) in the answer")
    urls: dict[str, str | None] = {}
    for name in ("dicomweb", "viewer"):
        url = values.get(name)
        if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
            raise notes.refuse(f"$imaging-access: {name} {url!r} is not an https URL")
        urls[name] = url
    return AccessAnswer(token, expires, urls["dicomweb"], urls["viewer"])


def viewer_audience(url: str) -> tuple[str, str | None]:
    """The viewer's base (the launch token's audience) and the ``code`` of a launch URL
    ``<viewer>/launch?code=<token>``."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    base_path = path.removesuffix("/launch")
    codes = parse_qs(parts.query).get("code", [])
    return f"{parts.scheme}://{parts.netloc}{base_path}", codes[0] if len(codes) == 1 else None


# --- shared value readers ------------------------------------------------------------------------


def _require_bundle(bundle: Mapping[str, Any], kind: str, notes: Notes) -> None:
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise notes.refuse(f"a {kind} Bundle was expected")
    if bundle.get("type") != kind:
        notes.note(f"Bundle.type {bundle.get('type')!r}, {kind} expected")


def _entries(bundle: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    return [e for e in _list(bundle.get("entry")) if isinstance(e, Mapping)]


def _check_subject(subject: Any, patient: PatientRef, notes: Notes, where: str) -> None:
    """Strict: every resource B reads is about the patient it asked for."""
    subject = _map(subject)
    ident = _map(subject.get("identifier"))
    if ident:
        if PatientRef(str(ident.get("system")), str(ident.get("value"))) != patient:
            raise notes.refuse(f"{where}: about another patient than the one asked for")
        return
    reference = _str(subject.get("reference")) or ""
    if reference == f"Patient/{patient_resource_id(patient.system, patient.value)}":
        notes.note(f"{where}: the subject named by reference only")
        return
    raise notes.refuse(f"{where}: does not say which patient it is about")


def _study_uid_of(ident: Mapping[str, Any], notes: Notes, where: str) -> str | None:
    value = _str(ident.get("value"))
    if value is None:
        return None
    uid = value.removeprefix("urn:oid:")
    if uid == value:
        notes.note(f"{where}: a Study Instance UID without urn:oid:")
    if not is_uid(uid):
        raise notes.refuse(f"{where}: {value!r} is not a DICOM UID")
    return uid


def _identifiers(value: Any) -> Iterable[PatientRef]:
    for ident in map(_map, _list(value)):
        system, ident_value = _str(ident.get("system")), _str(ident.get("value"))
        if system and ident_value:
            yield PatientRef(system, ident_value)


def _first_identifier(value: Any) -> PatientRef | None:
    found = list(_identifiers(value if isinstance(value, list) else [value]))
    return found[0] if found else None


def _size(extensions: Any, notes: Notes, where: str) -> int | None:
    for ext in map(_map, _list(extensions)):
        if ext.get("url") != SIZE_BYTES_URL:
            continue
        value = ext.get("valueDecimal", ext.get("valueInteger"))
        if isinstance(value, bool) or not isinstance(value, int | float):
            notes.note(f"{where}: a size that is not a number")
            return None
        if isinstance(value, float):
            if not value.is_integer():
                notes.note(f"{where}: a size of {value} bytes, not a whole number")
                return None
            notes.note(f"{where}: a size written as a decimal ({value})")
        if value < 0:
            notes.note(f"{where}: a negative size")
            return None
        return int(value)
    return None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _coding(value: Any) -> Coded:
    value = _map(value)
    return Coded(
        system=_str(value.get("system")),
        code=_str(value.get("code")),
        display=_str(value.get("display")),
    )


def _codings(concept: Any) -> list[Coded]:
    return [_coding(c) for c in _list(_map(concept).get("coding"))]


def _coded(concept: Any, *, prefer: str | None = None) -> Coded:
    """A concept's coding (the first, or the first of the system ``prefer``) and its text."""
    concept = _map(concept)
    codings = _codings(concept)
    preferred = [c for c in codings if prefer is not None and c.system == prefer]
    first = (preferred or codings or [Coded()])[0]
    return Coded(first.system, first.code, first.display, _str(concept.get("text")))


def _moment(value: Any, notes: Notes, where: str) -> datetime | None:
    """A FHIR date, dateTime or instant as a datetime (aware when it has a zone; a partial
    date is its first moment); None, noted, when unreadable."""
    if value is None:
        return None
    match = DATE_TIME.match(value) if isinstance(value, str) else None
    if match is None:
        notes.note(f"{where}: {str(value)[:40]!r} is not a FHIR date")
        return None
    g = match.groupdict()
    zone: timezone | None = None
    if g["tz"] == "Z":
        zone = UTC
    elif g["tz"]:
        sign = -1 if g["tz"][0] == "-" else 1
        zone = timezone(sign * timedelta(hours=int(g["tz"][1:3]), minutes=int(g["tz"][4:6])))
    try:
        return first_moment(match, zone)
    except ValueError:
        notes.note(f"{where}: {value!r} is not a valid date")
        return None


def _date_only(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def _first(value: Any) -> Any:
    items = _list(value)
    return items[0] if items else None
