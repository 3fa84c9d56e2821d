"""Attacks on a running node A, over real HTTPS with client certificates: each is refused with
the right status and an OperationOutcome naming the rule that failed, AND leaves an audit
record in A's chain. A step whose audit record cannot be written is not carried out."""

from __future__ import annotations

import hashlib
import hmac
import json
import string
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import sessionmaker

from ncp.audit.models import AuditRecord, Outcome
from ncp.audit.record import Auditor
from ncp.security.tokens import MAX_TOKEN_CHARS
from ncp.store.db import make_engine
from tests.support import node as node_support
from tests.support.node import RunningNode, studies_of
from tests.support.token_factory import b64, encode_json, header_for, new_key, parts, sign_raw

node_a = node_support.node_a

MATCH = {
    "resourceType": "Parameters",
    "parameter": [
        {
            "name": "resource",
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": node_support.SYSTEM, "value": "PAT100"}],
            },
        }
    ],
}


@pytest.fixture()
def http(node_a: RunningNode) -> Iterator[httpx.Client]:
    with node_a.client() as client:
        yield client


def refused(
    node: RunningNode,
    answer: httpx.Response,
    status: int,
    rule: str,
    *,
    says: str = "",
) -> AuditRecord:
    """The answer is a refusal with ``status`` and an OperationOutcome, and the node audited it
    under the request's id with ``rule``."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = outcome["issue"][0]["diagnostics"]
    assert says in diagnostics
    if status == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    [record] = node.audit_records(answer.headers["x-request-id"])
    assert (record.action, record.side, record.outcome) == (
        "refusal",
        "provider",
        Outcome.SERIOUS_FAILURE,
    )
    assert record.details["rule"] == rule and record.details["status"] == status
    assert record.reason == diagnostics
    return record


def match(http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return http.post("/fhir/Patient/$match", json=MATCH, headers=headers)


def bearer(node: RunningNode, token: str) -> dict[str, str]:
    headers = node.b.headers(None)
    headers["Authorization"] = f"Bearer {token}"
    return headers


# --- refused during the TLS handshake: no HTTP answer, an audit record ---------------------------


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("none", "no client certificate"),
        ("FR", "unable to get local issuer certificate"),
        ("BE expired", "certificate has expired"),
    ],
)
def test_handshake_refusals_are_audited(node_a: RunningNode, who: str, reason: str) -> None:
    before = node_a.last_seq()
    with node_a.client(who) as client, pytest.raises(httpx.TransportError):
        client.get("/fhir/metadata")
    [record] = node_a.wait_for_audit(lambda r: r.action == "refusal", after=before)
    assert record.outcome == Outcome.SERIOUS_FAILURE
    assert record.reason is not None and reason in record.reason
    assert record.details["stage"] == "handshake"


def test_the_nodes_own_certificate_is_no_peer(node_a: RunningNode) -> None:
    # A national system's certificate gets through the handshake (ingest needs it) but is not
    # a peer: it cannot ask for patients.
    with node_a.client("AT") as client:
        answer = match(client, node_a.b.headers(None))
    refused(node_a, answer, 403, "MutualTls", says="no peer's CA")


# --- the HP identity assertion -------------------------------------------------------------------


def test_no_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    headers = node_a.b.headers(None)
    del headers["Authorization"]
    refused(node_a, match(http, headers), 401, "MissingAssertion", says="Authorization")


def test_another_scheme_than_bearer(node_a: RunningNode, http: httpx.Client) -> None:
    headers = node_a.b.headers(None)
    headers["Authorization"] = "Basic YWxpY2U6c2VjcmV0"
    refused(node_a, match(http, headers), 401, "MissingAssertion", says="malformed")


def test_assertions_of_another_country_than_the_tls_peer(
    node_a: RunningNode, http: httpx.Client
) -> None:
    # DE is trusted, but the connection is BE's: BE may not present DE's assertions.
    record = refused(
        node_a,
        match(http, bearer(node_a, node_a.other.hp_assertion())),
        403,
        "CountryMismatch",
        says="'DE'",
    )
    assert record.peer_country == "BE"
    # ...nor DE's connection BE's.
    with node_a.client("DE") as de:
        refused(node_a, match(de, node_a.b.headers(None)), 403, "CountryMismatch")


def test_an_issuer_that_is_not_the_peer(node_a: RunningNode, http: httpx.Client) -> None:
    token = node_a.b.hp_assertion(issuer="LU")  # signed by B's key, claiming another issuer
    refused(node_a, match(http, bearer(node_a, token)), 403, "CountryMismatch", says="'LU'")


def test_expired_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    token = node_a.b.hp_assertion(now=datetime.now(UTC) - timedelta(hours=2))
    record = refused(node_a, match(http, bearer(node_a, token)), 401, "Expired", says="expired")
    assert record.token_jti is not None  # the signature verified: the jti may be quoted


def test_not_yet_valid_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    token = node_a.b.hp_assertion(now=datetime.now(UTC) + timedelta(minutes=10))
    refused(node_a, match(http, bearer(node_a, token)), 401, "NotYetValid", says="future")


def test_assertion_for_another_audience(node_a: RunningNode, http: httpx.Client) -> None:
    token = node_a.b.hp_assertion(audience=node_a.url + "/")  # one character off
    refused(node_a, match(http, bearer(node_a, token)), 401, "WrongAudience", says="not for")


def test_unknown_key_id(node_a: RunningNode, http: httpx.Client) -> None:
    token = node_a.b.hp_assertion(key=new_key("be-not-published"))
    refused(node_a, match(http, bearer(node_a, token)), 401, "KeyNotFound", says="be-not-published")


def test_tampered_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    header, payload, signature = node_a.b.hp_assertion().split(".")
    claims = parts(f"{header}.{payload}.{signature}")[1]
    claims["sub"] = "BE-HP-9999"
    token = f"{header}.{b64(encode_json(claims))}.{signature}"
    refused(node_a, match(http, bearer(node_a, token)), 401, "BadSignature")


def test_alg_none(node_a: RunningNode, http: httpx.Client) -> None:
    head, claims, _ = parts(node_a.b.hp_assertion())
    head["alg"] = "none"
    token = f"{b64(encode_json(head))}.{b64(encode_json(claims))}."
    refused(node_a, match(http, bearer(node_a, token)), 401, "AlgorithmNotAllowed", says="unsigned")


def test_hs256_with_the_public_key_as_secret(node_a: RunningNode, http: httpx.Client) -> None:
    head, claims, _ = parts(node_a.b.hp_assertion())
    head["alg"] = "HS256"
    signing_input = f"{b64(encode_json(head))}.{b64(encode_json(claims))}"
    secret = node_a.b.signing_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    refused(node_a, match(http, bearer(node_a, token)), 401, "AlgorithmNotAllowed", says="HS256")


def test_a_trc_presented_as_hp_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    trc = node_a.b.trc(node_a.b.hp_assertion())
    refused(node_a, match(http, bearer(node_a, trc)), 401, "WrongType")


def test_oversized_token_is_refused_unread(node_a: RunningNode, http: httpx.Client) -> None:
    token = "e" * (MAX_TOKEN_CHARS + 1)
    refused(node_a, match(http, bearer(node_a, token)), 401, "TooLarge", says="refused unread")


def test_an_unsigned_token_of_the_right_shape_with_a_known_kid(
    node_a: RunningNode, http: httpx.Client
) -> None:
    # Signed by DE's key under B's kid: the signature must not verify with B's key.
    claims = parts(node_a.b.hp_assertion())[1]
    token = sign_raw(
        header_for("hp-assertion+jwt", node_a.b.signing_key),
        claims,
        node_a.other.signing_key,
    )
    refused(node_a, match(http, bearer(node_a, token)), 401, "BadSignature")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    token=st.text(
        alphabet=string.ascii_letters + string.digits + "-_.=+/~!$&'()*,;:@",
        min_size=1,
        max_size=300,
    )
)
def test_any_garbage_bearer_is_refused_and_audited(
    node_a: RunningNode, http: httpx.Client, token: str
) -> None:
    answer = match(http, bearer(node_a, token))
    record = refused(node_a, answer, 401, rule=_rule_of(node_a, answer))
    assert record.token_jti is None  # nothing verified: no attacker-chosen id is quoted


def _rule_of(node: RunningNode, answer: httpx.Response) -> str:
    [record] = node.audit_records(answer.headers["x-request-id"])
    rule = record.details["rule"]
    assert rule in {"Malformed", "WrongType", "AlgorithmNotAllowed", "TooLarge", "BadSignature"}
    return str(rule)


# --- the treatment relationship confirmation -----------------------------------------------------


def access(http: httpx.Client, headers: dict[str, str], patient: str = "PAT100") -> httpx.Response:
    body: dict[str, Any] = {
        "resourceType": "Parameters",
        "parameter": [
            *({"name": "study", "valueString": uid} for uid in studies_of(patient)),
            {"name": "option", "valueCode": "A"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    return http.post("/fhir/$imaging-access", json=body, headers=headers)


def test_no_trc_on_a_patient_level_request(node_a: RunningNode, http: httpx.Client) -> None:
    refused(node_a, access(http, node_a.b.headers(None)), 401, "MissingConfirmation")


def test_trc_bound_to_another_hp_assertion(node_a: RunningNode, http: httpx.Client) -> None:
    hp, other_hp = node_a.b.hp_assertion(), node_a.b.hp_assertion()
    assert hp != other_hp  # each has its own jti
    headers = node_a.b.headers(hp=hp, trc=node_a.b.trc(other_hp))
    refused(node_a, access(http, headers), 403, "NotBound", says="another HP assertion")


def test_trc_of_another_hp(node_a: RunningNode, http: httpx.Client) -> None:
    hp = node_a.b.hp_assertion()
    theirs = node_a.b.hp_assertion(subject="BE-HP-0007")
    trc = node_a.b.trc(theirs)
    # Bound by hash to the other HP's assertion: refused either way.
    refused(node_a, access(http, node_a.b.headers(hp=hp, trc=trc)), 403, "NotBound")


def test_expired_trc(node_a: RunningNode, http: httpx.Client) -> None:
    hp = node_a.b.hp_assertion()
    trc = node_a.b.trc(hp, now=datetime.now(UTC) - timedelta(hours=3))
    refused(node_a, access(http, node_a.b.headers(hp=hp, trc=trc)), 401, "Expired")


def test_trc_from_another_country(node_a: RunningNode, http: httpx.Client) -> None:
    hp = node_a.b.hp_assertion()
    trc = node_a.other.trc(hp)
    refused(node_a, access(http, node_a.b.headers(hp=hp, trc=trc)), 403, "CountryMismatch")


def test_trc_for_another_patient_gets_no_token_for_this_one(
    node_a: RunningNode, http: httpx.Client
) -> None:
    # A valid pair for PAT101 asking for PAT100's studies.
    answer = access(http, node_a.b.headers("PAT101"), patient="PAT100")
    assert answer.status_code == 403
    assert "eyJ" not in answer.text
    [record] = node_a.audit_records(answer.headers["x-request-id"])
    assert (record.action, record.outcome) == ("access-token-issue", Outcome.SERIOUS_FAILURE)
    assert record.details["rule"] == "StudyOfAnotherPatient"
    assert record.patient_id == "PAT101"  # whom the confirmation was for


# --- fail closed ---------------------------------------------------------------------------------


@pytest.fixture()
def broken_audit(node_a: RunningNode, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The node's auditor writes to a database without the audit tables: every write fails."""
    engine = make_engine(f"sqlite:///{node_a.root / 'no-audit-tables.db'}")
    monkeypatch.setattr(node_a.node, "auditor", Auditor(sessionmaker(engine), country="AT"))
    yield
    engine.dispose()


@pytest.mark.usefixtures("broken_audit")
def test_no_answer_without_an_audit_record(node_a: RunningNode, http: httpx.Client) -> None:
    before = node_a.last_seq()
    answer = match(http, node_a.b.headers(None))
    assert answer.status_code == 500
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "could not be audited" in outcome["issue"][0]["diagnostics"]
    assert "PAT100" not in answer.text  # nothing of the match leaked
    granted = access(http, node_a.b.headers("PAT100"))
    assert granted.status_code == 500 and "eyJ" not in granted.text
    assert node_a.last_seq() == before


@pytest.mark.usefixtures("broken_audit")
def test_a_refusal_that_cannot_be_audited_is_still_a_refusal(
    node_a: RunningNode, http: httpx.Client
) -> None:
    headers = node_a.b.headers(None)
    del headers["Authorization"]
    answer = match(http, headers)
    assert answer.status_code == 500
    assert json.loads(answer.text)["resourceType"] == "OperationOutcome"
