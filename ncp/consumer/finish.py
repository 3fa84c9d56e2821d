"""The end of a job attempt: the studies verified as a whole, and the job's next status.

After the download every study is checked against its manifest as a whole (instances missing,
the study's size where A gives it): a study passes and is recorded as stored (its retention
date set, audited), or fails with the instances named and why. A run that stops otherwise ends
the job (:func:`end`), queues it again (:func:`requeue`; after a transient failure with a
back-off, :func:`retry_or_fail`) or hands it back. Every transition is audited first: one that
cannot be audited does not happen.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update

from ncp.audit.models import Action, Outcome
from ncp.consumer.attempt import Attempt
from ncp.consumer.jobs import Status, retention_until, set_status
from ncp.consumer.jobs import end as end_job
from ncp.consumer.localstore import StoreError
from ncp.consumer.retrieve import Transient
from ncp.consumer.verify import Problem
from ncp.store.retrieval import (
    RetrievalEvent,
    RetrievalJob,
    RetrievalJobStudy,
    RetrievalProblem,
    RetrievedInstance,
    StoredStudy,
)

log = logging.getLogger(__name__)


def verify(attempt: Attempt) -> Status | None:
    """Every study against its manifest as a whole; the job stored or failed."""
    now = attempt.env.now()
    set_status(
        attempt.env.sessions, attempt.row.id, Status.VERIFYING, None, now=now, worker=attempt.worker
    )
    audit_retrieve(attempt, Outcome.SUCCESS, None)
    failures: list[str] = []
    extras = 0
    stored_studies: list[tuple[str, int, int]] = []
    with attempt.env.sessions() as session:
        problems = session.scalars(
            select(RetrievalProblem).where(RetrievalProblem.job_id == attempt.row.id)
        ).all()
        rows = session.execute(
            select(
                RetrievedInstance.sop_uid,
                RetrievedInstance.size,
                RetrievedInstance.downloaded,
            ).where(RetrievedInstance.job_id == attempt.row.id)
        ).all()
    sizes = {sop: size for sop, size, _ in rows}
    downloaded = {sop for sop, _, fetched in rows if fetched}
    for uid, manifest in attempt.manifests.items():
        try:
            present = attempt.env.store.existing(uid) & {
                i.sop_instance_uid for s in manifest.series for i in s.instances
            }
        except StoreError as exc:
            raise Transient(str(exc)) from None
        own = [
            Problem(p.kind, p.study_uid, p.series_uid, p.sop_uid, p.detail)  # type: ignore[arg-type]
            for p in problems
            if p.study_uid == uid
        ]
        missing = [
            p
            for p in attempt.checks[uid].missing(present)
            if (uid, p.sop_uid) not in attempt.rejected
        ]
        if missing:
            attempt.committer.put_all(missing)
        wrong = [p for p in own if p.kind != "extra"]
        extras += sum(1 for p in own if p.kind == "extra")
        size = sum(sizes.get(sop, 0) for sop in present)
        # A's size of the study is checked when this job brought every instance of it.
        complete = not missing and not wrong and present <= downloaded
        if complete and manifest.size and size != manifest.size:
            detail = f"the study's {size} bytes differ from A's manifest ({manifest.size})"
            wrong.append(Problem("different", uid, None, None, detail))
            attempt.committer.put_all(wrong[-1:])
        if missing or wrong:
            named = [str(p) for p in (wrong + missing)[:3]]
            more = len(wrong) + len(missing) - len(named)
            text = "; ".join(named) + (f"; and {more} more" if more > 0 else "")
            failures.append(
                f"study {uid}: {len(wrong)} instance(s) rejected, {len(missing)} missing ({text})"
            )
            _study_done(attempt, uid, "failed", len(present), size)
            attempt.env.jobs.audit(
                attempt.job(),
                Status.FAILED,
                failures[-1][:2000],
                outcome=Outcome.SERIOUS_FAILURE,
                studies=[uid],
                action=Action.IMAGE_STORE,
                num_instances=len(present),
            )
        else:
            stored_studies.append((uid, len(present), size))
    attempt.committer.flush()
    for uid, count, size in stored_studies:
        _study_stored(attempt, uid, count, size)
    if failures:
        return end(attempt, Status.FAILED, " | ".join(failures), outcome=Outcome.SERIOUS_FAILURE)
    note = f"{extras} instance(s) not in A's manifest rejected" if extras else None
    return end(attempt, Status.STORED, note, outcome=Outcome.SUCCESS)


def _study_done(attempt: Attempt, uid: str, status: str, count: int, size: int) -> None:
    with attempt.env.sessions.begin() as session:
        session.execute(
            update(RetrievalJobStudy)
            .where(RetrievalJobStudy.job_id == attempt.row.id)
            .where(RetrievalJobStudy.study_uid == uid)
            .values(status=status, instances_done=count, bytes_done=size)
        )


def _study_stored(attempt: Attempt, uid: str, count: int, size: int) -> None:
    now = attempt.env.now()
    purge_at = retention_until(now, attempt.settings.retention_days)
    attempt.env.jobs.audit(
        attempt.job(),
        Status.STORED,
        None,
        studies=[uid],
        action=Action.IMAGE_STORE,
        num_instances=count,
        size_bytes=size,
        details={
            "store": attempt.env.store.kind,
            "purge_at": purge_at.isoformat() if purge_at else None,
        },
    )
    with attempt.env.sessions.begin() as session:
        row = session.get(StoredStudy, uid, with_for_update=True)
        if row is None:
            row = StoredStudy(study_uid=uid)
            session.add(row)
        row.peer = attempt.row.peer
        row.patient_system, row.patient_value = (
            attempt.row.patient.system,
            attempt.row.patient.value,
        )
        row.store_kind = attempt.env.store.kind
        row.instances, row.size = count, size
        row.stored_at, row.purge_at, row.purged_at = now, purge_at, None
        session.execute(
            update(RetrievalJobStudy)
            .where(RetrievalJobStudy.job_id == attempt.row.id)
            .where(RetrievalJobStudy.study_uid == uid)
            .values(status="stored", instances_done=count, bytes_done=size)
        )


def end(attempt: Attempt, status: Status, reason: str | None, *, outcome: Outcome) -> Status | None:
    """Record the job's new status (and audit it), if this worker still holds the job."""
    now = attempt.env.now()
    job = attempt.job()
    if job.worker != attempt.worker:
        return None  # another worker took the job over: its transitions are its own
    # Audited first: a transition that cannot be audited does not happen (fail closed).
    attempt.env.jobs.audit(job, status, reason, outcome=outcome, studies=list(attempt.manifests))
    with attempt.env.sessions.begin() as session:
        locked = session.scalar(
            select(RetrievalJob).where(RetrievalJob.id == attempt.row.id).with_for_update()
        )
        if locked is None or locked.worker != attempt.worker:
            return None
        if status == Status.STORED:
            locked.attempts = 0
        end_job(session, locked, status, reason, now=now)
    return status


def requeue(attempt: Attempt, reason: str, *, delay: float, attempts: int | None = None) -> None:
    """The job back in its queue (due after ``delay`` seconds), if this worker holds it."""
    now = attempt.env.now()
    with attempt.env.sessions.begin() as session:
        values: dict[str, object] = {
            "worker": None,
            "heartbeat_at": None,
            "not_before": now + timedelta(seconds=delay) if delay else None,
        }
        if attempts is not None:
            values["attempts"] = attempts
        changed = session.execute(
            update(RetrievalJob)
            .where(RetrievalJob.id == attempt.row.id, RetrievalJob.worker == attempt.worker)
            .values(status=Status.QUEUED.value, reason=reason, updated_at=now, **values)
            .returning(RetrievalJob.id)
        ).first()
        if changed is not None:
            session.add(
                RetrievalEvent(
                    job_id=attempt.row.id,
                    at=now,
                    status=Status.QUEUED.value,
                    reason=reason,
                    worker=attempt.worker,
                )
            )
    attempt.env.jobs.wake.set()


def retry_or_fail(attempt: Attempt, reason: str, retry_after: float | None) -> Status | None:
    """After a transient failure: queued again after a back-off, or failed when the retry
    budget is spent."""
    # An attempt that stored anything starts the count again: a long transfer over a flaky
    # link is not failed for hiccups spread over hours.
    attempts = 1 if attempt.committer.stored_any else attempt.row.attempts + 1
    limit = attempt.settings.retry_attempts
    audit_retrieve(attempt, Outcome.SERIOUS_FAILURE, reason)
    if attempts >= limit:
        return end(
            attempt,
            Status.FAILED,
            f"gave up after {attempts} attempt(s) in a row: {reason}",
            outcome=Outcome.SERIOUS_FAILURE,
        )
    delay = min(
        attempt.settings.retry_backoff_s * 2 ** (attempts - 1), attempt.settings.retry_backoff_max_s
    )
    if retry_after is not None:
        delay = max(delay, min(retry_after, attempt.settings.retry_backoff_max_s))
    requeue(
        attempt,
        f"attempt {attempts} of {limit} failed, retrying in {delay:.0f} s: {reason}",
        delay=delay,
        attempts=attempts,
    )
    return Status.QUEUED


def audit_retrieve(attempt: Attempt, outcome: Outcome, reason: str | None) -> None:
    """The run's pull over the imaging channel (B's side of A's gateway records)."""
    if not attempt.downloaded and outcome == Outcome.SUCCESS:
        return
    attempt.env.jobs.audit(
        attempt.job(),
        Status.DOWNLOADING,
        reason,
        outcome=outcome,
        studies=list(attempt.manifests),
        action=Action.IMAGE_RETRIEVE,
        num_instances=attempt.downloaded,
        size_bytes=attempt.downloaded_bytes,
        token_jti=next(iter(sorted(attempt.jtis)), None),
        details={"token_jtis": sorted(attempt.jtis)},
    )


def hand_back(attempt: Attempt, reason: str, *, delay: float) -> Status | None:
    """The job queued again after a failure of B's own (its lease frees it if even that fails)."""
    try:
        requeue(attempt, reason, delay=delay)
    except Exception:
        log.exception("job %s: could not be handed back; its lease will free it", attempt.job_id)
        return None
    return Status.QUEUED
