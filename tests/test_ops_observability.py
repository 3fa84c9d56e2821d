"""What an operator watches of a running ``ncp serve``: JSON log lines with request ids and
none of the patient's values, and Prometheus metrics that count what happened, after a full
request cycle of country B (identify, list, token, search, metadata, retrieve, refusals)."""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from ncp.ops.metrics import DatabaseCollector, Metrics
from ncp.store.db import migrate, session_factory
from tests.ops_node import ServedNode, served_node
from tests.support.node import PATIENTS, STUDIES, SYSTEM, studies_of

RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Cycle:
    node: ServedNode
    request_ids: dict[str, str]
    """Our X-Request-ID of each named step."""
    retrieved_bytes: int
    tokens_issued: int


@pytest.fixture(scope="module")
def cycle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cycle]:
    root = tmp_path_factory.mktemp("ops-cycle")
    with served_node(root, log_level="debug") as node:
        ids: dict[str, str] = {}

        def headers(step: str, patient: str | None = "PAT100") -> dict[str, str]:
            ids[step] = f"{step}-{uuid.uuid4().hex[:8]}"
            return node.b.headers(patient, request_id=ids[step])

        patient = PATIENTS["PAT100"]
        match = {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "resource",
                    "resource": {
                        "resourceType": "Patient",
                        "identifier": [{"system": SYSTEM, "value": "PAT100"}],
                        "name": [{"family": patient.family, "given": [patient.given]}],
                        "birthDate": patient.birth_date,
                    },
                }
            ],
        }
        with node.client() as http:
            assert http.get("/fhir/metadata").status_code == 200
            r = http.post("/fhir/Patient/$match", json=match, headers=headers("match", None))
            assert r.status_code == 200, r.text
            for rtype in ("ImagingStudy", "DocumentReference"):
                r = http.get(
                    f"/fhir/{rtype}",
                    params={"patient.identifier": f"{SYSTEM}|PAT100"},
                    headers=headers(f"list-{rtype}"),
                )
                assert r.status_code == 200, r.text
            # A path that names no route, carrying the patient's identifier.
            assert http.get("/fhir/Patient/PAT100/anything").status_code == 404
        studies = studies_of("PAT100")
        token = node.token("PAT100", studies)
        other = node.token("PAT101", studies_of("PAT101"))
        with node.client() as http:
            # A token asked for a study of another patient: refused when issued.
            refused = http.post(
                "/fhir/$imaging-access",
                json={
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "study", "valueString": studies_of("PAT101")[0]},
                        {"name": "option", "valueCode": "A"},
                        {"name": "purpose", "valueCode": "TREAT"},
                    ],
                },
                headers=headers("refused-token"),
            )
            assert refused.status_code in (403, 404, 422), refused.text
        retrieved = 0
        with httpx.Client(verify=node.context(), timeout=30) as http:
            bearer = {"Authorization": f"Bearer {token}"}
            assert http.get(f"{node.imaging}/studies", headers=bearer).status_code == 200
            meta = http.get(f"{node.imaging}/studies/{studies[0]}/metadata", headers=bearer)
            assert meta.status_code == 200
            for study in studies:
                answer = http.get(
                    f"{node.imaging}/studies/{study}", headers={**bearer, "Accept": RETRIEVE}
                )
                assert answer.status_code == 200
                retrieved += len(answer.content)
            # The other patient's token used for this patient's study: refused when used.
            wrong = {"Authorization": f"Bearer {other}"}
            assert (
                http.get(f"{node.imaging}/studies/{studies[0]}", headers=wrong).status_code == 403
            )
            assert http.get(f"{node.imaging}/studies", headers={}).status_code == 401
        yield Cycle(node, ids, retrieved, tokens_issued=2)


# -- logs -----------------------------------------------------------------------------------------


def _patient_values() -> list[str]:
    """Every value of the test patients the cycle touched: identifiers, names, birth dates,
    study UIDs (each also as its series and instances begin with it), accession numbers."""
    values: list[str] = []
    for pid in ("PAT100", "PAT101"):
        p = PATIENTS[pid]
        values += [pid, p.family, p.given]
        if p.birth_date:
            values += [p.birth_date, p.birth_date.replace("-", "")]
    for study in STUDIES.values():
        if study.patient_id in ("PAT100", "PAT101"):
            values += [study.uid, f"ACC{study.uid.rsplit('.', 2)[-2]}{study.uid[-1]}"]
    return values


def test_every_log_line_is_one_json_object(cycle: Cycle) -> None:
    records = cycle.node.log_records()  # json.loads of every line: one that is not JSON fails
    assert records
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= set(record)


def _found(values: list[str], text: str) -> list[str]:
    # As whole words: "Max" (a given name) is no leak in "Maximum number of open files".
    return [v for v in values if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w])", text)]


def test_a_full_request_cycle_logs_no_patient_data(cycle: Cycle) -> None:
    text = cycle.node.stderr.read_text(encoding="utf-8")
    assert len(text) > 2000  # the cycle was logged
    assert _found(_patient_values(), text) == [], "patient data in the log"


def test_each_request_is_logged_once_with_its_id_and_route(cycle: Cycle) -> None:
    requests = [r for r in cycle.node.log_records() if r["logger"] == "ncp.requests"]
    by_id = {r["request_id"]: r for r in requests}
    match = by_id[cycle.request_ids["match"]]
    assert (match["listener"], match["route"], match["status"]) == (
        "standard",
        "/fhir/Patient/$match",
        200,
    )
    assert by_id[cycle.request_ids["list-ImagingStudy"]]["route"] == "/fhir/ImagingStudy"
    routes = {(r["listener"], r["route"]) for r in requests}
    assert ("imaging", "/dicomweb/studies/{study}") in routes
    assert ("imaging", "/dicomweb/studies/{study}/metadata") in routes
    assert ("standard", "<unmatched>") in routes
    # A request without an id got one, the same in the log as in the answer's header.
    assert all(r["request_id"] not in ("", "-") for r in requests)


def test_the_answer_and_the_log_carry_the_same_generated_id(cycle: Cycle) -> None:
    with cycle.node.client() as http:
        answer = http.get("/fhir/metadata")
    rid = answer.headers["X-Request-ID"]
    logged = cycle.node.records_where(
        lambda r: r.get("request_id") == rid and r.get("logger") == "ncp.requests"
    )
    assert [r["route"] for r in logged] == ["/fhir/metadata"]


# -- metrics --------------------------------------------------------------------------------------


def _samples(node: ServedNode) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = node.ops_get("/metrics").text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())
    )


def test_the_documented_metrics_are_exposed(cycle: Cycle) -> None:
    answer = cycle.node.ops_get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = set(_samples(cycle.node))
    documented = Path(__file__).parents[1].joinpath("docs", "operations.md").read_text()
    for name in (
        "ncp_http_request_duration_seconds_bucket",
        "ncp_http_requests_in_flight",
        "ncp_audit_records_total",
        "ncp_image_bytes_streamed_total",
        "ncp_image_instances_streamed_total",
        "ncp_access_tokens_issued_total",
        "ncp_access_tokens_refused_total",
        "ncp_audit_chain_length",
        "process_resident_memory_bytes",
    ):
        assert name in names, name
    for family in (
        "ncp_http_request_duration_seconds",
        "ncp_http_requests_in_flight",
        "ncp_audit_records_total",
        "ncp_image_bytes_streamed_total",
        "ncp_image_instances_streamed_total",
        "ncp_access_tokens_issued_total",
        "ncp_access_tokens_refused_total",
        "ncp_audit_chain_length",
        "ncp_retrieval_jobs",
    ):
        assert f"`{family}`" in documented, f"{family} is not in docs/operations.md"


def test_the_metrics_count_what_happened(cycle: Cycle) -> None:
    samples = _samples(cycle.node)
    count = "ncp_http_request_duration_seconds_count"
    assert (
        _value(samples, count, listener="standard", route="/fhir/Patient/$match", status="200") == 1
    )
    assert (
        _value(samples, count, listener="imaging", route="/dicomweb/studies/{study}", status="200")
        == 2
    )
    assert (
        _value(samples, count, listener="imaging", route="/dicomweb/studies/{study}", status="403")
        == 1
    )
    assert _value(samples, count, listener="imaging", route="/dicomweb/studies", status="401") == 1
    assert (
        _value(samples, "ncp_access_tokens_issued_total", kind="issue", option="A")
        == cycle.tokens_issued
    )
    assert _value(samples, "ncp_access_tokens_refused_total", side="provider", stage="issue") == 1
    assert _value(samples, "ncp_access_tokens_refused_total", side="gateway", stage="use") == 2
    # Bytes as the gateway's audit records say, and the bodies the client read.
    with sqlite3.connect(cycle.node.root / "node.db") as db:
        audited = db.execute(
            "SELECT sum(size_bytes) FROM audit_record WHERE action = 'image-retrieve' AND "
            "side = 'gateway' AND outcome = 0 AND json_extract(details, '$.service') = 'WADO-RS'"
        ).fetchone()[0]
        chain = db.execute("SELECT seq FROM audit_chain_head").fetchone()[0]
    assert audited == cycle.retrieved_bytes
    streamed = _value(samples, "ncp_image_bytes_streamed_total", side="gateway")
    assert streamed >= cycle.retrieved_bytes  # plus the metadata answer
    assert _value(samples, "ncp_audit_chain_length") == chain
    assert _value(samples, "ncp_audit_records_total") == chain  # every record this process wrote


def test_no_raw_path_or_patient_value_reaches_a_label(cycle: Cycle) -> None:
    text = cycle.node.ops_get("/metrics").text
    assert _found(_patient_values(), text) == []


# -- the database's gauges ------------------------------------------------------------------------


def test_retrieval_jobs_are_read_from_the_database_by_state_and_lane(tmp_path: Path) -> None:
    from datetime import datetime

    from ncp.store.retrieval import RetrievalJob

    engine = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    migrate(engine)
    metrics = Metrics()
    metrics.watch_database(session_factory(engine))
    before = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert before["ncp_audit_chain_length"].samples[0].value == 0
    assert before["ncp_retrieval_jobs"].samples == []  # the table is there, empty
    # Jobs as country B's retrieval jobs keep them (ncp.store.retrieval).
    rows = [("queued", "batch")] * 3 + [("downloading", "emergency"), ("stored", "normal")]
    now = datetime(2026, 12, 6, 12, 0)
    with session_factory(engine).begin() as session:
        for i, (state, lane) in enumerate(rows):
            session.add(
                RetrievalJob(
                    id=str(i),
                    status=state,
                    priority=lane,
                    option="A",
                    peer="AT",
                    patient_system="urn:oid:1.2.3",
                    patient_value="P",
                    hp_id="HP",
                    hp_name="HP",
                    hp_source="portal",
                    request_id=f"job-{i}",
                    created_at=now,
                    updated_at=now,
                )
            )
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    got = {
        (s.labels["state"], s.labels["lane"]): s.value
        for s in families["ncp_retrieval_jobs"].samples
    }
    assert got == {("queued", "batch"): 3, ("downloading", "emergency"): 1, ("stored", "normal"): 1}
    engine.dispose()


def test_a_database_that_cannot_be_read_leaves_the_scrape_answering(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    collector = DatabaseCollector(session_factory(engine))
    assert list(collector.collect()) == []
    engine.dispose()
