"""The JSON API of retrieval jobs, for the portal (docs/retrieval.md, "JSON API").

``router(jobs, current_hp, confirmation)`` serves, below the prefix the portal chooses:

- ``POST /jobs``: create a job for studies of the confirmed patient (201);
- ``GET /jobs``: the HP's jobs, newest first (``status``, ``limit``, ``offset``);
- ``GET /jobs/{id}``: one job with its studies, purge dates, history and problems;
- ``GET /jobs/{id}/progress``: status and counts only, for polling a live bar;
- ``POST /jobs/{id}/cancel``: cancel;
- ``POST /jobs/{id}/confirmation``: a job in ``needs-hp`` takes the HP's fresh confirmation
  from the session and is queued again.

Who is asking is an explicit dependency: ``current_hp`` is a FastAPI dependency that returns the
logged-in :class:`~ncp.consumer.jobs.Requester` or raises (401); an HP sees and changes only
their own jobs (another HP's job is 404, as one that does not exist). The signed HP assertion
and TRC never come from the browser: ``confirmation(request, hp, peer, patient)`` returns the
pair the portal's session holds for that patient (None: the HP has not confirmed the treatment
relationship, 409). Errors are ``{"error": code, "detail": text}``.
"""

# No ``from __future__ import annotations`` here: the routes' parameter types name the HP
# dependency given to router(), which FastAPI must see as an object, not as a string.

from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ncp.consumer.jobs import JobError, JobRequest, Jobs, Requester, Status
from ncp.consumer.model import PeerContext
from ncp.security.claims import PatientRef


class Confirmation(Protocol):
    def __call__(
        self, request: Request, hp: Requester, peer: str, patient: PatientRef
    ) -> PeerContext | None:
        """The HP assertion and TRC the session holds for ``hp`` and ``patient`` at ``peer``."""
        ...


class PatientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=256)


class JobIn(BaseModel):
    """``POST /jobs``."""

    model_config = ConfigDict(extra="forbid")
    peer: str = Field(pattern=r"^[A-Z]{2}$", description="Country A, as on B's trust list.")
    patient: PatientIn = Field(description="The patient by A's identifier (as confirmed).")
    studies: list[str] = Field(min_length=1, max_length=50, description="Study Instance UIDs.")
    option: Literal["A", "C"] = "A"
    priority: Literal["emergency", "normal", "batch"] = "normal"
    local_patient: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="B's own identifier of the patient (import reconciliation).",
    )


def _error(exc: JobError) -> JSONResponse:
    code = {404: "not-found", 409: "conflict", 422: "invalid"}.get(exc.status, "error")
    return JSONResponse({"error": code, "detail": str(exc)}, status_code=exc.status)


def router(
    jobs: Jobs | Callable[[Request], Jobs],
    current_hp: Callable[..., Any],
    confirmation: Confirmation,
) -> APIRouter:
    """The API's routes (see the module doc). ``jobs``: the job service, or a function of the
    request that finds it (a node's app state)."""
    api = APIRouter()
    Hp = Annotated[Requester, Depends(current_hp)]

    def service(request: Request) -> Jobs:
        return jobs if isinstance(jobs, Jobs) else jobs(request)

    @api.post("/jobs", status_code=201)
    def create(body: JobIn, request: Request, hp: Hp) -> Any:
        patient = PatientRef(body.patient.system, body.patient.value)
        context = confirmation(request, hp, body.peer, patient)
        if context is None:
            return JSONResponse(
                {
                    "error": "confirmation-required",
                    "detail": "confirm the treatment relationship with this patient first",
                },
                status_code=409,
            )
        asked = JobRequest(
            peer=body.peer,
            patient=patient,
            studies=tuple(body.studies),
            option=body.option,
            priority=body.priority,
            local_patient=body.local_patient,
        )
        try:
            return service(request).create(hp, context, asked).to_json()
        except JobError as exc:
            return _error(exc)

    @api.get("/jobs")
    def list_jobs(
        request: Request,
        hp: Hp,
        status: Annotated[list[Status] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Any:
        found = service(request).list(
            hp=hp, statuses=[s.value for s in status or []], limit=limit, offset=offset
        )
        return {"jobs": [job.to_json(detail=False) for job in found]}

    @api.get("/jobs/{job_id}")
    def get(job_id: str, request: Request, hp: Hp) -> Any:
        try:
            return service(request).get(job_id, hp=hp).to_json()
        except JobError as exc:
            return _error(exc)

    @api.get("/jobs/{job_id}/progress")
    def progress(job_id: str, request: Request, hp: Hp) -> Any:
        try:
            view = service(request).get(job_id, hp=hp).to_json(detail=False)
        except JobError as exc:
            return _error(exc)
        keys = ("id", "status", "reason", "progress", "updated_at", "next_attempt_at")
        return {key: view[key] for key in keys}

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str, request: Request, hp: Hp) -> Any:
        try:
            return service(request).cancel(job_id, hp=hp).to_json()
        except JobError as exc:
            return _error(exc)

    @api.post("/jobs/{job_id}/confirmation")
    def confirm(job_id: str, request: Request, hp: Hp) -> Any:
        service_ = service(request)
        try:
            job = service_.get(job_id, hp=hp)
            context = confirmation(request, hp, job.peer, job.patient)
            if context is None:
                return JSONResponse(
                    {
                        "error": "confirmation-required",
                        "detail": "confirm the treatment relationship with this patient first",
                    },
                    status_code=409,
                )
            return service_.renew_context(job_id, context, hp=hp).to_json()
        except JobError as exc:
            return _error(exc)

    return api
