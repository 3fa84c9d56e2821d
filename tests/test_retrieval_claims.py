"""Which job a worker takes: lanes, order, leases, and several workers claiming at once, on
SQLite and PostgreSQL (``engine`` is migrated on each)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, select, update

from ncp.audit.record import Auditor
from ncp.consumer.jobs import JobRequest, Jobs, Requester
from ncp.consumer.model import PeerContext, Priority
from ncp.consumer.worker import claim
from ncp.security.claims import PatientRef
from ncp.store.db import session_factory
from ncp.store.retrieval import RetrievalEvent, RetrievalJob

PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT100")
LEASE = timedelta(seconds=30)
HP = Requester("BE-HP-1", "Dr. One")


def _jobs(engine: Engine) -> Jobs:
    sessions = session_factory(engine)
    return Jobs(sessions, Auditor(sessions, country="BE"))


def _context() -> PeerContext:
    return PeerContext("AT", "hp.x.y", "trc.x.y", PATIENT, datetime.now(UTC) + timedelta(hours=1))


def _queue(jobs: Jobs, priority: Priority, n: int = 1) -> list[str]:
    request = JobRequest("AT", PATIENT, ("1.2.3.4",), priority=priority)
    return [jobs.create(HP, _context(), request).id for _ in range(n)]


def _now(jobs: Jobs) -> datetime:
    return jobs.now()


def test_lanes_take_their_own_jobs_emergencies_first(engine: Engine) -> None:
    jobs = _jobs(engine)
    [batch] = _queue(jobs, "batch")
    [normal] = _queue(jobs, "normal")
    [emergency] = _queue(jobs, "emergency")
    s, now = jobs.sessions, _now(jobs)
    # Batch waits while anything else is queued; the emergency lane takes emergencies only.
    assert claim(s, "batch", "w-b", now=now, lease=LEASE) is None
    assert claim(s, "emergency", "w-e", now=now, lease=LEASE) == emergency
    assert claim(s, "emergency", "w-e2", now=now, lease=LEASE) is None
    assert claim(s, "normal", "w-n", now=now, lease=LEASE) == normal
    # The normal job runs (its worker reports): batch still waits.
    assert claim(s, "batch", "w-b", now=now, lease=LEASE) is None
    with s.begin() as session:
        session.execute(update(RetrievalJob).values(status="stored", worker=None))
        session.execute(
            update(RetrievalJob).where(RetrievalJob.id == batch).values(status="queued")
        )
    assert claim(s, "batch", "w-b", now=now, lease=LEASE) == batch


def test_the_normal_lane_takes_a_waiting_emergency_before_its_own(engine: Engine) -> None:
    jobs = _jobs(engine)
    [normal] = _queue(jobs, "normal")
    [emergency] = _queue(jobs, "emergency")
    s, now = jobs.sessions, _now(jobs)
    assert claim(s, "normal", "w-n", now=now, lease=LEASE) == emergency
    assert claim(s, "normal", "w-n", now=now, lease=LEASE) == normal


def test_a_job_whose_worker_stopped_reporting_is_taken_over(engine: Engine) -> None:
    jobs = _jobs(engine)
    [job] = _queue(jobs, "normal")
    s, now = jobs.sessions, _now(jobs)
    assert claim(s, "normal", "dead", now=now, lease=LEASE) == job
    assert claim(s, "normal", "alive", now=now + LEASE / 2, lease=LEASE) is None
    assert claim(s, "normal", "alive", now=now + LEASE * 2, lease=LEASE) == job
    with s() as session:
        row = session.get(RetrievalJob, job)
        assert row is not None and row.worker == "alive"
        events = session.scalars(
            select(RetrievalEvent).where(RetrievalEvent.job_id == job).order_by(RetrievalEvent.id)
        ).all()
    assert [e.status for e in events] == ["queued", "downloading", "downloading"]
    assert events[-1].reason == "taken over from worker dead (it stopped reporting)"


def test_a_job_waiting_to_retry_is_not_taken_before_its_time(engine: Engine) -> None:
    jobs = _jobs(engine)
    [job] = _queue(jobs, "normal")
    s, now = jobs.sessions, _now(jobs)
    with s.begin() as session:
        session.execute(update(RetrievalJob).values(not_before=now + timedelta(seconds=5)))
    assert claim(s, "normal", "w", now=now, lease=LEASE) is None
    assert claim(s, "normal", "w", now=now + timedelta(seconds=6), lease=LEASE) == job


def test_workers_claiming_at_once_never_take_the_same_job(engine: Engine) -> None:
    jobs = _jobs(engine)
    created = set(_queue(jobs, "normal", 50))
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work(name: str) -> None:
        start.wait()
        while True:
            job = claim(jobs.sessions, "normal", name, now=_now(jobs), lease=LEASE)
            if job is None:
                return
            with lock:
                taken.append((name, job))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(job for _, job in taken)
    assert set(counts) == created and set(counts.values()) == {1}
    with jobs.sessions() as session:
        workers = dict(session.execute(select(RetrievalJob.id, RetrievalJob.worker)).all())
    assert all(workers[job] == name for name, job in taken)
