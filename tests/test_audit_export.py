"""Audit records as FHIR AuditEvents (IHE BALP style): the mapping, and that every export is a
valid R4 resource (fhir.resources R4B model) conforming to the ncp-auditevent profile."""

from __future__ import annotations

import base64
import io
import itertools
import json
from datetime import timedelta
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ncp.audit.export import (
    EVENT_TYPES,
    JTI_PREFIX,
    PROFILE,
    audit_event,
    collection,
    event_type,
    export_events,
    validated,
    write_ndjson,
)
from ncp.audit.models import Action, AuditRecord, Side
from ncp.audit.record import AuditEvent
from ncp.fhir.canonical import structure_definition
from tests.audit_support import PATIENT_ID, T0, fill, sample_event, sparse_event

try:
    from ncp.validation.engine import Validator
except ImportError:  # pragma: no cover - the validator is built alongside
    Validator = None  # type: ignore[assignment,misc]


def _exported(engine: Engine, events: list[AuditEvent]) -> list[dict[str, Any]]:
    fill(engine, events)
    with Session(engine) as session:
        return list(export_events(session))


def _profile_errors(resource: dict[str, Any]) -> list[str]:
    if Validator is None:  # pragma: no cover
        return []
    issues = Validator.default().validate(resource)
    return [f"{i.expression}: {i.diagnostics}" for i in issues if i.is_error]


ALL_STEPS = [
    sample_event(i, action=action, side=side)
    for i, (action, side) in enumerate(itertools.product(Action, Side))
]


def test_every_step_on_every_side_exports_a_valid_auditevent(engine: Engine) -> None:
    sparse = [
        sparse_event(i, action=a, side=s)
        for i, (a, s) in enumerate(itertools.product(Action, Side))
    ]
    resources = _exported(engine, ALL_STEPS + sparse)
    assert len(resources) == len(ALL_STEPS) + len(sparse)
    for resource in resources:
        validated(resource)
        assert resource["meta"]["profile"] == [structure_definition("ncp-auditevent")]
        assert _profile_errors(resource) == [], resource["id"]


def test_the_profile_is_the_one_in_profiles() -> None:
    assert PROFILE == "https://ncp.example/fhir/StructureDefinition/ncp-auditevent"


@pytest.mark.parametrize(
    ("action", "side", "code", "verb", "subtype"),
    [
        ("hp-login", "consumer", "110114", "E", "110122"),
        ("patient-identify", "provider", "110112", "E", "search-type"),
        ("trc-confirm", "consumer", "110110", "C", None),
        ("trc-confirm", "provider", "110110", "E", None),
        ("list-query", "consumer", "110112", "E", "search-type"),
        ("report-read", "provider", "110106", "R", "read"),
        ("report-read", "consumer", "110107", "C", "read"),
        ("access-token-issue", "provider", "rest", "E", "operation"),
        ("access-token-renew", "provider", "rest", "E", "operation"),
        ("image-retrieve", "gateway", "110106", "R", None),
        ("image-retrieve", "edge", "110106", "R", None),
        ("image-retrieve", "consumer", "110107", "C", None),
        ("image-store", "consumer", "110104", "C", None),
        ("viewer-launch", "viewer", "110103", "R", None),
        ("ingest", "provider", "110110", "C", "create"),
        ("refusal", "provider", "110113", "E", None),
    ],
)
def test_type_action_and_subtype(
    action: str, side: str, code: str, verb: str, subtype: str | None
) -> None:
    resource = audit_event(_record(sample_event(action=action, side=side, interaction=None)))
    assert resource["type"]["code"] == code
    assert resource["action"] == verb
    assert [c["code"] for c in resource.get("subtype", [])] == ([subtype] if subtype else [])


def test_a_records_own_interaction_wins() -> None:
    event = sample_event(action="report-read", interaction="history-instance")
    assert audit_event(_record(event))["subtype"][0]["code"] == "history-instance"


def test_every_step_has_a_type_on_every_side() -> None:
    for action, side in itertools.product(Action, Side):
        assert event_type(action, side) is not None
    assert {a for a, _ in EVENT_TYPES} == set(Action)


def _record(event: AuditEvent, seq: int = 7) -> AuditRecord:
    values = event.columns()
    return AuditRecord(
        seq=seq,
        recorded=T0,
        prev_hash="0" * 64,
        hash="a" * 64,
        **values,
    )


def test_the_professional_is_the_requesting_user_with_the_token_as_policy() -> None:
    resource = audit_event(_record(sample_event(3)))
    user = resource["agent"][0]
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert user["requestor"] is True
    assert user["who"]["identifier"]["value"] == "hp-3"
    assert user["who"]["identifier"]["assigner"]["identifier"]["value"] == "BE"
    assert user["name"] == user["who"]["display"] == "Dr. Anna Schmidt"
    assert user["role"] == [{"text": "radiologist"}]
    assert user["policy"] == [f"{JTI_PREFIX}jti-3"] == ["urn:ietf:params:oauth:jti:jti-3"]
    assert user["location"] == {"display": "Emergency department"}
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    org = resource["agent"][1]
    assert org["who"] == {"identifier": {"value": "1.2.3.4.5"}, "display": "Hôpital Erasme"}
    assert sum(a["requestor"] for a in resource["agent"]) == 1


@pytest.mark.parametrize(
    ("side", "client", "server"), [("provider", "BE", "AT"), ("consumer", "AT", "BE")]
)
def test_the_nodes_are_source_and_destination_of_the_request(
    side: str, client: str, server: str
) -> None:
    resource = audit_event(_record(sample_event(side=side)))
    roles = {
        a["type"]["coding"][0]["code"]: a["who"]["identifier"]["value"]
        for a in resource["agent"]
        if a["who"].get("identifier", {}).get("system") == "urn:iso:std:iso:3166"
    }
    assert roles == {"110153": client, "110152": server}
    assert resource["source"]["site"] == "AT"
    assert resource["source"]["type"][0]["code"] == "4"


def test_a_node_without_a_professional_requests_with_the_token() -> None:
    resource = audit_event(
        _record(
            sparse_event(
                action="image-retrieve", side="consumer", peer_country="AT", token_jti="t-1"
            )
        )
    )
    client = resource["agent"][0]
    assert client["type"]["coding"][0]["code"] == "110153"
    assert client["requestor"] is True and client["policy"] == [f"{JTI_PREFIX}t-1"]


def test_a_local_step_names_this_node_as_the_application() -> None:
    resource = audit_event(_record(sparse_event()))
    assert [a["type"]["coding"][0]["code"] for a in resource["agent"]] == ["110150"]


def test_entities_patient_query_studies_and_correlation_id() -> None:
    event = sample_event(4, outcome=8, reason="token expired")
    resource = audit_event(_record(event, seq=42))
    patient, query, *studies, exchange = resource["entity"]
    assert patient["what"]["identifier"] == {
        "value": PATIENT_ID,
        "system": "urn:oid:1.2.40.0.10.1.4.3.1",
    }
    assert (patient["type"]["code"], patient["role"]["code"]) == ("1", "1")
    assert (query["type"]["code"], query["role"]["code"]) == ("2", "24")
    assert base64.b64decode(query["query"]).decode() == event.query
    assert [s["what"]["identifier"]["value"] for s in studies] == [
        f"urn:oid:{uid}" for uid in event.studies
    ]
    assert all(s["what"]["identifier"]["system"] == "urn:dicom:uid" for s in studies)
    assert exchange["what"]["identifier"]["value"] == "req-4"
    assert exchange["type"]["code"] == "XrequestId"
    detail = {d["type"]: d["valueString"] for d in exchange["detail"]}
    assert detail["chain-seq"] == "42" and detail["chain-hash"] == "a" * 64
    assert detail["instances"] == "424" and detail["bytes"] == str(5 * 2**31 + 4)
    assert detail["option"] == "A" and detail["priority"] == "urgent"
    assert json.loads(detail["details"]) == event.details
    assert (resource["outcome"], resource["outcomeDesc"]) == ("8", "token expired")
    assert resource["recorded"] == "2024-05-06T07:08:09.123Z"
    assert resource["period"]["start"] == "2024-05-06T07:08:09.019Z"  # 104 ms before


def test_an_issuer_that_is_not_a_uri_becomes_the_assigner() -> None:
    resource = audit_event(_record(sample_event(patient_issuer="HOSP A")))
    identifier = resource["entity"][0]["what"]["identifier"]
    assert identifier == {"value": PATIENT_ID, "assigner": {"display": "HOSP A"}}
    validated(resource)


def test_the_narrative_names_no_patient() -> None:
    resource = audit_event(_record(sample_event()))
    assert PATIENT_ID not in resource["text"]["div"] and "req-0" in resource["text"]["div"]


def test_since_selects_by_recorded_time(engine: Engine) -> None:
    fill(engine, [sparse_event(i) for i in range(5)])  # T0, T0+1ms, ...
    with Session(engine) as session:
        later = list(export_events(session, since=T0 + timedelta(milliseconds=3)))
        ids = [r["id"] for r in later]
        total = session.scalar(select(AuditRecord.seq).order_by(AuditRecord.seq.desc()))
    assert ids == ["audit-be-4", "audit-be-5"] and total == 5


def test_ndjson_and_bundle(engine: Engine) -> None:
    resources = _exported(engine, [sample_event(1), sparse_event(2)])
    out = io.StringIO()
    assert write_ndjson(resources, out) == 2
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["audit-at-1", "audit-be-2"]
    bundle = collection(resources, timestamp=T0)
    assert bundle["type"] == "collection" and len(bundle["entry"]) == 2
    assert len({e["fullUrl"] for e in bundle["entry"]}) == 2
    Bundle.model_validate(bundle)
    assert _profile_errors(bundle) == []
