"""Every reference in what the standard channel emits can be followed (issue 14): a client that
follows each one in a list, a report and a manifest document gets the resource, from the node
(relative or absolute references) or inside the document (``urn:uuid:`` entries). Also the IHE
MADO manifest document the manifest DocumentReference points to, its audit and its refusals.

Node A runs over mutual TLS (``tests.support.node.running_node``) with reports ingested."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from ncp.audit.models import Action, Outcome
from ncp.fhir.identifiers import manifest_reference_id, patient_resource_id
from ncp.fhir.mado import is_manifest_bundle_id
from tests.support.node import SYSTEM, RunningNode, running_node, studies_of
from tests.test_report_api import assert_valid, body_of, get, ingest, make_report, report_id_of

S1, S2 = studies_of("PAT100")
S101 = studies_of("PAT101")[0]
MADO_BUNDLE = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoFhirBundle"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    with running_node(tmp_path_factory.mktemp("references")) as running:
        for bundle in (make_report(S1), make_report(S2, status="preliminary"), make_report(S101)):
            assert ingest(running, bundle).status_code == 201
        yield running


def references(value: Any) -> list[str]:
    """Every ``reference`` string anywhere in a resource (contained ones included)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                found.append(item)
            else:
                found += references(item)
    elif isinstance(value, list):
        for item in value:
            found += references(item)
    return found


def follow(node: RunningNode, reference: str) -> dict[str, Any]:
    """GET a relative or absolute reference on the node, as country B would; the resource."""
    if reference.startswith(node.url + "/"):
        path = urlsplit(reference).path
    else:
        assert "://" not in reference and not reference.startswith("urn:"), reference
        path = urlsplit(node.url).path + "/" + reference
    response = get(node, path)
    assert response.status_code == 200, (reference, response.text)
    resource = body_of(response)
    assert resource["resourceType"] == path.split("/")[-2], reference
    assert resource["id"] == path.split("/")[-1], reference
    return resource


def search(node: RunningNode, rtype: str, *params: tuple[str, str]) -> dict[str, Any]:
    with node.client() as client:
        response = client.get(
            f"/fhir/{rtype}",
            params=[("patient.identifier", f"{SYSTEM}|PAT100"), *params],
            headers=node.b.headers("PAT100"),
        )
    assert response.status_code == 200, response.text
    return body_of(response)


def test_every_reference_of_the_list_answers(node: RunningNode) -> None:
    followed: set[str] = set()
    documents = search(node, "DocumentReference", ("_include", "DocumentReference:subject"))
    studies = search(node, "ImagingStudy", ("_revinclude", "DocumentReference:related"))
    for bundle in (documents, studies):
        for entry in bundle["entry"]:
            resource = entry["resource"]
            contained = {c["id"] for c in resource.get("contained", [])}
            for reference in references(resource):
                if reference.startswith("#"):
                    assert reference[1:] in contained, reference
                elif reference not in followed:
                    follow(node, reference)
                    followed.add(reference)
    kinds = {r.split("/")[-2] for r in followed}
    assert {"Patient", "Organization", "ImagingStudy"} <= kinds, followed


def in_document(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def resolve_in_document(bundle: dict[str, Any], base: str, reference: str) -> dict[str, Any]:
    """A document's reference resolves to one of its entries (urn:uuid, absolute, or relative
    to the node's base, as FHIR resolves references inside a Bundle)."""
    entries = in_document(bundle)
    target = entries.get(reference) or entries.get(f"{base}/{reference}")
    assert target is not None, reference
    return target


def test_every_reference_of_a_report_and_its_attachment_answers(node: RunningNode) -> None:
    documents = search(node, "DocumentReference")
    reports = [e["resource"] for e in documents["entry"] if "docStatus" in e["resource"]]
    assert len(reports) == 2
    for entry in reports:
        url = entry["content"][0]["attachment"]["url"]
        assert url.startswith(node.url + "/Bundle/")
        bundle = body_of(get(node, urlsplit(url).path))
        assert bundle["type"] == "document" and bundle["id"] == entry["id"]
        for resource in in_document(bundle).values():
            for reference in references(resource):
                resolve_in_document(bundle, node.url, reference)
        composition = bundle["entry"][0]["resource"]
        # The DiagnosticReport is reachable from the Composition (HL7 Europe imaging).
        (link,) = [
            e for e in composition["extension"] if e["url"].endswith("diagnosticReportReference")
        ]
        target = resolve_in_document(bundle, node.url, link["valueReference"]["reference"])
        assert target["resourceType"] == "DiagnosticReport"


def test_the_manifest_entry_points_at_a_mado_document(node: RunningNode) -> None:
    documents = search(node, "DocumentReference", ("study-instance-uid", f"urn:oid:{S1}"))
    manifests = [e["resource"] for e in documents["entry"] if "docStatus" not in e["resource"]]
    (entry,) = manifests
    url = entry["content"][0]["attachment"]["url"]
    assert url == f"{node.url}/Bundle/{manifest_reference_id(S1)}"
    assert is_manifest_bundle_id(manifest_reference_id(S1))
    response = get(node, urlsplit(url).path)
    assert response.status_code == 200, response.text
    bundle = body_of(response)
    assert bundle["meta"]["profile"] == [MADO_BUNDLE]
    assert_valid(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds[:3] == ["Composition", "ImagingStudy", "Patient"]
    assert {"Endpoint", "Device", "Organization"} <= set(kinds)
    study = bundle["entry"][1]["resource"]
    assert study["id"] == S1
    assert all(c["resourceType"] != "Endpoint" for c in study.get("contained", []))
    for resource in in_document(bundle).values():
        for reference in references(resource):
            resolve_in_document(bundle, node.url, reference)
    # Entries the node also serves on their own answer at their fullUrl.
    for full_url in in_document(bundle):
        if full_url.startswith(node.url + "/"):
            follow(node, full_url)
    # The same document again, in XML.
    xml = get(node, urlsplit(url).path, params={"_format": "xml"})
    assert xml.status_code == 200
    assert body_of(xml)["identifier"] == bundle["identifier"]


def test_another_patients_manifest_and_patient_are_not_found(node: RunningNode) -> None:
    before = len(node.audit_records())
    other = get(node, f"/fhir/Bundle/{manifest_reference_id(S101)}")
    assert other.status_code == 404
    patient = get(node, f"/fhir/Patient/{patient_resource_id(SYSTEM, 'PAT101')}")
    assert patient.status_code == 404
    organization = get(node, "/fhir/Organization/o0000")
    assert organization.status_code == 404
    records = node.audit_records()[before:]
    reads = [r for r in records if r.action == Action.LIST_QUERY]
    assert len(reads) == 3
    assert all(r.outcome == Outcome.MINOR_FAILURE for r in reads)
    own = get(node, f"/fhir/Bundle/{manifest_reference_id(S1)}")
    assert own.status_code == 200
    (record,) = [r for r in node.audit_records()[before + 3 :] if r.action == Action.LIST_QUERY]
    assert record.outcome == Outcome.SUCCESS and S1 in record.studies
    assert not is_manifest_bundle_id(report_id_of(make_report(S1)))
