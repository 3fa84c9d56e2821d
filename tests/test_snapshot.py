"""The snapshot generator: what it applies, and what it refuses with a typed error."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ncp.fhir.conformance import Definitions, conformance_dir
from ncp.fhir.snapshot import (
    CardinalityWidening,
    InvalidConstraint,
    InvalidSlicing,
    SnapshotError,
    UnknownElement,
    generate_snapshot,
)

LOINC = "http://loinc.org"
CORE = "http://hl7.org/fhir/StructureDefinition/"


@pytest.fixture(scope="module")
def base() -> Definitions:
    # Base definitions only, so that these tests do not depend on the project's profiles.
    return Definitions(conformance_dir("profiles"), conformance_dir("profiles") / "__none__")


def el(element_id: str, **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": element_id, "path": re.sub(r":[^.]*", "", element_id)}
    last = element_id.rsplit(".", 1)[-1]
    if ":" in last:
        out["sliceName"] = last.split(":", 1)[1]
    out.update(props)
    return out


def profile(type_name: str, *elements: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "StructureDefinition",
        "url": f"https://ncp.example/fhir/StructureDefinition/test-{type_name.lower()}",
        "type": type_name,
        "baseDefinition": CORE + type_name,
        "derivation": "constraint",
        "differential": {"element": list(elements)},
    }


def snap(base: Definitions, type_name: str, *elements: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as id -> element (ids are unique)."""
    out = generate_snapshot(profile(type_name, *elements), base.structure_definition)
    ids = [e["id"] for e in out]
    assert len(ids) == len(set(ids)), "duplicate element ids"
    return {e["id"]: e for e in out}


def ids(base: Definitions, type_name: str, *elements: dict[str, Any]) -> list[str]:
    out = generate_snapshot(profile(type_name, *elements), base.structure_definition)
    return [e["id"] for e in out]


def concept(code: str) -> dict[str, Any]:
    return {"coding": [{"system": LOINC, "code": code}]}


SECTION_SLICING = {"discriminator": [{"type": "pattern", "path": "code"}], "rules": "open"}


# -- what is applied ------------------------------------------------------------------------------


def test_an_empty_differential_gives_the_base_snapshot(base: Definitions) -> None:
    core = base.by_type("Patient")["snapshot"]["element"]
    assert ids(base, "Patient") == [e["id"] for e in core]


def test_cardinality_must_support_and_texts_are_applied(base: Definitions) -> None:
    s = snap(
        base,
        "Patient",
        el("Patient.birthDate", min=1, mustSupport=True, short="Born", comment="Why"),
        el("Patient.name", min=1, max="3"),
    )
    assert s["Patient.birthDate"]["min"] == 1
    assert s["Patient.birthDate"]["mustSupport"] is True
    assert (s["Patient.birthDate"]["short"], s["Patient.birthDate"]["comment"]) == ("Born", "Why")
    assert (s["Patient.name"]["min"], s["Patient.name"]["max"]) == (1, "3")
    # The base element's own base stays that of the resource definition.
    assert s["Patient.name"]["base"] == {"path": "Patient.name", "min": 0, "max": "*"}


def test_datatype_children_are_expanded_in_place_when_constrained(base: Definitions) -> None:
    order = ids(
        base,
        "Patient",
        el("Patient.identifier.system", min=1),
        el("Patient.identifier.value", min=1, maxLength=64),
    )
    i = order.index("Patient.identifier")
    assert order[i + 1 : i + 9] == [
        "Patient.identifier.id",
        "Patient.identifier.extension",
        "Patient.identifier.use",
        "Patient.identifier.type",
        "Patient.identifier.system",
        "Patient.identifier.value",
        "Patient.identifier.period",
        "Patient.identifier.assigner",
    ]
    assert order[i + 9] == "Patient.active"
    s = snap(base, "Patient", el("Patient.identifier.value", maxLength=64))
    assert s["Patient.identifier.value"]["maxLength"] == 64
    assert s["Patient.identifier.value"]["base"]["path"] == "Identifier.value"


def test_fixed_pattern_binding_and_types_are_applied(base: Definitions) -> None:
    vs = "https://ncp.example/fhir/ValueSet/imaging-modality"
    s = snap(
        base,
        "ImagingStudy",
        el("ImagingStudy.modality", binding={"strength": "extensible", "valueSet": vs}),
        el(
            "ImagingStudy.series.endpoint",
            type=[{"code": "Reference", "targetProfile": [CORE + "Endpoint"]}],
        ),
        el("ImagingStudy.identifier.system", fixedUri="urn:dicom:uid"),
        el("ImagingStudy.procedureCode", patternCodeableConcept=concept("18748-4")),
    )
    assert s["ImagingStudy.modality"]["binding"]["valueSet"] == vs
    assert s["ImagingStudy.modality"]["binding"]["strength"] == "extensible"
    assert s["ImagingStudy.identifier.system"]["fixedUri"] == "urn:dicom:uid"
    assert s["ImagingStudy.procedureCode"]["patternCodeableConcept"] == concept("18748-4")


def test_slices_follow_the_sliced_element_and_its_children(base: Definitions) -> None:
    order = ids(
        base,
        "Composition",
        el("Composition.section", slicing=SECTION_SLICING),
        el("Composition.section.text", min=1),
        el("Composition.section:a", min=1, max="1"),
        el("Composition.section:a.code", patternCodeableConcept=concept("18726-0")),
        el("Composition.section:b", max="1"),
        el("Composition.section:b.code", patternCodeableConcept=concept("55115-0")),
    )
    i = order.index("Composition.section:a")
    # the unsliced element's children come first, then each slice with its own children
    assert order[i - 1] == "Composition.section.section"
    assert order[i + 1] == "Composition.section:a.id"
    j = order.index("Composition.section:b")
    assert order[j - 1] == "Composition.section:a.section"
    assert order[-1] == "Composition.section:b.section"


def test_a_slice_inherits_the_constraints_of_the_unsliced_element(base: Definitions) -> None:
    s = snap(
        base,
        "Composition",
        el("Composition.section", min=1, slicing=SECTION_SLICING),
        el("Composition.section.text", min=1),
        el("Composition.section:a", max="1"),
        el("Composition.section:a.code", patternCodeableConcept=concept("18726-0")),
    )
    assert s["Composition.section:a.text"]["min"] == 1
    assert s["Composition.section:a"]["sliceName"] == "a"
    # a slice starts optional, whatever the sliced element's minimum
    assert s["Composition.section:a"]["min"] == 0
    assert "slicing" not in s["Composition.section:a"]
    assert s["Composition.section:a.code"]["path"] == "Composition.section.code"


def test_an_extension_can_be_constrained_inline(base: Definitions) -> None:
    url = "http://example.org/ext"
    s = snap(
        base,
        "DiagnosticReport",
        el(
            "DiagnosticReport.extension",
            slicing={"discriminator": [{"type": "value", "path": "url"}], "rules": "open"},
        ),
        el("DiagnosticReport.extension:link", min=1, max="1"),
        el("DiagnosticReport.extension:link.url", fixedUri=url),
        el("DiagnosticReport.extension:link.value[x]", min=1, type=[{"code": "Reference"}]),
        el("DiagnosticReport.extension:link.value[x].reference", min=1),
    )
    assert s["DiagnosticReport.extension:link.url"]["fixedUri"] == url
    assert s["DiagnosticReport.extension:link.value[x]"]["type"] == [{"code": "Reference"}]
    assert s["DiagnosticReport.extension:link.value[x].reference"]["min"] == 1


def test_a_content_reference_is_expanded_from_its_target(base: Definitions) -> None:
    s = snap(base, "Composition", el("Composition.section.section.title", min=1))
    assert s["Composition.section.section.title"]["min"] == 1
    assert s["Composition.section.section.title"]["path"] == "Composition.section.section.title"


def test_a_resource_element_narrows_to_a_resource_type(base: Definitions) -> None:
    s = snap(
        base,
        "Bundle",
        el(
            "Bundle.entry",
            slicing={"discriminator": [{"type": "type", "path": "resource"}], "rules": "open"},
        ),
        el("Bundle.entry:patient", max="1"),
        el("Bundle.entry:patient.resource", type=[{"code": "Patient"}]),
    )
    assert s["Bundle.entry:patient.resource"]["type"] == [{"code": "Patient"}]


def test_a_profiled_type_brings_the_children_of_its_profile(base: Definitions) -> None:
    simple = CORE + "SimpleQuantity"
    s = snap(
        base,
        "Observation",
        el("Observation.value[x]", type=[{"code": "Quantity", "profile": [simple]}]),
        el("Observation.value[x].unit", min=1),
    )
    # SimpleQuantity forbids a comparator; the expanded child says so
    assert s["Observation.value[x].comparator"]["max"] == "0"
    assert s["Observation.value[x].unit"]["min"] == 1


def test_generation_is_deterministic(base: Definitions) -> None:
    elements = (
        el("Composition.section", slicing=SECTION_SLICING),
        el("Composition.section:a", max="1"),
        el("Composition.section:a.code", patternCodeableConcept=concept("18726-0")),
    )
    assert ids(base, "Composition", *elements) == ids(base, "Composition", *elements)
    assert snap(base, "Composition", *elements) == snap(base, "Composition", *elements)


# -- what is refused ------------------------------------------------------------------------------

REFUSED: list[tuple[str, str, tuple[dict[str, Any], ...], type[SnapshotError], str]] = [
    (
        "min below base",
        "Patient",
        (el("Patient.name", min=1), el("Patient.name", min=0)),
        CardinalityWidening,
        "below base",
    ),
    (
        "max above base",
        "Patient",
        (el("Patient.birthDate", max="2"),),
        CardinalityWidening,
        "above base",
    ),
    (
        "max * above 1",
        "Patient",
        (el("Patient.birthDate", max="*"),),
        CardinalityWidening,
        "above base",
    ),
    (
        "min above max",
        "Patient",
        (el("Patient.name", min=2, max="1"),),
        CardinalityWidening,
        "above max",
    ),
    (
        "required made optional",
        "ImagingStudy",
        (el("ImagingStudy.status", min=0),),
        CardinalityWidening,
        "below base",
    ),
    ("bad max", "Patient", (el("Patient.name", max="many"),), CardinalityWidening, "number"),
    ("unknown element", "Patient", (el("Patient.shoeSize", min=1),), UnknownElement, "shoeSize"),
    (
        "unknown datatype child",
        "Patient",
        (el("Patient.identifier.issuer", min=1),),
        UnknownElement,
        "issuer",
    ),
    ("wrong root", "Patient", (el("Person.name", min=1),), UnknownElement, "does not start"),
    (
        "id and path disagree",
        "Patient",
        ({"id": "Patient.name", "path": "Patient.gender", "min": 1},),
        UnknownElement,
        "disagree",
    ),
    (
        "children of a choice",
        "Observation",
        (el("Observation.value[x].code", min=1),),
        UnknownElement,
        "several types",
    ),
    (
        "type-specific choice name",
        "Observation",
        (el("Observation.valueQuantity", min=1),),
        UnknownElement,
        "valueQuantity",
    ),
    (
        "slice without slicing",
        "Composition",
        (el("Composition.section:a", max="1"),),
        InvalidSlicing,
        "not sliced",
    ),
    (
        "unknown slice",
        "Composition",
        (el("Composition.section", slicing=SECTION_SLICING), el("Composition.section:a.code")),
        UnknownElement,
        "no slice",
    ),
    (
        "discriminator path unknown",
        "Composition",
        (
            el(
                "Composition.section",
                slicing={"discriminator": [{"type": "pattern", "path": "kode"}], "rules": "open"},
            ),
        ),
        InvalidSlicing,
        "kode",
    ),
    (
        "discriminator type unknown",
        "Composition",
        (
            el(
                "Composition.section",
                slicing={"discriminator": [{"type": "guess", "path": "code"}], "rules": "open"},
            ),
        ),
        InvalidSlicing,
        "discriminator type",
    ),
    (
        "slicing without discriminator",
        "Composition",
        (el("Composition.section", slicing={"rules": "open"}),),
        InvalidSlicing,
        "without",
    ),
    (
        "bad rules",
        "Composition",
        (
            el(
                "Composition.section",
                slicing={
                    "discriminator": [{"type": "pattern", "path": "code"}],
                    "rules": "sometimes",
                },
            ),
        ),
        InvalidSlicing,
        "rules",
    ),
    (
        "slicing a single element",
        "Composition",
        (
            el(
                "Composition.subject",
                slicing={"discriminator": [{"type": "type", "path": "$this"}], "rules": "open"},
            ),
        ),
        InvalidSlicing,
        "at most once",
    ),
    (
        "slice without its discriminator value",
        "Composition",
        (el("Composition.section", slicing=SECTION_SLICING), el("Composition.section:a", max="1")),
        InvalidSlicing,
        "no fixed/pattern",
    ),
    (
        "type slice not narrowed",
        "Bundle",
        (
            el(
                "Bundle.entry",
                slicing={"discriminator": [{"type": "type", "path": "resource"}], "rules": "open"},
            ),
            el("Bundle.entry:x", max="1"),
            el("Bundle.entry:x.resource", min=1),
        ),
        InvalidSlicing,
        "narrow",
    ),
    (
        "slices that cannot be told apart",
        "Composition",
        (
            el("Composition.section", slicing=SECTION_SLICING),
            el("Composition.section:a", max="1"),
            el("Composition.section:a.code", patternCodeableConcept=concept("18726-0")),
            el("Composition.section:b", max="1"),
            el("Composition.section:b.code", patternCodeableConcept=concept("18726-0")),
        ),
        InvalidSlicing,
        "told apart",
    ),
    (
        "slice minimums exceed max",
        "Composition",
        (
            el("Composition.section", max="2", slicing=SECTION_SLICING),
            *(
                x
                for c in "abc"
                for x in (
                    el(f"Composition.section:{c}", min=1),
                    el(f"Composition.section:{c}.code", patternCodeableConcept=concept(c)),
                )
            ),
        ),
        InvalidSlicing,
        "minimums exceed",
    ),
    (
        "slice max above element max",
        "Composition",
        (
            el("Composition.section", max="2", slicing=SECTION_SLICING),
            el("Composition.section:a", max="3"),
        ),
        CardinalityWidening,
        "above base",
    ),
    (
        "re-slicing",
        "Composition",
        (el("Composition.section", slicing=SECTION_SLICING), el("Composition.section:a/b")),
        InvalidSlicing,
        "re-slicing",
    ),
    (
        "bad slice name",
        "Composition",
        (el("Composition.section", slicing=SECTION_SLICING), el("Composition.section:a b")),
        InvalidSlicing,
        "slice name",
    ),
    (
        "choice type slice",
        "Observation",
        (el("Observation.value[x]:valueQuantity", min=1),),
        InvalidSlicing,
        "choice",
    ),
    (
        "type not in base",
        "Patient",
        (el("Patient.birthDate", type=[{"code": "string"}]),),
        InvalidConstraint,
        "not allowed",
    ),
    (
        "target outside base",
        "ImagingStudy",
        (
            el(
                "ImagingStudy.subject",
                type=[{"code": "Reference", "targetProfile": [CORE + "Organization"]}],
            ),
        ),
        InvalidConstraint,
        "not allowed",
    ),
    (
        "profile of another type",
        "Bundle",
        (
            el(
                "Bundle.entry.resource",
                type=[{"code": "Patient", "profile": [CORE + "Organization"]}],
            ),
        ),
        InvalidConstraint,
        "not a known profile",
    ),
    (
        "fixed value of the wrong type",
        "Patient",
        (el("Patient.birthDate", fixedString="x"),),
        InvalidConstraint,
        "does not match",
    ),
    (
        "binding on a non-coded element",
        "Patient",
        (el("Patient.birthDate", binding={"strength": "required", "valueSet": "http://x/vs"}),),
        InvalidConstraint,
        "cannot be bound",
    ),
    (
        "weaker binding",
        "Patient",
        (el("Patient.gender", binding={"strength": "extensible", "valueSet": "http://x/vs"}),),
        InvalidConstraint,
        "weaker",
    ),
    (
        "required binding without value set",
        "ImagingStudy",
        (el("ImagingStudy.modality", binding={"strength": "required"}),),
        InvalidConstraint,
        "needs a valueSet",
    ),
    (
        "maxLength on a non-string",
        "Patient",
        (el("Patient.birthDate", maxLength=10),),
        InvalidConstraint,
        "non-string",
    ),
    (
        "unknown property",
        "Patient",
        (el("Patient.name", mustSuport=True),),
        InvalidConstraint,
        "mustSuport",
    ),
    (
        "duplicate constraint key",
        "Patient",
        (el("Patient", constraint=[{"key": "dom-2", "severity": "error", "expression": "true"}]),),
        InvalidConstraint,
        "exists",
    ),
]


@pytest.mark.parametrize(
    ("type_name", "elements", "error", "message"),
    [pytest.param(t, e, x, m, id=name) for name, t, e, x, m in REFUSED],
)
def test_unsound_differentials_are_refused_with_a_typed_error(
    base: Definitions,
    type_name: str,
    elements: tuple[dict[str, Any], ...],
    error: type[SnapshotError],
    message: str,
) -> None:
    with pytest.raises(error, match=re.escape(message)) as caught:
        generate_snapshot(profile(type_name, *elements), base.structure_definition)
    assert caught.value.profile.endswith(type_name.lower())
    assert caught.value.element


def test_a_profile_of_the_wrong_type_or_base_is_refused(base: Definitions) -> None:
    wrong = profile("Patient")
    wrong["baseDefinition"] = CORE + "Practitioner"
    with pytest.raises(InvalidConstraint, match="differs from base"):
        generate_snapshot(wrong, base.structure_definition)
    missing = profile("Patient")
    missing["baseDefinition"] = "https://ncp.example/fhir/StructureDefinition/nothing"
    with pytest.raises(InvalidConstraint, match="not found"):
        generate_snapshot(missing, base.structure_definition)
    specialization = profile("Patient")
    specialization["derivation"] = "specialization"
    with pytest.raises(InvalidConstraint, match="constraint profiles"):
        generate_snapshot(specialization, base.structure_definition)
