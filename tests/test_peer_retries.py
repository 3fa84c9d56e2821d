"""Retries, timeouts and unusable answers, against a scripted peer over real mutual TLS
(:class:`tests.support.country_b.FakePeer`, country LU on B's trust list): transient failures
(connection refused, 503 with or without Retry-After) are tried again within the budget; 4xx,
500, a slow answer and a redirect are not; what B cannot use is refused typed and audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from ncp.audit.models import Outcome
from ncp.consumer.channel import retry_after_seconds
from ncp.consumer.model import PeerAnswerInvalid, PeerContext, PeerRefused, PeerUnreachable
from ncp.consumer.peer import PeerClient
from ncp.consumer.results import PatientQuery
from ncp.node import Node
from ncp.security.claims import PatientRef
from ncp.security.mtls import bind
from tests.support import node as node_support
from tests.support.country_b import (
    HP,
    FakePeer,
    Scripted,
    Sleeps,
    b_node,
    b_records,
    fake_peer,
)
from tests.support.node import RunningNode

node_a = node_support.node_a  # B's trust list names A as well; these tests ask only LU
LU = "LU"
PATIENT = PatientRef("urn:oid:1.2.442.0.1", "LU-1")
CANDIDATE = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 1,
    "entry": [
        {
            "resource": {
                "resourceType": "Patient",
                "identifier": [PATIENT.to_json()],
                "name": [{"family": "Weber", "given": ["Jana"]}],
                "birthDate": "1990-01-01",
            },
            "search": {
                "mode": "match",
                "score": 0.7,
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/match-grade",
                        "valueCode": "probable",
                    }
                ],
            },
        }
    ],
}


def refusal(text: str, code: str = "processing") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory, node_a: RunningNode) -> Iterator[FakePeer]:
    with fake_peer(tmp_path_factory.mktemp("lu"), LU, node_a.b.keys_dir / "ca.pem") as running:
        yield running


@pytest.fixture(scope="module")
def b(
    node_a: RunningNode, fake: FakePeer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    made = b_node(
        tmp_path_factory.mktemp("b-retries"),
        node_a,
        extra_peers={LU: fake.trust_entry()},
        consumer={"timeout_s": 0.5, "retry_after_max_s": 5, "backoff_s": 0.01, "attempts": 4},
    )
    yield made
    made.close()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(b: Node, sleeps: Sleeps, fake: FakePeer) -> Iterator[PeerClient]:
    fake.script.clear()
    fake.received.clear()
    c = PeerClient.from_node(b, sleep=sleeps)
    yield c
    c.close()


def ask(client: PeerClient, request_id: str) -> Any:
    hp = client.hp_assertion(LU, HP)
    return client.match(LU, hp, PatientQuery(PATIENT), request_id=request_id)


def test_503_with_retry_after_is_tried_again_after_the_wait(
    client: PeerClient, fake: FakePeer, sleeps: Sleeps, b: Node
) -> None:
    fake.script += [
        Scripted(503, refusal("busy"), {"Retry-After": "2"}),
        Scripted(200, CANDIDATE),
    ]
    result = ask(client, "retry-503")
    assert result.outcome == "probable" and result.candidates[0].patient == PATIENT
    assert sleeps.calls == [2.0]
    assert len(fake.received) == 2
    # One exchange: both tries carry the same correlation id.
    assert {r.headers["X-Request-ID"] for r in fake.received} == {"retry-503"}
    [record] = b_records(b, "retry-503")
    assert record.outcome == Outcome.SUCCESS
    assert (record.details["attempts"], record.details["waited_s"]) == (2, 2.0)


@pytest.mark.parametrize(
    ("header", "wait"),
    [
        ("1000", 5.0),  # cut at retry_after_max_s
        ("0", 0.0),
        (None, 0.01),  # no Retry-After: the back-off
        ("soon", 0.01),  # unreadable: the back-off
    ],
)
def test_the_wait_is_the_peers_within_the_cap(
    client: PeerClient, fake: FakePeer, sleeps: Sleeps, header: str | None, wait: float
) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    fake.script += [Scripted(503, refusal("busy"), headers), Scripted(200, CANDIDATE)]
    ask(client, "retry-cap")
    assert sleeps.calls == [wait]


def test_an_http_date_retry_after_is_read() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_after_seconds(later, now) == 7.0
    assert retry_after_seconds(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("-1") is None and retry_after_seconds(None) is None


def test_503_beyond_the_budget_reaches_the_caller_with_a_text(
    client: PeerClient, fake: FakePeer, sleeps: Sleeps, b: Node
) -> None:
    fake.script.append(Scripted(503, refusal("archive unavailable"), {"Retry-After": "1"}))
    with pytest.raises(PeerRefused) as refused:
        ask(client, "retry-spent")
    assert (refused.value.status, refused.value.diagnostics) == (503, "archive unavailable")
    assert len(fake.received) == 4 and sleeps.calls == [1.0, 1.0, 1.0]
    [record] = b_records(b, "retry-spent")
    assert record.outcome == Outcome.MAJOR_FAILURE and record.details["attempts"] == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500])
def test_other_refusals_are_never_retried(
    client: PeerClient, fake: FakePeer, sleeps: Sleeps, b: Node, status: int
) -> None:
    fake.script.append(Scripted(status, refusal(f"refused with {status}", "invalid")))
    rid = f"no-retry-{status}"
    with pytest.raises(PeerRefused) as refused:
        ask(client, rid)
    assert refused.value.status == status and refused.value.code == "invalid"
    assert refused.value.diagnostics == f"refused with {status}"
    assert len(fake.received) == 1 and sleeps.calls == []
    [record] = b_records(b, rid)
    assert record.reason == f"refused with {status}" and record.details["status"] == status
    expected = {401: 8, 403: 8, 500: 12}.get(status, 4)
    assert record.outcome == expected


def test_a_refusal_without_operation_outcome_still_says_what_happened(
    client: PeerClient, fake: FakePeer
) -> None:
    fake.script.append(Scripted(403, b"<html>Forbidden</html>"))
    with pytest.raises(PeerRefused, match="HTTP 403 without an OperationOutcome"):
        ask(client, "bare-403")


def test_a_redirect_is_not_followed(client: PeerClient, fake: FakePeer) -> None:
    fake.script.append(Scripted(302, b"", {"Location": "https://elsewhere.example/fhir"}))
    with pytest.raises(PeerRefused) as refused:
        ask(client, "redirect")
    assert refused.value.status == 302 and len(fake.received) == 1


def test_a_slow_answer_is_not_retried(
    client: PeerClient, fake: FakePeer, sleeps: Sleeps, b: Node
) -> None:
    fake.script += [Scripted(200, CANDIDATE, delay_s=1.5), Scripted(200, CANDIDATE)]
    with pytest.raises(PeerUnreachable, match="ReadTimeout"):
        ask(client, "slow")
    assert len(fake.received) == 1 and sleeps.calls == []
    [record] = b_records(b, "slow")
    assert record.outcome == Outcome.MAJOR_FAILURE


def test_an_answer_that_is_not_fhir_is_refused_and_audited(
    client: PeerClient, fake: FakePeer, b: Node
) -> None:
    fake.script.append(Scripted(200, b"not FHIR at all"))
    with pytest.raises(PeerAnswerInvalid, match="not FHIR"):
        ask(client, "not-fhir")
    [record] = b_records(b, "not-fhir")
    assert record.outcome == Outcome.MAJOR_FAILURE and record.details["status"] == 200


def test_a_peer_that_cannot_be_reached_is_tried_within_the_budget(
    node_a: RunningNode, fake: FakePeer, tmp_path: Path
) -> None:
    sock = bind()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    entry = {**fake.trust_entry(), "standard": f"https://localhost:{port}/fhir"}
    node = b_node(tmp_path / "b", node_a, extra_peers={LU: entry}, consumer={"backoff_s": 0.25})
    sleeps = Sleeps()
    try:
        with (
            PeerClient.from_node(node, sleep=sleeps) as c,
            pytest.raises(PeerUnreachable, match="after 4 tries") as failed,
        ):
            ask(c, "down")
        assert failed.value.peer == LU
        assert sleeps.calls == [0.25, 0.5, 1.0]
        [record] = b_records(node, "down")
        assert record.outcome == Outcome.MAJOR_FAILURE and "after 4 tries" in (record.reason or "")
    finally:
        node.close()


# --- lists B must not trust blindly ---------------------------------------------------------------


def _context(client: PeerClient) -> PeerContext:
    return client.context(LU, HP, PATIENT, purpose="TREAT", informed=True)


def _page(entries: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 2,
        "link": [{"relation": "self", "url": "x"}],
        "entry": entries,
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def _manifest_entry(uid: str, patient: PatientRef = PATIENT) -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "DocumentReference",
            "id": "m" + uid.replace(".", ""),
            "status": "current",
            "subject": {"identifier": patient.to_json()},
            "content": [
                {
                    "attachment": {"url": "https://x/ImagingStudy/1"},
                    "format": {"code": "urn:ihe:rad:MADO:fhir-manifest:2026"},
                }
            ],
            "context": {
                "related": [
                    {
                        "type": "ImagingStudy",
                        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
                    }
                ]
            },
        },
        "search": {"mode": "match"},
    }


def test_a_next_link_to_another_server_is_refused(
    client: PeerClient, fake: FakePeer, b: Node
) -> None:
    fake.script.append(
        Scripted(200, _page([_manifest_entry("1.2.3.4")], "https://evil.example/fhir/x"))
    )
    with pytest.raises(PeerAnswerInvalid, match="not under"):
        client.metadata_list(_context(client), request_id="evil-next")
    assert len(fake.received) == 1
    [record] = b_records(b, "evil-next")
    assert record.outcome == Outcome.MAJOR_FAILURE


def test_a_next_link_that_goes_round_is_refused(client: PeerClient, fake: FakePeer) -> None:
    again = f"{fake.url}/DocumentReference?page=2"
    fake.script += [
        Scripted(200, _page([_manifest_entry("1.2.3.4")], again)),
        Scripted(200, _page([_manifest_entry("1.2.3.5")], again)),
    ]
    with pytest.raises(PeerAnswerInvalid, match="goes round"):
        client.metadata_list(_context(client))
    assert len(fake.received) == 2


def test_a_list_entry_about_another_patient_is_refused(client: PeerClient, fake: FakePeer) -> None:
    other = PatientRef(PATIENT.system, "LU-2")
    fake.script.append(Scripted(200, _page([_manifest_entry("1.2.3.4", other)])))
    with pytest.raises(PeerAnswerInvalid, match="another patient"):
        client.metadata_list(_context(client))


def test_pages_of_the_fake_peer_are_followed(client: PeerClient, fake: FakePeer) -> None:
    fake.script += [
        Scripted(200, _page([_manifest_entry("1.2.3.4")], f"{fake.url}/DocumentReference?p=2")),
        Scripted(200, _page([_manifest_entry("1.2.3.5")])),
    ]
    listed = client.metadata_list(_context(client))
    assert [s.study_uid for s in listed.studies] == ["1.2.3.4", "1.2.3.5"]
    assert fake.received[1].path == "/fhir/DocumentReference?p=2"
    # Every page carries the pair and the same correlation id.
    assert len({r.headers["X-Request-ID"] for r in fake.received}) == 1
    assert all("NCP-Treatment-Relationship" in r.headers for r in fake.received)
