"""The standard channel of a real node A over HTTPS with mutual TLS on loopback: metadata,
patient identification ($match), image access ($imaging-access), errors as OperationOutcomes,
and an audit record for every step."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from ncp.audit.chain import verify as verify_chain
from ncp.audit.models import Action, Outcome
from ncp.provider.capability import SEARCH_PARAMS
from ncp.provider.search_params import INCLUDES, REVINCLUDES
from ncp.security.access import AccessVerifier
from ncp.security.claims import IMAGE_ACCESS, VIEWER_LAUNCH
from ncp.security.tokens import Replayed, verify
from ncp.validation.issues import has_errors
from tests.support import node as node_support
from tests.support.node import (
    EDGE_URL,
    PATIENTS,
    STUDIES,
    SYSTEM,
    VIEWER_URL,
    RunningNode,
    running_node,
    studies_of,
)

node_a = node_support.node_a  # the fixture: a real node A on loopback

FHIR_NS = {"f": "http://hl7.org/fhir"}


def validate(node: RunningNode, resource: dict[str, Any]) -> list[Any]:
    with node.node.validator_lock:
        return node.node.validator.validate(resource)


def assert_valid(node: RunningNode, resource: dict[str, Any]) -> None:
    issues = validate(node, resource)
    assert not has_errors(issues), [i for i in issues if i.is_error]


def match_body(
    *,
    identifier: str | None = None,
    family: str | None = None,
    given: str | None = None,
    birth: str | None = None,
    gender: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if identifier:
        patient["identifier"] = [{"system": SYSTEM, "value": identifier}]
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given:
        name["given"] = [given]
    if name:
        patient["name"] = [name]
    if birth:
        patient["birthDate"] = birth
    if gender:
        patient["gender"] = gender
    parameters: list[dict[str, Any]] = [{"name": "resource", "resource": patient}]
    if "only_certain" in params:
        parameters.append({"name": "onlyCertainMatches", "valueBoolean": params["only_certain"]})
    if "count" in params:
        parameters.append({"name": "count", "valueInteger": params["count"]})
    return {"resourceType": "Parameters", "parameter": parameters}


def access_body(studies: list[str], option: str, purpose: str = "TREAT", **extra: str) -> Any:
    params: list[dict[str, Any]] = [{"name": "study", "valueString": uid} for uid in studies]
    params.append({"name": "option", "valueCode": option})
    params.append({"name": "purpose", "valueCode": purpose})
    for name, value in extra.items():
        params.append({"name": name, "valueCode": value})
    return {"resourceType": "Parameters", "parameter": params}


def out(parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        p["name"]: next(v for k, v in p.items() if k.startswith("value"))
        for p in parameters["parameter"]
    }


@pytest.fixture()
def http(node_a: RunningNode) -> httpx.Client:
    with node_a.client() as client:
        yield client  # type: ignore[misc]


# --- metadata ------------------------------------------------------------------------------------


def test_metadata_needs_no_assertion_and_describes_what_is_served(
    node_a: RunningNode, http: httpx.Client
) -> None:
    answer = http.get("/fhir/metadata")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/fhir+json; charset=utf-8"
    statement = answer.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert (statement["kind"], statement["fhirVersion"]) == ("instance", "4.0.1")
    assert statement["implementation"]["url"] == node_a.url
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    assert "Mutual TLS" in rest["security"]["description"]
    assert {op["name"] for op in rest["operation"]} == {"imaging-access", "validate"}
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) == {
        "Bundle",
        "DocumentReference",
        "ImagingStudy",
        "Organization",
        "Patient",
    }
    assert [op["name"] for op in by_type["Patient"]["operation"]] == ["match", "validate"]
    # What the node routes, written out: a statement derived from the routes must find them
    # all, however the framework stores included routers.
    served = {
        "Bundle": ["read", "vread", "history-instance", "create"],
        "DocumentReference": ["read", "search-type"],
        "ImagingStudy": ["read", "search-type"],
        "Organization": ["read"],
        "Patient": ["read"],
    }
    for rtype, entry in by_type.items():
        assert [i["code"] for i in entry.get("interaction", [])] == served[rtype], rtype
        if "search-type" in served[rtype]:
            names = [p["name"] for p in entry["searchParam"]]
            assert names == [p.name for p in SEARCH_PARAMS[rtype]]
    assert by_type["Bundle"]["conditionalRead"] == "full-support"
    ours = [
        p["definition"]
        for p in by_type["DocumentReference"].get("searchParam", [])
        if "ncp.example" in p.get("definition", "")
    ]
    assert all(d.startswith("https://ncp.example/fhir/SearchParameter/") for d in ours)
    # Every parameter has a definition, and the includes the list accepts are declared.
    for rtype in ("DocumentReference", "ImagingStudy"):
        assert all(p.get("definition") for p in by_type[rtype]["searchParam"]), rtype
    assert "DocumentReference:related" in by_type["DocumentReference"]["searchInclude"]
    assert by_type["ImagingStudy"]["searchInclude"] == sorted(INCLUDES["ImagingStudy"])
    assert by_type["ImagingStudy"]["searchRevInclude"] == sorted(REVINCLUDES["ImagingStudy"])


def test_metadata_validates_without_system_operations(
    node_a: RunningNode, http: httpx.Client
) -> None:
    statement = http.get("/fhir/metadata").json()
    trimmed = copy.deepcopy(statement)
    del trimmed["rest"][0]["operation"]
    assert_valid(node_a, trimmed)


def test_metadata_validates(node_a: RunningNode, http: httpx.Client) -> None:
    assert_valid(node_a, http.get("/fhir/metadata").json())


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"_format": "xml"}, {}),
        ({"_format": "application/fhir+xml"}, {"Accept": "application/fhir+json"}),
        ({}, {"Accept": "application/fhir+xml"}),
    ],
)
def test_metadata_in_xml(
    http: httpx.Client, params: dict[str, str], headers: dict[str, str]
) -> None:
    answer = http.get("/fhir/metadata", params=params, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/fhir+xml; charset=utf-8"
    root = etree.fromstring(answer.content)
    assert etree.QName(root).localname == "CapabilityStatement"
    assert root.xpath("f:kind/@value", namespaces=FHIR_NS) == ["instance"]


def test_format_json_wins_over_accept_xml(http: httpx.Client) -> None:
    answer = http.get(
        "/fhir/metadata", params={"_format": "json"}, headers={"Accept": "application/fhir+xml"}
    )
    assert answer.headers["content-type"].startswith("application/fhir+json")


def test_unsupported_format_is_406(http: httpx.Client) -> None:
    answer = http.get("/fhir/metadata", params={"_format": "turtle"})
    assert answer.status_code == 406
    assert answer.json()["issue"][0]["code"] == "not-supported"


# --- errors and the correlation id ---------------------------------------------------------------


def test_unknown_path_and_method_are_operation_outcomes(http: httpx.Client) -> None:
    missing = http.get("/fhir/Nothing/here", params={"_format": "xml"})
    assert missing.status_code == 404
    assert etree.QName(etree.fromstring(missing.content)).localname == "OperationOutcome"
    wrong = http.delete("/fhir/metadata")
    assert wrong.status_code == 405
    assert wrong.json()["issue"][0]["code"] == "not-supported"


def test_request_id_is_echoed_generated_or_refused(node_a: RunningNode, http: httpx.Client) -> None:
    given = http.get("/fhir/metadata", headers={"X-Request-ID": "b.exchange:42"})
    assert given.headers["x-request-id"] == "b.exchange:42"
    generated = http.get("/fhir/metadata").headers["x-request-id"]
    assert len(generated) == 36
    bad = http.get("/fhir/metadata", headers={"X-Request-ID": "no spaces allowed"})
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"


def test_steps_carry_the_request_id_into_the_audit(node_a: RunningNode, http: httpx.Client) -> None:
    headers = node_a.b.headers(None, request_id="exchange-7")
    answer = http.post(
        "/fhir/Patient/$match", json=match_body(identifier="PAT100"), headers=headers
    )
    assert answer.status_code == 200
    assert answer.headers["x-request-id"] == "exchange-7"
    [record] = node_a.audit_records("exchange-7")
    assert (record.action, record.side, record.peer_country) == (
        "patient-identify",
        "provider",
        "BE",
    )
    assert record.actor_id == "BE-HP-0042"


# --- $match --------------------------------------------------------------------------------------


def post_match(
    node: RunningNode, http: httpx.Client, body: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    headers = node.b.headers(None)
    answer = http.post("/fhir/Patient/$match", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert_valid(node, bundle)
    return bundle, headers["X-Request-ID"]


def grades(bundle: dict[str, Any]) -> dict[str, str]:
    return {
        e["resource"]["identifier"][0]["value"]: e["search"]["extension"][0]["valueCode"]
        for e in bundle.get("entry", [])
    }


def test_match_by_identifier_and_agreeing_demographics_is_certain(
    node_a: RunningNode, http: httpx.Client
) -> None:
    body = match_body(
        identifier="PAT100", family="GRUBER", given="anna", birth="1980-05-17", gender="female"
    )
    bundle, rid = post_match(node_a, http, body)
    assert (bundle["type"], bundle["total"]) == ("searchset", 1)
    [entry] = bundle["entry"]
    assert entry["search"]["mode"] == "match" and entry["search"]["score"] == 1.0
    assert grades(bundle) == {"PAT100": "certain"}
    assert entry["resource"]["birthDate"] == "1980-05-17"
    assert entry["fullUrl"] == f"{node_a.url}/Patient/{entry['resource']['id']}"
    [record] = node_a.audit_records(rid)
    assert (record.action, record.outcome, record.patient_id) == ("patient-identify", 0, "PAT100")
    assert record.details["result"] == "confirmed"
    assert "identifier=urn:oid:1.2.40.0.10.1.4.3.1|PAT100" in (record.query or "")


def test_match_identifier_with_disagreeing_demographics_is_never_certain(
    node_a: RunningNode, http: httpx.Client
) -> None:
    body = match_body(identifier="PAT100", family="Gruber", birth="1980-05-18")
    bundle, rid = post_match(node_a, http, body)
    assert grades(bundle) == {"PAT100": "possible"}
    assert bundle["entry"][0]["search"]["score"] < 1.0
    [record] = node_a.audit_records(rid)
    assert record.patient_id is None and record.details["result"] == "not-certain"
    only, _ = post_match(
        node_a,
        http,
        {
            **body,
            "parameter": [*body["parameter"], {"name": "onlyCertainMatches", "valueBoolean": True}],
        },
    )
    assert only["total"] == 0


def test_match_by_demographics_returns_every_candidate_none_certain(
    node_a: RunningNode, http: httpx.Client
) -> None:
    bundle, rid = post_match(node_a, http, match_body(family="huber", birth="1975-03-02"))
    assert grades(bundle) == {"PAT101": "probable", "PAT102": "probable"}
    [record] = node_a.audit_records(rid)
    assert record.details["result"] == "ambiguous"
    assert len(record.details["candidates"]) == 2
    narrowed, _ = post_match(
        node_a, http, match_body(family="Huber", given="Max", birth="1975-03-02")
    )
    assert grades(narrowed) == {"PAT101": "probable", "PAT102": "possible"}
    scores = [e["search"]["score"] for e in narrowed["entry"]]
    assert scores == sorted(scores, reverse=True)
    one, _ = post_match(node_a, http, match_body(family="Huber", birth="1975-03-02", count=1))
    assert one["total"] == 1


def test_no_match_is_an_empty_searchset(node_a: RunningNode, http: httpx.Client) -> None:
    bundle, rid = post_match(
        node_a, http, match_body(identifier="PAT999", family="Nobody", birth="1990-01-01")
    )
    assert bundle == {"resourceType": "Bundle", "type": "searchset", "total": 0}
    [record] = node_a.audit_records(rid)
    assert (record.outcome, record.reason) == (Outcome.MINOR_FAILURE, "no match")


def test_a_patient_without_birth_date_in_the_index_is_served_valid(
    node_a: RunningNode, http: httpx.Client
) -> None:
    bundle, _ = post_match(
        node_a, http, match_body(identifier="PAT103", family="Novak", birth="1960-01-01")
    )
    assert grades(bundle) == {"PAT103": "probable"}  # the birth date cannot be compared
    assert "_birthDate" in bundle["entry"][0]["resource"]


@pytest.mark.parametrize(
    "body",
    [
        match_body(family="Huber"),  # too little to search demographics on
        {"resourceType": "Parameters", "parameter": []},
        {"resourceType": "Patient"},
        match_body(identifier="PAT100", birth="1980-05"),
    ],
)
def test_match_refuses_queries_it_cannot_answer_safely(
    node_a: RunningNode, http: httpx.Client, body: dict[str, Any]
) -> None:
    answer = http.post("/fhir/Patient/$match", json=body, headers=node_a.b.headers(None))
    assert answer.status_code == 400
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert_valid(node_a, outcome)


# --- $imaging-access -----------------------------------------------------------------------------


def request_access(
    node: RunningNode, http: httpx.Client, body: dict[str, Any], patient: str = "PAT100", **kw: Any
) -> tuple[httpx.Response, str]:
    headers = node.b.headers(patient, **kw)
    return http.post("/fhir/$imaging-access", json=body, headers=headers), headers["X-Request-ID"]


def test_option_a_token_for_the_gateway(node_a: RunningNode, http: httpx.Client) -> None:
    studies = studies_of("PAT100")
    answer, rid = request_access(node_a, http, access_body(studies, "A", priority="urgent"))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert_valid(node_a, result)
    values = out(result)
    imaging = node_a.node.settings.urls.imaging
    assert values["dicomweb"] == imaging and "viewer" not in values
    claims = verify(
        IMAGE_ACCESS,
        values["token"],
        node_a.node.keystore.published_keys(),
        audience=imaging,
        issuer="AT",
        now=node_a.node.clock(),
    )
    assert claims.studies == tuple(studies) and claims.option == "A"
    assert claims.patient == PATIENTS["PAT100"].ref and claims.priority == "urgent"
    assert values["expires"] == claims.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    lifetime = node_a.node.settings.tokens.image_access_lifetime_s
    assert (claims.expires_at - claims.issued_at).total_seconds() == lifetime
    [record] = node_a.audit_records(rid)
    assert (record.action, record.outcome, record.option) == ("access-token-issue", 0, "A")
    assert record.studies == studies and record.token_jti == claims.jti
    assert (record.purpose, record.priority, record.patient_id) == ("TREAT", "urgent", "PAT100")


def test_option_c_token_for_the_edge_gateway(node_a: RunningNode, http: httpx.Client) -> None:
    answer, _ = request_access(node_a, http, access_body(studies_of("PAT100")[:1], "C"))
    assert answer.status_code == 200
    values = out(answer.json())
    assert values["dicomweb"] == EDGE_URL
    claims = verify(
        IMAGE_ACCESS,
        values["token"],
        node_a.node.keystore.published_keys(),
        audience=EDGE_URL,
        issuer="AT",
        now=node_a.node.clock(),
    )
    assert claims.option == "C"


def test_option_c_without_an_edge_gateway_is_422(
    node_a: RunningNode, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = node_a.node.settings
    urls = settings.urls.model_copy(update={"edge": ""})
    monkeypatch.setattr(node_a.node, "settings", settings.model_copy(update={"urls": urls}))
    answer, rid = request_access(node_a, http, access_body(studies_of("PAT100")[:1], "C"))
    assert answer.status_code == 422
    assert "urls.edge" in answer.json()["issue"][0]["diagnostics"]
    [record] = node_a.audit_records(rid)
    assert record.outcome == Outcome.MINOR_FAILURE


def test_option_b_one_time_viewer_launch(node_a: RunningNode, http: httpx.Client) -> None:
    study = studies_of("PAT100")[0]
    answer, rid = request_access(node_a, http, access_body([study], "B"))
    assert answer.status_code == 200
    values = out(answer.json())
    assert_valid(node_a, answer.json())
    assert values["viewer"] == f"{VIEWER_URL}/launch?code={values['token']}"
    assert "dicomweb" not in values
    viewer = AccessVerifier(
        node_a.node.keystore.published_keys(),
        VIEWER_URL,
        "AT",
        node_a.node.replay,  # the node's database-backed guard, as the viewer will use it
        kinds=(VIEWER_LAUNCH,),
    )
    grant = viewer.check(values["token"], study_uid=study)
    assert grant.option == "B" and grant.patient == PATIENTS["PAT100"].ref
    with pytest.raises(Replayed):
        viewer.check(values["token"], study_uid=study)
    [record] = node_a.audit_records(rid)
    assert (record.option, record.token_jti) == ("B", grant.jti)


def test_asking_again_under_the_same_pair_renews(node_a: RunningNode, http: httpx.Client) -> None:
    hp = node_a.b.hp_assertion()
    trc = node_a.b.trc(hp, "PAT100")
    body = access_body(studies_of("PAT100"), "A")
    first, rid1 = request_access(node_a, http, body, hp=hp, trc=trc)
    second, rid2 = request_access(node_a, http, body, hp=hp, trc=trc)
    assert first.status_code == second.status_code == 200
    assert out(first.json())["token"] != out(second.json())["token"]
    [issued] = node_a.audit_records(rid1)
    [renewed] = node_a.audit_records(rid2)
    assert (issued.action, renewed.action) == ("access-token-issue", "access-token-renew")
    assert issued.token_jti != renewed.token_jti


def test_a_study_of_another_patient_is_refused_and_nothing_issued(
    node_a: RunningNode, http: httpx.Client
) -> None:
    mine, theirs = studies_of("PAT100")[0], studies_of("PAT101")[0]
    answer, rid = request_access(node_a, http, access_body([mine, theirs], "A"))
    assert answer.status_code == 403
    outcome = answer.json()
    assert "eyJ" not in answer.text and outcome["resourceType"] == "OperationOutcome"
    assert theirs in outcome["issue"][0]["diagnostics"]
    [record] = node_a.audit_records(rid)
    assert (record.action, record.outcome) == ("access-token-issue", Outcome.SERIOUS_FAILURE)
    assert record.details["rule"] == "StudyOfAnotherPatient" and record.token_jti is not None


def test_an_unknown_study_is_refused(node_a: RunningNode, http: httpx.Client) -> None:
    answer, rid = request_access(node_a, http, access_body(["1.2.826.0.1.3680043.10.543.999"], "A"))
    assert answer.status_code == 403
    [record] = node_a.audit_records(rid)
    assert record.details["rule"] == "UnknownStudy"


def test_a_purpose_beyond_the_confirmation_is_refused(
    node_a: RunningNode, http: httpx.Client
) -> None:
    answer, rid = request_access(node_a, http, access_body(studies_of("PAT100"), "A", "ETREAT"))
    assert answer.status_code == 403
    [record] = node_a.audit_records(rid)
    assert record.details["rule"] == "PurposeMismatch"


@pytest.mark.parametrize(
    "body",
    [
        access_body([], "A"),
        access_body(["not-a-uid"], "A"),
        access_body([next(iter(STUDIES))], "D"),
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "study", "valueString": next(iter(STUDIES))}],
        },
    ],
)
def test_malformed_access_requests_are_400(
    node_a: RunningNode, http: httpx.Client, body: dict[str, Any]
) -> None:
    answer, _ = request_access(node_a, http, body)
    assert answer.status_code == 400
    assert_valid(node_a, answer.json())


def test_the_audit_chain_stays_intact(node_a: RunningNode) -> None:
    with node_a.node.sessions() as session:
        result = verify_chain(session)
    assert result.ok, result.first_broken
    assert {r.action for r in node_a.audit_records()} >= {
        Action.PATIENT_IDENTIFY.value,
        Action.ACCESS_TOKEN_ISSUE.value,
    }


def test_a_node_on_postgresql_identifies_issues_and_renews(
    postgres_url: str, tmp_path: Path
) -> None:
    with running_node(tmp_path / "pg", database_url=postgres_url) as node, node.client() as http:
        bundle, _ = post_match(
            node, http, match_body(identifier="PAT100", family="Gruber", birth="1980-05-17")
        )
        assert grades(bundle) == {"PAT100": "certain"}
        hp = node.b.hp_assertion()
        trc = node.b.trc(hp, "PAT100")
        body = access_body(studies_of("PAT100"), "A")
        rids = [request_access(node, http, body, hp=hp, trc=trc)[1] for _ in range(2)]
        actions = [node.audit_records(rid)[0].action for rid in rids]
        assert actions == ["access-token-issue", "access-token-renew"]
        with node.node.sessions() as session:
            assert verify_chain(session).ok


def test_an_unexpected_error_is_a_500_outcome_without_internals(node_a: RunningNode) -> None:
    from fastapi.testclient import TestClient

    from ncp.app import build_app

    app = build_app(node_a.node)

    @app.get("/fhir/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: /srv/ncp/db password=hunter2")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get(
            "/fhir/boom", headers={"X-Request-ID": "boom-1", "Accept": "application/fhir+xml"}
        )
    assert answer.status_code == 500
    assert answer.headers["content-type"].startswith("application/fhir+xml")
    assert answer.headers["x-request-id"] == "boom-1"
    assert b"secret" not in answer.content and b"boom-1" in answer.content
