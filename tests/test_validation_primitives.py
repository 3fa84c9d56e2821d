"""Primitive values against R4's own rules: the 64-character limit of ``id`` (resource ids,
``meta.versionId``, the UIDs of ImagingStudy series and instances, which ``ncp-is-2``/``-3``
promise), and format messages in the project's words, quoting the value and the rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ncp.validation.engine import Validator
from ncp.validation.issues import Issue

CORPUS = Path(__file__).parent / "corpus"
STUDY = json.loads((CORPUS / "valid" / "ImagingStudy-with-series.json").read_text())
MANIFEST = "https://ncp.example/fhir/StructureDefinition/ncp-imaging-study-manifest"
PYDANTIC_WORDS = ("Value error", "spec regex", "Input should", "String should", "pydantic")


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator.default()


def errors_at(issues: list[Issue], expression: str) -> list[Issue]:
    return [i for i in issues if i.is_error and i.expression == expression]


def uid(length: int) -> str:
    """A valid DICOM UID of exactly ``length`` characters."""
    head = "1.2.826.0.1.3680043.8.498."
    return head + "1" * (length - len(head))


@pytest.mark.parametrize("length", [64, 65, 200])
def test_a_resource_id_is_at_most_64_characters(validator: Validator, length: int) -> None:
    patient = {"resourceType": "Patient", "id": "a" * length}
    found = errors_at(validator.validate(patient), "Patient.id")
    assert bool(found) == (length > 64), found
    if found:
        (issue,) = found
        assert "64" in issue.diagnostics and f"{length} characters" in issue.diagnostics
        assert len(issue.diagnostics) < 300  # the value is quoted, but bounded


def test_ids_of_contained_and_bundled_resources_and_version_ids_are_limited_too(
    validator: Validator,
) -> None:
    long = "x" * 65
    patient = {
        "resourceType": "Patient",
        "meta": {"versionId": long},
        "contained": [{"resourceType": "Organization", "id": long, "name": "O"}],
        "managingOrganization": {"reference": f"#{long}"},
    }
    issues = validator.validate(patient)
    assert errors_at(issues, "Patient.meta.versionId")
    assert errors_at(issues, "Patient.contained[0].ofType(Organization).id")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient}]}
    issues = validator.validate(bundle)
    assert errors_at(issues, "Bundle.entry[0].resource.ofType(Patient).meta.versionId")


@pytest.mark.parametrize(("level", "length"), [("series", 64), ("series", 65), ("instance", 65)])
def test_series_and_instance_uids_are_at_most_64_characters(
    validator: Validator, level: str, length: int
) -> None:
    study: dict[str, Any] = copy.deepcopy(STUDY)
    series = study["series"][0]
    if level == "series":
        series["uid"], where = uid(length), "ImagingStudy.series[0].uid"
    else:
        series["instance"][0]["uid"] = uid(length)
        where = "ImagingStudy.series[0].instance[0].uid"
    for profiles in ((), (MANIFEST,)):
        found = errors_at(validator.validate(study, profiles=profiles), where)
        assert bool(found) == (length > 64), (profiles, found)


@pytest.mark.parametrize(
    ("element", "value", "type_name", "rule_words"),
    [
        ("birthDate", "2024-13-01", "date", "YYYY-MM-DD"),
        ("birthDate", "1980-02-30", "date", "no such day"),
        ("deceasedDateTime", "2024-02-30T10:00:00Z", "dateTime", "no such day"),
        ("deceasedDateTime", "2024-01-01T10:00", "dateTime", "time zone"),
    ],
)
def test_format_messages_are_ours_quoting_the_value_and_the_rule(
    validator: Validator, element: str, value: str, type_name: str, rule_words: str
) -> None:
    issues = validator.validate({"resourceType": "Patient", element: value})
    found = errors_at(issues, f"Patient.{element}")
    assert len(found) == 1, found  # one finding, not the model's and ours
    text = found[0].diagnostics
    assert repr(value) in text and type_name in text and rule_words in text, text
    assert not any(words in text for words in PYDANTIC_WORDS), text


def test_meta_and_other_formats_are_checked_in_our_words(validator: Validator) -> None:
    patient = {
        "resourceType": "Patient",
        "meta": {"lastUpdated": "2020-01-01", "versionId": "a b"},
        "name": [{"family": ""}],
        "identifier": [{"system": "not a uri", "value": "x"}],
    }
    issues = validator.validate(patient)
    for where, words in (
        ("Patient.meta.lastUpdated", "instant"),
        ("Patient.meta.versionId", "id"),
        ("Patient.name[0].family", "empty"),
        ("Patient.identifier[0].system", "uri"),
    ):
        # An empty value also breaks ele-1 (no value, no children): another rule, kept.
        found = [i for i in errors_at(issues, where) if i.rule != "ele-1"]
        assert len(found) == 1, (where, found)
        assert words in found[0].diagnostics, found[0].diagnostics
        assert not any(w in found[0].diagnostics for w in PYDANTIC_WORDS), found[0].diagnostics


def test_a_long_bad_value_is_quoted_bounded(validator: Validator) -> None:
    issues = validator.validate({"resourceType": "Patient", "birthDate": "9" * 10_000})
    (issue,) = errors_at(issues, "Patient.birthDate")
    assert "'9999" in issue.diagnostics and "10000 characters" in issue.diagnostics
    assert len(issue.diagnostics) < 300


def test_resources_without_a_definition_held_get_our_words_too(validator: Validator) -> None:
    # No StructureDefinition of MedicationRequest is held: only the model checks it.
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/1"},
        "medicationCodeableConcept": {"text": "x"},
        "authoredOn": "2024-13-01",
    }
    issues = validator.validate(request)
    (issue,) = errors_at(issues, "MedicationRequest.authoredOn")
    assert "'2024-13-01'" in issue.diagnostics and "dateTime" in issue.diagnostics
    assert not any(w in issue.diagnostics for w in PYDANTIC_WORDS), issue.diagnostics
