"""The retrieval jobs' JSON API (what the portal calls) and the retention purge, around a real
node A. The HP identity is the API's explicit dependency: here a test header stands in for the
portal's session."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import Requester, Status
from ncp.consumer.jobs_api import router
from ncp.consumer.localstore import FolderStore
from ncp.consumer.model import PeerContext
from ncp.consumer.purge import purge_expired
from ncp.consumer.worker import Retriever
from ncp.security.claims import PatientRef
from tests.support import node as node_support
from tests.support.peer_stub import b_env, sign_context

node_a = node_support.node_a
DOCTORS = {"anne": Requester("BE-HP-1", "Dr. Anne"), "bart": Requester("BE-HP-2", "Dr. Bart")}
STUDIES = node_support.studies_of("PAT100")
PATIENT = node_support.PATIENTS["PAT100"].ref


@pytest.fixture
def env(tmp_path: Path, node_a: node_support.RunningNode) -> Iterator[RetrievalEnv]:
    made = b_env(tmp_path / "b", node_a)
    yield made
    made.close()


@pytest.fixture
def api(env: RetrievalEnv, node_a: node_support.RunningNode) -> Iterator[TestClient]:
    confirmed = {("anne", PATIENT), ("bart", PATIENT)}

    def current_hp(request: Request) -> Requester:
        who = request.headers.get("x-test-hp", "")
        if who not in DOCTORS:
            raise HTTPException(401, "log in first")
        return DOCTORS[who]

    def confirmation(
        request: Request, hp: Requester, peer: str, patient: PatientRef
    ) -> PeerContext | None:
        who = request.headers["x-test-hp"]
        return sign_context(node_a) if (who, patient) in confirmed else None

    app = FastAPI()
    app.include_router(router(env.jobs, current_hp, confirmation), prefix="/api/retrieval")
    with TestClient(app) as client:
        yield client


def _body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "peer": "AT",
        "patient": {"system": PATIENT.system, "value": PATIENT.value},
        "studies": STUDIES,
        "option": "A",
        "priority": "normal",
    }
    body.update(changes)
    return body


def test_an_hp_creates_follows_and_reads_a_job(api: TestClient, env: RetrievalEnv) -> None:
    anne = {"x-test-hp": "anne"}
    r = api.post("/api/retrieval/jobs", json=_body(), headers=anne)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["hp"] == {
        "id": "BE-HP-1",
        "name": "Dr. Anne",
        "source": "portal",
    }
    assert [s["study_uid"] for s in job["studies"]] == STUDIES
    assert Retriever(env).run_only(job["id"]) == Status.STORED
    progress = api.get(f"/api/retrieval/jobs/{job['id']}/progress", headers=anne).json()
    assert progress["status"] == "stored"
    assert progress["progress"]["instances_done"] == progress["progress"]["instances_total"] == 3
    full = api.get(f"/api/retrieval/jobs/{job['id']}", headers=anne).json()
    history = [h["status"] for h in full["history"]]
    assert history == ["queued", "downloading", "verifying", "stored"]
    assert full["purge_at"] and all(s["purge_at"] for s in full["studies"])
    listed = api.get("/api/retrieval/jobs", headers=anne).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and "history" not in listed[0]
    stored = api.get("/api/retrieval/jobs?status=stored", headers=anne).json()["jobs"]
    assert len(stored) == 1
    assert api.get("/api/retrieval/jobs?status=failed", headers=anne).json()["jobs"] == []
    conflict = api.post(f"/api/retrieval/jobs/{job['id']}/cancel", headers=anne)
    assert conflict.status_code == 409 and conflict.json()["error"] == "conflict"


def test_an_hp_never_sees_another_hps_job(api: TestClient) -> None:
    job = api.post("/api/retrieval/jobs", json=_body(), headers={"x-test-hp": "anne"}).json()
    bart = {"x-test-hp": "bart"}
    for method, path in (
        ("GET", f"/api/retrieval/jobs/{job['id']}"),
        ("GET", f"/api/retrieval/jobs/{job['id']}/progress"),
        ("POST", f"/api/retrieval/jobs/{job['id']}/cancel"),
        ("POST", f"/api/retrieval/jobs/{job['id']}/confirmation"),
    ):
        r = api.request(method, path, headers=bart)
        assert r.status_code == 404 and r.json()["error"] == "not-found", (method, path)
    assert api.get("/api/retrieval/jobs", headers=bart).json()["jobs"] == []
    # Still queued: Bart's cancel changed nothing.
    mine = api.get(f"/api/retrieval/jobs/{job['id']}", headers={"x-test-hp": "anne"}).json()
    assert mine["status"] == "queued"
    r = api.post(f"/api/retrieval/jobs/{job['id']}/cancel", headers={"x-test-hp": "anne"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_the_api_refuses_what_it_cannot_do(api: TestClient) -> None:
    anne = {"x-test-hp": "anne"}
    assert api.get("/api/retrieval/jobs").status_code == 401
    assert api.post("/api/retrieval/jobs", json=_body()).status_code == 401
    other = {"system": PATIENT.system, "value": "PAT101"}
    r = api.post("/api/retrieval/jobs", json=_body(patient=other), headers=anne)
    assert r.status_code == 409 and r.json()["error"] == "confirmation-required"
    for bad in (
        _body(studies=["1.2.3", "../x"]),
        _body(studies=[]),
        _body(option="B"),
        _body(priority="urgent"),
        _body(peer="at"),
        _body(extra="field"),
    ):
        r = api.post("/api/retrieval/jobs", json=bad, headers=anne)
        assert r.status_code == 422, bad
    assert api.get("/api/retrieval/jobs/nope", headers=anne).status_code == 404


def test_retention_purges_expired_studies_audited(env: RetrievalEnv, api: TestClient) -> None:
    anne = {"x-test-hp": "anne"}
    job = api.post("/api/retrieval/jobs", json=_body(), headers=anne).json()
    assert Retriever(env).run_only(job["id"]) == Status.STORED
    store = env.store
    assert isinstance(store, FolderStore)
    assert all(store.existing(uid) for uid in STUDIES)
    nothing = purge_expired(env, now=env.now() + timedelta(days=29))
    assert nothing.studies == [] and all(store.existing(uid) for uid in STUDIES)
    done = purge_expired(env, now=env.now() + timedelta(days=31))
    assert sorted(done.studies) == sorted(STUDIES) and done.instances == 3
    assert done.jobs == [job["id"]]
    assert all(store.existing(uid) == set() for uid in STUDIES)
    after = api.get(f"/api/retrieval/jobs/{job['id']}", headers=anne).json()
    assert after["status"] == "purged" and after["history"][-1]["status"] == "purged"
    assert all(s["purged_at"] for s in after["studies"])
    with env.sessions() as session:
        purges = session.scalars(
            select(AuditRecord).where(AuditRecord.action == "image-purge")
        ).all()
    assert sorted(r.studies[0] for r in purges) == sorted(STUDIES)
    assert all(r.outcome == 0 and r.patient_id == "PAT100" for r in purges)
    # Run again: nothing left to purge.
    assert purge_expired(env, now=env.now() + timedelta(days=40)).studies == []
