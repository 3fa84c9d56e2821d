"""One attempt of a claimed job: what its parts share, and why it stops.

:class:`Attempt` is the state of one run of a job in the worker thread that claimed it: the
job's row as loaded (:class:`JobRow`), A's manifests and the checks against them, what is
stored, rejected or given up, the job's committer, and the counters its audit reports. The
parts of a run work on it: preparing (:mod:`ncp.consumer.prepare`), the HP's confirmation and
the token (:mod:`ncp.consumer.grants`), the download (:mod:`ncp.consumer.download`) and the
end (:mod:`ncp.consumer.finish`), in the order :mod:`ncp.consumer.runner` runs them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update

from ncp.consumer.committer import Committer, JobLost
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.manifests import manifest_from_json
from ncp.consumer.model import ImageGrant, PeerContext, Priority, StudyManifest
from ncp.consumer.verify import StudyCheck
from ncp.errors import NcpError
from ncp.security.claims import PatientRef
from ncp.store.retrieval import (
    RetrievalJob,
    RetrievalJobStudy,
    RetrievalProblem,
    RetrievedInstance,
)

# -- why a job stops -------------------------------------------------------------------------


class Stop(Exception):
    """Leave the download between two instances."""


class Paused(Stop):
    """A batch job makes way for an emergency."""


class Cancelled(Stop):
    pass


class WorkerStopping(Stop):
    pass


class NeedsHp(NcpError):
    pass


class Declined(NcpError):
    pass


class Failed(NcpError):
    """The job fails now, without retrying (a store that refuses, a token A keeps refusing)."""


@dataclass
class JobRow:
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


class Attempt:
    """The shared state of one run of job ``job_id`` by ``worker``; :meth:`load` first."""

    row: JobRow
    committer: Committer

    def __init__(
        self, env: RetrievalEnv, job_id: str, *, worker: str, stop: threading.Event
    ) -> None:
        self.env = env
        self.job_id = job_id
        self.worker = worker
        self.stop = stop
        self.settings = env.settings
        self.staging = Path(self.settings.staging or "retrieval-staging") / job_id
        self.manifests: dict[str, StudyManifest] = {}
        self.checks: dict[str, StudyCheck] = {}
        self.stored: dict[str, set[str]] = {}
        """Stored SOP Instance UIDs by study (the committer adds what it records)."""
        self.rejected: set[tuple[str, str]] = set()
        self.abandoned: set[tuple[str, str]] = set()
        """(study, SOP) the manifest promised and A's gateway does not have (404)."""
        self.check_lock = threading.Lock()
        self.grant_lock = threading.Lock()
        self.downloaded = 0
        self.downloaded_bytes = 0
        self.jtis: set[str] = set()
        """The image tokens' ids this run used (its audit names them)."""

    def load(self) -> None:
        """The job's row, its studies (with A's manifests once read) and what it has stored
        and rejected so far; JobLost when this worker no longer holds the job."""
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
                    expires_at=aware(job.context_expires_at),
                    request_id=job.request_id,
                )
            grant = None
            if job.token and job.token_base_url and job.token_expires_at:
                grant = ImageGrant(
                    token=job.token,
                    base_url=job.token_base_url,
                    option="C" if job.option == "C" else "A",
                    studies=(),
                    expires_at=aware(job.token_expires_at),
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
            self.row = JobRow(
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

    def job(self) -> RetrievalJob:
        """The job's row as it is now (detached)."""
        with self.env.sessions() as session:
            job = session.get(RetrievalJob, self.row.id)
            assert job is not None
            session.expunge(job)
            return job

    def cancel_requested(self) -> bool:
        with self.env.sessions() as session:
            return bool(
                session.scalar(
                    select(RetrievalJob.cancel_requested).where(RetrievalJob.id == self.row.id)
                )
            )

    def set_reason(self, reason: str | None) -> None:
        with self.env.sessions.begin() as session:
            session.execute(
                update(RetrievalJob)
                .where(RetrievalJob.id == self.row.id, RetrievalJob.worker == self.worker)
                .values(reason=reason)
            )

    def settle(self, *, quietly: bool = False) -> None:
        """Wait until what was verified is stored and recorded."""
        try:
            self.committer.flush()
        except Exception:
            if not quietly:
                raise
        if not quietly:
            self.committer.raise_failure()


def aware(moment: datetime) -> datetime:
    """A database time (naive UTC) as an aware one."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
