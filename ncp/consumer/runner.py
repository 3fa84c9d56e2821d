"""Running one claimed job: manifests, token, download, verification, store, outcome.

One :class:`JobRun` per attempt, in the worker thread that claimed the job:

1. A's manifests of the job's studies (kept in the job, so a resumed job verifies against the
   same), and what B's store holds of them already (an earlier job, or this one before a crash):
   those instances are recorded as done and never fetched again;
2. an image access token (the job's own while it has some life left, renewed through
   ``PeerAccess.imaging_access`` when it comes within ``renew_before_s`` of its expiry, or when the
   gateway answers 401); when the HP's assertion or TRC has expired the job waits in needs-hp;
3. the download: each series still whole is one WADO-RS request, instances of series a crash cut
   short are one request each; up to ``connections_per_peer`` requests at once (one for batch
   jobs), every part verified (:mod:`ncp.consumer.verify`) the moment it has arrived and handed
   to the committer; between instances a job stops when cancelled, when its worker stops, and (a
   batch job) pauses while an emergency job is queued or running;
4. the committer (a thread of the job) stores verified instances in batches (reconciled first
   when configured), records them in B's database, reports the job's progress and keeps its
   lease (heartbeat), and reads whether the job was cancelled;
5. verifying: every study against its manifest as a whole (missing instances, total size), then
   stored (retention date set, audited) or failed with the instances named and why.

A transient failure (peer or its archive unreachable, 503, a transfer cut off) queues the job
again with a back-off; after ``retry_attempts`` attempts in a row that stored nothing it fails
with the last reason. A refusal by A is ``declined`` with A's text.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from ncp.audit.models import Action, Outcome
from ncp.audit.record import AuditError
from ncp.consumer.committer import Committer, JobLost, StoreFailed
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import (
    Status,
    end,
    retention_until,
    set_status,
    token_claims,
    utc_naive,
)
from ncp.consumer.localstore import InstanceKey, StoreError, Verified
from ncp.consumer.manifests import manifest_from_json, manifest_to_json
from ncp.consumer.model import (
    ImageGrant,
    PeerAnswerInvalid,
    PeerContext,
    PeerNotAllowed,
    PeerRefused,
    PeerUnreachable,
    PeerUntrusted,
    Priority,
    StudyManifest,
)
from ncp.consumer.retrieve import (
    Fetcher,
    NotAtPeer,
    Received,
    Refused,
    TokenRefused,
    Transient,
    Unit,
)
from ncp.consumer.verify import Problem, StudyCheck
from ncp.errors import NcpError
from ncp.security.claims import PatientRef
from ncp.store.retrieval import (
    RetrievalEvent,
    RetrievalJob,
    RetrievalJobStudy,
    RetrievalProblem,
    RetrievedInstance,
    StoredStudy,
)

log = logging.getLogger(__name__)

CONTEXT_MARGIN = timedelta(seconds=5)
"""A confirmation this close to its expiry is treated as expired (A's clock may run ahead)."""


# -- why a job stops -------------------------------------------------------------------------


class _Stop(Exception):
    """Leave the download between two instances."""


class _Paused(_Stop):
    """A batch job makes way for an emergency."""


class _Cancelled(_Stop):
    pass


class _WorkerStopping(_Stop):
    pass


class _NeedsHp(NcpError):
    pass


class _Declined(NcpError):
    pass


class _Failed(NcpError):
    """The job fails now, without retrying (a store that refuses, a token A keeps refusing)."""


@dataclass
class _Row:
    """What the run keeps of the job's row."""

    id: str
    peer: str
    option: str
    priority: Priority
    patient: PatientRef
    local_patient: str | None
    request_id: str
    context: PeerContext | None
    grant: ImageGrant | None
    attempts: int


class JobRun:
    def __init__(
        self,
        env: RetrievalEnv,
        job_id: str,
        *,
        worker: str,
        lane: str,
        stop: threading.Event,
    ) -> None:
        self.env = env
        self.job_id = job_id
        self.worker = worker
        self.lane = lane
        self.stop = stop
        self.settings = env.settings
        self.staging = Path(self.settings.staging or "retrieval-staging") / job_id
        self.manifests: dict[str, StudyManifest] = {}
        self.checks: dict[str, StudyCheck] = {}
        self.stored: dict[str, set[str]] = {}
        self.rejected: set[tuple[str, str]] = set()
        self.abandoned: set[tuple[str, str]] = set()
        self._check_lock = threading.Lock()
        self._grant_lock = threading.Lock()
        self._interrupt: _Stop | JobLost | None = None
        self._errors: list[Exception] = []
        self._downloaded = 0
        self._downloaded_bytes = 0
        self._jtis: set[str] = set()

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> Status:
        try:
            self.row = self._load()
        except JobLost:
            return Status.DOWNLOADING
        committer = Committer(
            self.env,
            self.row.id,
            self.worker,
            self.stored,
            patient=self.row.patient,
            local_patient=self.row.local_patient,
        )
        self.committer = committer
        committer.start()
        try:
            outcome = self._run()
        except JobLost:
            outcome = None
        except AuditError:
            # Fail closed: a job whose steps cannot be audited stops, and resumes later.
            log.error("job %s: B's audit trail could not be written; handed back", self.job_id)
            outcome = self._hand_back("B's audit trail could not be written", delay=30.0)
        except Exception:
            log.exception("job %s: the run failed; handed back", self.job_id)
            outcome = self._hand_back("the worker failed; the job resumes later", delay=30.0)
        finally:
            committer.close()
            shutil.rmtree(self.staging, ignore_errors=True)
        return outcome or Status.DOWNLOADING

    def _run(self) -> Status | None:
        row = self.row
        try:
            if self._cancel_requested():
                raise _Cancelled()
            self._prepare()
            self._download()
            self._settle()
            return self._verify()
        except _Cancelled:
            self._settle(quietly=True)
            return self._end(Status.CANCELLED, "cancelled", outcome=Outcome.SUCCESS)
        except _WorkerStopping:
            self._settle(quietly=True)
            self._requeue("the worker stopped; the job resumes where it was", delay=0.0)
            return Status.QUEUED
        except JobLost:
            raise
        except _NeedsHp as exc:
            self._settle(quietly=True)
            return self._end(Status.NEEDS_HP, str(exc), outcome=Outcome.MINOR_FAILURE)
        except _Declined as exc:
            self._settle(quietly=True)
            return self._end(Status.DECLINED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except PeerUntrusted as exc:
            # Never retried: waiting does not make a wrong certificate right.
            self._settle(quietly=True)
            return self._end(Status.FAILED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except (Transient, PeerUnreachable) as exc:
            self._settle(quietly=True)
            return self._retry_or_fail(str(exc), getattr(exc, "retry_after", None))
        except (_Failed, StoreFailed, PeerNotAllowed, PeerAnswerInvalid) as exc:
            self._settle(quietly=True)
            return self._end(Status.FAILED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except AuditError:
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", row.id)
            self._settle(quietly=True)
            return self._end(
                Status.FAILED,
                f"internal error: {type(exc).__name__}",
                outcome=Outcome.MAJOR_FAILURE,
            )

    def _hand_back(self, reason: str, *, delay: float) -> Status | None:
        try:
            self._requeue(reason, delay=delay)
        except Exception:
            log.exception("job %s: could not be handed back; its lease will free it", self.job_id)
            return None
        return Status.QUEUED

    # -- loading and preparing ---------------------------------------------------------------

    def _load(self) -> _Row:
        with self.env.sessions() as session:
            job = session.get(RetrievalJob, self.job_id)
            if job is None or job.worker != self.worker:
                raise JobLost()
            context = None
            if job.hp_assertion and job.trc and job.context_expires_at:
                context = PeerContext(
                    peer=job.peer,
                    hp_assertion=job.hp_assertion,
                    trc=job.trc,
                    patient=PatientRef(job.patient_system, job.patient_value),
                    expires_at=_aware(job.context_expires_at),
                    request_id=job.request_id,
                )
            grant = None
            if job.token and job.token_base_url and job.token_expires_at:
                grant = ImageGrant(
                    token=job.token,
                    base_url=job.token_base_url,
                    option="C" if job.option == "C" else "A",
                    studies=(),
                    expires_at=_aware(job.token_expires_at),
                )
            studies = session.scalars(
                select(RetrievalJobStudy)
                .where(RetrievalJobStudy.job_id == job.id)
                .order_by(RetrievalJobStudy.position)
            ).all()
            for study in studies:
                self.stored[study.study_uid] = set()
                if study.manifest:
                    self.manifests[study.study_uid] = manifest_from_json(study.manifest)
            for study_uid, sop in session.execute(
                select(RetrievedInstance.study_uid, RetrievedInstance.sop_uid).where(
                    RetrievedInstance.job_id == job.id
                )
            ):
                self.stored.setdefault(study_uid, set()).add(sop)
            for study_uid, bad in session.execute(
                select(RetrievalProblem.study_uid, RetrievalProblem.sop_uid).where(
                    RetrievalProblem.job_id == job.id, RetrievalProblem.sop_uid.is_not(None)
                )
            ):
                if bad:
                    self.rejected.add((study_uid, bad))
            return _Row(
                id=job.id,
                peer=job.peer,
                option=job.option,
                priority=job.priority,  # type: ignore[arg-type]
                patient=PatientRef(job.patient_system, job.patient_value),
                local_patient=job.local_patient_value,
                request_id=job.request_id,
                context=context,
                grant=grant,
                attempts=job.attempts,
            )

    def _context(self) -> PeerContext:
        context = self.row.context
        if context is None:
            raise _NeedsHp("the HP's confirmation is no longer held: the HP must confirm again")
        if context.expires_at - CONTEXT_MARGIN <= _aware(self.env.now()):
            raise _NeedsHp(
                "the HP's treatment relationship confirmation expired at "
                f"{context.expires_at:%Y-%m-%d %H:%M}Z: the HP must confirm again"
            )
        return context

    def _prepare(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        wanted = [uid for uid in self.stored if uid not in self.manifests]
        if wanted:
            peer = self.env.peers(self.row.peer)
            try:
                found = peer.manifests(self._context(), wanted)
            except PeerRefused as exc:
                raise self._refusal(exc) from None
            absent = [uid for uid in wanted if uid not in found]
            if absent:
                raise _Declined(
                    f"A lists no study {absent[0]} for this patient (unknown to A, or "
                    "another patient's)"
                )
            for uid in wanted:
                manifest = found[uid]
                if manifest.patient != self.row.patient:
                    raise _Declined(f"A's manifest of study {uid} is for another patient")
                if manifest.study_uid != uid:
                    raise _Declined(f"A answered study {manifest.study_uid} for study {uid}")
                self.manifests[uid] = manifest
            self._save_manifests(wanted)
        # What the store holds already is done: never fetched, never stored again.
        found_rows = []
        for uid, manifest in self.manifests.items():
            expected = {i.sop_instance_uid: s for s in manifest.series for i in s.instances}
            try:
                present = self.env.store.existing(uid)
            except StoreError as exc:
                raise Transient(str(exc)) from None
            for sop in sorted((present & expected.keys()) - self.stored[uid]):
                found_rows.append((uid, expected[sop].series_uid, sop))
        if found_rows:
            self.committer.record_present(found_rows)
        for uid, manifest in self.manifests.items():
            self.checks[uid] = StudyCheck(manifest, seen=self.stored[uid])

    def _save_manifests(self, uids: Iterable[str]) -> None:
        with self.env.sessions.begin() as session:
            for uid in uids:
                manifest = self.manifests[uid]
                session.execute(
                    update(RetrievalJobStudy)
                    .where(RetrievalJobStudy.job_id == self.row.id)
                    .where(RetrievalJobStudy.study_uid == uid)
                    .values(
                        manifest=manifest_to_json(manifest),
                        instances_total=manifest.instance_count,
                    )
                )
            total = sum(m.instance_count for m in self.manifests.values())
            size = sum(m.size or 0 for m in self.manifests.values())
            session.execute(
                update(RetrievalJob)
                .where(RetrievalJob.id == self.row.id)
                .values(instances_total=total, bytes_total=size)
            )

    # -- tokens ------------------------------------------------------------------------------

    def grant(self, *, refused: str | None = None) -> ImageGrant:
        """The token to use now: the job's own unless it is close to expiry, or it is the
        token ``refused`` (a gateway answered 401 to it; parallel requests renew it once)."""
        with self._grant_lock:
            current = self.row.grant
            renew_before = timedelta(seconds=self.settings.renew_before_s)
            now = _aware(self.env.now())
            fresh = current is not None and current.expires_at - renew_before > now
            if current is not None and fresh and current.token != refused:
                return current
            context = self._context()
            try:
                grant = self.env.peers(self.row.peer).imaging_access(
                    context,
                    list(self.manifests),
                    "C" if self.row.option == "C" else "A",
                    self.row.priority,
                )
            except PeerRefused as exc:
                raise self._refusal(exc) from None
            if grant.expires_at <= now:
                raise Transient("A issued an image access token that has expired already")
            self.row.grant = grant
            jti = token_claims(grant.token).get("jti")
            if isinstance(jti, str):
                self._jtis.add(jti)
            with self.env.sessions.begin() as session:
                session.execute(
                    update(RetrievalJob)
                    .where(RetrievalJob.id == self.row.id, RetrievalJob.worker == self.worker)
                    .values(
                        token=grant.token,
                        token_base_url=grant.base_url,
                        token_expires_at=utc_naive(grant.expires_at),
                    )
                )
            return grant

    def _refusal(self, exc: PeerRefused) -> NcpError:
        if exc.status >= 500:
            return Transient(f"A could not answer ({exc.status}): {exc.diagnostics}")
        if exc.status == 401:
            return _NeedsHp(
                f"A no longer accepts the HP's assertion or confirmation: {exc.diagnostics}; "
                "the HP must confirm again"
            )
        return _Declined(f"A declined ({exc.status}): {exc.diagnostics}")

    # -- downloading -------------------------------------------------------------------------

    def _plan(self) -> list[Unit]:
        units: list[Unit] = []
        for uid, manifest in self.manifests.items():
            have = self.stored[uid]
            for series in manifest.series:
                wanted = [
                    i.sop_instance_uid
                    for i in series.instances
                    if i.sop_instance_uid not in have
                    and (uid, i.sop_instance_uid) not in self.rejected
                    and (uid, i.sop_instance_uid) not in self.abandoned
                ]
                if not wanted:
                    continue
                if len(wanted) == len(series.instances):
                    units.append(Unit(uid, series.series_uid))
                else:
                    units.extend(Unit(uid, series.series_uid, sop) for sop in wanted)
        return units

    def _download(self) -> None:
        if self._cancel_requested():  # cancelled while A's manifests were read
            raise _Cancelled()
        if self._plan():
            self.grant()  # fails early (needs-hp, declined) before any connection is opened
        while True:
            units = self._plan()
            if not units:
                return
            self._interrupt = None
            self._errors = []
            parallel = 1 if self.row.priority == "batch" else self.settings.connections_per_peer
            pending: queue.SimpleQueue[Unit] = queue.SimpleQueue()
            for unit in units:
                pending.put(unit)
            with ThreadPoolExecutor(min(parallel, len(units)), "retrieve-unit") as pool:
                for _ in range(min(parallel, len(units))):
                    pool.submit(self._drain_units, pending)
            self.committer.flush()
            self.committer.raise_failure()
            interrupt, errors = self._interrupt, self._errors
            if isinstance(interrupt, JobLost | _WorkerStopping | _Cancelled):
                raise interrupt
            for error in errors:
                if not isinstance(error, Transient | PeerUnreachable):
                    raise error
            if isinstance(interrupt, _Paused):
                self._wait_for_emergencies()
                continue
            for error in errors:
                raise error
            return

    def _drain_units(self, pending: queue.SimpleQueue[Unit]) -> None:
        while self._interrupt is None:
            try:
                unit = pending.get_nowait()
            except queue.Empty:
                return
            try:
                self._run_unit(unit)
            except (_Stop, JobLost) as stop:
                self._interrupt = self._interrupt or stop
            except Exception as exc:  # collected: the round ends, the run decides
                self._errors.append(exc)
                if not isinstance(exc, Transient | PeerUnreachable):
                    self._interrupt = self._interrupt or _Stop()

    def _run_unit(self, unit: Unit) -> None:
        peer = self.row.peer
        if not self.env.slots.acquire(peer, self.row.priority, self.stop):
            raise _WorkerStopping()
        try:
            self._checkpoint()
            fetcher = Fetcher(
                self.env.connections,
                peer,
                self.staging,
                request_id=self.row.request_id,
                write_back=self.env.store.write_back,
            )
            refused: str | None = None
            for attempt in (1, 2):
                grant = self.grant(refused=refused)
                try:
                    with fetcher.open(grant.base_url, grant.token, unit) as parts:
                        for received in parts:
                            self._receive(unit, received)
                            self._checkpoint()
                    return
                except TokenRefused as exc:
                    refused = grant.token
                    if attempt == 2:
                        raise _Failed(f"A's gateway refused a fresh token too: {exc}") from None
                except NotAtPeer:
                    # What the manifest promised and A does not have is missing at the end.
                    self._abandon(unit)
                    return
                except Refused as exc:
                    raise _Declined(str(exc)) from None
        finally:
            self.env.slots.release(peer)

    def _abandon(self, unit: Unit) -> None:
        manifest = self.manifests[unit.study_uid]
        for series in manifest.series:
            if series.series_uid == unit.series_uid:
                for inst in series.instances:
                    if unit.sop_uid in (None, inst.sop_instance_uid):
                        self.abandoned.add((unit.study_uid, inst.sop_instance_uid))

    def _checkpoint(self) -> None:
        """Between instances: stop, cancel, make way for an emergency, or go on."""
        if self.stop.is_set():
            raise _WorkerStopping()
        if self.committer.lost:
            raise JobLost()
        if self.committer.cancelled:
            raise _Cancelled()
        if self.committer.failure is not None:
            raise _Stop()
        if self.row.priority == "batch" and self.committer.emergency_waiting(fresh=True):
            raise _Paused()

    def _receive(self, unit: Unit, received: Received) -> None:
        study = unit.study_uid
        if received.header is None:
            sop = unit.sop_uid
            self._reject(
                received,
                Problem(
                    "unreadable",
                    study,
                    unit.series_uid,
                    sop,
                    f"not a readable DICOM instance: {received.unreadable}",
                ),
            )
            return
        header = received.header
        with self._check_lock:
            check = self.checks[study]
            problem = check.check(header)
            if problem is None:
                problem = check.check_size(header.sop_uid or "", received.size)
        if problem is not None:
            self._reject(received, problem)
            return
        assert header.sop_uid is not None and header.series_uid is not None
        self._downloaded += 1
        self._downloaded_bytes += received.size
        self.committer.put(
            Verified(
                path=received.path,
                key=InstanceKey(study, header.series_uid, header.sop_uid),
                size=received.size,
                received_at=self.env.now(),
            )
        )

    def _reject(self, received: Received, problem: Problem) -> None:
        received.discard()
        if problem.sop_uid and problem.kind != "extra":
            self.rejected.add((problem.study_uid, problem.sop_uid))
        log.warning("job %s: rejected %s (%s)", self.row.id, problem.sop_uid, problem.kind)
        self.committer.put(problem)

    def _wait_for_emergencies(self) -> None:
        with contextlib.suppress(SQLAlchemyError):
            self._set_reason("paused: an emergency job goes first")
        while self.committer.emergency_waiting(fresh=True):
            if self.stop.is_set():
                raise _WorkerStopping()
            if self.committer.cancelled:
                raise _Cancelled()
            if self.committer.lost:
                raise JobLost()
            time.sleep(min(0.2, self.settings.poll_s))
        self._set_reason(None)

    def _set_reason(self, reason: str | None) -> None:
        with self.env.sessions.begin() as session:
            session.execute(
                update(RetrievalJob)
                .where(RetrievalJob.id == self.row.id, RetrievalJob.worker == self.worker)
                .values(reason=reason)
            )

    def _cancel_requested(self) -> bool:
        with self.env.sessions() as session:
            return bool(
                session.scalar(
                    select(RetrievalJob.cancel_requested).where(RetrievalJob.id == self.row.id)
                )
            )

    def _settle(self, *, quietly: bool = False) -> None:
        """Wait until what was verified is stored and recorded."""
        try:
            self.committer.flush()
        except Exception:
            if not quietly:
                raise
        if not quietly:
            self.committer.raise_failure()

    # -- verifying and ending ----------------------------------------------------------------

    def _verify(self) -> Status | None:
        now = self.env.now()
        set_status(
            self.env.sessions, self.row.id, Status.VERIFYING, None, now=now, worker=self.worker
        )
        self._audit_retrieve(Outcome.SUCCESS, None)
        failures: list[str] = []
        extras = 0
        stored_studies: list[tuple[str, int, int]] = []
        with self.env.sessions() as session:
            problems = session.scalars(
                select(RetrievalProblem).where(RetrievalProblem.job_id == self.row.id)
            ).all()
            rows = session.execute(
                select(
                    RetrievedInstance.sop_uid,
                    RetrievedInstance.size,
                    RetrievedInstance.downloaded,
                ).where(RetrievedInstance.job_id == self.row.id)
            ).all()
        sizes = {sop: size for sop, size, _ in rows}
        downloaded = {sop for sop, _, fetched in rows if fetched}
        for uid, manifest in self.manifests.items():
            try:
                present = self.env.store.existing(uid) & {
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
                for p in self.checks[uid].missing(present)
                if (uid, p.sop_uid) not in self.rejected
            ]
            if missing:
                self.committer.put_all(missing)
            wrong = [p for p in own if p.kind != "extra"]
            extras += sum(1 for p in own if p.kind == "extra")
            size = sum(sizes.get(sop, 0) for sop in present)
            # A's size of the study is checked when this job brought every instance of it.
            complete = not missing and not wrong and present <= downloaded
            if complete and manifest.size and size != manifest.size:
                detail = f"the study's {size} bytes differ from A's manifest ({manifest.size})"
                wrong.append(Problem("different", uid, None, None, detail))
                self.committer.put_all(wrong[-1:])
            if missing or wrong:
                named = [str(p) for p in (wrong + missing)[:3]]
                more = len(wrong) + len(missing) - len(named)
                text = "; ".join(named) + (f"; and {more} more" if more > 0 else "")
                failures.append(
                    f"study {uid}: {len(wrong)} instance(s) rejected, {len(missing)} missing"
                    f" ({text})"
                )
                self._study_done(uid, "failed", len(present), size)
                self.env.jobs.audit(
                    self._job(),
                    Status.FAILED,
                    failures[-1][:2000],
                    outcome=Outcome.SERIOUS_FAILURE,
                    studies=[uid],
                    action=Action.IMAGE_STORE,
                    num_instances=len(present),
                )
            else:
                stored_studies.append((uid, len(present), size))
        self.committer.flush()
        for uid, count, size in stored_studies:
            self._study_stored(uid, count, size)
        if failures:
            return self._end(Status.FAILED, " | ".join(failures), outcome=Outcome.SERIOUS_FAILURE)
        note = f"{extras} instance(s) not in A's manifest rejected" if extras else None
        return self._end(Status.STORED, note, outcome=Outcome.SUCCESS)

    def _study_done(self, uid: str, status: str, count: int, size: int) -> None:
        with self.env.sessions.begin() as session:
            session.execute(
                update(RetrievalJobStudy)
                .where(RetrievalJobStudy.job_id == self.row.id)
                .where(RetrievalJobStudy.study_uid == uid)
                .values(status=status, instances_done=count, bytes_done=size)
            )

    def _study_stored(self, uid: str, count: int, size: int) -> None:
        now = self.env.now()
        purge_at = retention_until(now, self.settings.retention_days)
        self.env.jobs.audit(
            self._job(),
            Status.STORED,
            None,
            studies=[uid],
            action=Action.IMAGE_STORE,
            num_instances=count,
            size_bytes=size,
            details={
                "store": self.env.store.kind,
                "purge_at": purge_at.isoformat() if purge_at else None,
            },
        )
        with self.env.sessions.begin() as session:
            row = session.get(StoredStudy, uid, with_for_update=True)
            if row is None:
                row = StoredStudy(study_uid=uid)
                session.add(row)
            row.peer = self.row.peer
            row.patient_system, row.patient_value = self.row.patient.system, self.row.patient.value
            row.store_kind = self.env.store.kind
            row.instances, row.size = count, size
            row.stored_at, row.purge_at, row.purged_at = now, purge_at, None
            session.execute(
                update(RetrievalJobStudy)
                .where(RetrievalJobStudy.job_id == self.row.id)
                .where(RetrievalJobStudy.study_uid == uid)
                .values(status="stored", instances_done=count, bytes_done=size)
            )

    def _job(self) -> RetrievalJob:
        with self.env.sessions() as session:
            job = session.get(RetrievalJob, self.row.id)
            assert job is not None
            session.expunge(job)
            return job

    def _end(self, status: Status, reason: str | None, *, outcome: Outcome) -> Status | None:
        """Record the job's new status (and audit it), if this worker still holds the job."""
        now = self.env.now()
        job = self._job()
        if job.worker != self.worker:
            return None  # another worker took the job over: its transitions are its own
        # Audited first: a transition that cannot be audited does not happen (fail closed).
        self.env.jobs.audit(job, status, reason, outcome=outcome, studies=list(self.manifests))
        with self.env.sessions.begin() as session:
            locked = session.scalar(
                select(RetrievalJob).where(RetrievalJob.id == self.row.id).with_for_update()
            )
            if locked is None or locked.worker != self.worker:
                return None
            if status == Status.STORED:
                locked.attempts = 0
            end(session, locked, status, reason, now=now)
        return status

    def _requeue(self, reason: str, *, delay: float, attempts: int | None = None) -> None:
        now = self.env.now()
        with self.env.sessions.begin() as session:
            values: dict[str, object] = {
                "worker": None,
                "heartbeat_at": None,
                "not_before": now + timedelta(seconds=delay) if delay else None,
            }
            if attempts is not None:
                values["attempts"] = attempts
            changed = session.execute(
                update(RetrievalJob)
                .where(RetrievalJob.id == self.row.id, RetrievalJob.worker == self.worker)
                .values(status=Status.QUEUED.value, reason=reason, updated_at=now, **values)
                .returning(RetrievalJob.id)
            ).first()
            if changed is not None:
                session.add(
                    RetrievalEvent(
                        job_id=self.row.id,
                        at=now,
                        status=Status.QUEUED.value,
                        reason=reason,
                        worker=self.worker,
                    )
                )
        self.env.jobs.wake.set()

    def _retry_or_fail(self, reason: str, retry_after: float | None) -> Status | None:
        # An attempt that stored anything starts the count again: a long transfer over a flaky
        # link is not failed for hiccups spread over hours.
        attempts = 1 if self.committer.stored_any else self.row.attempts + 1
        limit = self.settings.retry_attempts
        self._audit_retrieve(Outcome.SERIOUS_FAILURE, reason)
        if attempts >= limit:
            return self._end(
                Status.FAILED,
                f"gave up after {attempts} attempt(s) in a row: {reason}",
                outcome=Outcome.SERIOUS_FAILURE,
            )
        delay = min(
            self.settings.retry_backoff_s * 2 ** (attempts - 1), self.settings.retry_backoff_max_s
        )
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.retry_backoff_max_s))
        self._requeue(
            f"attempt {attempts} of {limit} failed, retrying in {delay:.0f} s: {reason}",
            delay=delay,
            attempts=attempts,
        )
        return Status.QUEUED

    def _audit_retrieve(self, outcome: Outcome, reason: str | None) -> None:
        """The run's pull over the imaging channel (B's side of A's gateway records)."""
        if not self._downloaded and outcome == Outcome.SUCCESS:
            return
        self.env.jobs.audit(
            self._job(),
            Status.DOWNLOADING,
            reason,
            outcome=outcome,
            studies=list(self.manifests),
            action=Action.IMAGE_RETRIEVE,
            num_instances=self._downloaded,
            size_bytes=self._downloaded_bytes,
            token_jti=next(iter(sorted(self._jtis)), None),
            details={"token_jtis": sorted(self._jtis)},
        )


def _aware(moment: datetime) -> datetime:
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
