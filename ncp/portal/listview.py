"""The list page's view model: one JSON object per patient list, built from the metadata list
country A serves (FHIR ``DocumentReference`` entries for study manifests and reports, and the
``ImagingStudy`` manifests), with coded values, dates and sizes in the HP's language.

The page's script (``static/list.js``) renders, sorts, filters and groups it; nothing in it is
HTML: every value from A is text and the script writes it with ``textContent``. The schema
(version 1) is documented in docs/portal.md; :data:`ROW_KEYS` names a row's keys.

Where the values come from (``ncp.fhir.listing`` builds them at A):

- date and time: the manifest's ``context.period.start`` (the study's local time at A);
- modality and body site: the R5 ``DocumentReference.modality``/``bodySite`` extensions;
- description: the manifest's attachment title (the DICOM Study Description);
- study type and requesting specialty: ``context.event`` and ``context.practiceSetting``
  (only a ``text`` when the DICOM did not say; shown as "not recorded");
- size: the ``ncp-size-bytes`` extension; series and instances: the ImagingStudy;
- report: the report entry whose ``context.related`` names the study's UID: ``docStatus``
  (preliminary flagged), an urgency from ``meta.tag`` (request-priority urgent, asap or stat),
  title, author, custodian (the originating organisation), date and version;
- thumbnail: only when the ImagingStudy offers option B (an IHE IID viewer endpoint), from the
  caller's ``thumbnail_url``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ncp.portal.i18n import Translator

SCHEMA_VERSION = 1
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
STUDY_UID_SYSTEM = "urn:dicom:uid"
PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"
URGENT_PRIORITIES = frozenset({"urgent", "asap", "stat"})
MODALITY_EXT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.modality"
BODY_SITE_EXT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.bodySite"
SIZE_EXT = "https://ncp.example/fhir/StructureDefinition/ncp-size-bytes"
REPORT_CATEGORY = "85430-7"

ROW_KEYS = (
    "id", "kind", "started", "started_display", "year", "modalities", "modality_display",
    "body_sites", "body_site_display", "description", "study_type", "requesting_specialty",
    "organisation", "country", "series", "instances", "size_bytes", "size_display",
    "download_s", "download_display", "accession", "report", "thumbnail",
)  # fmt: skip
"""Keys of every row, in this order (docs/portal.md has the meaning of each)."""

COLUMNS = (
    "select", "started", "modality", "body_site", "description", "report", "study_type",
    "requesting_specialty", "organisation", "series_instances", "size", "download",
)  # fmt: skip
"""The table's columns, in their default order; all but ``select`` may be hidden. The report's
status comes right after what the study is, so a preliminary or urgent flag is never scrolled
off a laptop's screen."""
DEFAULT_HIDDEN = ("study_type", "series_instances")


@dataclass(frozen=True)
class ListContext:
    """What the page knows besides A's answer."""

    peer: str
    """Country A's code (the originating country of every row)."""
    throughput: float | None = None
    """Bytes per second measured on earlier pulls from this peer; None before the first."""
    report_url: Callable[[str], str] | None = None
    """The portal's address of a report, by the report entry's id."""
    thumbnail_url: Callable[[str], str | None] | None = None
    """The address of a study's thumbnail (option B studies only), by Study Instance UID."""


def _codings(concept: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    found = concept.get("coding")
    return [c for c in found if isinstance(c, Mapping)] if isinstance(found, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _coded(concept: Any, t: Translator, systems: tuple[str, ...]) -> dict[str, Any] | None:
    """``{"code", "display"}`` in the HP's language, ``{"code": None, "display": text}`` for a
    text-only concept, None for none."""
    for coding in _codings(concept):
        system, code = coding.get("system"), coding.get("code")
        if system in systems and isinstance(code, str):
            return {"code": code, "display": t.coded(system, code, _text(coding.get("display")))}
    if isinstance(concept, Mapping) and _text(concept.get("text")):
        return {"code": None, "display": None, "note": concept["text"]}
    return None


def _extensions(resource: Mapping[str, Any], url: str) -> list[Mapping[str, Any]]:
    found = resource.get("extension")
    if not isinstance(found, list):
        return []
    return [e for e in found if isinstance(e, Mapping) and e.get("url") == url]


def _study_uid(resource: Mapping[str, Any]) -> str | None:
    context = resource.get("context")
    related = context.get("related") if isinstance(context, Mapping) else None
    for ref in related if isinstance(related, list) else []:
        ident = ref.get("identifier") if isinstance(ref, Mapping) else None
        if isinstance(ident, Mapping) and ident.get("system") == STUDY_UID_SYSTEM:
            value = _text(ident.get("value"))
            if value is not None:
                return value.removeprefix("urn:oid:")
    return None


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _is_report(resource: Mapping[str, Any]) -> bool:
    return any(
        c.get("code") == REPORT_CATEGORY
        for cat in resource.get("category", []) or []
        for c in _codings(cat)
    )


def _urgent(resource: Mapping[str, Any]) -> bool:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, Mapping) else None
    return any(
        isinstance(tag, Mapping)
        and tag.get("system") == PRIORITY_SYSTEM
        and tag.get("code") in URGENT_PRIORITIES
        for tag in (tags if isinstance(tags, list) else [])
    )


def _report(resource: Mapping[str, Any], t: Translator, ctx: ListContext) -> dict[str, Any]:
    status = _text(resource.get("docStatus")) or "unknown"
    content = resource.get("content") or [{}]
    attachment = content[0].get("attachment", {}) if isinstance(content[0], Mapping) else {}
    created = _moment(attachment.get("creation")) or _moment(resource.get("date"))
    authors = [a.get("display") for a in resource.get("author", []) or [] if isinstance(a, Mapping)]
    custodian = resource.get("custodian")
    rid = str(resource.get("id", ""))
    meta = resource.get("meta")
    return {
        "id": rid,
        "status": status,
        "status_display": t(f"report.status.{status}")
        if f"report.status.{status}" in t.messages
        else status,
        "preliminary": status == "preliminary",
        "urgent": _urgent(resource),
        "title": _text(attachment.get("title")) or "",
        "author": ", ".join(a for a in authors if isinstance(a, str)),
        "organisation": _text(custodian.get("display")) if isinstance(custodian, Mapping) else None,
        "date": created.isoformat() if created else None,
        "date_display": t.datetime(created) if created else "",
        "version": _text(meta.get("versionId")) if isinstance(meta, Mapping) else None,
        "url": ctx.report_url(rid) if ctx.report_url is not None else None,
    }


def _viewer_offered(study: Mapping[str, Any] | None) -> bool:
    if study is None:
        return False
    for contained in study.get("contained", []) or []:
        connection = contained.get("connectionType") if isinstance(contained, Mapping) else None
        if isinstance(connection, Mapping) and connection.get("code") == "ihe-iid":
            return True
    return False


def build_list(
    document_references: Iterable[Mapping[str, Any]],
    imaging_studies: Iterable[Mapping[str, Any]],
    t: Translator,
    ctx: ListContext,
    *,
    patient: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The view model of one patient's list (schema version :data:`SCHEMA_VERSION`).

    Rows are the studies (newest first), each with its report when A lists one for it; a
    report whose study A does not list is a row of its own (``kind`` = ``report``).
    Unreadable entries are left out and counted in ``skipped`` (A's validator makes them rare;
    the page says how many).
    """
    studies = {str(s.get("id")): s for s in imaging_studies if isinstance(s, Mapping)}
    by_uid: dict[str, Mapping[str, Any]] = {}
    for s in studies.values():
        for ident in s.get("identifier", []) or []:
            if isinstance(ident, Mapping) and ident.get("system") == STUDY_UID_SYSTEM:
                by_uid[str(ident.get("value", "")).removeprefix("urn:oid:")] = s
    manifests: list[Mapping[str, Any]] = []
    reports: dict[str, list[Mapping[str, Any]]] = {}
    skipped = 0
    for doc in document_references:
        uid = _study_uid(doc) if isinstance(doc, Mapping) else None
        if uid is None:
            skipped += 1
        elif _is_report(doc):
            reports.setdefault(uid, []).append(doc)
        else:
            manifests.append(doc)
    rows: list[dict[str, Any]] = []
    listed: set[str] = set()
    for doc in manifests:
        uid = _study_uid(doc)
        assert uid is not None
        row = _study_row(doc, uid, by_uid.get(uid), reports.get(uid, []), t, ctx)
        if row is None:
            skipped += 1
            continue
        listed.add(uid)
        rows.append(row)
    for uid, docs in reports.items():
        if uid not in listed:
            rows.append(_report_row(uid, _latest(docs), t, ctx))
    rows.sort(key=lambda r: r["started"] or "", reverse=True)
    return {
        "version": SCHEMA_VERSION,
        "language": t.language,
        "locale": t.tag,
        "peer": ctx.peer,
        "patient": dict(patient or {}),
        "columns": list(COLUMNS),
        "hidden": list(DEFAULT_HIDDEN),
        "rows": rows,
        "skipped": skipped,
    }


def _latest(docs: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    # A lists the latest version of each report; of several reports on one study, the newest.
    return max(docs, key=lambda d: str(d.get("date", "")))


def _study_row(
    doc: Mapping[str, Any],
    uid: str,
    study: Mapping[str, Any] | None,
    reports: list[Mapping[str, Any]],
    t: Translator,
    ctx: ListContext,
) -> dict[str, Any] | None:
    context = doc.get("context") if isinstance(doc.get("context"), Mapping) else {}
    assert isinstance(context, Mapping)
    period = context.get("period")
    started = _moment(period.get("start") if isinstance(period, Mapping) else None) or _moment(
        doc.get("date")
    )
    if started is None:
        return None
    modality_codes: list[str] = []
    for ext in _extensions(doc, MODALITY_EXT):
        for coding in _codings(ext.get("valueCodeableConcept")):
            if coding.get("system") == DCM and isinstance(coding.get("code"), str):
                modality_codes.append(coding["code"])
    sites: list[dict[str, Any]] = []
    for ext in _extensions(doc, BODY_SITE_EXT):
        for inner in ext.get("extension", []) or []:
            if isinstance(inner, Mapping) and inner.get("url") == "concept":
                coded = _coded(inner.get("valueCodeableConcept"), t, (SNOMED,))
                if coded is not None and coded.get("code"):
                    sites.append(coded)
    size = next((e.get("valueDecimal") for e in _extensions(doc, SIZE_EXT)), None)
    size_bytes = int(size) if isinstance(size, int | float) and size >= 0 else None
    content = doc.get("content") or [{}]
    attachment = content[0].get("attachment", {}) if isinstance(content[0], Mapping) else {}
    events = context.get("event")
    study_type = _coded(events[0] if isinstance(events, list) and events else None, t, (LOINC,))
    specialty = _coded(context.get("practiceSetting"), t, (SNOMED,))
    report = _report(_latest(reports), t, ctx) if reports else None
    custodian = doc.get("custodian")
    organisation = (report or {}).get("organisation") or (
        _text(custodian.get("display")) if isinstance(custodian, Mapping) else None
    )
    download = size_bytes / ctx.throughput if size_bytes is not None and ctx.throughput else None
    thumbnail = None
    if ctx.thumbnail_url is not None and _viewer_offered(study):
        thumbnail = ctx.thumbnail_url(uid)
    modality_display = [t.coded(DCM, m) for m in modality_codes]
    return {
        "id": uid,
        "kind": "study",
        "started": started.isoformat(),
        "started_display": t.datetime(started),
        "year": started.year,
        "modalities": modality_codes,
        "modality_display": ", ".join(modality_display),
        "body_sites": sites,
        "body_site_display": ", ".join(s["display"] for s in sites) or t("list.not_recorded"),
        "description": _text(attachment.get("title")) or "",
        "study_type": study_type if study_type and study_type.get("code") else None,
        "requesting_specialty": specialty if specialty and specialty.get("code") else None,
        "organisation": organisation or "",
        "country": ctx.peer,
        "series": study.get("numberOfSeries") if study else None,
        "instances": study.get("numberOfInstances") if study else None,
        "size_bytes": size_bytes,
        "size_display": t.size(size_bytes) if size_bytes is not None else "",
        "download_s": round(download, 1) if download is not None else None,
        "download_display": t.duration(download) if download is not None else t("list.unknown"),
        "accession": _accession(doc),
        "report": report,
        "thumbnail": thumbnail,
    }


def _report_row(
    uid: str, doc: Mapping[str, Any], t: Translator, ctx: ListContext
) -> dict[str, Any]:
    report = _report(doc, t, ctx)
    return {
        "id": uid,
        "kind": "report",
        "started": report["date"] or "",
        "started_display": report["date_display"],
        "year": int(report["date"][:4]) if report["date"] else None,
        "modalities": [],
        "modality_display": "",
        "body_sites": [],
        "body_site_display": "",
        "description": report["title"],
        "study_type": None,
        "requesting_specialty": None,
        "organisation": report["organisation"] or "",
        "country": ctx.peer,
        "series": None,
        "instances": None,
        "size_bytes": None,
        "size_display": "",
        "download_s": None,
        "download_display": "",
        "accession": _accession(doc),
        "report": report,
        "thumbnail": None,
    }


def _accession(doc: Mapping[str, Any]) -> str | None:
    context = doc.get("context")
    related = context.get("related") if isinstance(context, Mapping) else None
    for ref in related if isinstance(related, list) else []:
        if isinstance(ref, Mapping) and ref.get("type") == "ServiceRequest":
            ident = ref.get("identifier")
            if isinstance(ident, Mapping):
                return _text(ident.get("value"))
    return None


__all__ = ["COLUMNS", "ROW_KEYS", "SCHEMA_VERSION", "ListContext", "build_list"]
