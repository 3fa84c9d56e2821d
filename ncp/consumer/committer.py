"""A retrieval job's one writer (:class:`Committer`): it stores the verified instances the
download hands it, in batches (reconciled first when configured), records them and the rejected
ones in B's database, reports the job's progress, keeps the job's lease (heartbeat) and watches
for cancellation and, for batch jobs, for emergencies. One per job attempt, on its own thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ncp.consumer.env import RetrievalEnv
from ncp.consumer.localstore import StoreError, Verified
from ncp.consumer.reconcile import LocalIdentity, ReconcileError, reconcile
from ncp.consumer.verify import Problem
from ncp.errors import NcpError
from ncp.security.claims import PatientRef
from ncp.store.retrieval import RetrievalJob, RetrievalJobStudy, RetrievalProblem, RetrievedInstance

log = logging.getLogger(__name__)

BATCH_FILES = 32
BATCH_BYTES = 64 << 20
STORING = 2
"""Batches the store works on at once: the next is flushed while the last is recorded."""


# The committer's statements, built once (Core, not the ORM's bulk paths): a batch costs a few
# statements' execution, not their construction and compilation every time.
_JOB = cast(Table, RetrievalJob.__table__)
_STUDY = cast(Table, RetrievalJobStudy.__table__)
_INSERT_INSTANCE = insert(cast(Table, RetrievedInstance.__table__))
_INSERT_PROBLEM = insert(cast(Table, RetrievalProblem.__table__))
_PROGRESS = (
    update(_JOB)
    .where(_JOB.c.id == bindparam("job_"), _JOB.c.worker == bindparam("worker_"))
    .values(
        instances_done=_JOB.c.instances_done + bindparam("instances_", type_=Integer),
        bytes_done=_JOB.c.bytes_done + bindparam("bytes_", type_=BigInteger),
        instances_rejected=_JOB.c.instances_rejected + bindparam("rejected_", type_=Integer),
        heartbeat_at=bindparam("now_", type_=DateTime),
        updated_at=bindparam("now_", type_=DateTime),
    )
    .returning(_JOB.c.cancel_requested)
)
_STUDY_PROGRESS = (
    update(_STUDY)
    .where(_STUDY.c.job_id == bindparam("job_"), _STUDY.c.study_uid == bindparam("study_"))
    .values(
        instances_done=_STUDY.c.instances_done + bindparam("instances_", type_=Integer),
        bytes_done=_STUDY.c.bytes_done + bindparam("bytes_", type_=BigInteger),
    )
)


class JobLost(Exception):
    """Another worker took the job over (this one had stopped reporting): leave it alone."""


class StoreFailed(NcpError):
    """B's local store did not take verified instances: the job fails."""


_FLUSH = object()
_CLOSE = object()


class Committer:
    """The job's one writer: stores verified instances in batches, records them and the
    problems, reports progress, keeps the job's lease, and watches for cancellation and (for
    batch jobs) emergencies. Its queue is bounded: a slow store slows the download, never
    fills the memory."""

    def __init__(
        self,
        env: RetrievalEnv,
        job_id: str,
        worker: str,
        stored: dict[str, set[str]],
        *,
        patient: PatientRef,
        local_patient: str | None,
    ) -> None:
        self.env = env
        self.job_id = job_id
        self.worker = worker
        self.stored = stored
        """The job's stored SOP Instance UIDs by study: the committer adds what it records."""
        self.patient = patient
        settings = env.settings
        connections = settings.connections_per_peer
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(16, 16 * connections))
        self._thread = threading.Thread(target=self._loop, name="retrieve-commit", daemon=True)
        self._flushed = threading.Condition()
        self._flush_asked = 0
        self._flush_done = 0
        self.failure: Exception | None = None
        self.cancelled = False
        self.lost = False
        self.stored_any = False
        self._emergency = False
        self._emergency_checked = 0.0
        self._beat_every = settings.lease_s / 3
        self._last_beat = 0.0
        self._stores = ThreadPoolExecutor(STORING, thread_name_prefix="retrieve-store")
        self._storing: deque[tuple[Future[None], list[Verified]]] = deque()
        self._local = None
        if settings.reconcile and local_patient:
            issuer = settings.local_patient_issuer or env.local_issuer
            self._local = LocalIdentity(local_patient, issuer)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Verified | Problem) -> None:
        while True:
            if self.failure is not None or self.lost:
                if isinstance(item, Verified):
                    _discard([item])
                return
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def put_all(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.put(problem)

    def record_present(self, rows: list[tuple[str, str, str]]) -> None:
        """Instances the store holds already: done, without a download."""
        now = self.env.now()
        with self.env.sessions.begin() as session:
            session.execute(
                _INSERT_INSTANCE,
                [
                    {
                        "job_id": self.job_id,
                        "study_uid": study,
                        "series_uid": series,
                        "sop_uid": sop,
                        "size": 0,
                        "stored_at": now,
                        "downloaded": False,
                    }
                    for study, series, sop in rows
                ],
            )
            self._progress(session, {(s, sop): 0 for s, _, sop in rows}, [], now)
        for study, _, sop in rows:
            self.stored[study].add(sop)

    def flush(self) -> None:
        """Wait until everything put so far is stored and recorded."""
        if not self._thread.is_alive():
            return
        with self._flushed:
            self._flush_asked += 1
            ticket = self._flush_asked
        self._queue.put(_FLUSH)
        with self._flushed:
            while self._flush_done < ticket and self._thread.is_alive():
                self._flushed.wait(0.5)

    def raise_failure(self) -> None:
        if self.lost:
            raise JobLost()
        failure = self.failure
        if isinstance(failure, StoreError | ReconcileError):
            raise StoreFailed(f"B's local store did not take the instances: {failure}")
        if failure is not None:
            raise failure

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        # Anything left (after a failure) is discarded with the staging folder.

    def emergency_waiting(self, *, fresh: bool = False) -> bool:
        """Whether an emergency job is queued or running in any process (asked of the
        database; ``fresh``: now, else at most every poll)."""
        from ncp.consumer.worker import busy

        now_mono = time.monotonic()
        if fresh or now_mono - self._emergency_checked > 0.2:
            lease = timedelta(seconds=self.env.settings.lease_s)
            with self.env.sessions() as session:
                self._emergency = bool(
                    session.scalar(select(busy(("emergency",), self.env.now(), lease)))
                )
            self._emergency_checked = now_mono
        return self._emergency

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        batch: list[Verified] = []
        problems: list[Problem] = []
        size = 0
        closing = False
        self._beat()
        while not closing:
            busy = batch or problems or self._storing
            try:
                item = self._queue.get(timeout=0.05 if busy else self._beat_every)
            except queue.Empty:
                item = None
            # A batch goes when it is full, when nothing came for a moment, or when asked: not
            # each time the queue is empty (one connection's instances arrive a few ms apart,
            # and a batch of one costs a transaction and a folder flush of its own).
            flush_now = item is None
            if item is _CLOSE:
                closing = flush_now = True
            elif item is _FLUSH:
                flush_now = True
            elif isinstance(item, Verified):
                batch.append(item)
                size += item.size
            elif isinstance(item, Problem):
                problems.append(item)
            full = len(batch) >= BATCH_FILES or size >= BATCH_BYTES
            if (batch or problems) and (flush_now or full):
                self._send(batch, problems)
                batch, problems, size = [], [], 0
            self._record_stored(wait=item is _FLUSH or closing)
            if item is _FLUSH:
                with self._flushed:
                    self._flush_done += 1
                    self._flushed.notify_all()
            if time.monotonic() - self._last_beat >= self._beat_every:
                self._beat()
        self._stores.shutdown(wait=True)
        with self._flushed:
            self._flush_done = self._flush_asked
            self._flushed.notify_all()

    def _send(self, batch: list[Verified], problems: list[Problem]) -> None:
        """A batch to the store (in the background), problems to the records (now)."""
        if self.failure is not None or self.lost:
            _discard(batch)
            return
        if batch:
            while len(self._storing) >= STORING:
                self._record_one(*self._storing.popleft())
            self._storing.append((self._stores.submit(self._store, batch), batch))
        if problems:
            self._record([], problems)

    def _store(self, batch: list[Verified]) -> None:
        """On a store thread: reconcile (when configured), then store the batch durably."""
        if self._local is not None:
            for item in batch:
                reconcile(item.path, self.patient, self._local)
        self.env.store.put(batch)

    def _record_stored(self, *, wait: bool) -> None:
        """Record the batches the store took (all of them, waiting, with ``wait``)."""
        while self._storing and (wait or self._storing[0][0].done()):
            self._record_one(*self._storing.popleft())

    def _record_one(self, stored: Future[None], batch: list[Verified]) -> None:
        try:
            stored.result()
        except (StoreError, ReconcileError) as exc:
            self.failure = self.failure or exc
            _discard(batch)
            return
        except Exception as exc:
            log.exception("job %s: storing instances failed", self.job_id)
            self.failure = self.failure or exc
            _discard(batch)
            return
        if self.failure is None and not self.lost:
            # Stored and not recorded (the job failed or was lost meanwhile): a later attempt
            # finds them in the store and counts them done.
            self._record(batch, [])

    def _record(self, batch: list[Verified], problems: list[Problem]) -> None:
        """Stored instances and problems into B's records, with the job's progress."""
        try:
            now = self.env.now()
            with self.env.sessions.begin() as session:
                if batch:
                    session.execute(
                        _INSERT_INSTANCE,
                        [
                            {
                                "job_id": self.job_id,
                                "study_uid": v.key.study_uid,
                                "series_uid": v.key.series_uid,
                                "sop_uid": v.key.sop_uid,
                                "size": v.size,
                                "received_at": v.received_at,
                                "stored_at": now,
                                "downloaded": True,
                            }
                            for v in batch
                        ],
                    )
                if problems:
                    session.execute(
                        _INSERT_PROBLEM,
                        [
                            {
                                "job_id": self.job_id,
                                "at": now,
                                "kind": p.kind,
                                "study_uid": p.study_uid,
                                "series_uid": p.series_uid,
                                "sop_uid": p.sop_uid,
                                "detail": p.detail[:2000],
                            }
                            for p in problems
                        ],
                    )
                done = {(v.key.study_uid, v.key.sop_uid): v.size for v in batch}
                self._progress(session, done, problems, now)
            for v in batch:
                self.stored[v.key.study_uid].add(v.key.sop_uid)
            if batch:
                self.stored_any = True
        except JobLost:
            self.lost = True
        except Exception as exc:
            log.exception("job %s: recording progress failed", self.job_id)
            self.failure = exc

    def _progress(
        self,
        session: Session,
        done: dict[tuple[str, str], int],
        problems: list[Problem],
        now: datetime,
    ) -> None:
        """Counts, lease and cancellation, in the caller's transaction."""
        changed = session.execute(
            _PROGRESS,
            {
                "job_": self.job_id,
                "worker_": self.worker,
                "instances_": len(done),
                "bytes_": sum(done.values()),
                "rejected_": sum(1 for p in problems if p.kind != "missing"),
                "now_": now,
            },
        ).first()
        if changed is None:
            raise JobLost()
        self.cancelled = self.cancelled or bool(changed[0])
        per_study: dict[str, tuple[int, int]] = {}
        for (study, _), size in done.items():
            n, b = per_study.get(study, (0, 0))
            per_study[study] = (n + 1, b + size)
        if per_study:
            session.execute(
                _STUDY_PROGRESS,
                [
                    {"job_": self.job_id, "study_": study, "instances_": n, "bytes_": b}
                    for study, (n, b) in per_study.items()
                ],
            )
        self._last_beat = time.monotonic()

    def _beat(self) -> None:
        try:
            with self.env.sessions.begin() as session:
                self._progress(session, {}, [], self.env.now())
        except JobLost:
            self.lost = True
        except SQLAlchemyError:
            log.warning("job %s: the heartbeat could not be written", self.job_id)


def _discard(batch: Iterable[Verified]) -> None:
    for item in batch:
        with contextlib.suppress(FileNotFoundError):
            item.path.unlink()
