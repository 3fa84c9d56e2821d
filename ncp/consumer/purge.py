"""Retention: the purge job removes retrieved studies whose retention period has passed.

A study's purge date is set when a job stores it (``[retrieval] retention_days`` after; 0 keeps
it until removed by hand) and shown with every job that stored it. :func:`purge_expired` takes
each expired study (one replica at a time: the row is marked before the store is touched),
removes it from the local store, audits the removal (``image-purge``) and moves the jobs whose
studies are all gone to ``purged``. ``ncp jobs work`` runs it every ``purge_every_s``;
``ncp jobs purge`` runs it once.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, exists, select, update

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditEvent
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import Status, end
from ncp.consumer.localstore import StoreError
from ncp.fhir.identifiers import issuer_of
from ncp.store.retrieval import RetrievalJob, RetrievalJobStudy, StoredStudy

log = logging.getLogger(__name__)


@dataclass
class PurgeRun:
    studies: list[str] = field(default_factory=list)
    instances: int = 0
    jobs: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def purge_expired(env: RetrievalEnv, *, now: datetime | None = None) -> PurgeRun:
    moment = now or env.now()
    run = PurgeRun()
    request_id = f"purge-{uuid.uuid4()}"
    with env.sessions() as session:
        due = session.scalars(
            select(StoredStudy.study_uid)
            .where(StoredStudy.purge_at <= moment, StoredStudy.purged_at.is_(None))
            .order_by(StoredStudy.purge_at)
        ).all()
    for uid in due:
        with env.sessions.begin() as session:
            # Marked first: another replica's purge skips it.
            taken = session.execute(
                update(StoredStudy)
                .where(StoredStudy.study_uid == uid, StoredStudy.purged_at.is_(None))
                .where(StoredStudy.purge_at <= moment)
                .values(purged_at=moment)
                .returning(StoredStudy.peer, StoredStudy.patient_system, StoredStudy.patient_value)
            ).first()
        if taken is None:
            continue
        peer, system, value = taken
        try:
            count = env.store.remove_study(uid)
        except StoreError as exc:
            with env.sessions.begin() as session:
                session.execute(
                    update(StoredStudy).where(StoredStudy.study_uid == uid).values(purged_at=None)
                )
            run.failed[uid] = str(exc)
            _audit(env, request_id, uid, peer, system, value, 0, str(exc))
            continue
        run.studies.append(uid)
        run.instances += count
        _audit(env, request_id, uid, peer, system, value, count, None)
    if run.studies:
        run.jobs = _end_purged_jobs(env, moment)
    return run


def _audit(
    env: RetrievalEnv,
    request_id: str,
    uid: str,
    peer: str,
    system: str,
    value: str,
    count: int,
    failure: str | None,
) -> None:
    env.jobs.auditor.record(
        AuditEvent(
            action=Action.IMAGE_PURGE,
            side=Side.CONSUMER,
            request_id=request_id,
            outcome=Outcome.SERIOUS_FAILURE if failure else Outcome.SUCCESS,
            reason=failure or "retention period over",
            peer_country=peer,
            patient_id=value,
            patient_issuer=issuer_of(system),
            studies=(uid,),
            num_instances=count,
            details={"store": env.store.kind, "retention_days": env.settings.retention_days},
        )
    )


def _end_purged_jobs(env: RetrievalEnv, now: datetime) -> list[str]:
    """Stored jobs none of whose stored studies is left."""
    still_there = exists().where(
        RetrievalJobStudy.job_id == RetrievalJob.id,
        RetrievalJobStudy.status == "stored",
        exists().where(
            and_(
                StoredStudy.study_uid == RetrievalJobStudy.study_uid,
                StoredStudy.purged_at.is_(None),
            )
        ),
    )
    ended: list[str] = []
    with env.sessions.begin() as session:
        jobs = session.scalars(
            select(RetrievalJob)
            .where(RetrievalJob.status == Status.STORED.value, ~still_there)
            .with_for_update()
        ).all()
        reason = "retention period over: removed from B's store"
        for job in jobs:
            end(session, job, Status.PURGED, reason, now=now)
            ended.append(job.id)
    for job_id in ended:
        with env.sessions() as session:
            row = session.get(RetrievalJob, job_id)
            if row is not None:
                session.expunge(row)
        if row is not None:
            env.jobs.audit(row, Status.PURGED, reason)
    return ended
