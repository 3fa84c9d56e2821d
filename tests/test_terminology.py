"""The project's terminology files and their offline reader: validity, languages, canonical URLs,
coverage of what the node itself emits, display fallback, translation, refusal of bad files."""

from __future__ import annotations

import functools
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.conceptmap import ConceptMap
from fhir.resources.R4B.valueset import ValueSet
from hypothesis import given
from hypothesis import strategies as st

from ncp.examples import catalogue
from ncp.fhir import canonical, report
from ncp.fhir.conformance import DefinitionNotFound
from ncp.fhir.terminology import (
    Terminology,
    TerminologyError,
    clear_cache,
    default_terminology,
)

FOLDER = Path(__file__).resolve().parents[1] / "terminology"
LANGUAGES = ("en", "de", "fr", "it", "es", "nl", "pl", "pt")
DRAFTED = (
    "Translations drafted by the ncp developers; to be reviewed by national terminology centres"
)

SCT = "http://snomed.info/sct"
LNC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
REPORT_STATUS = "http://hl7.org/fhir/diagnostic-report-status"
BODY_PART_CS = canonical.code_system("dicom-body-part-examined")
BODY_PART_MAP = canonical.concept_map("dicom-body-part-to-snomed")
VS = {
    name: canonical.value_set(name)
    for name in (
        "imaging-modality",
        "body-site",
        "imaging-study-type",
        "imaging-document-type",
        "requesting-specialty",
        "report-status",
        "request-priority",
        "purpose-of-use",
        "confidentiality",
    )
}
MODELS: dict[str, Any] = {"CodeSystem": CodeSystem, "ValueSet": ValueSet, "ConceptMap": ConceptMap}
CANONICAL = {
    "CodeSystem": canonical.code_system,
    "ValueSet": canonical.value_set,
    "ConceptMap": canonical.concept_map,
}
# The section codes of the HL7 Europe imaging report, as docs (standards.md) list them.
REPORT_SECTIONS = (
    "18726-0",
    "55115-0",
    "11329-0",
    "55111-9",
    "18834-2",
    "59776-5",
    "19005-8",
    "18783-1",
    "73568-8",
    "LP173421-1",
)


def _resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(FOLDER.glob("*.json")):
        yield path, json.loads(path.read_text(encoding="utf-8"))


RESOURCES = list(_resources())
FILE_IDS = [path.name for path, _ in RESOURCES]


def _concepts(resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(system, concept) for every concept a CodeSystem defines or a ValueSet lists."""
    if resource["resourceType"] == "CodeSystem":
        stack = list(resource.get("concept", []))
        while stack:
            concept = stack.pop()
            stack.extend(concept.get("concept", []))
            yield resource["url"], concept
    elif resource["resourceType"] == "ValueSet":
        for include in resource["compose"]["include"]:
            for concept in include.get("concept", []):
                yield include["system"], concept


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return Terminology.load(FOLDER)


def _catalogue_procedures() -> list[catalogue.Procedure]:
    return [p for m in catalogue.MODALITIES for p in m.procedures]


# -- the files -------------------------------------------------------------------------------


def test_every_expected_resource_is_there() -> None:
    urls = {res["url"] for _, res in RESOURCES}
    assert set(VS.values()) | {BODY_PART_CS, BODY_PART_MAP} <= urls


@pytest.mark.parametrize(("path", "resource"), RESOURCES, ids=FILE_IDS)
def test_file_is_a_valid_fhir_r4_resource_named_after_its_id(
    path: Path, resource: dict[str, Any]
) -> None:
    kind = resource["resourceType"]
    MODELS[kind].model_validate(resource)
    assert path.name == f"{kind}-{resource['id']}.json"


@pytest.mark.parametrize(("path", "resource"), RESOURCES, ids=FILE_IDS)
def test_metadata_and_canonical_url_follow_the_project_rules(
    path: Path, resource: dict[str, Any]
) -> None:
    kind = resource["resourceType"]
    assert resource["url"] == CANONICAL[kind](resource["id"])
    assert resource["version"] == "0.1.0"
    assert resource["status"] == "draft"
    assert resource["experimental"] is False
    assert resource["publisher"] == "ncp developers"
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", resource["name"])
    assert resource["title"].strip()
    assert resource["description"].strip()
    if kind in ("ValueSet", "CodeSystem"):
        assert DRAFTED in resource["description"]


@pytest.mark.parametrize(("path", "resource"), RESOURCES, ids=FILE_IDS)
def test_every_concept_has_all_eight_languages(path: Path, resource: dict[str, Any]) -> None:
    for system, concept in _concepts(resource):
        where = f"{system}|{concept['code']}"
        langs = [d["language"] for d in concept.get("designation", [])]
        assert len(langs) == len(set(langs)), f"{where}: a language twice"
        assert set(LANGUAGES) <= set(langs), f"{where}: lacks {set(LANGUAGES) - set(langs)}"
        for designation in concept["designation"]:
            value = designation["value"]
            assert value.strip() == value and value, f"{where}: blank {designation['language']}"
        english = next(d["value"] for d in concept["designation"] if d["language"] == "en")
        assert english == concept["display"], f"{where}: en designation differs from display"


@pytest.mark.parametrize(("path", "resource"), RESOURCES, ids=FILE_IDS)
def test_no_duplicate_codes(path: Path, resource: dict[str, Any]) -> None:
    pairs = [(system, concept["code"]) for system, concept in _concepts(resource)]
    assert len(pairs) == len(set(pairs))
    if resource["resourceType"] == "ConceptMap":
        for group in resource["group"]:
            codes = [element["code"] for element in group["element"]]
            assert len(codes) == len(set(codes))


def test_a_concept_listed_in_several_files_has_the_same_names_everywhere() -> None:
    seen: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for path, resource in RESOURCES:
        for system, concept in _concepts(resource):
            names = {d["language"]: d["value"] for d in concept["designation"]}
            key = (system, concept["code"])
            if key in seen:
                first, first_names = seen[key]
                assert names == first_names, f"{key}: {first} and {path.name} disagree"
            else:
                seen[key] = (path.name, names)


def test_body_part_terms_are_dicom_code_strings() -> None:
    resource = next(res for _, res in RESOURCES if res["url"] == BODY_PART_CS)
    assert resource["count"] == len(resource["concept"])
    for concept in resource["concept"]:
        # PS3.5 CS value representation: upper case, digits, space, underscore; 16 at most.
        assert re.fullmatch(r"[A-Z0-9 _]{1,16}", concept["code"]), concept["code"]


def test_readme_names_every_resource() -> None:
    text = (FOLDER / "README.md").read_text(encoding="utf-8")
    for _, resource in RESOURCES:
        assert resource["url"] in text


# -- the node's own output binds ---------------------------------------------------------------


def test_every_procedure_of_the_example_generator_is_a_study_type(
    terminology: Terminology,
) -> None:
    for procedure in _catalogue_procedures():
        assert procedure.code.scheme == "LN"
        assert terminology.contains(VS["imaging-study-type"], LNC, procedure.code.value)
        assert terminology.display(LNC, procedure.code.value) == procedure.code.meaning


def test_every_modality_of_the_example_generator_is_in_the_modality_value_set(
    terminology: Terminology,
) -> None:
    for spec in catalogue.MODALITIES:
        assert terminology.contains(VS["imaging-modality"], DCM, spec.modality), spec.modality


def test_every_specialty_of_the_example_generator_is_a_requesting_specialty(
    terminology: Terminology,
) -> None:
    codes = {s.code.value: s.code.meaning for s in catalogue.REQUESTING_SERVICES.values()}
    for procedure in _catalogue_procedures():
        assert set(procedure.services) <= set(codes)
    for code, meaning in codes.items():
        assert terminology.contains(VS["requesting-specialty"], SCT, code), code
        assert terminology.display(SCT, code) == meaning


def test_every_body_part_of_the_example_generator_maps_into_body_site(
    terminology: Terminology,
) -> None:
    terms = {procedure.body_part for procedure in _catalogue_procedures()}
    for term in terms:
        assert terminology.display(BODY_PART_CS, term) is not None, term
        targets = terminology.translate(BODY_PART_MAP, BODY_PART_CS, term)
        assert len(targets) == 1, term
        system, code, equivalence = targets[0]
        assert (system, equivalence) == (SCT, "equivalent")
        assert terminology.contains(VS["body-site"], system, code), term


def test_concept_map_covers_the_code_system_and_lands_in_body_site(
    terminology: Terminology,
) -> None:
    resource = next(res for _, res in RESOURCES if res["url"] == BODY_PART_CS)
    targets: set[tuple[str, str]] = set()
    for concept in resource["concept"]:
        found = terminology.translate(BODY_PART_MAP, BODY_PART_CS, concept["code"])
        assert found, concept["code"]
        targets |= {(system, code) for system, code, _ in found}
    assert targets == terminology.value_set(VS["body-site"])


def test_a_study_head_in_dicom_becomes_the_snomed_head(terminology: Terminology) -> None:
    # The one pair every imaging example agrees on (IHE MADO examples: series.bodySite Head).
    assert terminology.translate(BODY_PART_MAP, BODY_PART_CS, "HEAD") == [
        (SCT, "69536005", "equivalent")
    ]


def test_what_the_report_builder_writes_is_in_the_value_sets(terminology: Terminology) -> None:
    study_types = VS["imaging-study-type"]
    for name in dir(report):
        if name.startswith("SECTION_"):
            assert terminology.contains(study_types, LNC, getattr(report, name)), name
    for section in REPORT_SECTIONS:
        assert terminology.contains(study_types, LNC, section), section
    assert terminology.contains(study_types, LNC, "18748-4")
    assert terminology.contains(VS["imaging-document-type"], LNC, "18748-4")
    for status in typing.get_args(report.ReportStatus):
        assert terminology.contains(VS["report-status"], REPORT_STATUS, status)
    assert terminology.contains(VS["confidentiality"], report.V3_CONFIDENTIALITY, "N")


def test_small_value_sets_hold_exactly_their_codes(terminology: Terminology) -> None:
    assert terminology.value_set(VS["report-status"]) == {
        (REPORT_STATUS, c) for c in ("preliminary", "final", "amended")
    }
    assert terminology.value_set(VS["request-priority"]) == {
        ("http://hl7.org/fhir/request-priority", c) for c in ("routine", "urgent", "asap", "stat")
    }
    act_reason = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    assert terminology.value_set(VS["purpose-of-use"]) == {
        (act_reason, "TREAT"),
        (act_reason, "ETREAT"),
    }
    assert terminology.display(act_reason, "TREAT") == "treatment"
    assert terminology.display(act_reason, "ETREAT") == "Emergency Treatment"
    assert {c for _, c in terminology.value_set(VS["confidentiality"])} == {"N", "R", "V"}


# -- lookups -----------------------------------------------------------------------------------


def test_value_set_urls_and_versions(terminology: Terminology) -> None:
    assert terminology.value_set_urls() == sorted(VS.values())
    assert terminology.concept_map_urls() == [BODY_PART_MAP]
    url = VS["body-site"]
    assert terminology.value_set(f"{url}|0.1.0") == terminology.value_set(url)
    assert terminology.contains(f"{url}|9.9.9", SCT, "69536005") is None
    assert terminology.contains(url, SCT, "12345") is False
    assert terminology.contains(canonical.value_set("no-such"), SCT, "69536005") is None
    with pytest.raises(DefinitionNotFound):
        terminology.value_set(canonical.value_set("no-such"))


def test_translate_unknown_map_or_code(terminology: Terminology) -> None:
    assert terminology.translate(BODY_PART_MAP, BODY_PART_CS, "NOTATERM") == []
    assert terminology.translate(BODY_PART_MAP, SCT, "HEAD") == []
    with pytest.raises(DefinitionNotFound):
        terminology.translate(canonical.concept_map("no-such"), BODY_PART_CS, "HEAD")


def test_display_fallback_rules(terminology: Terminology) -> None:
    chest = (SCT, "816094009")
    assert terminology.display(*chest) == "Chest"
    assert terminology.display(*chest, language="pl") == "Klatka piersiowa"
    assert terminology.display(*chest, language="de-AT") == "Thorax"
    assert terminology.display(*chest, language="PL_pl") == "Klatka piersiowa"
    assert terminology.display(*chest, language="it-CH") == "Torace"
    assert terminology.display(*chest, language="pt-BR") == "Tórax"
    assert terminology.display(*chest, language="sv") == "Chest"
    assert terminology.display(*chest, language="") == "Chest"
    assert terminology.display(BODY_PART_CS, "CHEST", "fr") == "Thorax"
    assert terminology.display(SCT, "000000") is None
    assert terminology.languages(*chest) >= set(LANGUAGES)


def _all_pairs() -> list[tuple[str, str]]:
    return sorted({(system, c["code"]) for _, res in RESOURCES for system, c in _concepts(res)})


LANGUAGE_TAGS = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8}){0,2}", fullmatch=True),
    st.sampled_from([*LANGUAGES, "de-AT", "fr-BE", "nl-BE", "pt-PT", "en-GB", "sv", "x-klingon"]),
)


@functools.cache
def _loaded() -> Terminology:
    return Terminology.load(FOLDER)


@given(language=LANGUAGE_TAGS)
def test_any_language_gets_a_non_empty_display_for_every_concept(language: str) -> None:
    terminology = _loaded()
    for system, code in _all_pairs():
        shown = terminology.display(system, code, language)
        assert shown is not None and shown.strip(), (system, code, language)


@given(language=st.sampled_from(LANGUAGES), region=st.from_regex(r"[A-Z]{2}", fullmatch=True))
def test_a_regional_tag_shows_its_language(language: str, region: str) -> None:
    terminology = _loaded()
    for system, code in _all_pairs():
        assert terminology.display(system, code, f"{language}-{region}") == terminology.display(
            system, code, language
        )


# -- the default instance ------------------------------------------------------------------------


def test_default_terminology_follows_the_conformance_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_cache()
    try:
        assert default_terminology() is default_terminology()
        assert VS["body-site"] in default_terminology().value_set_urls()
        (tmp_path / "terminology").mkdir()
        _write(tmp_path / "terminology", _value_set("only", [("urn:x", "a", {"en": "A"})]))
        monkeypatch.setenv("NCP_CONFORMANCE_DIR", str(tmp_path))
        assert default_terminology().value_set_urls() == [canonical.value_set("only")]
    finally:
        monkeypatch.delenv("NCP_CONFORMANCE_DIR", raising=False)
        clear_cache()


# -- reading other folders: expansion features and refusals --------------------------------------


def _value_set(rid: str, concepts: list[tuple[str, str, dict[str, str]]]) -> dict[str, Any]:
    includes: dict[str, list[dict[str, Any]]] = {}
    for system, code, names in concepts:
        concept: dict[str, Any] = {"code": code}
        if "en" in names:
            concept["display"] = names["en"]
        concept["designation"] = [{"language": k, "value": v} for k, v in names.items()]
        includes.setdefault(system, []).append(concept)
    return {
        "resourceType": "ValueSet",
        "id": rid,
        "url": canonical.value_set(rid),
        "version": "0.1.0",
        "status": "draft",
        "compose": {"include": [{"system": s, "concept": c} for s, c in includes.items()]},
    }


def _write(folder: Path, resource: dict[str, Any], name: str | None = None) -> Path:
    path = folder / (name or f"{resource['resourceType']}-{resource['id']}.json")
    path.write_text(json.dumps(resource), encoding="utf-8")
    return path


def test_whole_code_systems_imports_and_excludes_expand_locally(tmp_path: Path) -> None:
    code_system = {
        "resourceType": "CodeSystem",
        "id": "letters",
        "url": canonical.code_system("letters"),
        "version": "1",
        "status": "draft",
        "content": "complete",
        "concept": [
            {"code": "a", "display": "Alpha", "concept": [{"code": "a1", "display": "Alpha one"}]},
            {"code": "b", "display": "Beta", "designation": [{"language": "de", "value": "Be"}]},
        ],
    }
    every = {
        "resourceType": "ValueSet",
        "id": "every",
        "url": canonical.value_set("every"),
        "status": "draft",
        "compose": {"include": [{"system": canonical.code_system("letters")}]},
    }
    but_b = {
        "resourceType": "ValueSet",
        "id": "but-b",
        "url": canonical.value_set("but-b"),
        "status": "draft",
        "compose": {
            "include": [{"valueSet": [canonical.value_set("every")]}],
            "exclude": [{"system": canonical.code_system("letters"), "concept": [{"code": "b"}]}],
        },
    }
    for resource in (code_system, every, but_b):
        _write(tmp_path, resource)
    _write(tmp_path, {"resourceType": "StructureDefinition", "url": "urn:ignored"}, "sd.json")
    loaded = Terminology.load(tmp_path)
    letters = canonical.code_system("letters")
    assert loaded.value_set(canonical.value_set("every")) == {
        (letters, "a"),
        (letters, "a1"),
        (letters, "b"),
    }
    assert loaded.value_set(canonical.value_set("but-b")) == {(letters, "a"), (letters, "a1")}
    # No designations at all: the code system's own display is the last resort.
    assert loaded.display(letters, "a1", "fr") == "Alpha one"
    assert loaded.display(letters, "b", "de-CH") == "Be"
    assert loaded.display(letters, "b", "en") == "Beta"


def _bad_files() -> list[tuple[str, str | dict[str, Any], str]]:
    good = _value_set("good", [("urn:x", "a", {"en": "A"})])

    def changed(**compose: Any) -> dict[str, Any]:
        res: dict[str, Any] = json.loads(json.dumps(good))
        res["compose"] = compose
        return res

    no_url = dict(good)
    del no_url["url"]
    return [
        ("not-json", "{ this is not json", "not valid JSON"),
        ("array", "[]", "not a JSON object"),
        ("no-type", json.dumps({"url": "urn:x"}), "resourceType"),
        ("no-url", no_url, "url"),
        ("no-code", changed(include=[{"system": "urn:x", "concept": [{"display": "A"}]}]), "code"),
        ("no-system", changed(include=[{"concept": [{"code": "a"}]}]), "system"),
        (
            "filter",
            changed(include=[{"system": SCT, "filter": [{"property": "concept"}]}]),
            "filter",
        ),
        ("all-of-snomed", changed(include=[{"system": SCT}]), "cannot be expanded offline"),
        ("unknown-import", changed(include=[{"valueSet": ["urn:nowhere"]}]), "urn:nowhere"),
        (
            "self-import",
            changed(include=[{"valueSet": [canonical.value_set("good")]}]),
            "includes itself",
        ),
        (
            "blank-designation",
            changed(
                include=[
                    {
                        "system": "urn:x",
                        "concept": [{"code": "a", "designation": [{"language": "de"}]}],
                    }
                ]
            ),
            "value",
        ),
        ("no-compose", {k: v for k, v in good.items() if k != "compose"}, "compose"),
        ("concept-not-a-list", changed(include=[{"system": "urn:x", "concept": "a"}]), "concept"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "complaint"), [pytest.param(*case, id=case[0]) for case in _bad_files()]
)
def test_a_malformed_file_gives_a_terminology_error_naming_it(
    tmp_path: Path, name: str, content: str | dict[str, Any], complaint: str
) -> None:
    _write(tmp_path, _value_set("fine", [("urn:y", "b", {"en": "B"})]))
    path = tmp_path / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
    with pytest.raises(TerminologyError) as caught:
        Terminology.load(tmp_path)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)
    assert complaint in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_canonical_url_defined_twice_is_refused(tmp_path: Path) -> None:
    resource = _value_set("twice", [("urn:x", "a", {"en": "A"})])
    first = _write(tmp_path, resource, "a.json")
    second = _write(tmp_path, resource, "b.json")
    with pytest.raises(TerminologyError, match="already defined") as caught:
        Terminology.load(tmp_path)
    assert caught.value.path == str(second)
    assert str(first) in caught.value.problem


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TerminologyError, match="no such terminology folder"):
        Terminology.load(tmp_path / "absent")


def test_concept_map_without_equivalence_is_refused(tmp_path: Path) -> None:
    resource = {
        "resourceType": "ConceptMap",
        "id": "broken",
        "url": canonical.concept_map("broken"),
        "status": "draft",
        "group": [
            {
                "source": "urn:a",
                "target": "urn:b",
                "element": [{"code": "x", "target": [{"code": "y"}]}],
            }
        ],
    }
    path = _write(tmp_path, resource)
    with pytest.raises(TerminologyError, match="equivalence") as caught:
        Terminology.load(tmp_path)
    assert caught.value.path == str(path)
