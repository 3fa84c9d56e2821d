"""Running one claimed job: manifests, token, download, verification, store, outcome.

One :class:`JobRun` per attempt, in the worker thread that claimed the job; its parts work on
the attempt's shared state (:class:`~ncp.consumer.attempt.Attempt`):

1. :mod:`ncp.consumer.prepare`: A's manifests of the job's studies (kept in the job, so a
   resumed job verifies against the same), and what B's store holds of them already (an
   earlier job, or this one before a crash): those instances are recorded as done and never
   fetched again;
2. :mod:`ncp.consumer.grants`: an image access token (the job's own while it has some life
   left, renewed through ``PeerAccess.imaging_access`` when it comes within ``renew_before_s``
   of its expiry, or when the gateway answers 401); when the HP's assertion or TRC has expired
   the job waits in needs-hp;
3. :mod:`ncp.consumer.download`: each series still whole is one WADO-RS request, instances of
   series a crash cut short are one request each; up to ``connections_per_peer`` requests at
   once (one for batch jobs), every part verified (:mod:`ncp.consumer.verify`) the moment it
   has arrived and handed to the committer; between instances a job stops when cancelled, when
   its worker stops, and (a batch job) pauses while an emergency job is queued or running;
4. :mod:`ncp.consumer.committer` (a thread of the job) stores verified instances in batches
   (reconciled first when configured), records them in B's database, reports the job's progress
   and keeps its lease (heartbeat), and reads whether the job was cancelled;
5. :mod:`ncp.consumer.finish`: every study verified against its manifest as a whole (missing
   instances, total size), then stored (retention date set, audited) or failed with the
   instances named and why.

This module decides what each way of stopping means for the job. A transient failure (peer or
its archive unreachable, 503, a transfer cut off) queues the job again with a back-off; after
``retry_attempts`` attempts in a row that stored nothing it fails with the last reason. A
refusal by A is ``declined`` with A's text.
"""

from __future__ import annotations

import logging
import shutil
import threading

from ncp.audit.models import Outcome
from ncp.audit.record import AuditError
from ncp.consumer.attempt import (
    Attempt,
    Cancelled,
    Declined,
    Failed,
    NeedsHp,
    WorkerStopping,
)
from ncp.consumer.committer import Committer, JobLost, StoreFailed
from ncp.consumer.download import Download
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.finish import end, hand_back, requeue, retry_or_fail, verify
from ncp.consumer.jobs import Status
from ncp.consumer.model import (
    PeerAnswerInvalid,
    PeerNotAllowed,
    PeerUnreachable,
    PeerUntrusted,
)
from ncp.consumer.prepare import prepare
from ncp.consumer.retrieve import Transient

log = logging.getLogger(__name__)


class JobRun:
    """One attempt of job ``job_id``, claimed by ``worker``: :meth:`run` it to its end."""

    def __init__(
        self,
        env: RetrievalEnv,
        job_id: str,
        *,
        worker: str,
        lane: str,
        stop: threading.Event,
    ) -> None:
        self.attempt = Attempt(env, job_id, worker=worker, stop=stop)
        self.lane = lane

    def run(self) -> Status:
        """The job's status when this run left it (``downloading`` when another worker took
        it over meanwhile)."""
        attempt = self.attempt
        try:
            attempt.load()
        except JobLost:
            return Status.DOWNLOADING
        row = attempt.row
        committer = Committer(
            attempt.env,
            row.id,
            attempt.worker,
            attempt.stored,
            patient=row.patient,
            local_patient=row.local_patient,
        )
        attempt.committer = committer
        committer.start()
        try:
            outcome = self._run()
        except JobLost:
            outcome = None
        except AuditError:
            # Fail closed: a job whose steps cannot be audited stops, and resumes later.
            log.error("job %s: B's audit trail could not be written; handed back", row.id)
            outcome = hand_back(attempt, "B's audit trail could not be written", delay=30.0)
        except Exception:
            log.exception("job %s: the run failed; handed back", row.id)
            outcome = hand_back(attempt, "the worker failed; the job resumes later", delay=30.0)
        finally:
            committer.close()
            shutil.rmtree(attempt.staging, ignore_errors=True)
        return outcome or Status.DOWNLOADING

    def _run(self) -> Status | None:
        attempt = self.attempt
        try:
            if attempt.cancel_requested():
                raise Cancelled()
            prepare(attempt)
            Download(attempt).run()
            attempt.settle()
            return verify(attempt)
        except Cancelled:
            attempt.settle(quietly=True)
            return end(attempt, Status.CANCELLED, "cancelled", outcome=Outcome.SUCCESS)
        except WorkerStopping:
            attempt.settle(quietly=True)
            requeue(attempt, "the worker stopped; the job resumes where it was", delay=0.0)
            return Status.QUEUED
        except JobLost:
            raise
        except NeedsHp as exc:
            attempt.settle(quietly=True)
            return end(attempt, Status.NEEDS_HP, str(exc), outcome=Outcome.MINOR_FAILURE)
        except Declined as exc:
            attempt.settle(quietly=True)
            return end(attempt, Status.DECLINED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except PeerUntrusted as exc:
            # Never retried: waiting does not make a wrong certificate right.
            attempt.settle(quietly=True)
            return end(attempt, Status.FAILED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except (Transient, PeerUnreachable) as exc:
            attempt.settle(quietly=True)
            return retry_or_fail(attempt, str(exc), getattr(exc, "retry_after", None))
        except (Failed, StoreFailed, PeerNotAllowed, PeerAnswerInvalid) as exc:
            attempt.settle(quietly=True)
            return end(attempt, Status.FAILED, str(exc), outcome=Outcome.SERIOUS_FAILURE)
        except AuditError:
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", attempt.row.id)
            attempt.settle(quietly=True)
            return end(
                attempt,
                Status.FAILED,
                f"internal error: {type(exc).__name__}",
                outcome=Outcome.MAJOR_FAILURE,
            )
