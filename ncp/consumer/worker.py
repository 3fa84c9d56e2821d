"""Workers and lanes: which job a worker takes next, and the threads that run them.

Three lanes, as image exchange portals run them:

- **emergency**: ``emergency_workers`` threads (one by default) that take emergency jobs only, so
  no other lane can ever occupy them; the normal lane's workers take emergencies first too;
- **normal**: ``normal_workers`` threads;
- **batch** (prefetch of priors before a visit): ``batch_workers`` threads that take a batch job
  only while no emergency or normal job is queued or running anywhere (every replica's jobs are
  in the one database), and that pause between instances while an emergency job is queued or
  running (``ncp.consumer.download``).

A job is claimed in one statement, ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED
LIMIT 1) RETURNING id``: on PostgreSQL several replicas never take the same job and never wait
on each other's candidates; SQLite has one writer at a time, so the statement is atomic there as
it is. A job whose worker stopped reporting for ``lease_s`` (its process was killed) is claimable
again and resumes where it was.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import RUNNING, Status
from ncp.consumer.runner import JobRun
from ncp.store.retrieval import RetrievalEvent, RetrievalJob

log = logging.getLogger(__name__)

Lane = Literal["emergency", "normal", "batch"]
_LANE_PRIORITIES: dict[str, tuple[str, ...]] = {
    "emergency": ("emergency",),
    "normal": ("emergency", "normal"),
    "batch": ("batch",),
}


def worker_name(label: str = "") -> str:
    """A name for this process's workers, unique across replicas (host, pid, random)."""
    base = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return f"{base}:{label}" if label else base


def _claimable(now: datetime, lease: timedelta) -> ColumnElement[bool]:
    stale = now - lease
    return or_(
        and_(
            RetrievalJob.status == Status.QUEUED.value,
            RetrievalJob.cancel_requested.is_(False),
            or_(RetrievalJob.not_before.is_(None), RetrievalJob.not_before <= now),
        ),
        and_(
            RetrievalJob.status.in_([s.value for s in RUNNING]),
            or_(RetrievalJob.heartbeat_at.is_(None), RetrievalJob.heartbeat_at < stale),
        ),
    )


def busy(priorities: Sequence[str], now: datetime, lease: timedelta) -> ColumnElement[bool]:
    """Some job of these priorities is queued (and due) or running (with a live worker)."""
    return exists().where(
        RetrievalJob.priority.in_(list(priorities)),
        or_(
            and_(
                RetrievalJob.status == Status.QUEUED.value,
                RetrievalJob.cancel_requested.is_(False),
                or_(RetrievalJob.not_before.is_(None), RetrievalJob.not_before <= now),
            ),
            and_(
                RetrievalJob.status.in_([s.value for s in RUNNING]),
                RetrievalJob.heartbeat_at >= now - lease,
            ),
        ),
    )


def claim(
    sessions: sessionmaker[Session],
    lane: Lane,
    worker: str,
    *,
    now: datetime,
    lease: timedelta,
    only: str | None = None,
) -> str | None:
    """Take the next job of ``lane`` for ``worker`` (``only``: that job or none); its id, or
    None when there is nothing to take."""
    priorities = _LANE_PRIORITIES[lane]
    conditions = [_claimable(now, lease), RetrievalJob.priority.in_(priorities)]
    if only is not None:
        conditions.append(RetrievalJob.id == only)
    if lane == "batch":
        conditions.append(~busy(("emergency", "normal"), now, lease))
    rank = case({"emergency": 0, "normal": 1}, value=RetrievalJob.priority, else_=2)
    candidate = (
        select(RetrievalJob.id)
        .where(*conditions)
        .order_by(rank, RetrievalJob.created_at, RetrievalJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # One statement: SQLite takes its write lock at once (a read first could not be upgraded
    # when another writer came between), PostgreSQL locks the candidate row and skips rows other
    # replicas hold. SET reads the row as it was: the reason says whether it was taken over.
    took_over = "taken over from worker " + func.coalesce(RetrievalJob.worker, "?")
    with sessions.begin() as session:
        taken = session.execute(
            update(RetrievalJob)
            .where(RetrievalJob.id == candidate, conditions[0])
            .values(
                status=Status.DOWNLOADING.value,
                reason=case(
                    (RetrievalJob.status == Status.QUEUED.value, None),
                    else_=took_over + " (it stopped reporting)",
                ),
                worker=worker,
                heartbeat_at=now,
                not_before=None,
                updated_at=now,
            )
            .returning(RetrievalJob.id, RetrievalJob.reason)
        ).first()
        if taken is None:
            return None
        job_id, reason = taken
        session.add(
            RetrievalEvent(
                job_id=job_id, at=now, status=Status.DOWNLOADING.value, reason=reason, worker=worker
            )
        )
    return str(job_id)


class Retriever:
    """The lanes' worker threads of one process. :meth:`start`, then :meth:`stop` (jobs under
    way stop after the instance they are receiving and are queued again to resume)."""

    def __init__(self, env: RetrievalEnv, *, name: str | None = None) -> None:
        self.env = env
        self.name = name or worker_name()
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def lanes(self) -> list[tuple[Lane, int]]:
        s = self.env.settings
        lanes: list[tuple[Lane, int]] = [
            ("emergency", s.emergency_workers),
            ("normal", s.normal_workers),
            ("batch", s.batch_workers),
        ]
        return [(lane, n) for lane, n in lanes if n > 0]

    def start(self) -> None:
        for lane, count in self.lanes():
            for i in range(count):
                thread = threading.Thread(
                    target=self._loop,
                    args=(lane, f"{self.name}:{lane}{i}"),
                    name=f"retriever-{lane}-{i}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.env.jobs.wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _loop(self, lane: Lane, worker: str) -> None:
        settings = self.env.settings
        lease = timedelta(seconds=settings.lease_s)
        while not self.stop_event.is_set():
            try:
                job_id = claim(self.env.sessions, lane, worker, now=self.env.now(), lease=lease)
            except Exception:
                log.exception("claiming a job failed (lane %s)", lane)
                job_id = None
            if job_id is None:
                self.env.jobs.wake.wait(settings.poll_s)
                self.env.jobs.wake.clear()
                continue
            try:
                self.run(job_id, worker, lane)
            except Exception:  # a worker thread outlives any one job
                log.exception("job %s: the run failed", job_id)

    def run(self, job_id: str, worker: str, lane: Lane) -> Status:
        """Run a claimed job in this thread until it ends, waits or is handed back."""
        return JobRun(self.env, job_id, worker=worker, lane=lane, stop=self.stop_event).run()

    def run_only(self, job_id: str) -> Status | None:
        """Claim one job (if it is claimable) in its own lane and run it in this thread
        (``ncp pull``); None when another worker holds it or it is not due."""
        with self.env.sessions() as session:
            priority = session.scalar(
                select(RetrievalJob.priority).where(RetrievalJob.id == job_id)
            )
        if priority not in _LANE_PRIORITIES:
            return None
        lane: Lane = priority  # type: ignore[assignment]
        worker = f"{self.name}:pull"
        lease = timedelta(seconds=self.env.settings.lease_s)
        taken = claim(self.env.sessions, lane, worker, now=self.env.now(), lease=lease, only=job_id)
        return None if taken is None else self.run(taken, worker, lane)
