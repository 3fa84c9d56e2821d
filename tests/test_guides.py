"""The implementation guides' rules in the project's validator (docs/profiles.md, "Guides"):
the transcriptions of HL7 Europe imaging and IHE MADO profiles answer to the guides' canonical
URLs, the guides' published examples (IHE MADO, tests/reference/) validate as the guide says, a
resource that breaks a guide's rule fails with that rule, and ``ncp validate --ig``."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ncp.cli import main
from ncp.fhir.conformance import load_definitions, transcribed
from ncp.validation.engine import Validator
from ncp.validation.guides import GUIDES, guide_profiles
from tests.validation_support import generated_bundles

REPO = Path(__file__).parents[1]
MADO_EXAMPLES = sorted((REPO / "tests" / "reference" / "ihe-rad-mado").glob("*-bundle.json"))
EU = "http://hl7.eu/fhir/imaging/StructureDefinition/"
MADO = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/"


def rules(resource: dict[str, Any], profiles: list[str] | None = None) -> set[str]:
    """The rules (element ids or invariant keys) of the errors found."""
    issues = Validator.default().validate(resource, profiles=profiles or [])
    return {i.rule for i in issues if i.is_error}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def transcriptions() -> list[dict[str, Any]]:
    return [sd for sd in load_definitions().own("StructureDefinition") if transcribed(sd)]


def test_every_guide_profile_used_is_transcribed_with_its_source() -> None:
    found = {transcribed(sd): sd for sd in transcriptions()}
    for guide in GUIDES.values():
        for url in guide.profiles:
            assert url in found, url
    for url, sd in found.items():
        assert url is not None and url.startswith((EU, MADO)), url
        assert sd["purpose"].startswith("Source: "), sd["id"]
        assert sd["purpose"].endswith(".fsh"), sd["id"]
        assert sd["copyright"], sd["id"]


@pytest.mark.parametrize("suffix", ["", "|0.1.0", "#0.1.0"])
def test_a_guide_canonical_resolves_to_its_transcription(suffix: str) -> None:
    definitions = load_definitions()
    sd = definitions.structure_definition(MADO + "MadoFhirBundle" + suffix)
    assert sd["id"] == "ihe-mado-MadoFhirBundle"
    assert Validator.default().profile_type(EU + "CompositionEuImaging") == "Composition"


# --- IHE MADO ----------------------------------------------------------------------------------


@pytest.mark.skipif(not MADO_EXAMPLES, reason="IHE MADO reference examples absent")
@pytest.mark.parametrize("path", MADO_EXAMPLES, ids=lambda p: p.name)
def test_the_mado_examples_validate_as_the_guide_says(path: Path) -> None:
    bundle = load(path)
    assert bundle["meta"]["profile"][0].startswith(MADO + "MadoFhirBundle")
    assert rules(bundle) == set()
    assert rules(bundle, guide_profiles(["mado"])) == set()


def _endpoint(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Endpoint"
    )


def _study(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"
    )


MADO_BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no Retrieve Location UID": (
        lambda b: _endpoint(b).pop("extension"),
        "Endpoint.extension:retrieve-location-uid",
    ),
    "no creator Device": (
        lambda b: b.update(
            entry=[e for e in b["entry"] if e["resource"]["resourceType"] != "Device"]
        ),
        "Bundle.entry:creator",
    ),
    "procedure code nobody can read": (
        lambda b: _study(b).update(procedureCode=[{"coding": [{"system": "x:y", "code": "1"}]}]),
        "mado-reqproc-1",
    ),
    "series without endpoint": (
        lambda b: _study(b)["series"][0].pop("endpoint"),
        "ImagingStudy.series.endpoint",
    ),
    "study without numberOfSeries": (
        lambda b: _study(b).pop("numberOfSeries"),
        "ImagingStudy.numberOfSeries",
    ),
}


@pytest.mark.skipif(not MADO_EXAMPLES, reason="IHE MADO reference examples absent")
@pytest.mark.parametrize("case", sorted(MADO_BREAKS))
def test_a_mado_example_that_breaks_a_rule_fails_with_that_rule(case: str) -> None:
    bundle = copy.deepcopy(load(MADO_EXAMPLES[0]))
    change, rule = MADO_BREAKS[case]
    change(bundle)
    assert rule in rules(bundle)


# --- HL7 Europe imaging -------------------------------------------------------------------------


def _resource(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


def _section(bundle: dict[str, Any], code: str) -> dict[str, Any]:
    composition = _resource(bundle, "Composition")
    return next(s for s in composition["section"] if s["code"]["coding"][0]["code"] == code)


def _drop_category(rtype: str) -> Callable[[dict[str, Any]], None]:
    def change(bundle: dict[str, Any]) -> None:
        resource = _resource(bundle, rtype)
        resource["category"] = [
            c for c in resource["category"] if c["coding"][0]["code"] != "Medical-Imaging"
        ]

    return change


EU_BREAKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "composition without Medical-Imaging": (
        _drop_category("Composition"),
        "Composition.category:imaging",
    ),
    "report without Medical-Imaging": (
        _drop_category("DiagnosticReport"),
        "DiagnosticReport.category:imaging",
    ),
    "narrative section with neither entry, emptyReason nor note": (
        lambda b: _section(b, "11329-0").pop("extension"),
        "eu-imaging-composition-1",
    ),
    "report not linked to its composition": (
        lambda b: _resource(b, "DiagnosticReport").pop("extension"),
        "DiagnosticReport.extension:composition",
    ),
    "order reference without accession number": (
        lambda b: _resource(b, "DiagnosticReport")["basedOn"][0].pop("identifier"),
        "hl7eu-diagnosticreporteuimaging-accession",
    ),
    "order not for imaging": (
        lambda b: _resource(b, "ServiceRequest").pop("category"),
        "ServiceRequest.category:imaging",
    ),
    "legal attester without time": (
        lambda b: _resource(b, "Composition")["attester"][0].pop("time"),
        "Composition.attester:legalAuthenticator.time",
    ),
    "report performer other than the composition's author": (
        lambda b: _resource(b, "DiagnosticReport").update(
            performer=_resource(b, "DiagnosticReport")["resultsInterpreter"]
        ),
        "dr-comp-author-org",
    ),
    "study UID without its type": (
        lambda b: _resource(b, "ImagingStudy")["identifier"][0].pop("type"),
        "ImagingStudy.identifier:studyInstanceUid.type",
    ),
}


@pytest.fixture(scope="module")
def final_report() -> dict[str, Any]:
    return next(b for b in generated_bundles() if _resource(b, "Composition")["status"] == "final")


def test_a_generated_report_passes_as_is(final_report: dict[str, Any]) -> None:
    assert rules(final_report) == set()
    assert rules(final_report, guide_profiles(["eu-imaging"])) == set()


@pytest.mark.parametrize("case", sorted(EU_BREAKS))
def test_a_report_that_breaks_a_rule_fails_with_that_rule(
    final_report: dict[str, Any], case: str
) -> None:
    bundle = copy.deepcopy(final_report)
    change, rule = EU_BREAKS[case]
    change(bundle)
    # Through the profiles the report claims, and through the guide alone (--ig).
    assert rule in rules(bundle)
    bundle["meta"] = {}
    for entry in bundle["entry"]:
        entry["resource"].pop("meta", None)
    assert rule in rules(bundle, guide_profiles(["eu-imaging"]))


# --- ncp validate --ig ---------------------------------------------------------------------------


def test_validate_ig_checks_against_the_guide(
    tmp_path: Path, final_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    bare = copy.deepcopy(final_report)
    bare.pop("meta")
    for entry in bare["entry"]:
        entry["resource"].pop("meta", None)
    good.write_text(json.dumps(bare), encoding="utf-8")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", "--ig", "eu-imaging", str(good)]) == 0
    _drop_category("Composition")(bare)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bare), encoding="utf-8")
    assert main(["validate", str(bad)]) == 0  # base R4 alone has nothing against it
    assert main(["validate", "--ig", "eu-imaging", str(bad)]) == 1
    assert "Composition.category:imaging" in capsys.readouterr().out
    # A report is not a MADO manifest.
    assert main(["validate", "--ig", "mado", str(good)]) == 1
    with pytest.raises(SystemExit) as refused:
        main(["validate", "--ig", "nope", str(good)])
    assert refused.value.code == 2
