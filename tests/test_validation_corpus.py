"""The named corpus: every ``valid/`` file validates without error; every ``invalid/`` file gives
exactly the errors (severity, code, expression) of its ``expected/<name>.outcome.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from ncp.fhir.io import read_path, read_resource
from ncp.validation.engine import Validator
from ncp.validation.issues import from_operation_outcome

CORPUS = Path(__file__).parent / "corpus"
VALID = sorted((CORPUS / "valid").glob("*.*"))
INVALID = sorted((CORPUS / "invalid").glob("*.*"))


def _errors(path: Path) -> set[tuple[str, str, str]]:
    issues = Validator.default().validate(read_resource(read_path(path)))
    return {(i.severity, i.code, i.expression) for i in issues if i.is_error}


def test_the_corpus_has_a_file_per_case_named_by_resource_and_variant() -> None:
    assert len(VALID) >= 8 and len(INVALID) >= 15
    for path in (*VALID, *INVALID):
        resource_type, _, variant = path.stem.partition("-")
        assert variant, path.name
        assert read_resource(read_path(path))["resourceType"] == resource_type, path.name
    expected = {p.name.removesuffix(".outcome.json") for p in (CORPUS / "expected").glob("*")}
    assert expected == {p.stem for p in INVALID}


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_corpus_file_has_no_error(path: Path) -> None:
    assert _errors(path) == set()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_corpus_file_gives_its_expected_outcome(path: Path) -> None:
    outcome = json.loads((CORPUS / "expected" / f"{path.stem}.outcome.json").read_text())
    OperationOutcome.model_validate(outcome)
    expected = {(i.severity, i.code, i.expression) for i in from_operation_outcome(outcome)}
    assert expected, "an invalid case names at least one error"
    assert _errors(path) == expected
