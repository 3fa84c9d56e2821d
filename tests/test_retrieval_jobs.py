"""Retrieval jobs end to end in one process: a real node A (standard channel and option A gateway
over TLS, ``tests.support.node``), B's job machinery with a SQLite database and a folder store,
and a small stand-in for the peer client (``tests.support.peer_stub``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import JobConflict, JobNotFound, JobRequest, Requester, Status
from ncp.consumer.localstore import FolderStore
from ncp.consumer.model import ImageGrant, ManifestInstance, StudyManifest
from ncp.consumer.worker import Retriever
from ncp.store.retrieval import RetrievedInstance
from tests.support import node as node_support
from tests.support.peer_stub import NodeAPeer, b_env, sign_context

node_a = node_support.node_a
HP = Requester("BE-HP-0042", "Dr. Anne Peeters")
PAT100 = node_support.PATIENTS["PAT100"]
STUDIES = node_support.studies_of("PAT100")


@pytest.fixture
def env(tmp_path: Path, node_a: node_support.RunningNode) -> Iterator[RetrievalEnv]:
    made = b_env(tmp_path / "b", node_a)
    yield made
    made.close()


def _peer(env: RetrievalEnv) -> NodeAPeer:
    peer = env.peers("AT")
    assert isinstance(peer, NodeAPeer)
    return peer


def _create(env: RetrievalEnv, node: node_support.RunningNode, **changes: object) -> str:
    request = JobRequest(peer="AT", patient=PAT100.ref, studies=tuple(STUDIES))
    request = dataclasses.replace(request, **changes)  # type: ignore[arg-type]
    return env.jobs.create(HP, sign_context(node), request).id


def _b_audit(env: RetrievalEnv, job_id: str) -> list[AuditRecord]:
    with env.sessions() as session:
        records = session.scalars(select(AuditRecord).order_by(AuditRecord.seq)).all()
    return [r for r in records if (r.details or {}).get("job") == job_id]


def test_a_job_pulls_verifies_and_stores_its_studies(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    job_id = _create(env, node_a)
    assert Retriever(env).run_only(job_id) == Status.STORED
    job = env.jobs.get(job_id)
    assert job.status == Status.STORED and job.reason is None
    assert [e.status for e in job.history] == ["queued", "downloading", "verifying", "stored"]
    assert (job.instances_total, job.instances_done, job.instances_rejected) == (3, 3, 0)
    assert job.bytes_done == job.bytes_total > 0
    assert all(s.status == "stored" and s.purge_at is not None for s in job.studies)
    assert job.purge_at is not None and job.purge_at > datetime.now(UTC) + timedelta(days=29)
    store = env.store
    assert isinstance(store, FolderStore)
    files = [f for uid in STUDIES for f in store.files(uid)]
    assert len(files) == 3
    for f in files:  # A's bytes, as A's archive holds them
        ds = pydicom.dcmread(f)
        assert ds.PatientID == "PAT100" and ds.StudyInstanceUID in STUDIES
    assert not list((store.root / ".incoming").glob("**/*.part"))
    actions = [(r.action, r.outcome) for r in _b_audit(env, job_id)]
    assert actions[0] == ("retrieval-job", 0)  # created
    assert ("image-retrieve", 0) in actions
    assert actions.count(("image-store", 0)) == 2  # one per study
    assert actions[-1] == ("retrieval-job", 0)
    stored = _b_audit(env, job_id)[-1]
    assert stored.details["status"] == "stored" and stored.actor_id == HP.id
    assert stored.patient_id == "PAT100" and stored.peer_country == "AT"


def test_a_study_held_already_is_not_downloaded_again(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    first = _create(env, node_a)
    assert Retriever(env).run_only(first) == Status.STORED
    calls = dict(_peer(env).calls)
    second = _create(env, node_a)
    assert Retriever(env).run_only(second) == Status.STORED
    assert _peer(env).calls["imaging_access"] == calls["imaging_access"]  # no token: no request
    with env.sessions() as session:
        rows = session.scalars(
            select(RetrievedInstance).where(RetrievedInstance.job_id == second)
        ).all()
    assert len(rows) == 3 and not any(r.downloaded for r in rows)


def test_an_instance_unlike_its_manifest_is_rejected_and_named(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    victim: list[str] = []

    def lie(manifest: StudyManifest) -> StudyManifest:
        if manifest.study_uid != STUDIES[0]:
            return manifest
        series = manifest.series[0]
        first = series.instances[0]
        victim.append(first.sop_instance_uid)
        changed = ManifestInstance(first.sop_instance_uid, "1.2.840.10008.5.1.4.1.1.4", size=None)
        new_series = dataclasses.replace(series, instances=(changed, *series.instances[1:]))
        return dataclasses.replace(manifest, series=(new_series,), size=None)

    _peer(env).manifest_hook = lie
    job_id = _create(env, node_a)
    assert Retriever(env).run_only(job_id) == Status.FAILED
    job = env.jobs.get(job_id)
    assert job.instances_rejected == 1
    [problem] = job.problems
    assert (problem.kind, problem.sop_uid) == ("different", victim[0])
    assert "SOP class" in problem.detail
    assert victim[0] in (job.reason or "") and "1 instance(s) rejected" in (job.reason or "")
    store = env.store
    assert isinstance(store, FolderStore)
    assert victim[0] not in store.existing(STUDIES[0])  # nothing unverified is stored
    assert len(store.existing(STUDIES[0])) == 1
    assert {s.study_uid: s.status for s in job.studies} == {
        STUDIES[0]: "failed",
        STUDIES[1]: "stored",
    }
    failed = [r for r in _b_audit(env, job_id) if r.action == "image-store" and r.outcome == 8]
    assert len(failed) == 1 and victim[0] in (failed[0].reason or "")


def test_an_instance_missing_from_the_manifest_is_an_extra_and_not_stored(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    dropped: list[str] = []

    def drop(manifest: StudyManifest) -> StudyManifest:
        if manifest.study_uid != STUDIES[0]:
            return manifest
        series = manifest.series[0]
        dropped.append(series.instances[-1].sop_instance_uid)
        kept = dataclasses.replace(series, instances=series.instances[:-1])
        return dataclasses.replace(manifest, series=(kept,), size=None)

    _peer(env).manifest_hook = drop
    job_id = _create(env, node_a)
    assert Retriever(env).run_only(job_id) == Status.STORED
    job = env.jobs.get(job_id)
    assert [(p.kind, p.sop_uid) for p in job.problems] == [("extra", dropped[0])]
    assert "not in A's manifest" in (job.reason or "")
    assert dropped[0] not in env.store.existing(STUDIES[0])


def test_a_token_near_its_end_is_renewed_and_a_refused_one_replaced(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    peer = _peer(env)
    spoiled: list[str] = []

    def spoil_first(grant: ImageGrant) -> ImageGrant:
        if spoiled:
            return grant
        spoiled.append(grant.token)  # A's gateway answers 401 to a token with a bad signature
        head, body, sig = grant.token.split(".")
        return dataclasses.replace(grant, token=f"{head}.{body}.{sig[::-1]}")

    peer.grant_hook = spoil_first
    job_id = _create(env, node_a)
    assert Retriever(env).run_only(job_id) == Status.STORED
    assert peer.calls["imaging_access"] == 2

    # A grant about to expire is renewed before the next request.
    near = _create(env, node_a, studies=(STUDIES[0],))
    env.store.remove_study(STUDIES[0])
    peer.grant_hook = lambda g: dataclasses.replace(
        g, expires_at=datetime.now(UTC) + timedelta(seconds=10)
    )
    before = peer.calls["imaging_access"]
    assert Retriever(env).run_only(near) == Status.STORED
    assert peer.calls["imaging_access"] - before >= 2  # renew_before_s is 60 s


def test_an_expired_confirmation_waits_for_the_hp_and_resumes(
    tmp_path: Path, node_a: node_support.RunningNode
) -> None:
    later = [timedelta(0)]
    env = b_env(tmp_path / "b", node_a, clock=lambda: datetime.now(UTC) + later[0])
    try:
        job_id = _create(env, node_a)
        later[0] = timedelta(hours=2)  # the TRC (1 h) has expired when the worker runs
        assert Retriever(env).run_only(job_id) == Status.NEEDS_HP
        job = env.jobs.get(job_id)
        assert job.status == Status.NEEDS_HP and "must confirm again" in (job.reason or "")
        assert _peer(env).calls["imaging_access"] == 0
        fresh = sign_context(node_a)
        with pytest.raises(JobNotFound):  # another HP cannot
            env.jobs.renew_context(job_id, fresh, hp=Requester("BE-HP-9", "Someone Else"))
        later[0] = timedelta(0)
        assert env.jobs.renew_context(job_id, fresh, hp=HP).status == Status.QUEUED
        assert Retriever(env).run_only(job_id) == Status.STORED
        history = [e.status for e in env.jobs.get(job_id).history]
        assert history == [
            "queued",
            "downloading",
            "needs-hp",
            "queued",
            "downloading",
            "verifying",
            "stored",
        ]
    finally:
        env.close()


def test_a_study_of_another_patient_is_declined_with_a_reason(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    other = node_support.studies_of("PAT101")[0]
    job_id = _create(env, node_a, studies=(other,))
    assert Retriever(env).run_only(job_id) == Status.DECLINED
    job = env.jobs.get(job_id)
    assert job.reason and "refused" in job.reason
    assert env.store.existing(other) == set()


def test_cancel_and_who_may_see_a_job(env: RetrievalEnv, node_a: node_support.RunningNode) -> None:
    job_id = _create(env, node_a)
    stranger = Requester("BE-HP-9", "Someone Else")
    with pytest.raises(JobNotFound):
        env.jobs.get(job_id, hp=stranger)
    with pytest.raises(JobNotFound):
        env.jobs.cancel(job_id, hp=stranger)
    assert env.jobs.list(hp=stranger) == []
    assert [j.id for j in env.jobs.list(hp=HP)] == [job_id]
    cancelled = env.jobs.cancel(job_id, hp=HP)
    assert cancelled.status == Status.CANCELLED and cancelled.finished_at is not None
    with pytest.raises(JobConflict):
        env.jobs.cancel(job_id, hp=HP)
    assert Retriever(env).run_only(job_id) is None  # nothing to run
    records = _b_audit(env, job_id)
    assert [r.details["status"] for r in records] == ["queued", "cancelled"]


def test_reconciliation_writes_bs_identifier_after_verifying_as_bytes(
    tmp_path: Path, node_a: node_support.RunningNode
) -> None:
    env = b_env(tmp_path / "b", node_a, reconcile=True)
    try:
        job_id = _create(env, node_a, studies=(STUDIES[0],), local_patient="BE-0042")
        assert Retriever(env).run_only(job_id) == Status.STORED
        job = env.jobs.get(job_id)
        store = env.store
        assert isinstance(store, FolderStore)
        files = list(store.files(STUDIES[0]))
    finally:
        env.close()
    assert not job.problems and job.instances_done == 2
    # Verified as A sent them: the sizes recorded are A's, the stored files are B's rewrite.
    assert job.bytes_done == job.bytes_total
    for path in files:
        ds = pydicom.dcmread(path)
        assert (ds.PatientID, ds.IssuerOfPatientID) == ("BE-0042", "2.16.56.1.1.1")
        [other] = ds.OtherPatientIDsSequence
        assert (other.PatientID, other.IssuerOfPatientID) == ("PAT100", node_support.ISSUER)
        assert ds.StudyInstanceUID == STUDIES[0]
        assert ds.SOPInstanceUID == path.stem and ds.SeriesInstanceUID == path.parent.name


def test_a_job_cancelled_while_it_starts_stops_before_downloading(
    env: RetrievalEnv, node_a: node_support.RunningNode
) -> None:
    peer = _peer(env)
    job_id = _create(env, node_a)

    def cancel_meanwhile(manifest: StudyManifest) -> StudyManifest:
        env.jobs.cancel(job_id, hp=HP)  # the HP cancels while the worker reads A's manifests
        return manifest

    peer.manifest_hook = cancel_meanwhile
    assert Retriever(env).run_only(job_id) == Status.CANCELLED
    job = env.jobs.get(job_id)
    assert [e.status for e in job.history] == ["queued", "downloading", "cancelled"]
    assert peer.calls["imaging_access"] == 0 and job.instances_done == 0
    assert job.finished_at is not None and job.cancel_requested
    assert [r.details["status"] for r in _b_audit(env, job_id)] == ["queued", "cancelled"]
