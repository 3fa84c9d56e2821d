"""The validator over whole report bundles: everything the builder makes is valid, and each kind
of damage is reported with the right code at the right place, all of them at once."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncp.fhir.io import read_resource, to_xml
from ncp.fhir.report import ReportVersion, build_report_bundle
from ncp.validation.engine import UnknownProfile, Validator
from ncp.validation.issues import Issue, has_errors, to_operation_outcome
from tests.test_fhir_report import make_report, report_versions, version_2
from tests.validation_support import entry_of, generated_bundles, location

OTHER_UID = "1.2.826.0.1.3680043.8.498.999"


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator.default()


def errors(issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.is_error]


def found(issues: list[Issue], code: str, expression: str, rule: str | None = None) -> bool:
    return any(
        i.is_error and i.code == code and i.expression == expression and rule in (None, i.rule)
        for i in issues
    )


# --- what the node emits is valid --------------------------------------------------------------


def test_every_generated_report_bundle_is_valid_as_json_and_as_xml(validator: Validator) -> None:
    bundles = generated_bundles()
    assert len(bundles) > 10
    for bundle in bundles:
        issues = validator.validate(bundle)
        assert errors(issues) == []
        # Every constraint met was evaluated: none skipped at run time.
        assert not [i for i in issues if i.rule == "invariant-coverage"]
        assert errors(validator.validate(read_resource(to_xml(bundle)))) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_versions())
def test_every_bundle_the_builder_produces_validates_without_error(report: ReportVersion) -> None:
    issues = Validator.default().validate(build_report_bundle(report))
    assert errors(issues) == [], issues


def test_warnings_and_information_do_not_make_a_bundle_invalid(validator: Validator) -> None:
    issues = validator.validate(build_report_bundle(make_report()))
    assert not has_errors(issues)
    # dom-6 (no narrative in the entries) is a best-practice warning, never an error.
    assert {i.severity for i in issues if i.rule == "dom-6"} == {"warning"}


# --- mutations ---------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], tuple[str, str, str]]
"""Damages a bundle in place; returns (code, expression, rule) of the error expected."""


def drop_required_element(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, report = entry_of(bundle, "DiagnosticReport")
    del report["status"]
    return "required", location(bundle, "DiagnosticReport"), "DiagnosticReport.status"


def break_required_binding(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, study = entry_of(bundle, "ImagingStudy")
    study["status"] = "finished"
    return "code-invalid", f"{location(bundle, 'ImagingStudy')}.status", "ImagingStudy.status"


def point_a_reference_nowhere(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, report = entry_of(bundle, "DiagnosticReport")
    report["subject"] = {"reference": "urn:uuid:00000000-0000-4000-8000-000000000000"}
    where = f"{location(bundle, 'DiagnosticReport')}.subject.reference"
    return "not-found", where, "reference-resolution"


def point_a_section_entry_nowhere(bundle: dict[str, Any]) -> tuple[str, str, str]:
    composition = bundle["entry"][0]["resource"]
    composition["section"][0]["entry"] = [{"reference": "ImagingStudy/missing"}]
    where = "Bundle.entry[0].resource.ofType(Composition).section[0].entry[0].reference"
    return "not-found", where, "document-reference"


def swap_the_study_uid(bundle: dict[str, Any]) -> tuple[str, str, str]:
    # The report names its study by reference and by Study Instance UID (as the IG allows);
    # the ImagingStudy it points to now carries another study's UID.
    _, report = entry_of(bundle, "DiagnosticReport")
    _, study = entry_of(bundle, "ImagingStudy")
    uid = study["identifier"][0]["value"]
    report["imagingStudy"][0]["identifier"] = {"system": "urn:dicom:uid", "value": uid}
    study["identifier"][0]["value"] = f"urn:oid:{OTHER_UID}"
    where = f"{location(bundle, 'DiagnosticReport')}.imagingStudy[0].identifier.value"
    return "value", where, "linkage-study-uid"


def change_the_study_accession(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, study = entry_of(bundle, "ImagingStudy")
    study["identifier"][1]["value"] = "OTHER-ACCESSION"
    return "value", f"{location(bundle, 'ImagingStudy')}.identifier[1].value", "linkage-accession"


def put_a_non_composition_first(bundle: dict[str, Any]) -> tuple[str, str, str]:
    bundle["entry"][0], bundle["entry"][1] = bundle["entry"][1], bundle["entry"][0]
    return "invariant", "Bundle", "bdl-11"


def duplicate_a_full_url(bundle: dict[str, Any]) -> tuple[str, str, str]:
    bundle["entry"][2]["fullUrl"] = bundle["entry"][1]["fullUrl"]
    return "duplicate", "Bundle.entry[2].fullUrl", "bundle-fullurl-unique"


def break_a_date(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, patient = entry_of(bundle, "Patient")
    patient["birthDate"] = "1980-02-30"
    return "value", f"{location(bundle, 'Patient')}.birthDate", "primitive-format"


def add_an_unknown_element(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, study = entry_of(bundle, "ImagingStudy")
    study["colour"] = "blue"
    return "structure", f"{location(bundle, 'ImagingStudy')}.colour", "unknown-element"


def give_a_string_for_an_integer(bundle: dict[str, Any]) -> tuple[str, str, str]:
    _, study = entry_of(bundle, "ImagingStudy")
    study["numberOfSeries"] = "2"
    return "structure", f"{location(bundle, 'ImagingStudy')}.numberOfSeries", "json-type"


def drop_the_document_identifier(bundle: dict[str, Any]) -> tuple[str, str, str]:
    del bundle["identifier"]
    return "invariant", "Bundle", "bdl-9"


def empty_a_section(bundle: dict[str, Any]) -> tuple[str, str, str]:
    section = bundle["entry"][0]["resource"]["section"][2]
    for key in ("text", "entry", "section", "emptyReason"):
        section.pop(key, None)
    return "invariant", "Bundle.entry[0].resource.ofType(Composition).section[2]", "cmp-1"


MUTATIONS: list[Mutation] = [
    drop_required_element,
    break_required_binding,
    point_a_reference_nowhere,
    point_a_section_entry_nowhere,
    swap_the_study_uid,
    change_the_study_accession,
    put_a_non_composition_first,
    duplicate_a_full_url,
    break_a_date,
    add_an_unknown_element,
    give_a_string_for_an_integer,
    drop_the_document_identifier,
    empty_a_section,
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_each_mutation_is_reported_with_its_code_and_location(
    validator: Validator, mutation: Mutation
) -> None:
    bundle = build_report_bundle(make_report())
    code, expression, rule = mutation(bundle)
    issues = validator.validate(bundle)
    assert found(issues, code, expression, rule), (code, expression, rule, issues)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_versions(), st.sampled_from(MUTATIONS))
def test_mutations_of_any_built_report_are_reported(
    report: ReportVersion, mutation: Mutation
) -> None:
    bundle = build_report_bundle(report)
    code, expression, rule = mutation(bundle)
    issues = Validator.default().validate(bundle)
    assert found(issues, code, expression, rule), (code, expression, rule, issues)


def test_every_damage_is_reported_at_once(validator: Validator) -> None:
    bundle = build_report_bundle(make_report())
    expected = [
        mutation(bundle)
        for mutation in (
            drop_required_element,
            break_a_date,
            add_an_unknown_element,
            swap_the_study_uid,
            duplicate_a_full_url,
        )
    ]
    issues = validator.validate(bundle)
    for code, expression, rule in expected:
        assert found(issues, code, expression, rule), (code, expression, rule)


def test_non_composition_first_and_duplicates_also_fail_the_bundle_invariants(
    validator: Validator,
) -> None:
    bundle = build_report_bundle(make_report())
    put_a_non_composition_first(bundle)
    duplicate_a_full_url(bundle)
    issues = validator.validate(bundle)
    assert found(issues, "invariant", "Bundle", "bdl-11")
    assert found(issues, "invariant", "Bundle", "bdl-7")


def test_a_study_uid_that_agrees_is_not_an_error(validator: Validator) -> None:
    bundle = build_report_bundle(make_report())
    _, report = entry_of(bundle, "DiagnosticReport")
    _, study = entry_of(bundle, "ImagingStudy")
    identifier = {"system": "urn:dicom:uid", "value": study["identifier"][0]["value"]}
    report["imagingStudy"][0]["identifier"] = identifier
    assert errors(validator.validate(bundle)) == []


def test_a_wrong_reference_target_type_is_an_error(validator: Validator) -> None:
    bundle = build_report_bundle(make_report())
    _, report = entry_of(bundle, "DiagnosticReport")
    organization = next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Organization"
    )
    report["imagingStudy"] = [{"reference": organization}]
    issues = validator.validate(bundle)
    assert found(
        issues,
        "structure",
        f"{location(bundle, 'DiagnosticReport')}.imagingStudy[0]",
        "DiagnosticReport.imagingStudy",
    )


# --- profiles, build cost, outcome ------------------------------------------------------------


def test_profiles_forced_or_claimed(validator: Validator) -> None:
    with pytest.raises(UnknownProfile):
        validator.check_profile("https://example.org/fhir/StructureDefinition/nope")
    bundle = build_report_bundle(make_report())
    bundle["meta"] = {"profile": ["https://example.org/fhir/StructureDefinition/nope"]}
    issues = validator.validate(bundle)
    assert any(
        i.severity == "warning"
        and i.code == "not-found"
        and i.expression == "Bundle.meta.profile[0]"
        for i in issues
    )
    assert errors(issues) == []


def test_the_project_bundle_profile_checks_slices_and_entry_profiles(validator: Validator) -> None:
    url = "https://ncp.example/fhir/StructureDefinition/ncp-imaging-report-bundle"
    if validator.profile_type(url) is None:
        pytest.skip("the project's report bundle profile is not there")
    bundle = build_report_bundle(make_report())
    issues = validator.validate(bundle, profiles=[url])
    slice_errors = [i for i in errors(issues) if i.rule.startswith("Bundle.entry:")]
    assert slice_errors == []  # every entry found its slice (by resource type)
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    issues = validator.validate(bundle, profiles=[url])
    assert found(issues, "required", "Bundle", "Bundle.entry:patient")


def test_the_validator_is_built_once_and_later_validations_are_cheap() -> None:
    assert Validator.default() is Validator.default()
    bundle = generated_bundles()[0]
    Validator.default().validate(bundle)
    start = time.perf_counter()
    for _ in range(5):
        Validator.default().validate(copy.deepcopy(bundle))
    assert (time.perf_counter() - start) / 5 < 0.25


def test_outcome_of_a_valid_resource_has_one_information_issue(validator: Validator) -> None:
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    outcome = to_operation_outcome([])
    OperationOutcome.model_validate(outcome)
    assert outcome["issue"] == [
        {"severity": "information", "code": "informational", "diagnostics": "no issues"}
    ]
    issues = validator.validate(build_report_bundle(make_report()))
    OperationOutcome.model_validate(to_operation_outcome(issues))
    assert validator.validate(to_operation_outcome(issues)) == [
        i for i in validator.validate(to_operation_outcome(issues)) if not i.is_error
    ]


def test_garbage_never_raises(validator: Validator) -> None:
    for resource in (
        {},
        {"resourceType": "Nope"},
        {"resourceType": "Bundle", "type": "document", "entry": "x"},
        {"resourceType": "Bundle", "type": "document", "entry": [None, {"resource": 5}]},
        {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Nope"}}]},
        {"resourceType": "Bundle", "entry": [{"resource": {"id": "x"}}]},
        {"resourceType": "Patient", "name": [None], "gender": None, "contained": [{}]},
        {"resourceType": "Patient", "extension": [{"url": 5, "valueString": []}]},
    ):
        issues = validator.validate(copy.deepcopy(resource))
        assert has_errors(issues), resource
        assert all(i.code != "processing" for i in issues), issues


# --- the project's profiles ------------------------------------------------------------------

BUNDLE_PROFILE = "https://ncp.example/fhir/StructureDefinition/ncp-imaging-report-bundle"


@pytest.fixture
def profiled(validator: Validator) -> Validator:
    if validator.profile_type(BUNDLE_PROFILE) is None:
        pytest.skip("the project's report bundle profile is not there")
    return validator


def test_generated_bundles_conform_to_the_project_bundle_profile(profiled: Validator) -> None:
    for bundle in generated_bundles():
        assert errors(profiled.validate(bundle, profiles=[BUNDLE_PROFILE])) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report_versions())
def test_built_bundles_conform_to_the_project_bundle_profile(report: ReportVersion) -> None:
    validator = Validator.default()
    if validator.profile_type(BUNDLE_PROFILE) is None:
        return
    issues = validator.validate(build_report_bundle(report), profiles=[BUNDLE_PROFILE])
    assert errors(issues) == [], issues


def test_profile_section_slices_and_constraints(profiled: Validator) -> None:
    bundle = build_report_bundle(version_2())
    composition = bundle["entry"][0]["resource"]
    where = "Bundle.entry[0].resource.ofType(Composition)"
    composition["section"][0]["code"]["coding"][0]["code"] = "11111-1"  # not the study section
    del composition["relatesTo"]  # version 2 must say which version it replaces
    issues = profiled.validate(bundle, profiles=[BUNDLE_PROFILE])
    assert found(issues, "required", where, "Composition.section:imagingStudy")
    assert found(issues, "invariant", where, "ncp-comp-1")


@pytest.mark.parametrize(
    ("mutation", "rule"),
    [
        (put_a_non_composition_first, "bdl-11"),
        (drop_the_document_identifier, "bdl-9"),
        (lambda bundle: bundle.pop("timestamp"), "bdl-10"),
    ],
    ids=["composition-first", "identifier", "timestamp"],
)
def test_each_document_fault_is_reported_once(
    validator: Validator, mutation: Callable[[dict[str, Any]], object], rule: str
) -> None:
    bundle = build_report_bundle(make_report())
    mutation(bundle)
    issues = [i for i in validator.validate(bundle) if i.is_error]
    assert [i.rule for i in issues if i.rule.startswith(("bdl-", "document-"))] == [rule], issues
