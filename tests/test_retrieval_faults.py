"""Retrieval jobs under faults, against real servers: node A's standard channel and option A
gateway over TLS on an Orthanc archive, Orthanc as B's archive, B's worker as a process killed
with SIGKILL, A's archive stopped in the middle of a transfer, a tampered instance, a token that
expires at A's gateway during a job, and an emergency job behind twenty batch jobs.

B is a node of its own from its config on disk with the real peer client, in the test's
process or as ``python -m ncp jobs work``: what runs in production.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import JobRequest, JobView, Requester, Status
from ncp.consumer.localstore import FolderStore, StowStore
from ncp.consumer.worker import Retriever
from ncp.store.retrieval import RetrievalEvent, RetrievedInstance
from tests.support.node import PATIENTS
from tests.support.orthanc import OrthancServer
from tests.support.retrieval_world import (
    BIG,
    BIG_PER_SERIES,
    BIG_SERIES,
    SMALL_INSTANCES,
    TAMPERED,
    World,
    make_world,
    small_study,
    start_b,
    stop,
    tamper,
    wait_ready,
)

pytestmark = [pytest.mark.orthanc, pytest.mark.filterwarnings("ignore::UserWarning:pydicom")]
HP = Requester("BE-HP-0042", "Dr. Anne Peeters")
PATIENT = PATIENTS["PAT100"].ref
BIG_COUNT = BIG_SERIES * BIG_PER_SERIES


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("retrieval-world")) as made:
        yield made


def _wait(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def _a_retrieves(world: World, request_id: str) -> list[AuditRecord]:
    with world.node.node.sessions() as session:
        return list(
            session.scalars(
                select(AuditRecord)
                .where(AuditRecord.request_id == request_id)
                .where(AuditRecord.action == "image-retrieve")
                .order_by(AuditRecord.seq)
            )
        )


def _orthanc_count(server: OrthancServer, study: str) -> int:
    return len(StowStore(server.dicomweb_url).existing(study))


# -- B killed with SIGKILL -------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["folder", "stowrs"])
def test_b_killed_mid_retrieval_resumes_without_fetching_or_storing_twice(
    world: World, tmp_path: Path, store: str
) -> None:
    if store == "stowrs":
        world.archive_b.clear()
        store_cfg = {"kind": "stowrs", "url": world.archive_b.dicomweb_url}
    else:
        store_cfg = {"kind": "folder", "path": str(tmp_path / "b" / "retrieved")}
    b = world.b(tmp_path / "b", store=store_cfg, lease_s=2, connections_per_peer=2)
    jobs = b.env.jobs
    log = tmp_path / "b-worker.log"
    try:
        job = jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (BIG,)))
        worker = start_b("jobs", "work", "--config", str(b.config), log=log)
        try:
            _wait(lambda: jobs.get(job.id).instances_done >= BIG_COUNT // 4, 120, "a quarter")
            os.killpg(worker.pid, signal.SIGKILL)  # no goodbye: as a power loss looks to B
            worker.wait(30)
        finally:
            stop(worker)
        killed_at = jobs.now()
        with jobs.sessions() as session:
            before = set(
                session.scalars(
                    select(RetrievedInstance.sop_uid).where(RetrievedInstance.job_id == job.id)
                )
            )
        halfway = jobs.get(job.id)
        assert halfway.status == Status.DOWNLOADING, log.read_text()[-3000:]
        assert 0 < len(before) < BIG_COUNT

        again = start_b("jobs", "work", "--config", str(b.config), "--until-idle", log=log)
        try:
            again.wait(180)
        finally:
            stop(again)
        done = jobs.get(job.id)
        with jobs.sessions() as session:
            rows = session.execute(
                select(RetrievedInstance.sop_uid, RetrievedInstance.downloaded).where(
                    RetrievedInstance.job_id == job.id
                )
            ).all()
    finally:
        b.close()
    assert done.status == Status.STORED, (done.reason, log.read_text()[-3000:])
    assert done.instances_done == BIG_COUNT and done.instances_rejected == 0 and not done.problems
    took_over = [e for e in done.history if e.reason and "taken over" in e.reason]
    assert len(took_over) == 1
    # Every instance once in B's records, once in the store.
    assert len(rows) == len({sop for sop, _ in rows}) == BIG_COUNT
    if store == "folder":
        files = list(FolderStore(tmp_path / "b" / "retrieved").files(BIG))
        assert len(files) == BIG_COUNT
    else:
        assert _orthanc_count(world.archive_b, BIG) == BIG_COUNT
        stats = world.archive_b.http.get("/statistics").json()
        assert stats["CountInstances"] == BIG_COUNT
    # Nothing B had stored before the kill was fetched from A again: A's gateway names every
    # instance it sent, per request.
    fetched_after = set()
    for record in _a_retrieves(world, done.request_id):
        started = record.recorded - timedelta(milliseconds=record.duration_ms or 0)
        if started > killed_at:
            fetched_after.update(record.details.get("instances") or [])
    assert fetched_after, "the restarted worker fetched nothing"
    assert not (fetched_after & before)


# -- A's archive stopped -------------------------------------------------------------------------


def _run_in_background(env: RetrievalEnv) -> Callable[[], None]:
    """B's workers (every lane) as threads; returns what stops them."""
    retriever = Retriever(env)
    retriever.start()
    return retriever.stop


def test_a_job_retries_while_as_archive_is_down_and_completes_when_it_is_back(
    world: World, tmp_path: Path
) -> None:
    b = world.b(tmp_path / "b", retry_attempts=30)
    env = b.env
    halt = _run_in_background(env)
    try:
        job = env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (BIG,)))
        _wait(lambda: env.jobs.get(job.id).instances_done >= 60, 120, "some instances")
        world.archive_a.halt()
        try:
            _wait(
                lambda: any(
                    e.status == "queued" and "attempt" in (e.reason or "")
                    for e in env.jobs.get(job.id).history
                ),
                60,
                "a retry",
            )
        finally:
            world.archive_a.relaunch()
        _wait(lambda: env.jobs.get(job.id).ended, 180, "the job to end", every=0.1)
        done = env.jobs.get(job.id)
    finally:
        halt()
        b.close()
    assert done.status == Status.STORED, done.reason
    assert done.instances_done == BIG_COUNT and not done.problems
    retries = [e.reason for e in done.history if e.status == "queued" and e.reason]
    assert retries and all("retrying in" in r for r in retries)
    assert len(FolderStore(tmp_path / "b" / "retrieved").existing(BIG)) == BIG_COUNT


def test_a_job_fails_with_a_clear_reason_when_as_archive_stays_down(
    world: World, tmp_path: Path
) -> None:
    b = world.b(tmp_path / "b", retry_attempts=3, retry_backoff_s=0.2)
    env = b.env
    world.archive_a.halt()
    try:
        job = env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (small_study(51),)))
        retriever = Retriever(env)
        deadline = time.monotonic() + 60
        # A's gateway answers 503 with Retry-After: the retries wait (at most the back-off cap).
        while not env.jobs.get(job.id).ended and time.monotonic() < deadline:
            retriever.run_only(job.id)
            time.sleep(0.1)
        done = env.jobs.get(job.id)
    finally:
        world.archive_a.relaunch()
        b.close()
    assert done.status == Status.FAILED
    assert done.reason and done.reason.startswith("gave up after 3 attempt(s) in a row:")
    assert "unavailable (503)" in done.reason
    assert [e.status for e in done.history].count("queued") == 3  # created, and 2 retries


# -- content that does not match the manifest ------------------------------------------------------


def test_a_tampered_instance_is_rejected_and_named(world: World, tmp_path: Path) -> None:
    sop = tamper(world)
    b = world.b(tmp_path / "b")
    try:
        job = b.env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (TAMPERED,)))
        assert Retriever(b.env).run_only(job.id) == Status.FAILED
        done = b.env.jobs.get(job.id)
    finally:
        b.close()
    [problem] = done.problems
    assert (problem.kind, problem.sop_uid) == ("different", sop)
    assert "SOP class" in problem.detail and sop in (done.reason or "")
    stored = FolderStore(tmp_path / "b" / "retrieved").existing(TAMPERED)
    assert sop not in stored and len(stored) == 2


# -- a token expiring at A's gateway during the job ------------------------------------------------


def test_a_token_that_expires_mid_job_is_renewed(world: World, tmp_path: Path) -> None:
    b = world.b(tmp_path / "b", connections_per_peer=1)
    env = b.env
    try:
        job = env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (BIG,)))
        halt = _run_in_background(env)
        try:
            _wait(lambda: env.jobs.get(job.id).instances_done >= 50, 120, "some instances")
            # A's clock runs 40 s ahead: the 30-second token B holds has expired at A's gateway
            # (B's own clock still finds it valid, so B does not renew it beforehand).
            world.clock.offset = timedelta(seconds=40)
            _wait(lambda: env.jobs.get(job.id).ended, 180, "the job to end", every=0.1)
        finally:
            halt()
        done = env.jobs.get(job.id)
    finally:
        world.clock.offset = timedelta(0)
        b.close()
    assert done.status == Status.STORED, done.reason
    assert done.instances_done == BIG_COUNT
    with world.node.node.sessions() as session:
        steps = session.execute(
            select(AuditRecord.action, AuditRecord.outcome, AuditRecord.token_jti)
            .where(AuditRecord.request_id == done.request_id)
            .order_by(AuditRecord.seq)
        ).all()
    actions = [a for a, _, _ in steps]
    assert actions.count("access-token-issue") == 1 and actions.count("access-token-renew") >= 1
    # A's gateway refused the expired token (401), then served under the new one.
    assert "refusal" in actions
    served = {jti for a, outcome, jti in steps if a == "image-retrieve" and outcome == 0}
    assert len(served) >= 2  # instances came under both tokens


# -- lanes -----------------------------------------------------------------------------------------


def test_an_emergency_behind_twenty_batch_jobs_starts_within_one_instance(
    world: World, tmp_path: Path
) -> None:
    b = world.b(tmp_path / "b", emergency_workers=1, normal_workers=0, batch_workers=1)
    env = b.env
    try:
        context = b.context()
        batch = [
            env.jobs.create(
                HP, context, JobRequest("AT", PATIENT, (small_study(i),), priority="batch")
            ).id
            for i in range(20)
        ]
        halt = _run_in_background(env)
        try:
            _wait(lambda: env.jobs.get(batch[0]).instances_done >= 2, 60, "the first batch job")
            urgent = env.jobs.create(
                HP,
                b.context(purpose="ETREAT"),
                JobRequest("AT", PATIENT, (small_study(20),), priority="emergency"),
            )
            _wait(lambda: env.jobs.get(urgent.id).ended, 60, "the emergency", every=0.05)
            _wait(lambda: all(env.jobs.get(j).ended for j in batch), 240, "the batch", every=0.2)
        finally:
            halt()
        emergency = env.jobs.get(urgent.id)
        batch_views = [env.jobs.get(j) for j in batch]
        with env.sessions() as session:
            received = session.execute(
                select(RetrievedInstance.job_id, RetrievedInstance.received_at).where(
                    RetrievedInstance.job_id.in_(batch)
                )
            ).all()
    finally:
        b.close()
    assert emergency.status == Status.STORED
    assert all(v.status == Status.STORED for v in batch_views)
    assert len(received) == 20 * SMALL_INSTANCES
    queued_at = _at(emergency, "queued")
    started_at = _at(emergency, "downloading")
    stored_at = _at(emergency, "stored")
    # Between the emergency's arrival and its start: at most the batch instance in flight.
    before_start = [t for _, t in received if t is not None and queued_at < t < started_at]
    assert len(before_start) <= 1
    # While the emergency ran, the batch lane paused: at most that one instance in all.
    during = [t for _, t in received if t is not None and queued_at < t < stored_at]
    assert len(during) <= 1
    # And the batch lane did run on afterwards (it yielded, it was not starved).
    assert any(t is not None and t > stored_at for _, t in received)


def _at(job: JobView, status: str) -> datetime:
    moment = next(e.at for e in job.history if e.status == status)
    return moment.replace(tzinfo=None)


def test_orthanc_as_bs_archive_holds_what_stow_rs_stored(world: World, tmp_path: Path) -> None:
    world.archive_b.clear()
    b = world.b(tmp_path / "b", store={"kind": "stowrs", "url": world.archive_b.dicomweb_url})
    store = b.env.store
    assert isinstance(store, StowStore)
    try:
        study = small_study(30)
        job = b.env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (study,)))
        assert Retriever(b.env).run_only(job.id) == Status.STORED
        assert len(store.existing(study)) == SMALL_INSTANCES
        # A second job finds the study in B's archive: nothing is fetched or sent again.
        again = b.env.jobs.create(HP, b.context(), JobRequest("AT", PATIENT, (study,)))
        assert Retriever(b.env).run_only(again.id) == Status.STORED
        assert _a_retrieves(world, b.env.jobs.get(again.id).request_id) == []
        r = httpx.get(f"{world.archive_b.rest_url}/statistics")
        assert r.json()["CountInstances"] == SMALL_INSTANCES
        assert store.remove_study(study) == SMALL_INSTANCES
        assert store.existing(study) == set()
    finally:
        b.close()


# -- two replicas of B on one PostgreSQL -------------------------------------------------------


@pytest.mark.postgres
def test_two_b_workers_on_one_postgresql_do_each_of_fifty_jobs_once(
    world: World, tmp_path: Path, postgres_url: str
) -> None:
    b = world.b(
        tmp_path / "b",
        database_url=postgres_url,
        connections_per_peer=2,
        lease_s=30,
        poll_s=0.2,
    )
    jobs = b.env.jobs
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [start_b("jobs", "work", "--config", str(b.config), log=log) for log in logs]
    try:
        for worker, log in zip(workers, logs, strict=True):
            wait_ready(log, worker)
        context = b.context()
        created = [
            jobs.create(HP, context, JobRequest("AT", PATIENT, (small_study(i),))).id
            for i in range(50)
        ]
        _wait(lambda: all(j.ended for j in jobs.list(limit=100)), 300, "fifty jobs", every=0.25)
        views = [jobs.get(job_id) for job_id in created]
        with jobs.sessions() as session:
            claimers = session.scalars(
                select(RetrievalEvent.worker).where(RetrievalEvent.status == "downloading")
            ).all()
    finally:
        for worker in workers:
            stop(worker)
        b.close()
    assert all(v.status == Status.STORED for v in views), [v.reason for v in views]
    for view in views:
        assert [e.status for e in view.history] == ["queued", "downloading", "verifying", "stored"]
        # Exactly one worker ran it: one claim, and A sent its instances once.
        sent = [sop for r in _a_retrieves(world, view.request_id) for sop in r.details["instances"]]
        assert len(sent) == len(set(sent)) == SMALL_INSTANCES
    names = {w.rsplit(":", 1)[0] for w in claimers if w}
    assert len(claimers) == 50 and len(names) == 2, names  # both processes took jobs
    assert len(FolderStore(tmp_path / "b" / "retrieved").existing(small_study(0))) == 8
