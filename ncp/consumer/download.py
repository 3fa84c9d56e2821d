"""The download of a job attempt: WADO-RS requests over the imaging channel, each instance
verified the moment it has arrived and handed to the job's committer.

Each series still whole is one request; the instances of a series a crash cut short are one
request each, so nothing stored is fetched again. Up to ``connections_per_peer`` requests run at
once (one for batch jobs; the per-peer bound across jobs is ``PeerSlots``). Between two
instances the download stops when the job is cancelled or its worker stops, and a batch job
pauses while an emergency job is queued or running. A transient failure of one request ends the
round; the run decides what comes next (``ncp.consumer.runner``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from ncp.consumer.attempt import (
    Attempt,
    Cancelled,
    Declined,
    Failed,
    Paused,
    Stop,
    WorkerStopping,
)
from ncp.consumer.committer import JobLost
from ncp.consumer.grants import grant
from ncp.consumer.localstore import InstanceKey, Verified
from ncp.consumer.model import PeerUnreachable
from ncp.consumer.retrieve import (
    Fetcher,
    NotAtPeer,
    Received,
    Refused,
    TokenRefused,
    Transient,
    Unit,
)
from ncp.consumer.verify import Problem

log = logging.getLogger(__name__)


class Download:
    """Downloads what ``attempt`` still lacks (:meth:`run`)."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self._interrupt: Stop | JobLost | None = None
        self._errors: list[Exception] = []

    def run(self) -> None:
        """Every instance still lacking, in rounds (a batch job paused for an emergency goes
        on after it); raises what stopped it."""
        if self.attempt.cancel_requested():  # cancelled while A's manifests were read
            raise Cancelled()
        if self._plan():
            grant(self.attempt)  # fails early (needs-hp, declined) before any connection is opened
        while True:
            units = self._plan()
            if not units:
                return
            self._interrupt = None
            self._errors = []
            parallel = (
                1
                if self.attempt.row.priority == "batch"
                else self.attempt.settings.connections_per_peer
            )
            pending: queue.SimpleQueue[Unit] = queue.SimpleQueue()
            for unit in units:
                pending.put(unit)
            with ThreadPoolExecutor(min(parallel, len(units)), "retrieve-unit") as pool:
                for _ in range(min(parallel, len(units))):
                    pool.submit(self._drain_units, pending)
            self.attempt.committer.flush()
            self.attempt.committer.raise_failure()
            interrupt, errors = self._interrupt, self._errors
            if isinstance(interrupt, JobLost | WorkerStopping | Cancelled):
                raise interrupt
            for error in errors:
                if not isinstance(error, Transient | PeerUnreachable):
                    raise error
            if isinstance(interrupt, Paused):
                self._wait_for_emergencies()
                continue
            for error in errors:
                raise error
            return

    def _plan(self) -> list[Unit]:
        units: list[Unit] = []
        for uid, manifest in self.attempt.manifests.items():
            have = self.attempt.stored[uid]
            for series in manifest.series:
                wanted = [
                    i.sop_instance_uid
                    for i in series.instances
                    if i.sop_instance_uid not in have
                    and (uid, i.sop_instance_uid) not in self.attempt.rejected
                    and (uid, i.sop_instance_uid) not in self.attempt.abandoned
                ]
                if not wanted:
                    continue
                if len(wanted) == len(series.instances):
                    units.append(Unit(uid, series.series_uid))
                else:
                    units.extend(Unit(uid, series.series_uid, sop) for sop in wanted)
        return units

    def _drain_units(self, pending: queue.SimpleQueue[Unit]) -> None:
        while self._interrupt is None:
            try:
                unit = pending.get_nowait()
            except queue.Empty:
                return
            try:
                self._run_unit(unit)
            except (Stop, JobLost) as stop:
                self._interrupt = self._interrupt or stop
            except Exception as exc:  # collected: the round ends, the run decides
                self._errors.append(exc)
                if not isinstance(exc, Transient | PeerUnreachable):
                    self._interrupt = self._interrupt or Stop()

    def _run_unit(self, unit: Unit) -> None:
        peer = self.attempt.row.peer
        if not self.attempt.env.slots.acquire(peer, self.attempt.row.priority, self.attempt.stop):
            raise WorkerStopping()
        try:
            self._checkpoint()
            fetcher = Fetcher(
                self.attempt.env.connections,
                peer,
                self.attempt.staging,
                request_id=self.attempt.row.request_id,
                write_back=self.attempt.env.store.write_back,
            )
            refused: str | None = None
            for attempt in (1, 2):
                issued = grant(self.attempt, refused=refused)
                try:
                    with fetcher.open(issued.base_url, issued.token, unit) as parts:
                        for received in parts:
                            self._receive(unit, received)
                            self._checkpoint()
                    return
                except TokenRefused as exc:
                    refused = issued.token
                    if attempt == 2:
                        raise Failed(f"A's gateway refused a fresh token too: {exc}") from None
                except NotAtPeer:
                    # What the manifest promised and A does not have is missing at the end.
                    self._abandon(unit)
                    return
                except Refused as exc:
                    raise Declined(str(exc)) from None
        finally:
            self.attempt.env.slots.release(peer)

    def _abandon(self, unit: Unit) -> None:
        manifest = self.attempt.manifests[unit.study_uid]
        for series in manifest.series:
            if series.series_uid == unit.series_uid:
                for inst in series.instances:
                    if unit.sop_uid in (None, inst.sop_instance_uid):
                        self.attempt.abandoned.add((unit.study_uid, inst.sop_instance_uid))

    def _checkpoint(self) -> None:
        """Between instances: stop, cancel, make way for an emergency, or go on."""
        if self.attempt.stop.is_set():
            raise WorkerStopping()
        if self.attempt.committer.lost:
            raise JobLost()
        if self.attempt.committer.cancelled:
            raise Cancelled()
        if self.attempt.committer.failure is not None:
            raise Stop()
        if self.attempt.row.priority == "batch" and self.attempt.committer.emergency_waiting(
            fresh=True
        ):
            raise Paused()

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
        with self.attempt.check_lock:  # the checks and the counters are the job's, not a thread's
            check = self.attempt.checks[study]
            problem = check.check(header)
            if problem is None:
                problem = check.check_size(header.sop_uid or "", received.size)
            if problem is None:
                self.attempt.downloaded += 1
                self.attempt.downloaded_bytes += received.size
        if problem is not None:
            self._reject(received, problem)
            return
        assert header.sop_uid is not None and header.series_uid is not None
        self.attempt.committer.put(
            Verified(
                path=received.path,
                key=InstanceKey(study, header.series_uid, header.sop_uid),
                size=received.size,
                received_at=self.attempt.env.now(),
            )
        )

    def _reject(self, received: Received, problem: Problem) -> None:
        received.discard()
        if problem.sop_uid and problem.kind != "extra":
            self.attempt.rejected.add((problem.study_uid, problem.sop_uid))
        log.warning("job %s: rejected %s (%s)", self.attempt.row.id, problem.sop_uid, problem.kind)
        self.attempt.committer.put(problem)

    def _wait_for_emergencies(self) -> None:
        with contextlib.suppress(SQLAlchemyError):
            self.attempt.set_reason("paused: an emergency job goes first")
        while self.attempt.committer.emergency_waiting(fresh=True):
            if self.attempt.stop.is_set():
                raise WorkerStopping()
            if self.attempt.committer.cancelled:
                raise Cancelled()
            if self.attempt.committer.lost:
                raise JobLost()
            time.sleep(min(0.2, self.attempt.settings.poll_s))
        self.attempt.set_reason(None)
