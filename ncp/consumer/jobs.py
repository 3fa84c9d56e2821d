"""Retrieval jobs: what the HP asked for, their statuses and history, and the operations the API,
the command line and the workers share (create, read, list, cancel, give the HP's confirmation
again).

Statuses, as operators know them from national image exchange portals::

    queued -> downloading -> verifying -> stored -> purged
                  |  \\-> queued (a transient failure: retried after a pause)
                  +-> failed (reason) | declined (A refused: A's reason) | cancelled
                  +-> needs-hp (the TRC expired: the HP must confirm again) -> queued

Every status a job enters is a row of its history (:class:`~ncp.store.retrieval.RetrievalEvent`)
with its time and reason. Creation, and every change to a status that ends or stops a job, is
audited in B's chain (action ``retrieval-job``).

Who may see a job: the HP who asked (a :class:`Requester` the caller authenticated; the API
takes it as an explicit dependency) or an operator (``hp=None``: the command line, which acts
for the node).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditEvent, Auditor
from ncp.consumer.model import ImageOption, PeerContext, Priority
from ncp.dicom.uids import is_uid
from ncp.errors import NcpError
from ncp.fhir.identifiers import issuer_of
from ncp.security.claims import MAX_STUDIES, PatientRef
from ncp.store.retrieval import (
    RetrievalEvent,
    RetrievalJob,
    RetrievalJobStudy,
    RetrievalProblem,
    StoredStudy,
)


class Status(enum.StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STORED = "stored"
    FAILED = "failed"
    DECLINED = "declined"
    """A refused (its OperationOutcome's text is the reason)."""
    CANCELLED = "cancelled"
    PURGED = "purged"
    NEEDS_HP = "needs-hp"
    """The HP's assertion or TRC expired (or A no longer accepts them): waiting for the HP to
    confirm again (:meth:`Jobs.renew_context`)."""


ENDED = frozenset({Status.STORED, Status.FAILED, Status.DECLINED, Status.CANCELLED, Status.PURGED})
"""Statuses a job never leaves (but stored -> purged)."""
RUNNING = frozenset({Status.DOWNLOADING, Status.VERIFYING})
PRIORITIES: tuple[Priority, ...] = ("emergency", "normal", "batch")
OPTIONS: tuple[ImageOption, ...] = ("A", "C")


def utc_naive(moment: datetime) -> datetime:
    """The database's form of a time: naive UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=UTC)


def wire_priority(priority: str) -> str:
    """B's lane as FHIR request-priority (what A's token and audit carry)."""
    return "stat" if priority == "emergency" else "routine"


class JobError(NcpError):
    """A job operation that cannot be done; the API answers ``status``."""

    status = 400


class InvalidJobRequest(JobError):
    status = 422


class JobNotFound(JobError):
    """No such job, or not one the caller may see (the two are not told apart)."""

    status = 404


class JobConflict(JobError):
    """The job's status does not allow the operation (cancel a stored job...)."""

    status = 409


@dataclass(frozen=True)
class Requester:
    """The health professional on whose behalf a job is created and who may read it: their
    identifier and name in B, and where the identity came from. The portal supplies it from
    the HP's session (``portal``); the command line from ``[retrieval] cli_hp`` (``cli``)."""

    id: str
    name: str
    source: Literal["portal", "cli"] = "portal"


@dataclass(frozen=True)
class JobRequest:
    peer: str
    patient: PatientRef
    studies: tuple[str, ...]
    option: ImageOption = "A"
    priority: Priority = "normal"
    local_patient: str | None = None
    """B's own identifier of the patient, for import reconciliation (when configured)."""


# -- what a caller reads -------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyView:
    study_uid: str
    status: str
    instances_total: int
    instances_done: int
    bytes_done: int
    stored_at: datetime | None
    purge_at: datetime | None
    purged_at: datetime | None
    description: str | None = None
    """From A's manifest, once read (a job's detail only): what people recognise a study by."""
    started: datetime | None = None
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventView:
    status: str
    at: datetime
    reason: str | None


@dataclass(frozen=True)
class ProblemView:
    kind: str
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    detail: str


@dataclass(frozen=True)
class JobView:
    """A job as the API, the command line and the portal show it (times aware UTC)."""

    id: str
    status: Status
    reason: str | None
    request_id: str
    """The correlation id of the job's exchange (in both countries' audit records)."""
    priority: str
    option: str
    peer: str
    patient: PatientRef
    hp: Requester
    instances_total: int
    instances_done: int
    instances_rejected: int
    bytes_total: int
    bytes_done: int
    attempts: int
    next_attempt_at: datetime | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    context_expires_at: datetime | None
    studies: tuple[StudyView, ...] = ()
    history: tuple[EventView, ...] = ()
    problems: tuple[ProblemView, ...] = ()

    @property
    def purge_at(self) -> datetime | None:
        """When the first of the job's stored studies will be purged (None: not stored yet, or
        kept until removed by hand)."""
        dates = [s.purge_at for s in self.studies if s.purge_at and not s.purged_at]
        return min(dates) if dates else None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_json(self, *, detail: bool = True) -> dict[str, Any]:
        """The job as JSON (the API's and ``--json``'s form; documented in docs/retrieval.md)."""

        def t(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat().replace("+00:00", "Z")

        out: dict[str, Any] = {
            "id": self.id,
            "status": str(self.status),
            "reason": self.reason,
            "request_id": self.request_id,
            "priority": self.priority,
            "option": self.option,
            "peer": self.peer,
            "patient": self.patient.to_json(),
            "hp": {"id": self.hp.id, "name": self.hp.name, "source": self.hp.source},
            "progress": {
                "instances_total": self.instances_total,
                "instances_done": self.instances_done,
                "instances_rejected": self.instances_rejected,
                "bytes_total": self.bytes_total,
                "bytes_done": self.bytes_done,
            },
            "attempts": self.attempts,
            "next_attempt_at": t(self.next_attempt_at),
            "cancel_requested": self.cancel_requested,
            "created_at": t(self.created_at),
            "updated_at": t(self.updated_at),
            "finished_at": t(self.finished_at),
            "context_expires_at": t(self.context_expires_at),
            "purge_at": t(self.purge_at),
            "studies": [
                {
                    "study_uid": s.study_uid,
                    "status": s.status,
                    "instances_total": s.instances_total,
                    "instances_done": s.instances_done,
                    "bytes_done": s.bytes_done,
                    "stored_at": t(s.stored_at),
                    "purge_at": t(s.purge_at),
                    "purged_at": t(s.purged_at),
                }
                | (
                    {
                        "description": s.description,
                        "started": s.started.isoformat() if s.started else None,
                        "modalities": list(s.modalities),
                    }
                    if detail
                    else {}
                )
                for s in self.studies
            ],
        }
        if detail:
            out["history"] = [
                {"status": e.status, "at": t(e.at), "reason": e.reason} for e in self.history
            ]
            out["problems"] = [
                {
                    "kind": p.kind,
                    "study_uid": p.study_uid,
                    "series_uid": p.series_uid,
                    "sop_uid": p.sop_uid,
                    "detail": p.detail,
                }
                for p in self.problems
            ]
        return out


# -- the service ---------------------------------------------------------------------------------


def token_claims(token: str | None) -> dict[str, Any]:
    """The claims of a compact JWS this node signed itself, or received from A (for audit
    fields only; never for a decision: nothing is verified here)."""
    if not token or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return data if isinstance(data, dict) else {}


def actor_fields(job: RetrievalJob) -> dict[str, Any]:
    """The audit record's actor, from the HP assertion the job was created with."""
    claims = token_claims(job.hp_assertion)
    iua = (claims.get("extensions") or {}).get("ihe_iua") or {}
    role = iua.get("subject_role")
    role = role[0] if isinstance(role, list) and role else role
    return {
        "actor_id": job.hp_id,
        "actor_name": job.hp_name,
        "actor_role": role.get("code") if isinstance(role, dict) else None,
        "actor_organisation": _text(iua.get("subject_organization")),
        "actor_organisation_id": _text(iua.get("subject_organization_id")),
        "actor_point_of_care": _text(claims.get("ncp_point_of_care")),
    }


def _text(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) and value else None


def purpose_of(trc: str | None) -> str | None:
    iua = (token_claims(trc).get("extensions") or {}).get("ihe_iua") or {}
    purpose = iua.get("purpose_of_use")
    purpose = purpose[0] if isinstance(purpose, list) and purpose else purpose
    code = purpose.get("code") if isinstance(purpose, dict) else None
    return code if code in ("TREAT", "ETREAT") else None


@dataclass
class Jobs:
    """The job operations of one node (thread-safe: a session per call)."""

    sessions: sessionmaker[Session]
    auditor: Auditor
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    wake: threading.Event = field(default_factory=threading.Event)
    """Set when a job is queued, so this process's idle workers look at once."""

    def now(self) -> datetime:
        return utc_naive(self.clock())

    # -- create ------------------------------------------------------------------------------

    def create(self, hp: Requester, context: PeerContext, request: JobRequest) -> JobView:
        """Queue a job for ``hp`` under ``context`` (the HP assertion and TRC B signed for this
        HP and patient). InvalidJobRequest when the request or the context does not fit."""
        studies = _check_request(request)
        if context.peer != request.peer:
            raise InvalidJobRequest(f"the confirmation is for {context.peer}, not {request.peer}")
        if context.patient != request.patient:
            raise InvalidJobRequest(
                "the treatment relationship confirmation is for another patient"
            )
        now = self.now()
        if utc_naive(context.expires_at) <= now:
            raise InvalidJobRequest(
                "the HP's assertion or treatment relationship confirmation has expired"
            )
        job_id = str(uuid.uuid4())
        job = RetrievalJob(
            id=job_id,
            status=Status.QUEUED.value,
            priority=request.priority,
            option=request.option,
            peer=request.peer,
            patient_system=request.patient.system,
            patient_value=request.patient.value,
            local_patient_value=request.local_patient,
            hp_id=hp.id,
            hp_name=hp.name,
            hp_source=hp.source,
            request_id=context.request_id or f"job-{job_id}",
            hp_assertion=context.hp_assertion,
            trc=context.trc,
            context_expires_at=utc_naive(context.expires_at),
            instances_total=0,
            instances_done=0,
            instances_rejected=0,
            bytes_total=0,
            bytes_done=0,
            attempts=0,
            cancel_requested=False,
            created_at=now,
            updated_at=now,
        )
        # Audited first: a job nobody can account for must not run.
        self.audit(job, Status.QUEUED, "created", studies=studies)
        with self.sessions.begin() as session:
            session.add(job)
            session.flush()
            for position, uid in enumerate(studies):
                session.add(RetrievalJobStudy(job_id=job_id, study_uid=uid, position=position))
            session.add(RetrievalEvent(job_id=job_id, at=now, status=Status.QUEUED.value))
        self.wake.set()
        return self.get(job_id)

    # -- read --------------------------------------------------------------------------------

    def get(self, job_id: str, *, hp: Requester | None = None) -> JobView:
        with self.sessions() as session:
            job = _load(session, job_id, hp)
            return _view(session, job, detail=True)

    def list(
        self,
        *,
        hp: Requester | None = None,
        statuses: Sequence[str] = (),
        patient: PatientRef | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[JobView]:
        """Jobs newest first (only ``hp``'s when given)."""
        query = select(RetrievalJob).order_by(
            RetrievalJob.created_at.desc(), RetrievalJob.id.desc()
        )
        if hp is not None:
            query = query.where(RetrievalJob.hp_id == hp.id, RetrievalJob.hp_source == hp.source)
        if statuses:
            query = query.where(RetrievalJob.status.in_(list(statuses)))
        if patient is not None:
            query = query.where(
                RetrievalJob.patient_system == patient.system,
                RetrievalJob.patient_value == patient.value,
            )
        with self.sessions() as session:
            jobs = session.scalars(query.limit(max(1, min(limit, 1000))).offset(offset)).all()
            return [_view(session, job, detail=False) for job in jobs]

    # -- change ------------------------------------------------------------------------------

    def cancel(self, job_id: str, *, hp: Requester | None = None) -> JobView:
        """Cancel a job. A queued (or waiting) job is cancelled at once; a running one stops
        after the instance it is receiving (its worker records the cancellation)."""
        now = self.now()
        with self.sessions.begin() as session:
            job = _load(session, job_id, hp, lock=True)
            status = Status(job.status)
            if status in ENDED:
                raise JobConflict(f"the job is {status}: there is nothing to cancel")
            job.cancel_requested = True
            job.updated_at = now
            # A queued job has no worker (a claim makes it downloading under the row's lock).
            ends_now = status in (Status.QUEUED, Status.NEEDS_HP)
            if ends_now:
                end(session, job, Status.CANCELLED, "cancelled before it ran", now=now)
        if ends_now:
            self.audit(job, Status.CANCELLED, "cancelled before it ran")
        return self.get(job_id)

    def renew_context(
        self, job_id: str, context: PeerContext, *, hp: Requester | None = None
    ) -> JobView:
        """Give a job waiting in needs-hp (or any job not ended) the HP's fresh assertion and
        TRC; a job in needs-hp is queued again and resumes where it stopped."""
        now = self.now()
        with self.sessions.begin() as session:
            job = _load(session, job_id, hp, lock=True)
            if Status(job.status) in ENDED:
                raise JobConflict(f"the job is {job.status}: it needs no confirmation")
            if context.peer != job.peer or context.patient != PatientRef(
                job.patient_system, job.patient_value
            ):
                raise InvalidJobRequest("the confirmation is for another peer or patient")
            if utc_naive(context.expires_at) <= now:
                raise InvalidJobRequest("the confirmation given has expired already")
            job.hp_assertion, job.trc = context.hp_assertion, context.trc
            job.context_expires_at = utc_naive(context.expires_at)
            job.updated_at = now
            requeued = job.status == Status.NEEDS_HP.value
            if requeued:
                # The old token was issued under the old pair: never reuse it.
                job.token = job.token_base_url = None
                job.token_expires_at = None
                job.status, job.reason, job.not_before = Status.QUEUED.value, None, None
                job.worker, job.heartbeat_at = None, None
                session.add(
                    RetrievalEvent(
                        job_id=job.id,
                        at=now,
                        status=Status.QUEUED.value,
                        reason="the HP confirmed again",
                    )
                )
        if requeued:
            self.audit(job, Status.QUEUED, "the HP confirmed again")
            self.wake.set()
        return self.get(job_id)

    # -- audit -------------------------------------------------------------------------------

    def audit(
        self,
        job: RetrievalJob,
        status: Status,
        reason: str | None,
        *,
        outcome: Outcome = Outcome.SUCCESS,
        studies: Sequence[str] = (),
        action: Action = Action.RETRIEVAL_JOB,
        **extra: Any,
    ) -> None:
        details = {"job": job.id, "status": str(status), "hp_source": job.hp_source}
        details.update(extra.pop("details", {}))
        self.auditor.record(
            AuditEvent(
                action=action,
                side=Side.CONSUMER,
                request_id=job.request_id,
                outcome=outcome,
                reason=reason[:2000] if reason else None,
                peer_country=job.peer,
                patient_id=job.patient_value,
                patient_issuer=issuer_of(job.patient_system),
                purpose=purpose_of(job.trc),
                priority=wire_priority(job.priority),
                option=job.option,
                studies=tuple(studies),
                details=details,
                **actor_fields(job),
                **extra,
            )
        )


def _check_request(request: JobRequest) -> tuple[str, ...]:
    if len(request.peer) != 2 or not request.peer.isupper():
        raise InvalidJobRequest("peer must be a country code such as AT")
    if request.option not in OPTIONS:
        raise InvalidJobRequest("option must be A or C")
    if request.priority not in PRIORITIES:
        raise InvalidJobRequest("priority must be emergency, normal or batch")
    studies = tuple(dict.fromkeys(request.studies))
    if not studies:
        raise InvalidJobRequest("name at least one study")
    if len(studies) > MAX_STUDIES:
        raise InvalidJobRequest(f"at most {MAX_STUDIES} studies per job")
    bad = [uid for uid in studies if not is_uid(uid)]
    if bad:
        raise InvalidJobRequest(f"not a Study Instance UID: {bad[0][:80]!r}")
    if not request.patient.system or not request.patient.value:
        raise InvalidJobRequest("the patient needs a system and a value")
    if request.local_patient is not None and not 0 < len(request.local_patient) <= 64:
        raise InvalidJobRequest("a local patient identifier has 1 to 64 characters")
    return studies


def _load(
    session: Session, job_id: str, hp: Requester | None, *, lock: bool = False
) -> RetrievalJob:
    query = select(RetrievalJob).where(RetrievalJob.id == job_id)
    if lock:
        query = query.with_for_update()
    job = session.scalar(query)
    # Another HP's job is "not found": its existence is not theirs to learn.
    if job is None or (hp is not None and (job.hp_id, job.hp_source) != (hp.id, hp.source)):
        raise JobNotFound(f"no job {job_id[:64]}")
    return job


def end(
    session: Session, job: RetrievalJob, status: Status, reason: str | None, *, now: datetime
) -> None:
    """Move ``job`` (locked in ``session``) into a status, with its history row; an ended job
    forgets the HP's assertions and the token (they were only lent for the work)."""
    job.status, job.reason, job.updated_at = status.value, reason, now
    if status in ENDED or status == Status.NEEDS_HP:
        job.worker, job.heartbeat_at, job.not_before = None, None, None
        job.token = job.token_base_url = None
        job.token_expires_at = None
    if status in ENDED:
        job.finished_at = now
        job.hp_assertion = job.trc = None
    session.add(RetrievalEvent(job_id=job.id, at=now, status=status.value, reason=reason))


def set_status(
    sessions: sessionmaker[Session],
    job_id: str,
    status: Status,
    reason: str | None,
    *,
    now: datetime,
    worker: str | None = None,
    **values: Any,
) -> None:
    """A worker's status change: the row's columns (``values`` too) and a history row."""
    with sessions.begin() as session:
        session.execute(
            update(RetrievalJob)
            .where(RetrievalJob.id == job_id)
            .values(status=status.value, reason=reason, updated_at=now, **values)
        )
        session.add(
            RetrievalEvent(job_id=job_id, at=now, status=status.value, reason=reason, worker=worker)
        )


def _view(session: Session, job: RetrievalJob, *, detail: bool) -> JobView:
    rows = session.execute(
        select(RetrievalJobStudy, StoredStudy)
        .outerjoin(StoredStudy, StoredStudy.study_uid == RetrievalJobStudy.study_uid)
        .where(RetrievalJobStudy.job_id == job.id)
        .order_by(RetrievalJobStudy.position)
    ).all()
    studies = tuple(
        StudyView(
            study_uid=s.study_uid,
            status=s.status,
            instances_total=s.instances_total,
            instances_done=s.instances_done,
            bytes_done=s.bytes_done,
            stored_at=aware(stored.stored_at) if stored and s.status == "stored" else None,
            purge_at=aware(stored.purge_at) if stored and s.status == "stored" else None,
            purged_at=aware(stored.purged_at) if stored and s.status == "stored" else None,
            **(_described(s.manifest) if detail else {}),
        )
        for s, stored in rows
    )
    history: tuple[EventView, ...] = ()
    problems: tuple[ProblemView, ...] = ()
    if detail:
        history = tuple(
            EventView(e.status, aware(e.at) or e.at, e.reason)
            for e in session.scalars(
                select(RetrievalEvent)
                .where(RetrievalEvent.job_id == job.id)
                .order_by(RetrievalEvent.id)
            )
        )
        problems = tuple(
            ProblemView(p.kind, p.study_uid, p.series_uid, p.sop_uid, p.detail)
            for p in session.scalars(
                select(RetrievalProblem)
                .where(RetrievalProblem.job_id == job.id)
                .order_by(RetrievalProblem.id)
                .limit(1000)
            )
        )
    return JobView(
        id=job.id,
        status=Status(job.status),
        reason=job.reason,
        request_id=job.request_id,
        priority=job.priority,
        option=job.option,
        peer=job.peer,
        patient=PatientRef(job.patient_system, job.patient_value),
        hp=Requester(job.hp_id, job.hp_name, "cli" if job.hp_source == "cli" else "portal"),
        instances_total=job.instances_total,
        instances_done=job.instances_done,
        instances_rejected=job.instances_rejected,
        bytes_total=job.bytes_total,
        bytes_done=job.bytes_done,
        attempts=job.attempts,
        next_attempt_at=aware(job.not_before) if job.status == Status.QUEUED.value else None,
        cancel_requested=job.cancel_requested,
        created_at=aware(job.created_at) or job.created_at,
        updated_at=aware(job.updated_at) or job.updated_at,
        finished_at=aware(job.finished_at),
        context_expires_at=aware(job.context_expires_at),
        studies=studies,
        history=history,
        problems=problems,
    )


def _described(manifest: str | None) -> dict[str, Any]:
    """What people recognise a study by, from the manifest a job keeps (once it read it)."""
    if not manifest:
        return {}
    try:
        data = json.loads(manifest)
        started = data.get("started")
        return {
            "description": data.get("description") or None,
            "started": datetime.fromisoformat(started) if started else None,
            "modalities": tuple(
                dict.fromkeys(
                    str(x["modality"]) for x in data.get("series") or () if x.get("modality")
                )
            ),
        }
    except (ValueError, TypeError, AttributeError):
        return {}


def retention_until(stored_at: datetime, days: float) -> datetime | None:
    return None if days <= 0 else stored_at + timedelta(days=days)
