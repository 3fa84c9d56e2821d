"""What the node emits validates with its own validator, against the profiles it claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from ncp.fhir import canonical
from ncp.fhir.io import read_path, read_resource
from ncp.validation.engine import Validator
from ncp.validation.issues import has_errors

SAMPLE_REPORTS = sorted(
    (Path(__file__).parents[1] / "examples" / "sample" / "reports").rglob("*.json")
)


@pytest.mark.parametrize("path", SAMPLE_REPORTS, ids=lambda p: p.name)
def test_committed_sample_reports_are_valid_against_their_claimed_profiles(path: Path) -> None:
    bundle = read_resource(read_path(path))
    assert bundle["meta"]["profile"] == [
        canonical.structure_definition("ncp-imaging-report-bundle"),
        "http://hl7.eu/fhir/imaging/StructureDefinition/BundleReportEuImaging",
    ]
    issues = Validator.default().validate(bundle)
    assert not has_errors(issues), [i for i in issues if i.severity in ("error", "fatal")]


def test_the_sample_has_reports() -> None:
    assert len(SAMPLE_REPORTS) == 7
