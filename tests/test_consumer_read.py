"""Properties of B's readers of A's answers (ncp.consumer.read): tolerant of harmless quirks
(kept and noted), strict on what matters (another patient, counts that disagree, UIDs that are
not UIDs or repeat), and never failing with anything but PeerAnswerInvalid, whatever arrives."""

from __future__ import annotations

import contextlib
import html
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncp.consumer.model import PeerAnswerInvalid
from ncp.consumer.queries import (
    access_parameters,
    escape,
    list_parameters,
    match_parameters,
    text_words,
)
from ncp.consumer.read import (
    MATCH_GRADE_URL,
    Notes,
    access_answer,
    list_entry,
    manifest,
    match_result,
    narrative_paragraphs,
    outcome_text,
    parse_body,
    report_document,
    searchset_page,
)
from ncp.consumer.results import ListFilters, PatientQuery
from ncp.fhir.datatypes import SIZE_BYTES_URL
from ncp.provider.search_params import parse_search
from ncp.security.claims import PatientRef

PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT100")
OTHER = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT101")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
XHTML = "http://www.w3.org/1999/xhtml"
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- building manifests as A writes them ---------------------------------------------------------


@st.composite
def study_shapes(draw: st.DrawFn) -> tuple[str, list[list[str]]]:
    """A Study Instance UID and, per series, its instance numbers (unique UIDs by position)."""
    root = "1.2.826.0.1.3680043.10." + str(draw(st.integers(1, 10**6)))
    series = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    return root, [[f"{root}.{s}.{i}" for i in range(1, n + 1)] for s, n in enumerate(series, 1)]


def imaging_study(root: str, series: list[list[str]]) -> dict[str, Any]:
    def size(value: int | float) -> list[dict[str, Any]]:
        return [{"url": SIZE_BYTES_URL, "valueDecimal": value}]

    return {
        "resourceType": "ImagingStudy",
        "id": root,
        "contained": [
            {"resourceType": "Endpoint", "id": "a", "address": "https://gw.at.test/dicomweb"},
            {"resourceType": "Endpoint", "id": "viewer", "address": "https://v.at.test/x"},
        ],
        "extension": size(1000 * sum(len(s) for s in series)),
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{root}"},
            {"system": "urn:acc", "value": "ACC1"},
        ],
        "status": "available",
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
        "subject": {"reference": "Patient/p1", "identifier": PATIENT.to_json()},
        "started": "2024-01-02T10:15:00+01:00",
        "endpoint": [{"reference": "#viewer"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s) for s in series),
        "description": "CT chest",
        "series": [
            {
                "extension": size(1000 * len(instances)),
                "uid": f"{root}.{index}",
                "modality": {"code": "CT"},
                "numberOfInstances": len(instances),
                "endpoint": [{"reference": "#a"}],
                "instance": [
                    {"uid": uid, "sopClass": {"code": f"urn:oid:{CT_IMAGE}"}, "number": n}
                    for n, uid in enumerate(instances, 1)
                ],
            }
            for index, instances in enumerate(series, 1)
        ],
    }


HARMLESS = (
    "unknown-element",
    "unknown-extension",
    "size-as-decimal",
    "uid-without-prefix",
    "bare-sop-class",
    "no-description",
    "no-started",
    "no-number-of-series",
    "bad-date",
)


def apply_harmless(resource: dict[str, Any], quirk: str) -> bool:
    """Change ``resource`` by one harmless quirk; True if the reader should note it."""
    series = resource["series"]
    match quirk:
        case "unknown-element":
            resource["fooBar"] = {"anything": [1, 2]}
            series[0]["instance"][0]["title"] = "x"
            return False
        case "unknown-extension":
            resource["extension"].append({"url": "urn:x", "valueString": "y"})
            series[0]["extension"].append({"url": "urn:x", "valueBoolean": True})
            return False
        case "size-as-decimal":
            resource["extension"][0]["valueDecimal"] = float(
                resource["extension"][0]["valueDecimal"]
            )
            return True
        case "uid-without-prefix":
            resource["identifier"][0]["value"] = resource["identifier"][0]["value"][8:]
            return True
        case "bare-sop-class":
            series[-1]["instance"][-1]["sopClass"] = {"code": CT_IMAGE}
            return True
        case "no-description":
            del resource["description"]
            return False
        case "no-started":
            del resource["started"]
            return False
        case "no-number-of-series":
            del resource["numberOfSeries"]
            return True
        case _:  # bad-date
            resource["started"] = "yesterday"
            return True


HARMFUL = (
    "another-patient",
    "no-patient",
    "duplicate-sop",
    "count-off",
    "series-count-off",
    "bad-instance-uid",
    "bad-series-uid",
    "empty-series",
    "two-study-uids",
    "bad-sop-class",
    "duplicate-series",
    "not-an-imaging-study",
)


def apply_harmful(resource: dict[str, Any], mutation: str) -> None:
    series = resource["series"]
    match mutation:
        case "another-patient":
            resource["subject"]["identifier"] = OTHER.to_json()
        case "no-patient":
            resource["subject"] = {"display": "Anna"}
        case "duplicate-sop":
            series[0]["instance"].append(dict(series[0]["instance"][0]))
            series[0]["numberOfInstances"] += 1
            resource["numberOfInstances"] += 1
        case "count-off":
            series[0]["numberOfInstances"] += 1
        case "series-count-off":
            resource["numberOfSeries"] = len(series) + 1
        case "bad-instance-uid":
            series[0]["instance"][0]["uid"] = "1.2..4"
        case "bad-series-uid":
            series[0]["uid"] = "not a uid"
        case "empty-series":
            resource["numberOfInstances"] -= len(series[0]["instance"])
            series[0]["instance"] = []
            series[0]["numberOfInstances"] = 0
        case "two-study-uids":
            resource["identifier"].append({"system": "urn:dicom:uid", "value": "urn:oid:1.2.9"})
        case "bad-sop-class":
            series[0]["instance"][0]["sopClass"] = {"code": "CT Image Storage"}
        case "duplicate-series":
            series.append(json.loads(json.dumps(series[0])))
            for instance in series[-1]["instance"]:
                instance["uid"] += ".9"
            resource["numberOfSeries"] = len(series)
            resource["numberOfInstances"] += len(series[-1]["instance"])
        case _:
            resource["resourceType"] = "DiagnosticReport"


@QUICK
@given(study_shapes(), st.sets(st.sampled_from(HARMLESS)))
def test_a_manifest_with_harmless_quirks_reads_the_same(
    shape: tuple[str, list[list[str]]], quirks: set[str]
) -> None:
    root, series = shape
    resource = imaging_study(root, series)
    for quirk in sorted(quirks):
        apply_harmless(resource, quirk)
    read = manifest(resource, PATIENT, Notes("AT"))
    assert read.study_uid == root and read.patient == PATIENT
    assert [[i.sop_instance_uid for i in s.instances] for s in read.series] == series
    assert all(i.sop_class_uid == CT_IMAGE for s in read.series for i in s.instances)
    assert read.instance_count == sum(len(s) for s in series)
    assert read.size == 1000 * read.instance_count
    assert [s.endpoint for s in read.series] == ["https://gw.at.test/dicomweb"] * len(series)
    assert read.viewer == "https://v.at.test/x"


@QUICK
@given(study_shapes(), st.sets(st.sampled_from(HARMLESS)))
def test_what_the_reader_tolerated_is_noted(
    shape: tuple[str, list[list[str]]], quirks: set[str]
) -> None:
    resource = imaging_study(*shape)
    notes = Notes("AT")
    if "no-started" in quirks:
        quirks.discard("bad-date")  # a date that is not there cannot be unreadable
    noted = any([apply_harmless(resource, q) for q in sorted(quirks)])
    manifest(resource, PATIENT, notes)
    assert bool(notes.quirks) == noted


@QUICK
@given(study_shapes(), st.sampled_from(HARMFUL), st.sets(st.sampled_from(HARMLESS)))
def test_a_manifest_that_is_wrong_where_it_matters_is_refused(
    shape: tuple[str, list[list[str]]], mutation: str, quirks: set[str]
) -> None:
    resource = imaging_study(*shape)
    for quirk in sorted(quirks):
        apply_harmless(resource, quirk)
    apply_harmful(resource, mutation)
    with pytest.raises(PeerAnswerInvalid):
        manifest(resource, PATIENT, Notes("AT"))


# --- anything at all ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "resourceType",
        "type",
        "entry",
        "resource",
        "search",
        "identifier",
        "subject",
        "series",
        "instance",
        "uid",
        "content",
        "context",
        "related",
        "parameter",
        "issue",
        "extension",
        "link",
    ]
)
fhirish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | json_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(keys, fhirish, max_size=6),
    st.sampled_from(
        ["ImagingStudy", "Bundle", "DocumentReference", "Parameters", "OperationOutcome"]
    ),
)
def test_no_answer_makes_a_reader_fail_untyped(data: dict[str, Any], rtype: str) -> None:
    data["resourceType"] = rtype
    notes = Notes("AT")
    outcome_text(data)
    for read in (
        lambda: manifest(data, PATIENT, notes),
        lambda: list_entry(data, PATIENT, notes, "entry"),
        lambda: match_result(data, asked_system=None, peer="AT"),
        lambda: searchset_page(data, notes),
        lambda: access_answer(data, notes),
        lambda: report_document(data, PATIENT, notes, "r1"),
    ):
        with contextlib.suppress(PeerAnswerInvalid):
            read()


# --- $match ---------------------------------------------------------------------------------------

grades = st.sampled_from(
    ["certain", "probable", "possible", "certain-match", None, "sure", "certainly-not"]
)


@QUICK
@given(st.lists(st.tuples(grades, st.booleans()), max_size=5))
def test_match_outcome_follows_the_candidates(candidates: list[tuple[str | None, bool]]) -> None:
    entries = []
    for n, (grade, has_id) in enumerate(candidates):
        patient: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": f"F{n}"}]}
        if has_id:
            patient["identifier"] = [{"system": PATIENT.system, "value": f"P{n}"}]
        search: dict[str, Any] = {"mode": "match"}
        if grade is not None:
            search["extension"] = [{"url": MATCH_GRADE_URL, "valueCode": grade}]
        entries.append({"resource": patient, "search": search})
    result = match_result(
        {"resourceType": "Bundle", "type": "searchset", "entry": entries},
        asked_system=PATIENT.system,
        peer="AT",
    )
    usable = [(g, i) for g, i in candidates if i and g != "certainly-not"]
    assert len(result.candidates) == len(usable)
    if not usable:
        assert result.outcome == "no-match"
    elif len(usable) > 1:
        assert result.outcome == "ambiguous" and result.certain is None
    else:
        grade = usable[0][0]
        expected = {"certain": "certain", "certain-match": "certain", "probable": "probable"}
        assert result.outcome == expected.get(grade or "", "possible")
    # Never certain unless exactly one candidate that A graded certain.
    if result.outcome == "certain":
        assert len(usable) == 1 and usable[0][0] in ("certain", "certain-match")


# --- narrative ------------------------------------------------------------------------------------

line = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda t: t.strip() != ""
)


@QUICK
@given(st.lists(line, min_size=1, max_size=5))
def test_narrative_reads_back_as_its_paragraphs(paragraphs: list[str]) -> None:
    body = "".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)
    div = f'<div xmlns="{XHTML}">{body}</div>'
    assert narrative_paragraphs(div) == tuple(" ".join(p.split()) for p in paragraphs)


def test_markup_in_a_narrative_stays_text() -> None:
    div = (
        f'<div xmlns="{XHTML}"><p>&lt;script&gt;alert(1)&lt;/script&gt;</p>'
        "<script>alert(2)</script><ul><li>one</li><li>two</li></ul></div>"
    )
    assert narrative_paragraphs(div) == ("<script>alert(1)</script>", "one", "two")
    notes = Notes("AT")
    assert narrative_paragraphs("<div><p>unclosed", notes) == ("unclosed",)
    assert notes.quirks


def test_an_entity_in_a_narrative_is_not_expanded() -> None:
    div = '<!DOCTYPE d [<!ENTITY x "boom">]><div xmlns="http://www.w3.org/1999/xhtml">&x;</div>'
    assert "boom" not in " ".join(narrative_paragraphs(div))


# --- $imaging-access answers ----------------------------------------------------------------------

TOKEN = "aaa.bbb.ccc"


def params(**values: Any) -> dict[str, Any]:
    kinds = {
        "token": "valueString",
        "expires": "valueInstant",
        "dicomweb": "valueUrl",
        "viewer": "valueUrl",
    }
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": k, kinds[k]: v} for k, v in values.items()],
    }


def test_an_access_answer_reads_strictly() -> None:
    good = access_answer(
        params(token=TOKEN, expires="2026-12-06T12:00:00Z", dicomweb="https://gw/dicomweb"),
        Notes("AT"),
    )
    assert good.dicomweb == "https://gw/dicomweb" and good.expires_at.tzinfo is not None
    for bad in (
        params(expires="2026-12-06T12:00:00Z", dicomweb="https://gw"),
        params(token="not-a-jws", expires="2026-12-06T12:00:00Z", dicomweb="https://gw"),
        params(token=TOKEN, expires="2026-12-06T12:00:00", dicomweb="https://gw"),
        params(token=TOKEN, dicomweb="https://gw"),
        params(token=TOKEN, expires="2026-12-06T12:00:00Z", dicomweb="http://gw"),
        {"resourceType": "OperationOutcome"},
    ):
        with pytest.raises(PeerAnswerInvalid):
            access_answer(bad, Notes("AT"))


# --- what B sends ---------------------------------------------------------------------------------

values = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(
    lambda t: t.strip() == t and t != ""
)


@QUICK
@given(st.lists(values, min_size=1, max_size=4), values)
def test_filters_reach_a_as_b_meant_them(modalities: list[str], text: str) -> None:
    """What B writes, A's own parser reads back: each value one alternative, however many
    commas, pipes or backslashes it holds."""
    filters = ListFilters(modalities=tuple(modalities), text=text)
    if not text_words(text):
        # An accent alone has no word to search for: A would answer 400, B refuses it first.
        with pytest.raises(ValueError, match="at least one word"):
            list_parameters("ImagingStudy", PATIENT, filters, page_size=10)
        return
    for rtype in ("DocumentReference", "ImagingStudy"):
        query = parse_search(rtype, list_parameters(rtype, PATIENT, filters, page_size=10))
        assert query.allows_patient("1.2.40.0.10.1.4.3.1", "PAT100")
        assert not query.allows_patient("1.2.40.0.10.1.4.3.1", "PAT101")
        [modality] = [f for f in query.filters if f.name == "modality"]
        assert [t.code for t in modality.alternatives] == [m.strip() for m in modalities]
        assert query.count == 10


def test_escape_follows_fhir_search() -> None:
    assert escape(r"a,b|c$d\e") == r"a\,b\|c\$d\\e"


def test_requests_b_cannot_send_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="family name and birth date"):
        match_parameters(PatientQuery(family="Huber"))
    with pytest.raises(ValueError, match="Study Instance UID"):
        access_parameters(["x"], "A", "TREAT", "normal")
    with pytest.raises(ValueError, match="at most 50"):
        access_parameters([f"1.2.3.{n}" for n in range(51)], "A", "TREAT", "normal")
    with pytest.raises(ValueError, match="page_size"):
        list_parameters("ImagingStudy", PATIENT, ListFilters(), page_size=1001)
    with pytest.raises(ValueError, match="time zone"):
        from datetime import datetime

        list_parameters(
            "ImagingStudy", PATIENT, ListFilters(date_from=datetime(2024, 1, 1)), page_size=10
        )
    body = access_parameters(["1.2.3", "1.2.3", "1.2.4"], "C", "ETREAT", "emergency")
    assert [p.get("valueString") for p in body["parameter"][:2]] == ["1.2.3", "1.2.4"]
    assert {"name": "priority", "valueCode": "stat"} in body["parameter"]


# --- the body -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_body_reads_or_fails_as_a_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(parse_body(body), dict)


def test_bodies_b_cannot_read_are_refused() -> None:
    assert parse_body(b' {"resourceType": "Bundle"}') == {"resourceType": "Bundle"}
    xml = (
        b'<Parameters xmlns="http://hl7.org/fhir">'
        b'<parameter><name value="x"/></parameter></Parameters>'
    )
    assert parse_body(xml)["resourceType"] == "Parameters"
    for bad in (b"[1, 2]", b"", b"null", b"{" * 100_000, b"<!DOCTYPE x><Bundle/>", b"{'a': 1}"):
        with pytest.raises(ValueError):
            parse_body(bad)
