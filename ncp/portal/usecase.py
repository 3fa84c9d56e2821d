"""The use case's pages (design.md section 3, steps 2 to 7): identify the patient at A, confirm
the treatment relationship (B signs the TRC), the list, a report with its versions, and the
thumbnails of A's studies.

Routes stay thin: the peer client's answers become pages here, its refusals become pages in
:func:`add_handlers` (A's OperationOutcome text shown to the HP), and an expired confirmation
asks the HP again with the reason (:class:`~ncp.portal.peering.ConfirmationExpired`).
"""

from __future__ import annotations

import itertools
import logging
from datetime import date, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException

from ncp.consumer.model import PeerAnswerInvalid, PeerNotAllowed, PeerRefused, PeerUnreachable
from ncp.consumer.results import PatientQuery, ReportDocument, ReportHistory
from ncp.dicom.uids import is_uid
from ncp.fhir.datatypes import zone_of
from ncp.portal import listview
from ncp.portal.app import Portal, portal_of
from ncp.portal.i18n import Translator
from ncp.portal.patients import Confirmed, Identification, candidates_of
from ncp.portal.peering import ConfirmationExpired
from ncp.portal.sessions import PortalSessionView, csrf_ok
from ncp.security.claims import PatientRef

log = logging.getLogger(__name__)

MAX_KEY = 32
FINDINGS, IMPRESSION, RECOMMENDATION = "59776-5", "19005-8", "18783-1"
KEY_SECTIONS = {FINDINGS: "findings", IMPRESSION: "impression", RECOMMENDATION: "recommendation"}


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/identify", identify, methods=["POST"])
    api.add_api_route("/confirm", confirm, methods=["POST"])
    api.add_api_route("/patients/{key}/confirm", confirm_again, methods=["GET"])
    api.add_api_route("/patients/{key}/list", list_page, methods=["GET"])
    api.add_api_route("/patients/{key}/reports/{report_id}", report_page, methods=["GET"])
    api.add_api_route("/patients/{key}/thumbnails/{study}", thumbnail, methods=["GET"])
    return api


# -- shared ---------------------------------------------------------------------------------------


def form_session(request: Request, csrf_token: str) -> PortalSessionView:
    """The HP's session of a form, its CSRF token checked (403 otherwise)."""
    portal = portal_of(request)
    view = portal.hp_session(request)
    if not csrf_ok(view, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or not this session's")
    return view


def confirmed_patient(portal: Portal, view: PortalSessionView, key: str) -> Confirmed:
    found = portal.patients.confirmed(view, key) if len(key) <= MAX_KEY else None
    if found is None:
        raise HTTPException(404, "no patient of this session")
    return found


def local_time(portal: Portal, t: Translator, moment: datetime) -> str:
    """A moment at B (an expiry, a job's time) in B's zone and the HP's locale."""
    return t.datetime(moment.astimezone(zone_of(portal.node.country)))


def _peers(portal: Portal) -> Any:
    if portal.peers is None:
        raise HTTPException(503, "this node may ask no other country ([consumer] peers)")
    return portal.peers


# -- identify --------------------------------------------------------------------------------------


def _query(portal: Portal, country: str, identifier: str, family: str, given: str,
           birth_date: str) -> PatientQuery:  # fmt: skip
    """The HP's form as a ``$match`` query; ValueError with a message key when unusable."""
    ref: PatientRef | None = None
    identifier = identifier.strip()
    if identifier:
        system, bar, value = identifier.rpartition("|")
        if not bar:
            system = portal.settings.identifier_systems.get(country, "")
            value = identifier
        if not system or not value.strip():
            raise ValueError("identify.error.system")
        ref = PatientRef(system.strip(), value.strip())
    born: date | None = None
    if birth_date.strip():
        try:
            born = date.fromisoformat(birth_date.strip())
        except ValueError:
            raise ValueError("identify.error.birth_date") from None
    if ref is None and not (family.strip() and born is not None):
        raise ValueError("identify.error.missing")
    return PatientQuery(
        identifier=ref,
        family=family.strip() or None,
        given=given.strip() or None,
        birth_date=born,
    )


def identify(
    request: Request,
    csrf_token: str = Form("", max_length=128),
    country: str = Form("", max_length=2),
    identifier: str = Form("", max_length=300),
    family: str = Form("", max_length=64),
    given: str = Form("", max_length=64),
    birth_date: str = Form("", max_length=10),
) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    peers = _peers(portal)
    t = portal.translator(request, view)
    asked = {"country": country, "identifier": identifier, "family": family, "given": given,
             "birth_date": birth_date}  # fmt: skip
    if country not in peers.countries():
        raise HTTPException(400, "not a country this node may ask")
    try:
        query = _query(portal, country, identifier, family, given, birth_date)
    except ValueError as exc:
        error = t(str(exc), country=country)
        return portal.render(
            request, "home.html", session=view, status=422, peers=peers.countries(),
            asked=asked, error=error, recent=recent_patients(portal, view, t),
        )  # fmt: skip
    result = peers.identify(view, country, query)
    key = portal.patients.remember_match(view, country, result)
    found = Identification(key, country, result.outcome, candidates_of(result))
    return portal.render(
        request,
        "identified.html",
        session=view,
        status=200,
        found=found,
        asked=asked,
        peer=country,
        candidates=[_candidate(t, c) for c in found.candidates],
        peers=peers.countries(),
    )


def _candidate(t: Translator, c: Any) -> dict[str, Any]:
    born = date.fromisoformat(c.birth_date) if c.birth_date else None
    gender = f"gender.{c.gender}" if c.gender else None
    return {
        "name": c.name,
        "birth_date": t.date(born) if born else "",
        "gender": t(gender) if gender and gender in t.messages else (c.gender or ""),
        "identifier": c.patient.value,
        "system": c.patient.system,
        "grade": c.grade,
        "grade_display": t(f"grade.{c.grade}"),
        "score": f"{c.score:.2f}" if isinstance(c.score, float) else "",
    }


def recent_patients(portal: Portal, view: PortalSessionView, t: Translator) -> list[dict[str, Any]]:
    now = portal.clock()
    return [
        {
            "key": c.key,
            "display": c.display,
            "identifier": c.patient.value,
            "peer": c.peer,
            "emergency": c.emergency,
            "expired": c.expired(now),
            "expires": local_time(portal, t, c.expires_at),
        }
        for c in portal.patients.all_confirmed(view)
    ]


# -- confirm ---------------------------------------------------------------------------------------


def confirm(
    request: Request,
    csrf_token: str = Form("", max_length=128),
    match: str = Form("", max_length=MAX_KEY),
    candidate: str = Form("", max_length=4),
    patient: str = Form("", max_length=MAX_KEY),
    purpose: str = Form("", max_length=8),
    relationship: str = Form("", max_length=8),
    informed: str = Form("", max_length=8),
) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    peers = _peers(portal)
    t = portal.translator(request, view)
    if patient:
        known = confirmed_patient(portal, view, patient)
        peer, ref, display = known.peer, known.patient, known.display
        again: Confirmed | None = known
        found = None
    else:
        found = portal.patients.identification(view, match) if len(match) <= MAX_KEY else None
        if found is None:
            raise HTTPException(404, "no identification of this session")
        if not candidate.isdigit() or int(candidate) >= len(found.candidates):
            return _confirm_error(portal, request, view, t, "confirm.error.candidate", found=found)
        chosen = found.candidates[int(candidate)]
        peer, ref, display, again = found.peer, chosen.patient, chosen.name, None
    problem = None
    if purpose not in ("TREAT", "ETREAT"):
        problem = "confirm.error.purpose"
    elif relationship != "yes":
        problem = "confirm.error.relationship"
    elif purpose == "TREAT" and informed != "yes":
        problem = "confirm.error.informed"
    if problem is not None:
        return _confirm_error(portal, request, view, t, problem, found=found, again=again)
    context = peers.confirm(view, peer, ref, purpose=purpose, informed=informed == "yes")
    key = portal.patients.confirm(
        view,
        context,
        display=display,
        purpose=purpose,
        informed=informed == "yes",
        now=portal.clock(),
    )
    return RedirectResponse(f"/patients/{key}/list", status_code=303)


def _confirm_error(
    portal: Portal,
    request: Request,
    view: PortalSessionView,
    t: Translator,
    key: str,
    *,
    found: Identification | None = None,
    again: Confirmed | None = None,
) -> Response:
    if again is not None:
        return confirm_page(portal, request, view, again, error=t(key), status=422)
    assert found is not None
    return portal.render(
        request,
        "identified.html",
        session=view,
        status=422,
        found=found,
        asked=None,
        peer=found.peer,
        candidates=[_candidate(t, c) for c in found.candidates],
        error=t(key),
    )


def confirm_page(
    portal: Portal,
    request: Request,
    view: PortalSessionView,
    confirmed: Confirmed,
    *,
    expired: bool = False,
    error: str | None = None,
    status: int = 200,
) -> Response:
    """Confirm the treatment relationship with a patient of this session again."""
    t = portal.translator(request, view)
    return portal.render(
        request,
        "confirm.html",
        session=view,
        status=status,
        confirmed=confirmed,
        expired=expired,
        expired_at=local_time(portal, t, confirmed.expires_at),
        error=error,
    )


def confirm_again(request: Request, key: str) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    confirmed = confirmed_patient(portal, view, key)
    return confirm_page(portal, request, view, confirmed, expired=confirmed.expired(portal.clock()))


# -- the list -------------------------------------------------------------------------------------


def list_page(request: Request, key: str) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    t = portal.translator(request, view)
    confirmed: Confirmed | None = None
    if portal.list_source is not None and len(key) <= MAX_KEY:
        model = portal.list_source(view, key, t)
        if model is None:
            raise HTTPException(404)
    else:
        confirmed = confirmed_patient(portal, view, key)
        peers = _peers(portal)
        found = peers.patient_list(confirmed)
        thumbnails = portal.thumbnails
        if thumbnails is not None:
            thumbnails.offer(view.id_hash, key, found.viewer_studies())
        model = peers.list_model(
            confirmed,
            found,
            t,
            report_url=lambda rid: f"/patients/{key}/reports/{rid}",
            thumbnail_url=(lambda uid: f"/patients/{key}/thumbnails/{uid}")
            if thumbnails is not None
            else None,
        )
    messages = t.subset("list.") | t.subset("report.status.")
    return portal.render(
        request,
        "list.html",
        session=view,
        model=model,
        messages=messages,
        columns=listview.COLUMNS,
        key=key,
        confirmed=confirmed,
        expires=local_time(portal, t, confirmed.expires_at) if confirmed else None,
    )


# -- a report -------------------------------------------------------------------------------------


def report_page(request: Request, key: str, report_id: str, version: str | None = None) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    confirmed = confirmed_patient(portal, view, key)
    t = portal.translator(request, view)
    try:
        history = _peers(portal).report_history(confirmed, report_id)
    except ValueError:
        raise HTTPException(404, "not a report id") from None
    if not history.versions:
        raise HTTPException(404, "A has no version of this report")
    shown = history.latest
    if version is not None:
        shown = next((v for v in history.versions if v.version == version), None)
        if shown is None:
            raise HTTPException(404, "no such version of the report")
    assert shown is not None
    return portal.render(
        request,
        "report.html",
        session=view,
        key=key,
        confirmed=confirmed,
        report=_report_view(t, shown, confirmed.peer),
        latest=shown is history.latest,
        versions=[_version_view(t, v, v is shown) for v in history.versions],
        addenda=_addenda(t, history),
        report_id=report_id,
    )


def _report_view(t: Translator, doc: ReportDocument, peer: str) -> dict[str, Any]:
    sections = []
    for s in doc.sections:
        kind = KEY_SECTIONS.get(s.code or "", "other")
        sections.append(
            {
                "title": s.title or t(f"report.section.{kind}"),
                "kind": kind,
                "paragraphs": list(s.paragraphs),
                "empty": t("report.section.pending")
                if s.empty_reason == "notstarted"
                else (t("report.section.empty") if not s.paragraphs else None),
            }
        )
    key = f"report.status.{doc.status}"
    return {
        "title": doc.title or t("report.title"),
        "status": doc.status,
        "status_display": t(key) if key in t.messages else doc.status,
        "preliminary": doc.preliminary,
        "urgent": doc.urgent,
        "version": doc.version or "",
        "date": t.datetime(doc.date) if doc.date else "",
        "authors": ", ".join(doc.authors),
        "organisation": doc.organisation or "",
        "country": peer,
        "language": doc.language or "",
        "accession": doc.accession or "",
        "studies": [u for u in doc.study_uids if is_uid(u)],
        "sections": sections,
        "has_key_sections": any(s["kind"] != "other" for s in sections),
    }


def _version_view(t: Translator, doc: ReportDocument, current: bool) -> dict[str, Any]:
    key = f"report.status.{doc.status}"
    return {
        "version": doc.version or "",
        "status": doc.status,
        "status_display": t(key) if key in t.messages else doc.status,
        "date": t.datetime(doc.date) if doc.date else "",
        "authors": ", ".join(doc.authors),
        "shown": current,
    }


def _addenda(t: Translator, history: ReportHistory) -> list[dict[str, Any]]:
    """The amendments, oldest first: what each amended version added to the one before."""
    ordered = list(reversed(history.versions))
    out = []
    for before, after in itertools.pairwise(ordered):
        if after.status not in ("amended", "corrected", "appended"):
            continue
        old = {p for s in before.sections for p in s.paragraphs}
        added = [
            {"section": s.title or "", "text": p}
            for s in after.sections
            for p in s.paragraphs
            if p not in old
        ]
        out.append(
            {
                "version": after.version or "",
                "date": t.datetime(after.date) if after.date else "",
                "authors": ", ".join(after.authors),
                "added": added,
            }
        )
    return out


# -- thumbnails -----------------------------------------------------------------------------------


def thumbnail(request: Request, key: str, study: str) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    confirmed = confirmed_patient(portal, view, key)
    if portal.thumbnails is None or not is_uid(study):
        raise HTTPException(404)
    found = portal.thumbnails.get(view.id_hash, confirmed, study)
    if found is None:
        raise HTTPException(404, "no thumbnail of this study")
    return Response(found.body, media_type=found.media_type)


# -- A's answers as pages -------------------------------------------------------------------------


def add_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConfirmationExpired, _expired)
    app.add_exception_handler(PeerRefused, _refused)
    app.add_exception_handler(PeerUnreachable, _refused)
    app.add_exception_handler(PeerAnswerInvalid, _refused)
    app.add_exception_handler(PeerNotAllowed, _refused)


async def _expired(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConfirmationExpired)
    portal = portal_of(request)
    view = portal.hp_session(request)
    return confirm_page(portal, request, view, exc.confirmed, expired=True, status=409)


async def _refused(request: Request, exc: Exception) -> Response:
    portal = portal_of(request)
    view = portal.session(request)
    t = portal.translator(request, view)
    peer = getattr(exc, "peer", "") or ""
    if isinstance(exc, PeerRefused):
        status, title, text = 502, t("refused.title", country=peer), exc.diagnostics
        detail = t("refused.status", status=exc.status)
    elif isinstance(exc, PeerNotAllowed):
        status, title, text, detail = 403, t("refused.not_allowed", country=peer), exc.reason, ""
    elif isinstance(exc, PeerAnswerInvalid):
        status, title, text, detail = 502, t("refused.invalid", country=peer), exc.reason, ""
    else:
        status, title, text, detail = 504, t("refused.unreachable", country=peer), str(exc), ""
    log.info("peer %s: %s", peer, exc)
    return portal.render(
        request,
        "refused.html",
        session=view,
        status=status,
        title=title,
        text=text or t("refused.no_text"),
        detail=detail,
    )


__all__ = [
    "add_handlers",
    "confirm_page",
    "confirmed_patient",
    "form_session",
    "local_time",
    "recent_patients",
    "router",
]
