"""Contract tests of the metadata list (ncp.provider.list_api) over real HTTPS with mutual TLS:
searchsets of DocumentReference and ImagingStudy for the TRC's patient, in JSON and XML, paging,
includes, refusals and their audit records.

Node A runs from ``tests.support.node.running_node`` with reports of PAT100 and PAT101 ingested
through the report store. Every Bundle the node answers is validated with the project's
validator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ncp.audit.models import Action, Outcome
from ncp.fhir.identifiers import imaging_study_id, manifest_reference_id, patient_resource_id
from ncp.store.models import Patient, Study
from tests.support.node import STUDIES, SYSTEM, B, RunningNode, running_node, studies_of
from tests.test_report_api import XML, assert_valid, body_of, ingest, make_report, report_id_of

PAT100 = f"{SYSTEM}|PAT100"
PAT101 = f"{SYSTEM}|PAT101"
S1, S2 = studies_of("PAT100")
S101 = studies_of("PAT101")[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("list-api")) as running:
        for bundle in (
            make_report(S1),
            make_report(S1, version=2, status="amended", findings="Revised."),
            make_report(S2, status="preliminary"),
            make_report(S101),
        ):
            assert ingest(running, bundle).status_code == 201
        yield running


REPORTS = {report_id_of(make_report(S1)), report_id_of(make_report(S2))}
MANIFESTS = {manifest_reference_id(S1), manifest_reference_id(S2)}


def search(
    node: RunningNode,
    rtype: str,
    params: list[tuple[str, str]] | dict[str, str],
    *,
    patient: str | None = "PAT100",
    **headers: str,
) -> httpx.Response:
    with node.client(B) as client:
        return client.get(
            f"/fhir/{rtype}", params=params, headers=node.b.headers(patient) | headers
        )


def searchset(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    bundle = body_of(response)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert_valid(bundle)
    return bundle


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


# --- the searchsets ------------------------------------------------------------------------------


def test_document_reference_lists_latest_reports_and_manifests(node: RunningNode) -> None:
    bundle = searchset(search(node, "DocumentReference", {"patient.identifier": PAT100}))
    assert bundle["total"] == 4
    assert set(ids(bundle)) == REPORTS | MANIFESTS
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{node.url}/DocumentReference/{resource['id']}"
        assert entry["search"]["mode"] == "match"
        assert resource["subject"]["identifier"] == {"system": SYSTEM, "value": "PAT100"}
    reports = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    s1 = reports[report_id_of(make_report(S1))]
    assert s1["meta"]["versionId"] == "2" and s1["status"] == "current"
    assert reports[report_id_of(make_report(S2))]["docStatus"] == "preliminary"
    assert bundle["link"] == [
        {
            "relation": "self",
            "url": f"{node.url}/DocumentReference?patient.identifier="
            f"urn%3Aoid%3A1.2.40.0.10.1.4.3.1%7CPAT100&_count=50",
        }
    ]


def test_imaging_study_manifests_carry_endpoints(node: RunningNode) -> None:
    bundle = searchset(
        search(
            node, "ImagingStudy", {"patient": f"Patient/{patient_resource_id(SYSTEM, 'PAT100')}"}
        )
    )
    assert bundle["total"] == 2
    assert set(ids(bundle)) == {imaging_study_id(S1), imaging_study_id(S2)}
    for entry in bundle["entry"]:
        study = entry["resource"]
        assert entry["fullUrl"] == f"{node.url}/ImagingStudy/{study['id']}"
        addresses = {e["id"]: e["address"] for e in study["contained"]}
        assert addresses["a"] == node.node.settings.urls.imaging
        assert study["numberOfInstances"] == STUDIES[study["id"]].instances


@pytest.mark.parametrize("rtype", ["DocumentReference", "ImagingStudy"])
@pytest.mark.parametrize("how", ["_format", "Accept"])
def test_searches_answer_xml(node: RunningNode, rtype: str, how: str) -> None:
    params: list[tuple[str, str]] = [("patient.identifier", PAT100)]
    if how == "_format":
        response = search(node, rtype, [*params, ("_format", "application/fhir+xml")])
    else:
        response = search(node, rtype, params, Accept=XML)
    assert response.headers["content-type"].startswith(XML)
    xml = searchset(response)
    json_bundle = searchset(search(node, rtype, params))
    assert ids(xml) == ids(json_bundle)
    assert xml["total"] == json_bundle["total"]
    if how == "_format":  # links keep the format asked for
        assert all("_format=application%2Ffhir%2Bxml" in link["url"] for link in xml["link"])


def test_post_search_equals_get(node: RunningNode) -> None:
    params = {"patient.identifier": PAT100, "modality": "CT"}
    with node.client(B) as client:
        response = client.post(
            "/fhir/DocumentReference/_search",
            data=params,
            headers=node.b.headers("PAT100"),
        )
        as_xml = client.post(
            "/fhir/DocumentReference/_search",
            data=params,
            headers=node.b.headers("PAT100") | {"Accept": XML},
        )
    posted = searchset(response)
    got = searchset(search(node, "DocumentReference", params))
    assert posted == got
    assert as_xml.headers["content-type"].startswith(XML)
    assert searchset(as_xml) == got
    assert set(ids(posted)) == {report_id_of(make_report(S1)), manifest_reference_id(S1)}
    with node.client(B) as client:
        wrong = client.post(
            "/fhir/DocumentReference/_search",
            content=b"{}",
            headers=node.b.headers("PAT100") | {"Content-Type": "application/json"},
        )
    assert wrong.status_code == 415


def test_summary_count_gives_the_total_only(node: RunningNode) -> None:
    bundle = searchset(
        search(node, "DocumentReference", {"patient.identifier": PAT100, "_summary": "count"})
    )
    assert bundle["total"] == 4
    assert "entry" not in bundle


@pytest.mark.parametrize("rtype", ["DocumentReference", "ImagingStudy"])
def test_following_next_links_gives_every_match_once(node: RunningNode, rtype: str) -> None:
    everything = ids(searchset(search(node, rtype, {"patient.identifier": PAT100})))
    seen: list[str] = []
    pages = 0
    response = search(node, rtype, {"patient.identifier": PAT100, "_count": "1"})
    while True:
        bundle = searchset(response)
        pages += 1
        assert bundle["total"] == len(everything)
        seen += ids(bundle)
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert all(url.startswith(f"{node.url}/{rtype}?") for url in links.values())
        assert ("previous" in links) == (pages > 1)
        if "next" not in links:
            break
        next_url = urlsplit(links["next"])
        assert pages <= len(everything)
        response = search(node, rtype, parse_qsl(next_url.query))
    assert seen == everything
    assert len(set(seen)) == len(seen) == pages


def test_include_brings_patient_and_studies(node: RunningNode) -> None:
    params = [
        ("patient.identifier", PAT100),
        ("_include", "DocumentReference:patient"),
        ("_include", "DocumentReference:related"),
    ]
    bundle = searchset(search(node, "DocumentReference", params))
    included = {
        (e["resource"]["resourceType"], e["resource"]["id"])
        for e in bundle["entry"]
        if e["search"]["mode"] == "include"
    }
    assert included == {
        ("Patient", patient_resource_id(SYSTEM, "PAT100")),
        ("ImagingStudy", imaging_study_id(S1)),
        ("ImagingStudy", imaging_study_id(S2)),
    }
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))  # each resource once


def test_revinclude_brings_the_documents_of_the_studies(node: RunningNode) -> None:
    params = [("patient.identifier", PAT100), ("_revinclude", "DocumentReference:related")]
    bundle = searchset(search(node, "ImagingStudy", params))
    assert set(ids(bundle)) == {imaging_study_id(S1), imaging_study_id(S2)}
    assert set(ids(bundle, "include")) == REPORTS | MANIFESTS


def test_filters_reach_the_engine(node: RunningNode) -> None:
    bundle = searchset(
        search(node, "DocumentReference", {"patient.identifier": PAT100, "modality": "MR"})
    )
    assert set(ids(bundle)) == {report_id_of(make_report(S2)), manifest_reference_id(S2)}
    later = searchset(
        search(node, "ImagingStudy", {"patient.identifier": PAT100, "started": "ge2030-01-01"})
    )
    assert later["total"] == 0 and "entry" not in later


def test_every_search_is_audited(node: RunningNode) -> None:
    response = search(node, "DocumentReference", {"patient.identifier": PAT100, "modality": "CT"})
    assert response.status_code == 200
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.LIST_QUERY
    assert record.outcome == Outcome.SUCCESS
    assert record.query == urlsplit(str(response.request.url)).query
    assert (record.patient_id, record.peer_country) == ("PAT100", "BE")
    assert record.details["total"] == 2
    assert record.interaction == "search-type"
    assert record.studies == [S1]


def test_read_by_id(node: RunningNode) -> None:
    with node.client(B) as client:
        study = client.get(f"/fhir/ImagingStudy/{imaging_study_id(S1)}", headers=node.b.headers())
        doc = client.get(
            f"/fhir/DocumentReference/{manifest_reference_id(S2)}",
            headers=node.b.headers(),
            params={"_format": "xml"},
        )
        theirs = client.get(
            f"/fhir/ImagingStudy/{imaging_study_id(S101)}", headers=node.b.headers()
        )
    assert study.status_code == 200 and body_of(study)["id"] == imaging_study_id(S1)
    assert_valid(body_of(study))
    assert doc.status_code == 200 and body_of(doc)["id"] == manifest_reference_id(S2)
    assert theirs.status_code == 404
    with node.client(B) as client:
        for odd in ("_search", "x" * 65, "a%0Ab"):
            response = client.get(f"/fhir/DocumentReference/{odd}", headers=node.b.headers())
            assert response.status_code == 404, odd


# --- refusals ------------------------------------------------------------------------------------


def _refusal(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    outcome = body_of(response)
    assert outcome["resourceType"] == "OperationOutcome"
    assert_valid(outcome)
    issue: dict[str, Any] = outcome["issue"][0]
    return issue


def test_no_pair_is_refused(node: RunningNode) -> None:
    no_trc = search(node, "DocumentReference", {"patient.identifier": PAT100}, patient=None)
    _refusal(no_trc, 401)
    with node.client(B) as client:
        no_hp = client.get("/fhir/ImagingStudy", params={"patient.identifier": PAT100})
    _refusal(no_hp, 401)
    (record,) = node.audit_records(no_trc.headers["x-request-id"])
    assert record.action == Action.REFUSAL


@pytest.mark.parametrize(
    ("trc_patient", "param"),
    [
        ("PAT101", ("patient.identifier", PAT100)),  # TRC for another patient
        ("PAT100", ("patient.identifier", PAT101)),  # patient parameter of another patient
        ("PAT100", ("patient", f"Patient/{patient_resource_id(SYSTEM, 'PAT101')}")),
        ("PAT100", ("subject.identifier", "PAT101")),
    ],
)
def test_another_patient_is_403_and_audited(
    node: RunningNode, trc_patient: str, param: tuple[str, str]
) -> None:
    response = search(node, "DocumentReference", [param], patient=trc_patient)
    issue = _refusal(response, 403)
    assert issue["code"] == "forbidden"
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.LIST_QUERY
    assert record.outcome == Outcome.SERIOUS_FAILURE
    assert record.patient_id == trc_patient


def test_missing_patient_is_400(node: RunningNode) -> None:
    issue = _refusal(search(node, "ImagingStudy", {"modality": "CT"}), 400)
    assert issue["expression"] == ["patient"]


@pytest.mark.parametrize(
    ("param", "value", "code"),
    [
        ("color", "blue", "not-supported"),
        ("date", "2024-13-45", "invalid"),
        ("date", "20240101", "invalid"),
        ("date", "xx2024-01-01", "not-supported"),
        ("_count", "-1", "invalid"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    node: RunningNode, param: str, value: str, code: str
) -> None:
    response = search(
        node, "DocumentReference", [("patient.identifier", PAT100), (param, value)], Accept=XML
    )
    issue = _refusal(response, 400)
    assert issue["code"] == code
    assert issue["expression"] == [param]
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.LIST_QUERY and record.outcome == Outcome.MINOR_FAILURE


# --- attacks -------------------------------------------------------------------------------------

_NAMES = [
    "patient",
    "patient.identifier",
    "subject",
    "subject:identifier",
    "modality",
    "date",
    "started",
    "status",
    "_id",
    "_count",
    "_offset",
    "_sort",
    "_include",
    "_revinclude",
    "_text",
    "identifier",
    "related",
    "study-instance-uid",
    "_summary",
]
_VALUES = [
    PAT100,
    PAT101,
    "PAT101",
    "PAT1*",
    "pat100",
    f"Patient/{patient_resource_id(SYSTEM, 'PAT101')}",
    f"ImagingStudy/{S101}",
    S101,
    "CT",
    "ge2020",
    "-date",
    "DocumentReference:patient",
    "DocumentReference:related",
    "ImagingStudy:patient",
    "0",
    "1",
    "count",
    "",
    ",",
    "\\",
    "|",
]
_PARAMS = st.lists(
    st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES) | st.text(max_size=12)),
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rtype=st.sampled_from(["DocumentReference", "ImagingStudy"]),
    own=st.booleans(),
    params=_PARAMS,
)
def test_no_parameters_reach_another_patients_data(
    node: RunningNode, rtype: str, own: bool, params: list[tuple[str, str]]
) -> None:
    """Whatever the parameters, the answer is a refusal or PAT100's data only, never a 500."""
    query = ([("patient.identifier", PAT100)] if own else []) + params
    response = search(node, rtype, query)
    assert response.status_code in (200, 400, 403), response.text
    if response.status_code != 200:
        assert body_of(response)["resourceType"] == "OperationOutcome"
        return
    bundle = body_of(response)
    mine = set(studies_of("PAT100"))
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Patient":
            assert resource["identifier"][0]["value"] == "PAT100"
        elif kind == "ImagingStudy":
            assert resource["id"] in mine
        elif kind == "DocumentReference":
            assert resource["subject"]["identifier"]["value"] == "PAT100"
            related = resource["context"]["related"][0]["identifier"]["value"]
            assert related.removeprefix("urn:oid:") in mine


def test_an_entry_that_cannot_be_built_becomes_an_outcome(node: RunningNode) -> None:
    """A study indexed without date or instances (a broken archive entry) cannot be a valid
    manifest: the list leaves it out with a warning instead of failing for the patient."""
    broken = "1.2.826.0.1.3680043.10.543.103.99"
    with node.node.sessions.begin() as session:
        patient = session.scalars(select(Patient).where(Patient.patient_id == "PAT103")).one()
        session.add(Study(study_uid=broken, patient_pk=patient.id, header_sop_uid=f"{broken}.1"))
    for rtype in ("ImagingStudy", "DocumentReference"):
        bundle = searchset(
            search(node, rtype, {"patient.identifier": f"{SYSTEM}|PAT103"}, patient="PAT103")
        )
        assert bundle["total"] == 2
        modes = [e["search"]["mode"] for e in bundle["entry"]]
        assert modes == ["match", "outcome"]
        (issue,) = bundle["entry"][1]["resource"]["issue"]
        assert issue["severity"] == "warning" and broken in issue["diagnostics"]
