"""Country B's retrieval workers as a role of ``ncp serve`` (``[retrieval] enabled``): B's node as
the installed command runs it pulls a large study from node A (standard channel and option A
gateway over TLS, on Orthanc); SIGTERM in the middle hands the job back (queued, nothing lost),
and the next start resumes it where it was without fetching or storing anything twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from ncp.audit.models import AuditRecord
from ncp.config import load_settings
from ncp.consumer.jobs import JobRequest, Requester, Status
from ncp.consumer.localstore import FolderStore
from ncp.node import Node
from ncp.ops.runner import NamedWorker
from ncp.serve import ROLES, retrieval_role
from ncp.store.retrieval import RetrievedInstance
from tests.gateway_support import free_port
from tests.support.node import PATIENTS
from tests.support.retrieval_world import BIG, BIG_PER_SERIES, BIG_SERIES, World, make_world

pytestmark = [pytest.mark.orthanc, pytest.mark.filterwarnings("ignore::UserWarning:pydicom")]
HP = Requester("BE-HP-0042", "Dr. Anne Peeters")
BIG_COUNT = BIG_SERIES * BIG_PER_SERIES
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("serve-retrieval")) as made:
        yield made


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ServedB:
    """``ncp serve --config`` B's node: its standard channel and ops listener on free ports, the
    retrieval role switched on by the environment, as an operator may."""

    def __init__(self, config: Path, log: Path) -> None:
        (config.parent / "archive").mkdir(exist_ok=True)  # B's own (empty) archive
        self.ops = free_port()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NCP_LISTEN__STANDARD_PORT": str(free_port()),
            "NCP_LISTEN__OPS_PORT": str(self.ops),
            "NCP_RETRIEVAL__ENABLED": "true",
            # B's keys here are the test PKI's, which ncp serve accepts in the demo only.
            "NCP_NODE__DEMO": "true",
        }
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ncp", "serve", "--config", str(config)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_alive(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                answer = httpx.get(f"http://127.0.0.1:{self.ops}/healthz", timeout=2)
                if answer.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise


def test_the_retrieval_role_is_one_line_of_roles_and_off_unless_enabled(
    world: World, tmp_path: Path
) -> None:
    assert retrieval_role in ROLES
    b = world.b(tmp_path / "b")
    try:
        assert retrieval_role(b.node, "info") is None  # [retrieval] enabled defaults to false
        settings = load_settings(b.config, environ={**os.environ, "NCP_RETRIEVAL__ENABLED": "1"})
        assert settings.retrieval.enabled and settings.retrieval.cli_hp is not None
        node = Node.from_settings(settings)
        try:
            part = retrieval_role(node, "info")
            assert isinstance(part, NamedWorker) and part.name == "retrieval"
            part.worker.stop(5)  # never started: stopping closes its clients
        finally:
            node.close()
    finally:
        b.close()


def test_sigterm_hands_the_running_job_back_and_the_next_start_resumes_it(
    world: World, tmp_path: Path
) -> None:
    b = world.b(tmp_path / "b", connections_per_peer=2, poll_s=0.2)
    jobs = b.env.jobs
    log = tmp_path / "b-serve.log"
    try:
        job = jobs.create(HP, b.context(), JobRequest("AT", PATIENTS["PAT100"].ref, (BIG,)))
        served = ServedB(b.config, log)
        try:
            served.wait_alive()
            _wait(lambda: jobs.get(job.id).instances_done >= BIG_COUNT // 4, 180, "a quarter")
            assert served.stop(signal.SIGTERM) == 0, log.read_text()[-3000:]
        finally:
            if served.process.poll() is None:
                served.process.kill()
        handed_back = jobs.get(job.id)
        assert handed_back.status == Status.QUEUED, (handed_back.reason, log.read_text()[-3000:])
        assert handed_back.reason == "the worker stopped; the job resumes where it was"
        assert 0 < handed_back.instances_done < BIG_COUNT
        with jobs.sessions() as session:
            before = set(
                session.scalars(
                    select(RetrievedInstance.sop_uid).where(RetrievedInstance.job_id == job.id)
                )
            )
        assert len(before) == handed_back.instances_done

        # Transfers the first process began after the signal, while it wound down, are its
        # own: "again" is measured from the second start.
        restarted_at = jobs.now()
        again = ServedB(b.config, log)
        try:
            again.wait_alive()
            _wait(lambda: jobs.get(job.id).ended, 240, "the job to end")
        finally:
            assert again.stop(signal.SIGTERM) == 0, log.read_text()[-3000:]
        done = jobs.get(job.id)
        with jobs.sessions() as session:
            rows = session.scalars(
                select(RetrievedInstance.sop_uid).where(RetrievedInstance.job_id == job.id)
            ).all()
    finally:
        b.close()
    assert done.status == Status.STORED, (done.reason, log.read_text()[-3000:])
    assert done.instances_done == BIG_COUNT and not done.problems
    statuses = [e.status for e in done.history]
    assert statuses == ["queued", "downloading", "queued", "downloading", "verifying", "stored"]
    # Handed back, not lost: no worker had to wait out a lease to take it over.
    assert not [e for e in done.history if e.reason and "taken over" in e.reason]
    assert len(rows) == len(set(rows)) == BIG_COUNT
    assert len(list(FolderStore(tmp_path / "b" / "retrieved").files(BIG))) == BIG_COUNT
    # What B held when it stopped was never fetched from A again after the restart.
    fetched_after: set[str] = set()
    with world.node.node.sessions() as session:
        for record in session.scalars(
            select(AuditRecord)
            .where(AuditRecord.request_id == done.request_id)
            .where(AuditRecord.action == "image-retrieve")
        ):
            started = record.recorded - timedelta(milliseconds=record.duration_ms or 0)
            if started > restarted_at:
                fetched_after.update(record.details.get("instances") or [])
    assert fetched_after and not (fetched_after & before)
    assert "retrieval workers" in log.read_text() and "handing back" in log.read_text()
