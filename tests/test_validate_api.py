"""The server's $validate: the same engine as ncp validate, answering OperationOutcomes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lxml import etree

from ncp.app import build_app
from ncp.fhir import canonical
from ncp.fhir.io import to_xml
from ncp.fhir.report import build_report_bundle
from tests.test_fhir_report import make_report

BUNDLE_PROFILE = canonical.structure_definition("ncp-imaging-report-bundle")


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(build_app())


def errors(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]


def test_a_built_report_is_valid_against_its_profile(client: TestClient) -> None:
    bundle = build_report_bundle(make_report())
    answer = client.post(
        "/fhir/Bundle/$validate",
        params={"profile": BUNDLE_PROFILE},
        content=json.dumps(bundle),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/fhir+json")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert errors(outcome) == []


def test_parameters_form_and_xml_answer(client: TestClient) -> None:
    bundle = build_report_bundle(make_report())
    del bundle["entry"][0]["resource"]["identifier"]  # Composition.identifier is 1..1
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": bundle},
            {"name": "profile", "valueUri": BUNDLE_PROFILE},
        ],
    }
    answer = client.post(
        "/fhir/$validate", content=to_xml(parameters), headers={"Accept": "application/fhir+xml"}
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/fhir+xml")
    root = etree.fromstring(answer.content)
    ns = {"f": "http://hl7.org/fhir"}
    severities = root.xpath("//f:issue/f:severity/@value", namespaces=ns)
    locations = root.xpath("//f:issue/f:expression/@value", namespaces=ns)
    diagnostics = root.xpath("//f:issue/f:diagnostics/@value", namespaces=ns)
    assert "error" in severities
    assert "Bundle.entry[0].resource.ofType(Composition)" in locations
    assert any("Composition.identifier: minimum required = 1" in d for d in diagnostics)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "required"),
        (b"{not json", 400, None),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Patient/>', 400, None),
        (b'{"resourceType": "Patient"}', 400, "invalid"),  # the path says Bundle
    ],
)
def test_bad_input_gets_an_outcome(
    client: TestClient, body: bytes, status: int, code: str | None
) -> None:
    answer = client.post("/fhir/Bundle/$validate", content=body)
    assert answer.status_code == status
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert errors(outcome)
    if code:
        assert errors(outcome)[0]["code"] == code


def test_unknown_profile_and_oversized_body(client: TestClient) -> None:
    answer = client.post(
        "/fhir/$validate",
        params={"profile": "https://ncp.example/fhir/StructureDefinition/nope"},
        content=b'{"resourceType": "Patient"}',
    )
    assert (answer.status_code, errors(answer.json())[0]["code"]) == (400, "not-supported")

    small = TestClient(_app_with_limit(1000))
    answer = small.post("/fhir/$validate", content=b"{" + b" " * 5000 + b"}")
    assert (answer.status_code, errors(answer.json())[0]["code"]) == (413, "too-costly")


def _app_with_limit(limit: int) -> Any:
    from fastapi import FastAPI

    from ncp.validation.api import router

    app = FastAPI()
    app.include_router(router(max_bytes=limit))
    return app
