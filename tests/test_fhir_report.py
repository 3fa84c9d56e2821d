"""The imaging report document builder: shape, identifiers, versions, refusals, validity."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncp.fhir.report import (
    COMPOSITION_DIAGNOSTIC_REPORT_URL,
    COMPOSITION_VERSION_URL,
    DIAGNOSTIC_REPORT_COMPOSITION_URL,
    LOINC,
    PRIORITY_CATEGORY,
    SNOMED,
    URI,
    Coding,
    HumanName,
    Identifier,
    ReportBuildError,
    ReportOrder,
    ReportOrganization,
    ReportPatient,
    ReportStudy,
    ReportText,
    ReportVersion,
    build_report_bundle,
    document_identifier,
    report_bundle_json,
)

REPORT_ID = Identifier("urn:oid:1.2.3.4.2", "RPT-0001")
CET = timezone(timedelta(hours=1))
STUDY_START = datetime(2024, 3, 5, 9, 30, tzinfo=CET)
REQUIRED_SECTIONS = ["18726-0", "55115-0", "11329-0", "55111-9", "59776-5", "19005-8"]
URL_KEYS = {"system", "url", "profile"}


def make_report(**changes: Any) -> ReportVersion:
    report = ReportVersion(
        report_id=REPORT_ID,
        version=1,
        status="final",
        issued=STUDY_START + timedelta(hours=3),
        replaces=None,
        title="Imaging report: CT Chest",
        language="en",
        patient=ReportPatient(
            Identifier("urn:oid:1.2.40.0.10.1.4.3.1", "1237010180"),
            HumanName("Müller", ("Łukasz",)),
            date(1980, 1, 1),
            "male",
        ),
        study=ReportStudy(
            study_instance_uid="1.2.826.0.1.3680043.8.498.1",
            accession=Identifier("urn:oid:1.2.3.4.1", "KDN2024000001"),
            started=STUDY_START,
            modalities=("CT",),
            description="CT Chest",
            procedure=Coding(LOINC, "24627-2", "CT Chest"),
            number_of_series=2,
            number_of_instances=41,
        ),
        order=ReportOrder(
            requester=HumanName("Gruber", ("Anna",), ("Dr.",)),
            requesting_service=Coding(SNOMED, "394592004", "Clinical oncology"),
            reason="Staging.",
        ),
        organization=ReportOrganization(Identifier(URI, "urn:oid:1.2.3.4"), "Klinikum", "Wien"),
        radiologist=HumanName("Zöchling", ("Markus",), ("Dr.",)),
        text=ReportText(
            history="Staging of a newly diagnosed carcinoma.",
            procedure="Helical CT.",
            findings="The lungs are clear.",
            impression="No acute abnormality.",
            recommendation=None,
        ),
    )
    return dataclasses.replace(report, **changes)


def version_2(**changes: Any) -> ReportVersion:
    defaults: dict[str, Any] = {
        "version": 2,
        "status": "amended",
        "issued": STUDY_START + timedelta(days=2),
        "replaces": document_identifier(REPORT_ID, 1),
    }
    return make_report(**(defaults | changes))


def resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}


def strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v, key)
    elif isinstance(node, str):
        yield key, node


def assert_no_urls(bundle: dict[str, Any]) -> None:
    """No address anywhere, except code system, extension and profile URLs (and the XHTML
    namespace of narratives): the report must not point at images."""
    for key, value in strings(bundle):
        if key in URL_KEYS:
            continue
        if key == "div":
            value = value.replace('xmlns="http://www.w3.org/1999/xhtml"', "")
        assert "http" not in value, (key, value)


def test_bundle_is_a_valid_document_with_the_composition_first() -> None:
    bundle = build_report_bundle(make_report())
    Bundle.model_validate(bundle)
    assert bundle["type"] == "document"
    assert bundle["entry"][0]["resource"]["resourceType"] == "Composition"
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} >= {
        "Composition",
        "DiagnosticReport",
        "Patient",
        "ImagingStudy",
        "ServiceRequest",
        "Organization",
        "Practitioner",
    }
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
    assert_no_urls(bundle)


def test_the_order_s_priority_is_the_service_request_s_and_read_back() -> None:
    from ncp.provider.report_fields import report_fields
    from tests.test_report_api import assert_valid

    report = make_report()
    urgent = dataclasses.replace(report, order=dataclasses.replace(report.order, priority="stat"))
    bundle = build_report_bundle(urgent)
    assert resources(bundle)["ServiceRequest"]["priority"] == "stat"
    assert_valid(bundle)
    assert report_fields(bundle).priority == "stat"
    assert "priority" not in resources(build_report_bundle(report))["ServiceRequest"]
    assert report_fields(build_report_bundle(report)).priority is None
    wrong = dataclasses.replace(report, order=dataclasses.replace(report.order, priority="high"))
    with pytest.raises(ReportBuildError, match="request-priority"):
        build_report_bundle(wrong)


def test_sections_are_sliced_by_loinc_code_and_carry_narrative() -> None:
    composition = resources(build_report_bundle(make_report()))["Composition"]
    codes = [s["code"]["coding"][0]["code"] for s in composition["section"]]
    assert codes == REQUIRED_SECTIONS
    for section in composition["section"]:
        assert section["code"]["coding"][0]["system"] == LOINC
        ET.fromstring(section["text"]["div"])  # well-formed XHTML
    study_section = composition["section"][0]
    imaging_study = next(
        e
        for e in build_report_bundle(make_report())["entry"]
        if e["resource"]["resourceType"] == "ImagingStudy"
    )
    assert study_section["entry"] == [{"reference": imaging_study["fullUrl"]}]


def test_empty_sections_say_why_and_recommendation_is_optional() -> None:
    report = make_report(
        status="preliminary",
        text=ReportText(history=None, procedure=None, findings="Pending.", impression=None),
    )
    composition = resources(build_report_bundle(report))["Composition"]
    by_code = {s["code"]["coding"][0]["code"]: s for s in composition["section"]}
    assert "18783-1" not in by_code
    for code in ("11329-0", "55111-9", "19005-8"):
        assert by_code[code]["emptyReason"]["coding"][0]["code"] in ("unavailable", "notstarted")
        assert "entry" not in by_code[code]
    assert "emptyReason" not in by_code["59776-5"]
    with_recommendation = make_report(
        text=dataclasses.replace(make_report().text, recommendation="Follow-up in 6 months.")
    )
    codes = [
        s["code"]["coding"][0]["code"]
        for s in resources(build_report_bundle(with_recommendation))["Composition"]["section"]
    ]
    assert codes[-1] == "18783-1"


def test_composition_and_diagnostic_report_agree() -> None:
    bundle = build_report_bundle(version_2())
    found = resources(bundle)
    composition, report = found["Composition"], found["DiagnosticReport"]
    assert composition["status"] == report["status"] == "amended"
    assert report["identifier"] == [composition["identifier"]]
    assert composition["identifier"] == {"system": REPORT_ID.system, "value": REPORT_ID.value}
    composition_url = bundle["entry"][0]["fullUrl"]
    assert report["extension"] == [
        {"url": DIAGNOSTIC_REPORT_COMPOSITION_URL, "valueReference": {"reference": composition_url}}
    ]
    report_url = bundle["entry"][1]["fullUrl"]
    assert composition["extension"] == [
        {"url": COMPOSITION_DIAGNOSTIC_REPORT_URL, "valueReference": {"reference": report_url}},
        {"url": COMPOSITION_VERSION_URL, "valueString": "2"},
    ]
    assert report["code"]["coding"][0]["code"] == composition["type"]["coding"][0]["code"]
    # HL7 Europe imaging: imaging-report (LOINC 85430-7) and imaging (Medical-Imaging), both
    # in Composition and DiagnosticReport.
    for resource in (composition, report):
        codes = {(c["coding"][0]["system"], c["coding"][0]["code"]) for c in resource["category"]}
        assert {(LOINC, "85430-7"), (PRIORITY_CATEGORY, "Medical-Imaging")} <= codes
    order = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    (based_on,) = report["basedOn"]
    assert based_on["reference"] == order["fullUrl"]
    assert based_on["identifier"]["value"] == "KDN2024000001"
    assert order["resource"]["identifier"][0]["value"] == "KDN2024000001"
    assert order["resource"]["identifier"][0]["type"]["coding"][0]["code"] == "ACSN"


def test_imaging_study_names_the_study_without_endpoints() -> None:
    study = resources(build_report_bundle(make_report()))["ImagingStudy"]
    uid, accession = study["identifier"]
    assert uid["system"] == "urn:dicom:uid"
    assert uid["value"] == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert uid["type"]["coding"][0]["code"] == "110180"
    assert accession["type"]["coding"][0]["code"] == "ACSN"
    assert study["status"] == "available"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (2, 41)
    assert "endpoint" not in study and "series" not in study


def test_versions_share_the_business_identifier_but_not_the_document_identifier() -> None:
    first, second = build_report_bundle(make_report()), build_report_bundle(version_2())
    assert first["identifier"] != second["identifier"]
    assert first["identifier"] == {"system": URI, "value": document_identifier(REPORT_ID, 1).value}
    c1, c2 = resources(first)["Composition"], resources(second)["Composition"]
    assert c1["identifier"] == c2["identifier"]
    assert "relatesTo" not in c1
    assert c2["relatesTo"] == [
        {
            "code": "replaces",
            "targetIdentifier": {"system": URI, "value": first["identifier"]["value"]},
        }
    ]
    assert {e["fullUrl"] for e in first["entry"]}.isdisjoint(e["fullUrl"] for e in second["entry"])


def test_building_is_deterministic_and_json_keeps_element_order_and_characters() -> None:
    text = report_bundle_json(make_report())
    assert text == report_bundle_json(make_report())
    assert "Müller" in text and "Łukasz" in text
    assert text.startswith('{\n "resourceType": "Bundle"')
    assert json.loads(text) == build_report_bundle(make_report())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 2, "status": "final"}, "must name the document"),
        ({"replaces": document_identifier(REPORT_ID, 1)}, "replaces nothing"),
        ({"status": "amended"}, "later version"),
        ({"version": 0}, "1 or more"),
        ({"text": ReportText("h", "p", "f", None)}, "needs an impression"),
        ({"issued": datetime(2024, 3, 5, 12, 0)}, "UTC offset"),
        ({"issued": STUDY_START - timedelta(minutes=1)}, "before its study"),
        ({"title": "   "}, "empty"),
        ({"title": "bad \x07 bell"}, r"U\+0007"),
        ({"report_id": Identifier("not-a-uri", "x")}, "absolute URI"),
        ({"status": "registered"}, "preliminary, final or amended"),
    ],
)
def test_inconsistent_input_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportBuildError, match=message):
        build_report_bundle(make_report(**changes))


def test_study_facts_are_checked() -> None:
    bad_uid = dataclasses.replace(make_report().study, study_instance_uid="1.2.03")
    with pytest.raises(ReportBuildError, match="not a DICOM UID"):
        build_report_bundle(make_report(study=bad_uid))
    no_instances = dataclasses.replace(make_report().study, number_of_instances=1)
    with pytest.raises(ReportBuildError, match="at least one series"):
        build_report_bundle(make_report(study=no_instances))
    with pytest.raises(ReportBuildError, match="its own document"):
        build_report_bundle(version_2(replaces=document_identifier(REPORT_ID, 2)))


# --- property: any consistent input builds a valid R4 document ------------------------------

_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"),
        blacklist_characters="\ufffe\uffff",
    ),
    min_size=1,
    max_size=60,
).filter(lambda s: s.strip() != "")
_optional_text = st.none() | _text
_names = st.builds(HumanName, _text, st.lists(_text, max_size=2).map(tuple))
_moments = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2030, 1, 1),
    timezones=st.sampled_from([UTC, CET, timezone(timedelta(hours=-5, minutes=-30))]),
)


@st.composite
def report_versions(draw: st.DrawFn) -> ReportVersion:
    version = draw(st.integers(1, 5))
    status = draw(st.sampled_from(["preliminary", "final"] + (["amended"] if version > 1 else [])))
    started = draw(_moments)
    report_id = Identifier("urn:oid:1.2.3." + str(draw(st.integers(1, 10**6))), draw(_text))
    impression = draw(_text if status != "preliminary" else _optional_text)
    return make_report(
        report_id=report_id,
        version=version,
        status=status,
        issued=started + draw(st.timedeltas(timedelta(0), timedelta(days=400))),
        replaces=document_identifier(report_id, version - 1) if version > 1 else None,
        title=draw(_text),
        patient=ReportPatient(
            Identifier("urn:oid:1.2.40.0.10.1.4.3.1", draw(_text)),
            draw(_names),
            draw(st.dates(date(1900, 1, 1), date(2030, 1, 1))),
            draw(st.sampled_from(["male", "female", "other", "unknown"])),
        ),
        study=dataclasses.replace(
            make_report().study,
            started=started,
            description=draw(_text),
            modalities=tuple(
                draw(
                    st.lists(
                        st.sampled_from(["CT", "MR", "US", "PT"]),
                        min_size=1,
                        max_size=3,
                        unique=True,
                    )
                )
            ),
        ),
        order=ReportOrder(draw(_names), None, draw(_optional_text)),
        radiologist=draw(_names),
        text=ReportText(
            draw(_optional_text),
            draw(_optional_text),
            draw(_optional_text),
            impression,
            draw(_optional_text),
        ),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_versions())
def test_every_consistent_report_builds_a_valid_r4_document(report: ReportVersion) -> None:
    bundle = build_report_bundle(report)
    Bundle.model_validate(json.loads(json.dumps(bundle, ensure_ascii=False)))
    found = resources(bundle)
    assert found["Composition"]["status"] == found["DiagnosticReport"]["status"] == report.status
    texts = {
        "11329-0": report.text.history,
        "55111-9": report.text.procedure,
        "59776-5": report.text.findings,
        "19005-8": report.text.impression,
    }
    for section in found["Composition"]["section"]:
        ET.fromstring(section["text"]["div"])
        code = section["code"]["coding"][0]["code"]
        if code in texts:
            assert ("emptyReason" in section) == (texts[code] is None)
