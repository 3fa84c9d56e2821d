"""Contract tests of the report routes (ncp.provider.report_api) over real HTTPS with mutual TLS:
read, history and version read for peers under a verified pair; ingest for national systems.

Node A runs from ``tests.support.node.running_node`` (its own node for this module: the tests
ingest reports). Everything the node answers is validated with the project's validator."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from ncp.audit.models import Action, Outcome
from ncp.fhir.identifiers import report_resource_id
from ncp.fhir.io import read_resource, to_json, to_xml
from ncp.fhir.manifest import UNQUALIFIED_ACCESSION_SYSTEM
from ncp.fhir.report import (
    LOINC,
    Coding,
    HumanName,
    Identifier,
    ReportOrder,
    ReportOrganization,
    ReportPatient,
    ReportStudy,
    ReportText,
    ReportVersion,
    build_report_bundle,
    document_identifier,
)
from ncp.validation.engine import Validator
from ncp.validation.issues import has_errors
from tests.support.node import STUDIES, SYSTEM, A, B, RunningNode, running_node

REPORT_SYSTEM = "urn:oid:1.2.40.0.10.1.4.3.9"
ACCESSION_SYSTEM = UNQUALIFIED_ACCESSION_SYSTEM
"""The test archive names no Issuer of Accession Number: reports use what manifests then say."""
_LOCK = threading.Lock()
XML = "application/fhir+xml"


# --- helpers shared with tests/test_list_api.py ---------------------------------------------------


def make_report(
    study_uid: str,
    *,
    version: int = 1,
    status: str = "final",
    number: str | None = None,
    findings: str = "No focal lesion.",
) -> dict[str, Any]:
    """A report bundle about one of the node's studies (its patient from the test dataset)."""
    study = STUDIES[study_uid]
    rid = Identifier(REPORT_SYSTEM, number or f"RPT-{study_uid.rsplit('.', 2)[-2]}-{study_uid[-1]}")
    report = ReportVersion(
        report_id=rid,
        version=version,
        status=status,  # type: ignore[arg-type]
        issued=datetime(2024, 1, 3, 9, version, tzinfo=UTC),
        replaces=document_identifier(rid, version - 1) if version > 1 else None,
        title=f"{study.modality} report",
        language="en",
        patient=ReportPatient(
            Identifier(SYSTEM, study.patient_id),
            HumanName("Gruber", ("Anna",)),
            date(1980, 5, 17),
            "female",
        ),
        study=ReportStudy(
            study_uid,
            # The accession number the test archive gives the study (tests.support.node).
            Identifier(ACCESSION_SYSTEM, f"ACC{study_uid.rsplit('.', 2)[-2]}{study_uid[-1]}"),
            datetime(2024, 1, 2, 10, 15, tzinfo=UTC),
            (study.modality,),
            f"{study.modality} study",
            Coding(LOINC, "24627-2", "CT Chest"),
            1,
            study.instances,
        ),
        order=ReportOrder(HumanName("Maier", ("Karl",))),
        organization=ReportOrganization(
            Identifier("urn:oid:1.2.40.0.10.1.4.3.8", "RAD1"), "Radiology Wien"
        ),
        radiologist=HumanName("Berger", ("Lena",)),
        text=ReportText("None.", "Standard protocol.", findings, "Normal study."),
    )
    return build_report_bundle(report)


def report_id_of(bundle: dict[str, Any]) -> str:
    identifier = bundle["entry"][0]["resource"]["identifier"]
    return report_resource_id(identifier["system"], identifier["value"])


def assert_valid(resource: dict[str, Any]) -> None:
    with _LOCK:
        issues = Validator.default().validate(resource)
    errors = [(i.expression, i.diagnostics) for i in issues if i.is_error]
    assert not has_errors(issues), errors


def body_of(response: httpx.Response) -> dict[str, Any]:
    """The FHIR resource answered, in the format its Content-Type says."""
    xml = response.headers["content-type"].startswith(XML)
    assert response.content.lstrip()[:1] == (b"<" if xml else b"{")
    return read_resource(response.content)


def ingest(
    node: RunningNode, bundle: dict[str, Any], *, xml: bool = False, **headers: str
) -> httpx.Response:
    """POST /fhir/Bundle as A's national system (A's own client certificate, no assertions),
    the body in JSON or XML; ``headers`` are added (``Prefer``, ``Accept``)."""
    body, kind = (to_xml(bundle), XML) if xml else (to_json(bundle), "application/fhir+json")
    with node.client(A) as client:
        return client.post("/fhir/Bundle", content=body, headers={"Content-Type": kind} | headers)


# --- fixtures ----------------------------------------------------------------------------------

S1, S2 = (uid for uid, s in STUDIES.items() if s.patient_id == "PAT100")
S101 = next(uid for uid, s in STUDIES.items() if s.patient_id == "PAT101")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("report-api")) as running:
        yield running


@pytest.fixture(scope="module")
def stored(node: RunningNode) -> dict[str, str]:
    """Report of S1 in versions 1 and 2, and a report of PAT101: their ids."""
    for bundle in (make_report(S1), make_report(S1, version=2, findings="Small nodule.")):
        assert ingest(node, bundle).status_code == 201
    other = make_report(S101)
    assert ingest(node, other).status_code == 201
    return {"s1": report_id_of(make_report(S1)), "pat101": report_id_of(other)}


def get(
    node: RunningNode,
    path: str,
    *,
    patient: str = "PAT100",
    who: str = B,
    params: dict[str, str] | None = None,
    **headers: str,
) -> httpx.Response:
    with node.client(who) as client:
        return client.get(path, params=params, headers=node.b.headers(patient) | headers)


# --- reading -----------------------------------------------------------------------------------


def test_read_answers_the_latest_version_with_etag_and_last_modified(
    node: RunningNode, stored: dict[str, str]
) -> None:
    response = get(node, f"/fhir/Bundle/{stored['s1']}")
    assert response.status_code == 200, response.text
    bundle = body_of(response)
    assert bundle["id"] == stored["s1"]
    assert bundle["type"] == "document"
    assert bundle["meta"]["versionId"] == "2"
    assert response.headers["etag"] == 'W/"2"'
    modified = parsedate_to_datetime(response.headers["last-modified"])
    served = datetime.fromisoformat(bundle["meta"]["lastUpdated"].replace("Z", "+00:00"))
    assert modified == served.replace(microsecond=0)
    assert_valid(bundle)


@pytest.mark.parametrize("how", ["_format", "Accept"])
@pytest.mark.parametrize("path", ["", "/_history", "/_history/1"])
def test_reads_answer_xml(node: RunningNode, stored: dict[str, str], path: str, how: str) -> None:
    """Read, history and version read in XML, asked for either way: the same resource."""
    url = f"/fhir/Bundle/{stored['s1']}{path}"
    if how == "_format":
        response = get(node, url, params={"_format": "xml"})
    else:
        response = get(node, url, Accept=XML)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"{XML}; charset=utf-8"
    resource = body_of(response)
    as_json = body_of(get(node, url))
    # A history Bundle's timestamp is when it was assembled: the two requests may differ there.
    assert resource | {"timestamp": ""} == as_json | {"timestamp": ""}
    assert_valid(resource)


def test_unsupported_format_is_406_and_reads_nothing(
    node: RunningNode, stored: dict[str, str]
) -> None:
    response = get(node, f"/fhir/Bundle/{stored['s1']}", params={"_format": "text/csv"})
    assert response.status_code == 406
    assert all(
        r.action != Action.REPORT_READ for r in node.audit_records(response.headers["x-request-id"])
    )


def test_history_lists_every_version_newest_first(
    node: RunningNode, stored: dict[str, str]
) -> None:
    rid = stored["s1"]
    response = get(node, f"/fhir/Bundle/{rid}/_history")
    assert response.status_code == 200, response.text
    history = body_of(response)
    assert history["type"] == "history"
    assert history["total"] == 2
    versions = [e["resource"]["meta"]["versionId"] for e in history["entry"]]
    assert versions == ["2", "1"]
    for entry, vid in zip(history["entry"], versions, strict=True):
        assert entry["fullUrl"] == f"{node.url}/Bundle/{rid}"
        assert entry["request"] == {"method": "POST", "url": "Bundle"}
        assert entry["response"]["status"].startswith("201")
        assert entry["response"]["etag"] == f'W/"{vid}"'
        assert entry["response"]["location"] == f"{node.url}/Bundle/{rid}/_history/{vid}"
    assert_valid(history)
    xml = get(node, f"/fhir/Bundle/{rid}/_history", params={"_format": "xml"})
    assert xml.headers["content-type"].startswith(XML)
    assert body_of(xml) | {"timestamp": ""} == history | {"timestamp": ""}


def test_version_read_gives_an_older_version(node: RunningNode, stored: dict[str, str]) -> None:
    rid = stored["s1"]
    response = get(node, f"/fhir/Bundle/{rid}/_history/1", Accept=XML)
    assert response.status_code == 200, response.text
    bundle = body_of(response)
    assert bundle["meta"]["versionId"] == "1"
    assert response.headers["etag"] == 'W/"1"'
    assert bundle["identifier"] != body_of(get(node, f"/fhir/Bundle/{rid}"))["identifier"]
    assert_valid(bundle)
    for missing in ("3", "0", "x"):
        gone = get(node, f"/fhir/Bundle/{rid}/_history/{missing}")
        assert gone.status_code == 404
        assert body_of(gone)["resourceType"] == "OperationOutcome"


def test_unknown_id_is_404(node: RunningNode, stored: dict[str, str]) -> None:
    odd = ("a%0Ab", "x" * 65, "%E2%9C%93")  # not FHIR ids: never reach store or audit text
    paths = [f"/fhir/Bundle/{i}" for i in ("r-unknown", *odd)]
    for path in [*paths, *(f"{p}/_history" for p in paths), *(f"{p}/_history/1" for p in paths)]:
        response = get(node, path)
        assert response.status_code == 404
        outcome = body_of(response)
        assert outcome["issue"][0]["code"] == "not-found"
        assert_valid(outcome)


def test_nul_in_the_id_is_404(node: RunningNode, stored: dict[str, str]) -> None:
    assert get(node, "/fhir/Bundle/%00").status_code == 404


def test_another_patients_report_looks_unknown_and_is_audited(
    node: RunningNode, stored: dict[str, str]
) -> None:
    """TRC for PAT100, report of PAT101: the same 404 as an unknown id (existence not told),
    while the audit record says what happened."""
    theirs = get(node, f"/fhir/Bundle/{stored['pat101']}")
    unknown = get(node, "/fhir/Bundle/r-unknown")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.content == unknown.content
    for path in ("/_history", "/_history/1"):
        assert get(node, f"/fhir/Bundle/{stored['pat101']}{path}").status_code == 404
    (record,) = node.audit_records(theirs.headers["x-request-id"])
    assert record.action == Action.REPORT_READ
    assert record.outcome == Outcome.SERIOUS_FAILURE
    assert "another patient" in (record.reason or "")
    (plain,) = node.audit_records(unknown.headers["x-request-id"])
    assert plain.outcome == Outcome.MINOR_FAILURE
    # With a TRC for PAT101 the same report is served.
    assert get(node, f"/fhir/Bundle/{stored['pat101']}", patient="PAT101").status_code == 200


def test_read_without_a_pair_is_refused(node: RunningNode, stored: dict[str, str]) -> None:
    path = f"/fhir/Bundle/{stored['s1']}"
    with node.client(B) as client:
        headers = node.b.headers(None)  # HP assertion, no TRC
        no_trc = client.get(path, headers=headers)
        no_hp = client.get(path)
    assert no_trc.status_code == 401
    assert no_hp.status_code == 401
    assert body_of(no_trc)["resourceType"] == "OperationOutcome"
    (record,) = node.audit_records(no_trc.headers["x-request-id"])
    assert record.action == Action.REFUSAL


def test_successful_read_is_audited(node: RunningNode, stored: dict[str, str]) -> None:
    response = get(node, f"/fhir/Bundle/{stored['s1']}")
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.REPORT_READ
    assert record.outcome == Outcome.SUCCESS
    assert (record.patient_id, record.patient_issuer) == ("PAT100", SYSTEM.removeprefix("urn:oid:"))
    assert record.studies == [S1]
    assert record.interaction == "read"
    assert record.details["version"] == "2"


def test_a_conditional_read_of_the_version_held_is_304_and_audited(
    node: RunningNode, stored: dict[str, str]
) -> None:
    rid = stored["s1"]
    current = get(node, f"/fhir/Bundle/{rid}")
    modified = current.headers["last-modified"]
    held = {"If-None-Match": 'W/"2"'}
    for path, conditions in [
        (f"/fhir/Bundle/{rid}", held),
        (f"/fhir/Bundle/{rid}", {"If-None-Match": '"2"'}),  # compared weakly
        (f"/fhir/Bundle/{rid}", {"If-None-Match": 'W/"7", W/"2"'}),
        (f"/fhir/Bundle/{rid}", {"If-None-Match": "*"}),
        (f"/fhir/Bundle/{rid}", {"If-Modified-Since": modified}),
        (f"/fhir/Bundle/{rid}/_history/1", {"If-None-Match": 'W/"1"'}),
    ]:
        response = get(node, path, **conditions)
        assert response.status_code == 304, (path, conditions)
        assert response.content == b""
        assert response.headers["etag"] == ('W/"1"' if path.endswith("/1") else 'W/"2"')
        (record,) = node.audit_records(response.headers["x-request-id"])
        assert (record.action, record.outcome) == (Action.REPORT_READ, Outcome.SUCCESS)


def test_the_capability_statement_says_reports_are_read_conditionally(node: RunningNode) -> None:
    with node.client(B) as client:
        statement = body_of(client.get("/fhir/metadata"))
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert by_type["Bundle"]["conditionalRead"] == "full-support"
    # The list's resources are derived, not versioned: no conditional read is promised there.
    assert all("conditionalRead" not in by_type[t] for t in ("DocumentReference", "ImagingStudy"))
    assert_valid(statement)


def test_a_conditional_read_of_another_version_gets_the_version(
    node: RunningNode, stored: dict[str, str]
) -> None:
    rid = stored["s1"]
    for conditions in [
        {"If-None-Match": 'W/"1"'},  # a stale copy
        {"If-None-Match": "W/2"},  # not an entity tag: no match
        {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"},
        {"If-Modified-Since": "yesterday"},  # unreadable: ignored
        # If-None-Match decides when both are sent, however far ahead the date.
        {"If-None-Match": 'W/"1"', "If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"},
    ]:
        response = get(node, f"/fhir/Bundle/{rid}", **conditions)
        assert response.status_code == 200, conditions
        assert body_of(response)["meta"]["versionId"] == "2"


def test_a_conditional_read_tells_nothing_of_another_patients_report(
    node: RunningNode, stored: dict[str, str]
) -> None:
    response = get(node, f"/fhir/Bundle/{stored['pat101']}", **{"If-None-Match": "*"})
    assert response.status_code == 404


# --- ingest ------------------------------------------------------------------------------------


def test_ingest_creates_then_is_idempotent(node: RunningNode) -> None:
    bundle = make_report(S2)
    created = ingest(node, bundle)
    assert created.status_code == 201, created.text
    rid = report_id_of(bundle)
    assert created.headers["location"] == f"{node.url}/Bundle/{rid}/_history/1"
    assert created.headers["etag"] == 'W/"1"'
    stored = body_of(created)
    assert stored["id"] == rid and stored["meta"]["versionId"] == "1"
    assert_valid(stored)
    again = ingest(node, bundle)
    assert again.status_code == 200
    assert body_of(again) == stored
    (record,) = node.audit_records(created.headers["x-request-id"])
    assert record.action == Action.INGEST and record.outcome == Outcome.SUCCESS
    assert record.patient_id == "PAT100"
    assert record.studies == [S2]
    assert record.details["new"] is True


def test_ingest_in_xml_with_prefer(node: RunningNode) -> None:
    bundle = make_report(S2, number="RPT-XML-1")
    minimal = ingest(node, bundle, xml=True, Prefer="return=minimal")
    assert minimal.status_code == 201, minimal.text
    assert minimal.content == b""
    assert minimal.headers["location"].endswith("/_history/1")
    note = ingest(node, bundle, Prefer="return=OperationOutcome", Accept=XML)
    assert note.status_code == 200
    outcome = body_of(note)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"
    assert_valid(outcome)
    served = get(node, f"/fhir/Bundle/{report_id_of(bundle)}")
    assert served.status_code == 200


def test_invalid_report_is_422_and_nothing_is_stored(node: RunningNode) -> None:
    bundle = make_report(S2, number="RPT-INVALID")
    del bundle["entry"][0]["resource"]["status"]  # Composition.status is 1..1
    response = ingest(node, bundle)
    assert response.status_code == 422
    outcome = body_of(response)
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(i["severity"] in ("error", "fatal") for i in outcome["issue"])
    assert_valid(outcome)
    assert get(node, f"/fhir/Bundle/{report_id_of(bundle)}").status_code == 404
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.INGEST and record.outcome == Outcome.MINOR_FAILURE


def test_same_version_with_other_content_is_409(node: RunningNode) -> None:
    first = make_report(S2, number="RPT-CONFLICT")
    assert ingest(node, first).status_code == 201
    changed = make_report(S2, number="RPT-CONFLICT", findings="Something else entirely.")
    response = ingest(node, changed)
    assert response.status_code == 409
    outcome = body_of(response)
    assert outcome["issue"][0]["code"] == "conflict"
    assert_valid(outcome)


def test_unreadable_and_oversized_bodies_are_refused(node: RunningNode) -> None:
    with node.client(A) as client:
        broken = client.post(
            "/fhir/Bundle", content=b"{not json", headers={"Content-Type": "application/fhir+json"}
        )
        wrong_type = client.post(
            "/fhir/Bundle", content=b"a=b", headers={"Content-Type": "text/plain"}
        )
    assert broken.status_code == 400
    assert wrong_type.status_code == 415
    (record,) = node.audit_records(broken.headers["x-request-id"])
    assert record.action == Action.INGEST and record.outcome == Outcome.MINOR_FAILURE


def test_peer_may_not_ingest(node: RunningNode) -> None:
    bundle = make_report(S2, number="RPT-FROM-PEER")
    with node.client(B) as client:
        response = client.post(
            "/fhir/Bundle",
            content=to_json(bundle),
            headers=node.b.headers(None) | {"Content-Type": "application/fhir+json"},
        )
    assert response.status_code == 403
    assert body_of(response)["resourceType"] == "OperationOutcome"
    (record,) = node.audit_records(response.headers["x-request-id"])
    assert record.action == Action.REFUSAL
    assert get(node, f"/fhir/Bundle/{report_id_of(bundle)}").status_code == 404


def test_new_version_supersedes_the_old_one_in_the_list(node: RunningNode) -> None:
    number = "RPT-LIST-1"
    assert ingest(node, make_report(S2, number=number)).status_code == 201
    rid = report_id_of(make_report(S2, number=number))
    params = {"patient.identifier": f"{SYSTEM}|PAT100", "_id": rid}

    def listed(extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
        response = get(node, "/fhir/DocumentReference", params=params | (extra or {}))
        assert response.status_code == 200, response.text
        bundle = body_of(response)
        assert_valid(bundle)
        return [e["resource"] for e in bundle.get("entry", [])]

    (before,) = listed()
    assert before["meta"]["versionId"] == "1"
    second = make_report(S2, number=number, version=2, status="amended", findings="Revised.")
    assert ingest(node, second).status_code == 201
    (after,) = listed()
    assert after["meta"]["versionId"] == "2"
    assert after["status"] == "current" and after["docStatus"] == "amended"
    assert after["masterIdentifier"] != before["masterIdentifier"]
    (old,) = listed({"status": "superseded"})
    assert old["meta"]["versionId"] == "1" and old["status"] == "superseded"
    assert old["content"][0]["attachment"]["url"] == f"{node.url}/Bundle/{rid}/_history/1"
    history = body_of(get(node, f"/fhir/Bundle/{rid}/_history"))
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
