"""A hostile but trusted peer against a real node A (issue 13, items 9, 10, 13 and 14): wrong
shapes of JSON, text that is not Unicode, Unicode digits, refusals of every kind, certificates
that identify no country, and the existence oracle of ``$imaging-access``.

The rule under test everywhere: every input gets a defined 4xx (an OperationOutcome on the
standard channel, a DICOMweb status on the gateway) and leaves an audit record of its request.
"""

from __future__ import annotations

import json
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ncp.audit.chain import verify as verify_chain
from ncp.audit.models import Action, Outcome
from ncp.security import pki
from ncp.security.claims import HP_ASSERTION
from ncp.security.keystore import load_certificates, load_private_key
from tests.support import node as node_support
from tests.support.node import STUDIES, RunningNode, studies_of
from tests.support.token_factory import hp_claims

node_a = node_support.node_a

PATIENT_STUDY = studies_of("PAT100")[0]
OTHER_STUDY = studies_of("PAT101")[0]
UNKNOWN_STUDY = "1.2.826.0.1.3680043.10.543.999"


@pytest.fixture()
def http(node_a: RunningNode) -> Any:
    with node_a.client() as client:
        yield client


def rid() -> str:
    return f"hostile-{uuid.uuid4()}"


def assert_outcome(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body


def assert_audited(node: RunningNode, request_id: str) -> list[Any]:
    records = node.audit_records(request_id)
    assert records, f"request {request_id} left no audit record"
    assert all(r.outcome != Outcome.SUCCESS for r in records), [r.action for r in records]
    return records


# --- item 9: wrong shapes of JSON ----------------------------------------------------------------

WRONG_SHAPES: list[Any] = [
    {"resourceType": "Parameters", "parameter": [[None]]},
    {"resourceType": "Parameters", "parameter": ["x"]},
    {"resourceType": "Parameters", "parameter": 1.5},
    {"resourceType": "Parameters", "parameter": {"name": "study"}},
    {"resourceType": "Parameters", "parameter": [{"name": [[None]]}]},
    {"resourceType": "Parameters", "parameter": [{"name": {"a": 1}}]},
    {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": [1]}]},
    {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "name": 5}}],
    },
    {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": {"resourceType": "Patient", "name": [[None]]}}
        ],
    },
    {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": {"resourceType": "Patient", "identifier": ["x"]}}
        ],
    },
    {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "resource",
                "resource": {"resourceType": "Patient", "name": [{"given": [None, 1]}]},
            }
        ],
    },
    {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "resource",
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": ["x"]}],
                    "birthDate": 19800517,
                },
            }
        ],
    },
    {"resourceType": ["Parameters"]},
]


@pytest.mark.parametrize("body", WRONG_SHAPES)
@pytest.mark.parametrize("route", ["/fhir/Patient/$match", "/fhir/$imaging-access"])
def test_a_wrong_shape_of_json_is_a_400_and_audited(
    node_a: RunningNode, http: httpx.Client, route: str, body: Any
) -> None:
    headers = node_a.b.headers("PAT100", request_id=(request_id := rid()))
    answer = http.post(route, json=body, headers=headers)
    assert_outcome(answer, 400)
    assert_audited(node_a, request_id)


LONE = '"\\ud800"'
"""A lone surrogate as JSON writes it: valid JSON syntax, not Unicode text."""


@pytest.mark.parametrize(
    ("route", "text"),
    [
        ("/fhir/Patient/$match", '{"resourceType":"Parameters","parameter":[{"name":%s}]}'),
        (
            "/fhir/Patient/$match",
            '{"resourceType":"Parameters","parameter":[{"name":"resource","resource":'
            '{"resourceType":"Patient","name":[{"family":%s}],"birthDate":"1980-05-17"}}]}',
        ),
        (
            "/fhir/Patient/$match",
            '{"resourceType":"Parameters","parameter":[{"name":"resource","resource":'
            '{"resourceType":"Patient","identifier":[{"system":"urn:oid:1.2","value":%s}]}}]}',
        ),
        ("/fhir/$imaging-access", '{"resourceType":"Parameters","parameter":[{"name":%s}]}'),
        (
            "/fhir/$imaging-access",
            '{"resourceType":"Parameters","parameter":[{"name":"option","valueCode":%s}]}',
        ),
        ("/fhir/$validate", '{"resourceType":"Patient","id":%s}'),
    ],
)
def test_a_lone_surrogate_in_a_body_is_a_400_and_audited(
    node_a: RunningNode, http: httpx.Client, route: str, text: str
) -> None:
    headers = node_a.b.headers("PAT100", request_id=(request_id := rid()))
    headers["Content-Type"] = "application/fhir+json"
    answer = http.post(route, content=(text % LONE).encode("ascii"), headers=headers)
    assert_outcome(answer, 400)
    assert_audited(node_a, request_id)


def _signed_raw(node: RunningNode, payload: dict[str, Any]) -> str:
    """An HP assertion signed with B's key as B's node would, from a payload our own issuer
    refuses to write (JSON escapes a lone surrogate as ``\\ud800``)."""
    key = node.b.signing_key
    return jwt.api_jws.encode(
        json.dumps(payload, ensure_ascii=True).encode("ascii"),
        key.private_key,  # type: ignore[arg-type]
        algorithm="ES256",
        headers={"typ": HP_ASSERTION.typ, "kid": key.kid},
    )


@pytest.mark.parametrize(
    "claim", [("extensions", "ihe_iua", "subject_name"), ("sub",), ("ncp_point_of_care",)]
)
def test_a_lone_surrogate_in_a_signed_assertion_is_refused_and_audited(
    node_a: RunningNode, http: httpx.Client, claim: tuple[str, ...]
) -> None:
    payload = hp_claims(datetime.now(UTC), issuer="BE", audience=node_a.url).to_payload()
    where = payload
    for name in claim[:-1]:
        where = where[name]
    where[claim[-1]] = "Dr \ud800"
    hp = _signed_raw(node_a, payload)
    headers = node_a.b.headers(None, hp=hp, request_id=(request_id := rid()))
    answer = http.post(
        "/fhir/Patient/$match",
        json={"resourceType": "Parameters", "parameter": []},
        headers=headers,
    )
    assert_outcome(answer, 401)
    [record] = assert_audited(node_a, request_id)
    assert record.action == Action.REFUSAL


def test_hostile_text_in_a_request_never_breaks_its_audit_record(
    node_a: RunningNode, http: httpx.Client
) -> None:
    # Text the audit table could not hold as given (NUL, very long) reaches it escaped and cut.
    family = "\x00" + "x" * 5000
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "resource",
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"family": family}],
                    "birthDate": "1980-05-17",
                },
            }
        ],
    }
    headers = node_a.b.headers(None, request_id=(request_id := rid()))
    answer = http.post("/fhir/Patient/$match", json=body, headers=headers)
    assert answer.status_code in (200, 400), answer.text
    assert node_a.audit_records(request_id)


# --- item 10: every refusal is audited -----------------------------------------------------------


def _match_body() -> dict[str, Any]:
    return {
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


def _access_body() -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "study", "valueString": PATIENT_STUDY},
            {"name": "option", "valueCode": "A"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }


ROUTES = {
    "/fhir/Patient/$match": _match_body,
    "/fhir/$imaging-access": _access_body,
    "/fhir/$validate": lambda: {"resourceType": "Patient", "id": "p1"},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(
    ("status", "change"),
    [
        (400, {"content": b'{"resourceType": "Parameters", '}),
        (400, {"content": b""}),
        (406, {"headers": {"Accept": "image/png"}}),
        (406, {"params": {"_format": "yaml"}}),
        (413, {"content": b'{"resourceType":"Parameters","x":"' + b"a" * (21 << 20) + b'"}'}),
        (415, {"headers": {"Content-Type": "text/plain"}}),
    ],
)
def test_refusals_of_the_operations_are_audited(
    node_a: RunningNode, http: httpx.Client, route: str, status: int, change: dict[str, Any]
) -> None:
    headers = node_a.b.headers("PAT100", request_id=(request_id := rid()))
    headers["Content-Type"] = "application/fhir+json"
    headers.update(change.get("headers", {}))
    content = change.get("content", json.dumps(ROUTES[route]()).encode())
    answer = http.post(route, content=content, headers=headers, params=change.get("params"))
    assert_outcome(answer, status)
    records = assert_audited(node_a, request_id)
    assert any((r.details or {}).get("status") == status for r in records), [
        (r.action, r.details) for r in records
    ]


def test_an_unknown_path_and_a_wrong_method_are_audited(
    node_a: RunningNode, http: httpx.Client
) -> None:
    for method, path, status in (
        ("GET", "/fhir/Nothing/here", 404),
        ("DELETE", "/fhir/metadata", 405),
        ("PUT", "/fhir/Patient/$match", 405),
    ):
        headers = node_a.b.headers(None, request_id=(request_id := rid()))
        answer = http.request(method, path, headers=headers)
        assert_outcome(answer, status)
        assert_audited(node_a, request_id)


def test_an_unexpected_error_is_audited(node_a: RunningNode) -> None:
    from fastapi.testclient import TestClient

    from ncp.app import build_app

    app = build_app(node_a.node)

    @app.get("/fhir/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    request_id = rid()
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/fhir/boom", headers={"X-Request-ID": request_id})
    assert answer.status_code == 500
    [record] = assert_audited(node_a, request_id)
    assert record.outcome == Outcome.MAJOR_FAILURE
    assert "secret" not in (record.reason or "")


# --- item 13: /fhir/metadata for certificates that identify no trusted country --------------------


def _client_with_subject(node: RunningNode, tmp: Path, attributes: list[tuple[Any, str]]) -> Any:
    """A client of A with a certificate that B's CA issued for ``attributes`` (its subject)."""
    ca = pki.Authority(
        load_certificates(node.b.keys_dir / pki.CA_CERT)[0],
        load_private_key(node.b.keys_dir / pki.CA_KEY),  # type: ignore[arg-type]
    )
    key = pki.new_ec_key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    tmp.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = tmp / "client.pem", tmp / "client.key"
    pki.write_file(cert_path, pki.cert_pem(cert))
    pki.write_private_key(key_path, key)
    context = ssl.create_default_context(cafile=node.ca_file)
    context.load_cert_chain(cert_path, key_path)
    return httpx.Client(verify=context, base_url=node.origin, timeout=10)


CN = NameOID.COMMON_NAME
C = NameOID.COUNTRY_NAME


@pytest.mark.parametrize(
    "subject",
    [
        [(C, "FR"), (CN, "FR from BE's CA")],
        [(CN, "no country")],
        [(C, "BE"), (C, "FR"), (CN, "two countries")],
        [(C, "BE"), (C, "BE"), (CN, "BE twice")],
    ],
    ids=["other-country", "no-country", "two-countries", "same-country-twice"],
)
@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/openapi.json"])
def test_a_certificate_of_no_trusted_country_gets_no_description(
    node_a: RunningNode, tmp_path: Path, subject: list[tuple[Any, str]], path: str
) -> None:
    with _client_with_subject(node_a, tmp_path / "cert", subject) as client:
        answer = client.get(path, headers={"X-Request-ID": (request_id := rid())})
    assert_outcome(answer, 403)
    [record] = assert_audited(node_a, request_id)
    assert record.action == Action.REFUSAL and record.peer_country is None


def test_a_national_system_and_a_peer_get_the_description(
    node_a: RunningNode,
) -> None:
    for who in ("BE", "AT"):
        with node_a.client(who) as client:
            assert client.get("/fhir/metadata").status_code == 200, who


# --- item 14: no existence oracle in $imaging-access ---------------------------------------------


def test_an_unknown_study_and_another_patients_study_get_one_answer(
    node_a: RunningNode, http: httpx.Client
) -> None:
    answers = {}
    for uid in (UNKNOWN_STUDY, OTHER_STUDY):
        body = _access_body()
        body["parameter"][0]["valueString"] = uid
        headers = node_a.b.headers("PAT100", request_id=(request_id := rid()))
        answer = http.post("/fhir/$imaging-access", json=body, headers=headers)
        outcome = assert_outcome(answer, 403)
        answers[uid] = (request_id, json.dumps(outcome).replace(uid, "<study>"))
    assert answers[UNKNOWN_STUDY][1] == answers[OTHER_STUDY][1]
    # The audit record keeps the real reason for the operator.
    rules = {
        uid: node_a.audit_records(request_id)[0].details["rule"]
        for uid, (request_id, _) in answers.items()
    }
    assert rules == {UNKNOWN_STUDY: "UnknownStudy", OTHER_STUDY: "StudyOfAnotherPatient"}


# --- the gateway (option A) ----------------------------------------------------------------------


@pytest.fixture()
def gateway(node_a: RunningNode, http: httpx.Client) -> Any:
    headers = node_a.b.headers("PAT100")
    answer = http.post("/fhir/$imaging-access", json=_access_body(), headers=headers)
    assert answer.status_code == 200, answer.text
    token = next(p["valueString"] for p in answer.json()["parameter"] if p["name"] == "token")
    assert node_a.imaging_url is not None
    context = ssl.create_default_context(cafile=node_a.ca_file)
    with httpx.Client(
        verify=context,
        base_url=node_a.imaging_url.rsplit("/dicomweb", 1)[0],
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ) as client:
        yield client


@pytest.mark.parametrize(
    "query",
    ["offset=\u00b2", "limit=\u2460", "limit=\u0663", "offset=1\u00b2", "limit=%C2%B2"],
)
def test_unicode_digits_in_a_gateway_query_are_a_400_and_audited(
    node_a: RunningNode, gateway: httpx.Client, query: str
) -> None:
    answer = gateway.get(f"/dicomweb/studies?{query}", headers={"X-Request-ID": (r := rid())})
    assert answer.status_code == 400, answer.text
    assert answer.headers["warning"].startswith("299 ")
    assert_audited(node_a, r)


def test_unicode_digits_in_frame_numbers_are_a_400_and_audited(
    node_a: RunningNode, gateway: httpx.Client
) -> None:
    series = f"{PATIENT_STUDY}.1"
    path = f"/dicomweb/studies/{PATIENT_STUDY}/series/{series}/instances/{series}.1/frames/\u00b2"
    answer = gateway.get(path, headers={"X-Request-ID": (r := rid())})
    assert answer.status_code == 400, answer.text
    assert_audited(node_a, r)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_a_wrong_method_at_the_gateway_is_a_405_and_audited(
    node_a: RunningNode, gateway: httpx.Client, method: str
) -> None:
    answer = gateway.request(method, "/dicomweb/studies", headers={"X-Request-ID": (r := rid())})
    assert answer.status_code == 405, answer.text
    assert "GET" in answer.headers["allow"]
    assert answer.headers["warning"].startswith("299 ")
    assert_audited(node_a, r)


def test_a_path_outside_the_gateway_is_a_404_and_audited(
    node_a: RunningNode, gateway: httpx.Client
) -> None:
    answer = gateway.get("/elsewhere", headers={"X-Request-ID": (r := rid())})
    assert answer.status_code == 404, answer.text
    assert_audited(node_a, r)


def test_the_audit_chain_stays_intact(node_a: RunningNode) -> None:
    with node_a.node.sessions() as session:
        result = verify_chain(session)
    assert result.ok, result.first_broken
    assert len(STUDIES) == 5
