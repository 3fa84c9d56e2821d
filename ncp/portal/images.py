"""Images for chosen studies: retrieval jobs (options A and C, with a priority) and their pages,
and A's viewer in a new tab (option B).

- ``POST /retrieve``: one job per 50 studies (a job's ceiling) through the job service, in the
  HP's name, under the pair the session holds for the patient; then the job's page (or the
  list of jobs when there are several).
- ``POST /view``: a fresh ``$imaging-access`` option B per click; the answer is a small page
  that moves the new tab on to A's one-time launch URL (a redirect would be refused by the
  portal's ``form-action 'self'``, which Chromium applies to a form's redirects too).
- ``GET /jobs``, ``GET /jobs/{id}``: the HP's jobs; a job's page polls the jobs API's progress
  route (``static/job.js``) while it runs, and links each stored study to B's local viewer.
- ``POST /jobs/{id}/cancel``, ``POST /jobs/{id}/confirm``: cancel; give a job waiting for the
  HP (needs-hp) the session's fresh confirmation.

Another HP's job is "not found", exactly as one that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException

from ncp.consumer.jobs import ENDED, JobConflict, JobError, JobNotFound, JobRequest, JobView
from ncp.consumer.model import ImageOption, Priority
from ncp.dicom.uids import is_uid
from ncp.portal.app import Portal, portal_of
from ncp.portal.i18n import Translator
from ncp.portal.patients import Confirmed
from ncp.portal.sessions import PortalSessionView
from ncp.portal.usecase import confirm_page, confirmed_patient, form_session, local_time
from ncp.security.claims import MAX_STUDIES

OPTIONS: tuple[ImageOption, ...] = ("A", "C")
PRIORITIES: tuple[Priority, ...] = ("emergency", "normal", "batch")
MAX_CHOSEN = 1000


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/retrieve", retrieve, methods=["POST"])
    api.add_api_route("/view", view_at_a, methods=["POST"])
    api.add_api_route("/jobs", jobs_page, methods=["GET"])
    api.add_api_route("/jobs/{job_id}", job_page, methods=["GET"])
    api.add_api_route("/jobs/{job_id}/cancel", cancel, methods=["POST"])
    api.add_api_route("/jobs/{job_id}/confirm", reconfirm, methods=["POST"])
    return api


def _studies(given: list[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(s.strip() for s in (given or [])[:MAX_CHOSEN]))
    if not chosen or not all(is_uid(s) for s in chosen):
        raise HTTPException(422, "choose studies by their Study Instance UIDs")
    return chosen


def _usable(portal: Portal, view: PortalSessionView, key: str) -> Confirmed:
    from ncp.portal.peering import ConfirmationExpired

    confirmed = confirmed_patient(portal, view, key)
    if confirmed.expired(portal.clock()):
        raise ConfirmationExpired(confirmed)
    return confirmed


def retrieve(
    request: Request,
    csrf_token: str = Form("", max_length=128),
    patient: str = Form("", max_length=64),
    study: Annotated[list[str] | None, Form()] = None,
    option: str = Form("A", max_length=1),
    priority: str = Form("normal", max_length=16),
) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    if option not in OPTIONS or priority not in PRIORITIES:
        raise HTTPException(422, "option A or C, priority emergency, normal or batch")
    confirmed = _usable(portal, view, patient)
    chosen = _studies(study)
    created = []
    for start in range(0, len(chosen), MAX_STUDIES):
        asked = JobRequest(
            peer=confirmed.peer,
            patient=confirmed.patient,
            studies=tuple(chosen[start : start + MAX_STUDIES]),
            option=option,  # type: ignore[arg-type]
            priority=priority,  # type: ignore[arg-type]
        )
        try:
            created.append(portal.jobs.create(portal.requester(view), confirmed.context, asked))
        except JobError as exc:
            raise HTTPException(exc.status, str(exc)) from None
    target = f"/jobs/{created[0].id}" if len(created) == 1 else "/jobs"
    return RedirectResponse(target, status_code=303)


def view_at_a(
    request: Request,
    csrf_token: str = Form("", max_length=128),
    patient: str = Form("", max_length=64),
    study: Annotated[list[str] | None, Form()] = None,
) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    confirmed = _usable(portal, view, patient)
    chosen = _studies(study)[:MAX_STUDIES]
    if portal.peers is None:
        raise HTTPException(503)
    grant = portal.peers.viewer_launch(confirmed, chosen, emergency=confirmed.emergency)
    # IHE IID (RAD-106) parameters: A's viewer opens the study asked for first.
    iid = urlencode({"requestType": "STUDY", "studyUID": ",".join(chosen)})
    target = f"{grant.url}{'&' if '?' in grant.url else '?'}{iid}"
    return portal.render(request, "launch.html", session=view, target=target, peer=confirmed.peer)


# -- the HP's jobs ---------------------------------------------------------------------------------


def _patient_names(portal: Portal, view: PortalSessionView) -> dict[tuple[str, str, str], str]:
    return {
        (c.peer, c.patient.system, c.patient.value): c.display
        for c in portal.patients.all_confirmed(view)
    }


def _job_view(portal: Portal, t: Translator, job: JobView, names: dict[Any, str]) -> dict[str, Any]:
    def when(moment: Any) -> str:
        return local_time(portal, t, moment) if moment is not None else ""

    total = job.instances_total
    percent = round(100 * job.instances_done / total) if total else (100 if job.ended else 0)
    return {
        "id": job.id,
        "status": str(job.status),
        "status_display": t(f"job.status.{job.status}"),
        "ended": job.ended,
        "reason": job.reason or "",
        "option": job.option,
        "priority": job.priority,
        "priority_display": t(f"job.priority.{job.priority}"),
        "peer": job.peer,
        "patient": names.get((job.peer, job.patient.system, job.patient.value))
        or job.patient.value,
        "patient_id": job.patient.value,
        "created": when(job.created_at),
        "finished": when(job.finished_at),
        "purge": when(job.purge_at),
        "instances_done": job.instances_done,
        "instances_total": total,
        "instances_rejected": job.instances_rejected,
        "bytes_done": t.size(job.bytes_done),
        "bytes_total": t.size(job.bytes_total) if job.bytes_total else "",
        "percent": percent,
        "studies": [
            {
                "uid": s.study_uid,
                "status": s.status,
                "status_display": t(f"job.study.{s.status}")
                if f"job.study.{s.status}" in t.messages
                else s.status,
                "done": s.instances_done,
                "total": s.instances_total,
                "size": t.size(s.bytes_done),
                "stored": s.status == "stored" and s.purged_at is None,
                "purge": when(s.purge_at),
                "description": s.description or "",
                "started": t.datetime(s.started) if s.started else "",
                "modalities": ", ".join(s.modalities),
            }
            for s in job.studies
        ],
        "history": [
            {
                "status": e.status,
                "status_display": t(f"job.status.{e.status}")
                if f"job.status.{e.status}" in t.messages
                else e.status,
                "at": when(e.at),
                "reason": e.reason or "",
            }
            for e in job.history
        ],
        "problems": [
            {"kind": p.kind, "study": p.study_uid, "sop": p.sop_uid or "", "detail": p.detail}
            for p in job.problems
        ],
        "needs_hp": str(job.status) == "needs-hp",
    }


def jobs_page(request: Request) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    t = portal.translator(request, view)
    names = _patient_names(portal, view)
    found = portal.jobs.list(hp=portal.requester(view), limit=200)
    return portal.render(
        request,
        "jobs.html",
        session=view,
        jobs=[_job_view(portal, t, job, names) for job in found],
    )


def _job(portal: Portal, view: PortalSessionView, job_id: str) -> JobView:
    try:
        return portal.jobs.get(job_id[:64], hp=portal.requester(view))
    except JobNotFound:
        raise HTTPException(404, "no such job") from None


def job_page(request: Request, job_id: str) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    t = portal.translator(request, view)
    job = _job(portal, view, job_id)
    return portal.render(
        request,
        "job.html",
        session=view,
        job=_job_view(portal, t, job, _patient_names(portal, view)),
        messages=t.subset("job."),
    )


def cancel(request: Request, job_id: str, csrf_token: str = Form("", max_length=128)) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    job = _job(portal, view, job_id)
    try:
        portal.jobs.cancel(job.id, hp=portal.requester(view))
    except JobConflict as exc:
        raise HTTPException(409, str(exc)) from None
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def reconfirm(
    request: Request, job_id: str, csrf_token: str = Form("", max_length=128)
) -> Response:
    view = form_session(request, csrf_token)
    portal = portal_of(request)
    job = _job(portal, view, job_id)
    if job.status in ENDED:
        raise HTTPException(409, "the job has ended")
    confirmed = portal.patients.for_patient(view, job.peer, job.patient)
    if confirmed is None:
        raise HTTPException(409, "identify and confirm the patient again first")
    if confirmed.expired(portal.clock()):
        return confirm_page(portal, request, view, confirmed, expired=True, status=409)
    try:
        portal.jobs.renew_context(job.id, confirmed.context, hp=portal.requester(view))
    except JobError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


__all__ = ["router"]
