"""The list page's view model: one JSON object per patient list, built from what the peer client
(``ncp.consumer.peer``) read of country A's metadata list (``MetadataList``: the study manifest
and report entries of every page) and of A's ImagingStudy manifests (series and instance counts,
the option B viewer endpoint), with coded values, dates and sizes in the HP's language.

The page's script (``static/list.js``) renders, sorts, filters and groups it; nothing in it is
HTML: every value from A is text and the script writes it with ``textContent``. The schema
(version 2) is documented in docs/portal.md; :data:`ROW_KEYS` names a row's keys.

Where the values come from (``ncp.fhir.listing`` builds them at A, ``ncp.consumer.read`` reads
them at B):

- date and time: the manifest entry's ``context.period.start`` (the study's local time at A);
- modality and body site: the R5 ``DocumentReference.modality``/``bodySite`` extensions;
- description: the manifest's attachment title (the DICOM Study Description);
- study type and requesting specialty: ``context.event`` and ``context.practiceSetting``
  (only a ``text`` when the DICOM did not say: shown as "not recorded");
- size: the ``ncp-size-bytes`` extension; series and instances: the ImagingStudy manifest;
- report: the report entry whose ``context.related`` names the study's UID: ``docStatus``
  (preliminary flagged), its order's priority from ``meta.tag`` (urgent, asap or stat: urgent
  flagged), title, author, custodian (the originating organisation), date;
- thumbnail and option B: only when the manifest offers A's viewer (an IHE IID endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ncp.consumer.model import StudyManifest
from ncp.consumer.results import Coded, ListedReport, ListedStudy, MetadataList
from ncp.portal.i18n import Translator

SCHEMA_VERSION = 2
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"

ROW_KEYS = (
    "id", "kind", "started", "started_display", "year", "modalities", "modality_display",
    "body_sites", "body_site_display", "description", "study_type", "requesting_specialty",
    "organisation", "country", "series", "instances", "size_bytes", "size_display",
    "download_s", "download_display", "accession", "report", "thumbnail", "viewer",
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
    """The portal's address of a report, by A's report id."""
    thumbnail_url: Callable[[str], str | None] | None = None
    """The address of a study's thumbnail (option B studies only), by Study Instance UID."""


def _coded(value: Coded | None, t: Translator) -> dict[str, Any] | None:
    """``{"code", "display"}`` in the HP's language; None when A gave no code (a text-only
    concept says the archive did not record it)."""
    if value is None or not value.code:
        return None
    fallback = value.display or value.text
    display = t.coded(value.system, value.code, fallback) if value.system else fallback
    return {"code": value.code, "display": display or value.code}


def _report(report: ListedReport, t: Translator, ctx: ListContext) -> dict[str, Any]:
    status = report.doc_status or "unknown"
    if report.status == "entered-in-error":
        status = "entered-in-error"
    key = f"report.status.{status}"
    return {
        "id": report.report_id,
        "status": status,
        "status_display": t(key) if key in t.messages else status,
        "preliminary": report.preliminary,
        "urgent": report.urgent,
        "title": report.title or "",
        "author": report.author or "",
        "organisation": report.custodian,
        "date": report.date.isoformat() if report.date else None,
        "date_display": t.datetime(report.date) if report.date else "",
        "version": report.version,
        "url": ctx.report_url(report.report_id) if ctx.report_url is not None else None,
    }


def _latest(reports: tuple[ListedReport, ...]) -> ListedReport:
    """Of several reports on one study, the newest (A lists the latest version of each)."""
    return max(reports, key=lambda r: r.date.isoformat() if r.date else "")


def build_list(
    listed: MetadataList,
    manifests: Mapping[str, StudyManifest],
    t: Translator,
    ctx: ListContext,
    *,
    patient: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The view model of one patient's list (schema version :data:`SCHEMA_VERSION`).

    Rows are the studies (newest first), each with its report when A lists one for it; a
    report whose study A does not list is a row of its own (``kind`` = ``report``).
    ``manifests`` (by Study Instance UID) give the counts and whether A offers its viewer; a
    study without one shows no counts. Entries A could not build (its warnings) and studies
    without a date are counted in ``skipped`` (the page says how many).
    """
    rows: list[dict[str, Any]] = []
    skipped = len(listed.warnings)
    by_study: dict[str, list[ListedReport]] = {}
    for report in listed.reports:
        if report.study_uid:
            by_study.setdefault(report.study_uid, []).append(report)
    listed_uids: set[str] = set()
    for study in listed.studies:
        row = _study_row(
            study,
            manifests.get(study.study_uid),
            tuple(by_study.get(study.study_uid, ())),
            t,
            ctx,
        )
        if row is None:
            skipped += 1
            continue
        listed_uids.add(study.study_uid)
        rows.append(row)
    orphans = [r for r in listed.reports if not r.study_uid or r.study_uid not in listed_uids]
    rows += [_report_row(r, t, ctx) for r in orphans]
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


def _study_row(
    study: ListedStudy,
    manifest: StudyManifest | None,
    reports: tuple[ListedReport, ...],
    t: Translator,
    ctx: ListContext,
) -> dict[str, Any] | None:
    started = study.date
    if started is None:
        return None
    sites = [c for c in (_coded(s, t) for s in study.body_sites) if c is not None]
    report = _report(_latest(reports), t, ctx) if reports else None
    size = study.size if study.size is not None else (manifest.size if manifest else None)
    download = size / ctx.throughput if size is not None and ctx.throughput else None
    viewer = manifest is not None and manifest.viewer is not None
    thumbnail = ctx.thumbnail_url(study.study_uid) if viewer and ctx.thumbnail_url else None
    organisation = (report or {}).get("organisation") or study.custodian or ""
    return {
        "id": study.study_uid,
        "kind": "study",
        "started": started.isoformat(),
        "started_display": t.datetime(started),
        "year": started.year,
        "modalities": list(study.modalities),
        "modality_display": ", ".join(t.coded(DCM, m) for m in study.modalities),
        "body_sites": sites,
        "body_site_display": ", ".join(s["display"] for s in sites) or t("list.not_recorded"),
        "description": study.title or study.description or "",
        "study_type": _coded(study.study_type, t),
        "requesting_specialty": _coded(study.requesting_specialty, t),
        "organisation": organisation,
        "country": ctx.peer,
        "series": len(manifest.series) if manifest is not None else None,
        "instances": manifest.instance_count if manifest is not None else None,
        "size_bytes": size,
        "size_display": t.size(size) if size is not None else "",
        "download_s": round(download, 1) if download is not None else None,
        "download_display": t.duration(download) if download is not None else t("list.unknown"),
        "accession": study.accession,
        "report": report,
        "thumbnail": thumbnail,
        "viewer": viewer,
    }


def _report_row(report: ListedReport, t: Translator, ctx: ListContext) -> dict[str, Any]:
    shown = _report(report, t, ctx)
    return {
        "id": report.study_uid or f"report-{report.report_id}",
        "kind": "report",
        "started": shown["date"] or "",
        "started_display": shown["date_display"],
        "year": report.date.year if report.date else None,
        "modalities": list(report.modalities),
        "modality_display": ", ".join(t.coded(DCM, m) for m in report.modalities),
        "body_sites": [],
        "body_site_display": "",
        "description": shown["title"],
        "study_type": None,
        "requesting_specialty": None,
        "organisation": shown["organisation"] or "",
        "country": ctx.peer,
        "series": None,
        "instances": None,
        "size_bytes": None,
        "size_display": "",
        "download_s": None,
        "download_display": "",
        "accession": report.accession,
        "report": shown,
        "thumbnail": None,
        "viewer": False,
    }


__all__ = ["COLUMNS", "ROW_KEYS", "SCHEMA_VERSION", "ListContext", "build_list"]
