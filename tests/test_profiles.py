"""The project's conformance resources (profiles/): well-formed, canonical, snapshots up to date,
and structurally comparable with what the node builds and with the IHE MADO reference examples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.operationdefinition import OperationDefinition
from fhir.resources.R4B.searchparameter import SearchParameter
from fhir.resources.R4B.structuredefinition import StructureDefinition

from ncp.fhir import canonical
from ncp.fhir.conformance import Definitions, conformance_dir, load_definitions, transcribed
from ncp.fhir.snapshot import build_profiles

PROFILES = conformance_dir("profiles")
REPO = PROFILES.parent
REFERENCE = Path(__file__).parent / "reference"  # public examples, see reference/SOURCES.md
MADO = REFERENCE / "ihe-rad-mado"
CORE = "http://hl7.org/fhir/StructureDefinition/"

MODELS: dict[str, Any] = {
    "StructureDefinition": StructureDefinition,
    "SearchParameter": SearchParameter,
    "OperationDefinition": OperationDefinition,
}
CANONICAL = {
    "StructureDefinition": canonical.structure_definition,
    "SearchParameter": canonical.search_parameter,
    "OperationDefinition": canonical.operation,
}
# Search parameters core R4 already defines (hl7.fhir.r4.core 4.0.1): ours must not redefine them.
CORE_SEARCH_CODES = {
    "DocumentReference": {
        "authenticator", "author", "category", "contenttype", "custodian", "date", "description",
        "encounter", "event", "facility", "format", "identifier", "language", "location",
        "patient", "period", "related", "relatesto", "relation", "relationship",
        "security-label", "setting", "status", "subject", "type",
    },
    "ImagingStudy": {
        "basedon", "bodysite", "dicom-class", "encounter", "endpoint", "identifier", "instance",
        "interpreter", "modality", "patient", "performer", "reason", "referrer", "series",
        "started", "status", "subject",
    },
}  # fmt: skip

PROFILE_IDS = {
    "ncp-imaging-report-bundle",
    "ncp-imaging-report-composition",
    "ncp-imaging-report-diagnosticreport",
    "ncp-imaging-study-manifest",
    "ncp-imaging-documentreference",
    "ncp-patient",
    "ncp-practitioner",
    "ncp-practitionerrole",
    "ncp-organization",
    "ncp-endpoint-wado-rs",
    "ncp-endpoint-viewer",
    "ncp-auditevent",
    "ncp-size-bytes",
}
GUIDE_PROFILE_IDS = {
    # HL7 Europe imaging report (R4), transcribed (docs/profiles.md, "Guides")
    "hl7eu-BundleReportEuImaging",
    "hl7eu-CompositionEuImaging",
    "hl7eu-DiagnosticReportEuImaging",
    "hl7eu-ImagingStudyEuImaging",
    "hl7eu-ObservationFindingEuImaging",
    "hl7eu-ServiceRequestOrderEuImaging",
    # IHE RAD MADO, transcribed
    "ihe-mado-MadoComposition",
    "ihe-mado-MadoCreator",
    "ihe-mado-MadoCreatorOrganization",
    "ihe-mado-MadoFhirBundle",
    "ihe-mado-MadoImagingStudy",
    "ihe-mado-MadoPatient",
    "ihe-mado-MadoRequestedProcedure",
    "ihe-mado-MadoWadoEndpoint",
    "ihe-mado-MadoWebViewerEndpoint",
}


def conformance_files() -> list[Path]:
    return sorted(PROFILES.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def structure_definitions() -> list[dict[str, Any]]:
    return [load(p) for p in sorted(PROFILES.glob("StructureDefinition-*.json"))]


def snapshot(profile_id: str) -> list[dict[str, Any]]:
    elements: list[dict[str, Any]] = load(PROFILES / f"StructureDefinition-{profile_id}.json")[
        "snapshot"
    ]["element"]
    return elements


# -- well-formed and canonical --------------------------------------------------------------------


@pytest.mark.parametrize("path", conformance_files(), ids=lambda p: p.name)
def test_every_conformance_resource_parses_as_r4(path: Path) -> None:
    resource = load(path)
    MODELS[resource["resourceType"]].model_validate(resource)


@pytest.mark.parametrize("path", conformance_files(), ids=lambda p: p.name)
def test_canonical_urls_ids_and_versions_follow_the_project_rules(path: Path) -> None:
    resource = load(path)
    rtype, rid = resource["resourceType"], resource["id"]
    assert path.name == f"{rtype}-{rid}.json"
    assert resource["url"] == CANONICAL[rtype](rid)
    assert resource["url"].startswith(canonical.BASE + "/")
    assert (resource["version"], resource["status"]) == ("0.1.0", "draft")
    if rtype == "StructureDefinition":
        assert resource["fhirVersion"] == "4.0.1"
        assert resource["derivation"] == "constraint"
        assert resource["baseDefinition"].startswith(CORE)


def test_the_expected_profiles_are_all_there() -> None:
    assert {sd["id"] for sd in structure_definitions()} == PROFILE_IDS | GUIDE_PROFILE_IDS


def test_files_are_deterministic_pretty_json() -> None:
    for path in conformance_files():
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(load(path), ensure_ascii=False, indent=2) + "\n", path.name


def test_every_profile_and_value_set_named_is_known_or_our_own() -> None:
    """Profiles name core types, core resources, the project's own profiles or the guide profiles
    the project transcribes; bindings name core value sets or the project's own (terminology/),
    never another organisation's guessed URL."""
    ours = {sd["url"] for sd in structure_definitions()}
    ours |= {t for sd in structure_definitions() if (t := transcribed(sd))}
    for sd in structure_definitions():
        for e in sd["differential"]["element"]:
            for t in e.get("type", []):
                for url in t.get("profile", []) + t.get("targetProfile", []):
                    assert url in ours or re.fullmatch(re.escape(CORE) + r"[A-Za-z]+", url), url
            vs = e.get("binding", {}).get("valueSet")
            if vs:
                assert vs.startswith(canonical.BASE + "/ValueSet/"), vs


def test_value_sets_bound_by_the_profiles_exist_in_terminology() -> None:
    definitions = load_definitions()
    named = {
        e["binding"]["valueSet"]
        for sd in structure_definitions()
        for e in sd["differential"]["element"]
        if "valueSet" in e.get("binding", {})
    }
    for op in PROFILES.glob("OperationDefinition-*.json"):
        named |= {p["binding"]["valueSet"] for p in load(op)["parameter"] if "binding" in p}
    missing = sorted(url for url in named if not definitions.has(url, "ValueSet"))
    assert not missing, f"value sets not in terminology/: {missing}"


# -- snapshots ------------------------------------------------------------------------------------


def test_committed_snapshots_equal_regenerated_ones() -> None:
    base = Definitions(PROFILES, PROFILES / "__none__")
    built = build_profiles(PROFILES, base.structure_definition)
    stale = [p.name for p, text in built.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"run scripts/build-profiles: {stale}"


@pytest.mark.parametrize("profile_id", sorted(PROFILE_IDS))
def test_each_snapshot_holds_every_base_element(profile_id: str) -> None:
    sd = load(PROFILES / f"StructureDefinition-{profile_id}.json")
    base = load_definitions().structure_definition(sd["baseDefinition"])
    elements = sd["snapshot"]["element"]
    ids = [e["id"] for e in elements]
    assert len(ids) == len(set(ids))
    assert {e["id"] for e in base["snapshot"]["element"]} <= set(ids)
    assert {e["path"] for e in elements} >= {e["path"] for e in base["snapshot"]["element"]}
    # every differential element is in the snapshot, with what it says
    by_id = {e["id"]: e for e in elements}
    for d in sd["differential"]["element"]:
        e = by_id[d["id"]]
        for key in ("min", "max", "mustSupport", "sliceName", "maxLength"):
            if key in d:
                assert e[key] == d[key], (d["id"], key)


def test_definitions_find_the_project_profiles_and_base_types() -> None:
    definitions = load_definitions()
    url = canonical.structure_definition("ncp-imaging-study-manifest")
    assert definitions.structure_definition(url)["type"] == "ImagingStudy"
    assert definitions.by_type("ImagingStudy")["url"] == CORE + "ImagingStudy"
    assert definitions.by_type("string")["kind"] == "primitive-type"
    assert definitions.code_system("http://hl7.org/fhir/composition-status")["content"]


# -- search parameters and operations -------------------------------------------------------------


def test_search_parameters_add_only_what_core_lacks() -> None:
    codes: set[tuple[str, str]] = set()
    for path in PROFILES.glob("SearchParameter-*.json"):
        sp = load(path)
        for base in sp["base"]:
            assert sp["code"] not in CORE_SEARCH_CODES[base], (base, sp["code"])
            assert (base, sp["code"]) not in codes
            codes.add((base, sp["code"]))
            assert sp["expression"].startswith(f"{base}."), sp["expression"]
            assert path.name == f"SearchParameter-{base}-{sp['code']}.json"
    assert codes == {
        ("DocumentReference", "modality"),
        ("DocumentReference", "bodysite"),
        ("DocumentReference", "study-instance-uid"),
        ("DocumentReference", "accession-number"),
        ("ImagingStudy", "study-type"),
        ("ImagingStudy", "requesting-specialty"),
    }


def test_search_parameter_expressions_name_elements_the_manifest_profiles_carry() -> None:
    docref = {e.get("fixedUri") for e in snapshot("ncp-imaging-documentreference")}
    for path in PROFILES.glob("SearchParameter-DocumentReference-*.json"):
        for url in re.findall(r"extension\('([^']+)'\)", load(path)["expression"]):
            assert url in docref or url == "concept", url


def test_the_imaging_access_operation_has_its_parameters() -> None:
    op = load(PROFILES / "OperationDefinition-imaging-access.json")
    assert (op["code"], op["system"], op["type"], op["instance"]) == (
        "imaging-access",
        True,
        False,
        False,
    )
    params = {(p["use"], p["name"]): (p["min"], p["max"]) for p in op["parameter"]}
    assert params == {
        ("in", "study"): (1, "*"),
        ("in", "option"): (1, "1"),
        ("in", "purpose"): (1, "1"),
        ("in", "priority"): (0, "1"),
        ("out", "token"): (1, "1"),
        ("out", "expires"): (1, "1"),
        ("out", "dicomweb"): (0, "1"),
        ("out", "viewer"): (0, "1"),
    }


# -- structural comparison with instances ---------------------------------------------------------
# Not a validator (that is ncp.validation): cardinality, fixed and pattern values, and slices told
# apart by their discriminators, enough to see where an instance and a profile differ in shape.


class _Node:
    def __init__(self, element: dict[str, Any]) -> None:
        self.element = element
        self.children: list[_Node] = []
        self.slices: list[_Node] = []

    @property
    def name(self) -> str:
        return str(self.element["path"]).rsplit(".", 1)[-1]

    def child(self, name: str) -> _Node | None:
        return next((c for c in self.children if c.name == name), None)


def _tree(elements: list[dict[str, Any]]) -> _Node:
    root = _Node(elements[0])
    for e in elements[1:]:
        segs = [(s.partition(":")[0], s.partition(":")[2]) for s in str(e["id"]).split(".")]
        node = root
        for name, slice_name in segs[1:-1]:
            node = next(c for c in node.children if c.name == name)
            if slice_name:
                node = next(s for s in node.slices if s.element.get("sliceName") == slice_name)
        name, slice_name = segs[-1]
        if slice_name:
            next(c for c in node.children if c.name == name).slices.append(_Node(e))
        else:
            node.children.append(_Node(e))
    return root


def _values(obj: Any, name: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    if name.endswith("[x]"):
        stem = name[:-3]
        found = [v for k, v in obj.items() if k.startswith(stem) and k[len(stem) :][:1].isupper()]
    else:
        found = [obj[name]] if name in obj else []
    out: list[Any] = []
    for v in found:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _matches(pattern: Any, value: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            all(any(_matches(p, v) for v in _values(value, k)) for p in pv)
            if isinstance(pv, list)
            else any(_matches(pv, v) for v in _values(value, k))
            for k, pv in pattern.items()
        )
    return bool(pattern == value)


def _fixed(element: dict[str, Any]) -> tuple[str, Any] | None:
    for k, v in element.items():
        if re.fullmatch(r"(fixed|pattern)[A-Z]\w*", k):
            return k, v
    return None


def _in_slice(sliced: _Node, s: _Node, value: Any) -> bool:
    for d in sliced.element["slicing"]["discriminator"]:
        profiles = [p for t in s.element.get("type", []) for p in t.get("profile", [])]
        if d["type"] == "type":
            child = s.child(d["path"])
            assert child is not None
            code = child.element["type"][0]["code"]
            found = _values(value, d["path"])
            if not found or found[0].get("resourceType") != code:
                return False
        elif d["path"] == "url" and profiles:
            if value.get("url") not in profiles:
                return False
        else:
            parts = [] if d["path"] == "$this" else d["path"].removeprefix("$this.").split(".")
            values: list[Any] = [value]
            node: _Node | None = s
            for part in parts:
                node = node.child(part) if node is not None else None
                values = [x for v in values for x in _values(v, part)]
            fixed = _fixed(node.element) if node is not None else None
            if fixed is None or not any(_matches(fixed[1], v) for v in values):
                return False
    return True


def shape_differences(elements: list[dict[str, Any]], resource: dict[str, Any]) -> set[str]:
    """Where ``resource`` departs from the profile's shape, one message per element id."""
    problems: set[str] = set()

    def count(node: _Node, n: int) -> None:
        e = node.element
        if n < int(e["min"]):
            problems.add(f"{e['id']}: {n} < min {e['min']}")
        if e["max"] != "*" and n > int(e["max"]):
            problems.add(f"{e['id']}: {n} > max {e['max']}")

    def walk(node: _Node, values: list[Any]) -> None:
        fixed = _fixed(node.element)
        if fixed and any(not _matches(fixed[1], v) for v in values):
            problems.add(f"{node.element['id']}: does not match {fixed[0]}")
        for c in node.children:
            for v in values:
                found = _values(v, c.name)
                count(c, len(found))
                for s in c.slices:
                    members = [x for x in found if _in_slice(c, s, x)]
                    count(s, len(members))
                    walk(s, members)
                walk(c, found)

    walk(_tree(elements), [resource])
    return problems


def unknown_elements(elements: list[dict[str, Any]], resource: dict[str, Any]) -> set[str]:
    """Element names in ``resource`` that the profile's snapshot does not know."""
    out: set[str] = set()

    def walk(node: _Node, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            return
        for k, v in value.items():
            if k == "resourceType" or k.startswith("_"):
                continue
            match = [
                c
                for c in node.children
                if c.name == k
                or (c.name.endswith("[x]") and re.fullmatch(re.escape(c.name[:-3]) + "[A-Z].*", k))
            ]
            if not match:
                out.add(f"{path}.{k}")
                continue
            for item in v if isinstance(v, list) else [v]:
                if match[0].children:
                    walk(match[0], item, f"{path}.{k}")

    walk(_tree(elements), resource, str(elements[0]["path"]))
    return out


def mado_resources(resource_type: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(MADO.glob("*-bundle.json")):
        for entry in load(path)["entry"]:
            if entry["resource"]["resourceType"] == resource_type:
                yield path.name, entry["resource"]


needs_mado = pytest.mark.skipif(not MADO.is_dir(), reason="IHE MADO reference examples absent")

# Where the IHE MADO examples differ in shape from our profiles; each is explained in
# docs/profiles.md ("Compared with the IHE MADO examples").
MADO_IMAGING_STUDY_DIFFERENCES = {
    "ImagingStudy.extension:sizeBytes: 0 < min 1",
    "ImagingStudy.series.extension:sizeBytes: 0 < min 1",
    "ImagingStudy.series.performer:custodian: 0 < min 1",
}
MADO_DOCUMENT_REFERENCE_DIFFERENCES = {"DocumentReference.custodian: 0 < min 1"}


@needs_mado
def test_the_mado_imaging_study_is_structurally_comparable() -> None:
    elements = snapshot("ncp-imaging-study-manifest")
    differences: set[str] = set()
    studies = list(mado_resources("ImagingStudy"))
    assert studies
    for _name, study in studies:
        assert not unknown_elements(elements, study)
        differences |= shape_differences(elements, study)
    assert differences == MADO_IMAGING_STUDY_DIFFERENCES


@needs_mado
def test_the_mado_parties_and_endpoints_fit_our_profiles() -> None:
    for rtype, profile_id in (("Patient", "ncp-patient"), ("Endpoint", "ncp-endpoint-wado-rs")):
        for _name, resource in mado_resources(rtype):
            assert not shape_differences(snapshot(profile_id), resource)
            assert not unknown_elements(snapshot(profile_id), resource)


@needs_mado
def test_the_mado_manifest_document_references_are_structurally_comparable() -> None:
    elements = snapshot("ncp-imaging-documentreference")
    for path in sorted(MADO.glob("mado-fhir-*-docref.json")):
        docref = load(path)
        assert not unknown_elements(elements, docref)
        assert shape_differences(elements, docref) == MADO_DOCUMENT_REFERENCE_DIFFERENCES


def test_every_documented_mado_difference_is_in_docs() -> None:
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    for difference in MADO_IMAGING_STUDY_DIFFERENCES | MADO_DOCUMENT_REFERENCE_DIFFERENCES:
        assert difference.split(":")[0] in text or difference.rsplit(": ", 1)[0] in text, difference


REPORT_DIFFERENCES_ALLOWED: set[str] = set()
REPORT_PROFILES = {
    "Composition": "ncp-imaging-report-composition",
    "DiagnosticReport": "ncp-imaging-report-diagnosticreport",
    "Patient": "ncp-patient",
    "Organization": "ncp-organization",
    "Practitioner": "ncp-practitioner",
    "PractitionerRole": "ncp-practitionerrole",
}


def test_the_report_builder_output_has_the_shape_of_the_report_profiles() -> None:
    from ncp.fhir.report import build_report_bundle
    from tests.test_fhir_report import make_report, version_2

    for report in (make_report(), version_2(), make_report(status="preliminary")):
        bundle = build_report_bundle(report)
        differences = shape_differences(snapshot("ncp-imaging-report-bundle"), bundle)
        for entry in bundle["entry"]:
            resource = entry["resource"]
            profile_id = REPORT_PROFILES.get(resource["resourceType"])
            if profile_id:
                assert not unknown_elements(snapshot(profile_id), resource)
                differences |= shape_differences(snapshot(profile_id), resource)
        assert differences <= REPORT_DIFFERENCES_ALLOWED, differences


XT_EHR = REFERENCE / "xt-ehr-logical-models"


@pytest.mark.skipif(not XT_EHR.is_dir(), reason="Xt-EHR logical models absent")
def test_docs_cover_every_xt_ehr_logical_element() -> None:
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted(XT_EHR.glob("StructureDefinition-*.json")):
        model = load(path)
        elements = model.get("differential", model.get("snapshot"))["element"]
        for e in elements[1:]:
            if f"| `{e['path']}` |" not in text:
                missing.append(e["path"])
    assert not missing, missing


def test_docs_describe_every_profile() -> None:
    text = (REPO / "docs" / "profiles.md").read_text(encoding="utf-8")
    for sd in structure_definitions():
        assert sd["url"] in text, sd["id"]
    for path in PROFILES.glob("*.json"):
        resource = load(path)
        if resource["resourceType"] != "StructureDefinition":
            assert resource["url"] in text, path.name
