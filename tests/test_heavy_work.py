"""CPU-heavy requests never freeze the node (issue 13, item 8): a large ``$validate`` runs off the
event loop while the list goes on answering, and a request over its budget (size, time, or all
slots busy) gets a defined answer with an OperationOutcome and an audit record.

No wall-clock thresholds: the list's answers are shown to arrive while the validation still
holds the validator, i.e. by ordering, which a loaded machine does not change.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ncp.audit.models import Outcome
from ncp.fhir.work import Busy, HeavyWork
from tests.support import node as node_support
from tests.support.node import PATIENTS, RunningNode, running_node

node_a = node_support.node_a

JSON = "application/fhir+json"


def big_bundle(entries: int) -> bytes:
    """A collection Bundle of ``entries`` Patients: valid, and slow to validate (about half a
    second per MiB on one core)."""
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                    "resource": {
                        "resourceType": "Patient",
                        "id": f"p{i}",
                        "name": [{"family": "Gruber", "given": ["Anna"]}],
                        "birthDate": "1980-05-17",
                        "gender": "female",
                    },
                }
                for i in range(entries)
            ],
        }
    ).encode("utf-8")


def _list(node: RunningNode, http: httpx.Client) -> httpx.Response:
    patient = PATIENTS["PAT100"].ref
    return http.get(
        "/fhir/ImagingStudy",
        params={"patient.identifier": f"{patient.system}|{patient.value}"},
        headers=node.b.headers("PAT100"),
    )


def test_the_list_answers_while_a_large_validation_runs(node_a: RunningNode) -> None:
    body = big_bundle(12_000)  # about 2.7 MB: a validation of seconds
    assert len(body) < node_a.node.settings.budget.validate_max_bytes
    lock = node_a.node.validator_lock
    done: dict[str, Any] = {}

    def validate() -> None:
        with node_a.client(timeout=300) as client:
            headers = {**node_a.b.headers(None), "Content-Type": JSON}
            done["answer"] = client.post("/fhir/$validate", content=body, headers=headers)

    worker = threading.Thread(target=validate)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not lock.locked():  # the validation has the validator: it is running now
            assert worker.is_alive() and time.monotonic() < deadline, done
            time.sleep(0.005)
        seen = []
        with node_a.client() as http:
            for _ in range(3):
                answer = _list(node_a, http)
                # Read right after each answer: was the validation still under way?
                seen.append((answer.status_code, lock.locked(), "answer" in done))
    finally:
        worker.join(timeout=300)
    assert [status for status, _, _ in seen] == [200, 200, 200]
    assert all(running and not finished for _, running, finished in seen), seen
    assert done["answer"].status_code == 200, done["answer"].text[:500]
    assert done["answer"].json()["resourceType"] == "OperationOutcome"


# --- over budget -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node whose budget a modest body exceeds: 512 KiB, and 50 ms of validation."""
    changes = {"budget": {"validate_max_bytes": 512 * 1024, "validate_time_s": 0.05}}
    with running_node(tmp_path_factory.mktemp("tight"), settings_changes=changes) as node:
        yield node


def _validate(node: RunningNode, body: bytes, path: str = "/fhir/$validate") -> tuple[Any, str]:
    rid = f"budget-{uuid.uuid4()}"
    with node.client(timeout=120) as http:
        headers = {**node.b.headers(None, request_id=rid), "Content-Type": JSON}
        return http.post(path, content=body, headers=headers), rid


@pytest.mark.parametrize("path", ["/fhir/$validate", "/fhir/Bundle/$validate"])
def test_a_body_over_the_size_budget_is_413_and_audited(tight: RunningNode, path: str) -> None:
    answer, rid = _validate(tight, big_bundle(4_000), path)  # about 900 KB
    assert answer.status_code == 413, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    [record] = tight.audit_records(rid)
    assert record.outcome == Outcome.SERIOUS_FAILURE and record.details["status"] == 413


def test_a_validation_over_the_time_budget_is_413_and_audited(tight: RunningNode) -> None:
    answer, rid = _validate(tight, big_bundle(2_000))  # about 450 KB: well over 50 ms
    assert answer.status_code == 413, answer.text
    outcome = answer.json()
    assert outcome["issue"][0]["code"] == "too-costly"
    assert "time budget" in outcome["issue"][0]["diagnostics"]
    [record] = tight.audit_records(rid)
    assert record.details["status"] == 413
    # The validator is free again for the next request.
    small, _ = _validate(tight, json.dumps({"resourceType": "Patient", "id": "p1"}).encode())
    assert small.status_code == 200


def test_ingest_over_the_time_budget_is_413_and_audited(tight: RunningNode) -> None:
    rid = f"budget-{uuid.uuid4()}"
    body = json.loads(big_bundle(2_000))
    body["type"] = "document"
    with tight.client("AT", timeout=120) as http:
        answer = http.post(
            "/fhir/Bundle",
            content=json.dumps(body).encode(),
            headers={"Content-Type": JSON, "X-Request-ID": rid},
        )
    assert answer.status_code == 413, answer.text
    [record] = tight.audit_records(rid)
    assert record.action == "ingest" and "time budget" in (record.reason or "")


# --- the slots ----------------------------------------------------------------------------------


def _holding(started: threading.Event, release: threading.Event) -> Any:
    def hold() -> bool:
        started.set()
        return release.wait(60)

    return hold


def test_heavy_work_refuses_beyond_its_slots_and_queue() -> None:
    work = HeavyWork(1, queue_timeout_s=60, retry_after_s=7)
    started, release = threading.Event(), threading.Event()

    async def scenario() -> list[Any]:
        running = asyncio.ensure_future(work.run(_holding(started, release)))
        waiting = asyncio.ensure_future(work.run(lambda: "second"))
        while work.pending < 2 or not started.is_set():
            await asyncio.sleep(0.001)
        with pytest.raises(Busy) as refused:  # one running, one waiting: no more
            await work.run(lambda: "third")
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "7"
        release.set()
        return [await running, await waiting]

    try:
        assert asyncio.run(scenario()) == [True, "second"]
        assert work.pending == 0
    finally:
        release.set()
        work.close()


def test_heavy_work_refuses_a_step_that_waited_past_its_queue_timeout() -> None:
    work = HeavyWork(1, queue_timeout_s=0.2, retry_after_s=3)
    started, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        first = asyncio.ensure_future(work.run(_holding(started, release)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        late = asyncio.ensure_future(work.run(lambda: "late"))
        while work.pending < 2:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)  # the queued step's turn comes after its queue timeout
        release.set()
        assert await first is True
        with pytest.raises(Busy):
            await late

    try:
        asyncio.run(scenario())
        assert work.pending == 0
    finally:
        release.set()
        work.close()


def test_heavy_work_settings_are_bounded(tmp_path: Path) -> None:
    from ncp.config import BudgetSection, settings_from_mapping
    from ncp.errors import ConfigError

    base = {"node": {"country": "AT"}, "archive": {"kind": "folder", "path": "a"}}
    assert BudgetSection().validate_max_bytes == 4 * 1024 * 1024
    for bad in ({"validate_max_bytes": 100 << 20}, {"validate_time_s": 0}, {"slots": 0}):
        with pytest.raises(ConfigError, match="budget"):
            settings_from_mapping({**base, "budget": bad}, base_dir=tmp_path, environ={})
