"""Random searches answer what a brute-force filter and sort over every entry answers.

The oracle never looks at the SQL: it builds every list entry the node would show with the
listing and manifest builders (:mod:`ncp.fhir.listing`, :mod:`ncp.fhir.manifest`) and filters
and sorts those FHIR resources in Python, by the FHIR search rules as the search module states
them (docstrings of ``ncp.provider.search`` and ``ncp.provider.search_params``). Hypothesis draws
combinations of filters (values taken from the data, plus values that match nothing), sort
keys, page sizes and the patient; the engine's pages, concatenated, must equal the oracle's
list, with the same total, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ncp.fhir.identifiers import manifest_reference_id
from ncp.fhir.listing import (
    BODY_SITE_EXTENSION,
    MODALITY_EXTENSION,
    manifest_reference,
    report_reference,
)
from ncp.fhir.manifest import Custodian, ImagingEndpoints, imaging_study
from ncp.provider.describe import describe_indexed_study, describe_report, describe_study
from ncp.provider.search import ManifestMatch, ReportMatch, run_search
from ncp.provider.search_params import DateRange, SearchQuery, parse_search
from ncp.store.models import Patient, Report, ReportVersion, Study
from tests.test_search import ZONE, SearchIndex, dataset, index  # noqa: F401

BASE = "https://ncp.example.at/fhir"
CUSTODIAN = Custodian("NCPeH AT", "urn:ietf:rfc:3986", BASE, country="AT", zone=ZONE)
ENDPOINTS = ImagingEndpoints(option_a="https://ncp.example.at/dicomweb")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
BODY_PART_SYSTEM = "https://ncp.example/fhir/CodeSystem/dicom-body-part-examined"
UID_SYSTEM = "urn:dicom:uid"
MADO = "urn:ihe:rad:MADO:fhir-manifest:2026"


@dataclass(frozen=True)
class Entry:
    """One list entry as the oracle sees it: the resource B would get, and how it sorts."""

    key: str
    resource: dict[str, Any]
    text: str
    tie: tuple[str, int, int]
    facets: dict[str, Any]
    """Resources the filters read: ``doc`` (a DocumentReference: the entry itself or, for an
    ImagingStudy, its manifest entry) and ``study`` (the ImagingStudy, if indexed)."""


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def study_text(resource: dict[str, Any]) -> str:
    parts = [resource.get("description", "")]
    parts += [c.get("text", "") for c in resource.get("procedureCode", [])]
    parts += [s.get("description", "") for s in resource.get("series", [])]
    return fold("\n".join(parts))


@dataclass(frozen=True)
class World:
    documents: dict[tuple[str, str], list[Entry]]
    studies: dict[tuple[str, str], list[Entry]]
    values: dict[str, list[str]]
    """Values seen in the data, for the strategies."""


@pytest.fixture(scope="module")
def world(index: SearchIndex) -> Iterator[World]:  # noqa: F811
    documents: dict[tuple[str, str], list[Entry]] = {}
    studies: dict[tuple[str, str], list[Entry]] = {}
    values: dict[str, set[str]] = {}

    def seen(name: str, value: str | None) -> None:
        if value:
            values.setdefault(name, set()).add(value)

    with index.sessions() as session:
        for who in (index.big, index.small):
            docs: list[Entry] = []
            imaging: list[Entry] = []
            patient = session.scalars(
                select(Patient).where(Patient.issuer == who[0], Patient.patient_id == who[1])
            ).one()
            by_uid: dict[str, tuple[Study, dict[str, Any], dict[str, Any]]] = {}
            for study in session.scalars(select(Study).where(Study.patient_pk == patient.id)):
                manifest = manifest_reference(describe_study(study), CUSTODIAN, base_url=BASE)
                resource = imaging_study(
                    describe_indexed_study(session, study), ENDPOINTS, CUSTODIAN
                )
                by_uid[study.study_uid] = (study, manifest, resource)
                text = study_text(resource)
                facets = {"doc": manifest, "study": resource}
                docs.append(Entry(manifest["id"], manifest, text, (study.study_uid, 1, 0), facets))
                imaging.append(
                    Entry(study.study_uid, resource, text, (study.study_uid, 2, 0), facets)
                )
                seen("uid", study.study_uid)
                seen("accession", study.accession_number)
                seen("accession_system", f"urn:oid:{study.accession_issuer}")
                seen("procedure", study.procedure_code)
                seen("requesting", study.requesting_code)
                seen("modality", study.modalities.split("\\")[0])
                seen("body_part", study.body_parts.split("\\")[0])
                seen("started", study.started.isoformat() if study.started else None)
                for text in [study.description] + [s.description for s in study.series]:
                    for word in (text or "").split():
                        seen("word", word)
            rows = session.execute(
                select(Report, ReportVersion)
                .join(ReportVersion, ReportVersion.report_id == Report.id)
                .where(Report.patient_issuer == who[0], Report.patient_id == who[1])
            )
            for report, version in rows:
                indexed = by_uid.get(version.study_uid or "")
                doc = report_reference(
                    describe_report(report, version),
                    base_url=BASE,
                    study=describe_study(indexed[0]) if indexed else None,
                    custodian=CUSTODIAN,
                )
                facets = {"doc": doc}
                docs.append(
                    Entry(
                        f"{report.id}/{version.version}",
                        doc,
                        fold(version.title),
                        (report.id, 0, version.version),
                        facets,
                    )
                )
                seen("report_id", report.id)
                seen("date", version.date.isoformat())
                for word in version.title.split():
                    seen("word", word)
            documents[who] = docs
            studies[who] = imaging
        yield World(documents, studies, {k: sorted(v) for k, v in values.items()})


# --- the oracle ------------------------------------------------------------------------------


def codings(concept: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((concept or {}).get("coding", []))


def token_hit(found: list[dict[str, Any]], system: str | None, code: str) -> bool:
    for c in found:
        if c.get("code", c.get("value")) != code:
            continue
        if system is None or c.get("system", "") == system:
            return True
    return False


def doc_codings(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    if name == "modality":
        return [
            e["valueCodeableConcept"]["coding"][0]
            for e in doc.get("extension", [])
            if e["url"] == MODALITY_EXTENSION
        ]
    if name == "bodysite":
        return [
            c
            for e in doc.get("extension", [])
            if e["url"] == BODY_SITE_EXTENSION
            for c in codings(e["extension"][0]["valueCodeableConcept"])
        ]
    context = doc.get("context", {})
    if name == "event":
        return [c for concept in context.get("event", []) for c in codings(concept)]
    if name == "setting":
        return codings(context.get("practiceSetting"))
    if name == "format":
        return [c["format"] for c in doc["content"] if "format" in c]
    if name == "type":
        return codings(doc.get("type"))
    raise AssertionError(name)


def related(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    out = []
    for r in doc.get("context", {}).get("related", []):
        ident = r.get("identifier", {})
        is_accession = any(c.get("code") == "ACSN" for c in codings(ident.get("type")))
        if (kind == "uid" and ident.get("system") == UID_SYSTEM) or (
            kind == "accession" and is_accession
        ):
            out.append(ident)
    return out


def uid_code(code: str) -> str:
    return code if code.startswith("urn:oid:") else f"urn:oid:{code}"


def token_matches(entry: Entry, rtype: str, name: str, system: str | None, code: str) -> bool:
    doc = entry.facets["doc"]
    resource = entry.resource
    if name in ("modality", "bodysite", "event", "setting", "format", "type"):
        return token_hit(doc_codings(doc, name), system, code)
    if name == "study-type":
        return token_hit(doc_codings(doc, "event"), system, code)
    if name == "requesting-specialty":
        return token_hit(doc_codings(doc, "setting"), system, code)
    if name == "study-instance-uid":
        return system in (None, UID_SYSTEM) and token_hit(related(doc, "uid"), None, uid_code(code))
    if name == "accession-number":
        return token_hit(related(doc, "accession"), system, code)
    if name == "identifier":
        idents = resource["identifier"]
        if system in (UID_SYSTEM, None) and token_hit(idents, UID_SYSTEM, uid_code(code)):
            return True
        return system != UID_SYSTEM and token_hit(idents, system, code)
    if name == "status":
        return code == resource["status"] and system is None
    if name == "_id":
        return code == resource["id"]
    raise AssertionError(name)


def date_matches(value: str, d: DateRange) -> bool:
    moment = datetime.fromisoformat(value)
    low, high = d.low, d.high
    v = moment if low.tzinfo is not None else moment.replace(tzinfo=None)
    inside = low <= v and (high is None or v < high)
    above = high is not None and v >= high
    return {
        "eq": inside,
        "ne": not inside,
        "gt": above,
        "sa": above,
        "lt": v < low,
        "eb": v < low,
        "ge": v >= low,
        "le": high is None or v < high,
    }[d.prefix]


def entry_date(entry: Entry) -> str:
    return entry.resource.get("date") or entry.resource["started"]


def oracle(world: World, rtype: str, who: tuple[str, str], raw: list[tuple[str, str]]) -> list[str]:
    query = parse_search(rtype, raw)  # the ranges of dates, the tokens: as parsed
    pool = (world.documents if rtype == "DocumentReference" else world.studies)[who]
    kept = [e for e in pool if all(passes(e, rtype, f) for f in query.filters)]
    return [e.key for e in sorted(kept, key=functools.cmp_to_key(order(query)))]


def passes(entry: Entry, rtype: str, f: Any) -> bool:
    if f.name == "date":
        return any(date_matches(entry_date(entry), d) for d in f.alternatives)
    if f.name == "_text":
        return any(all(w in entry.text for w in alt) for alt in f.alternatives)
    return any(token_matches(entry, rtype, f.name, t.system, t.code) for t in f.alternatives)


def sort_value(entry: Entry, column: str) -> Any:
    r = entry.resource
    if column == "date":
        return datetime.fromisoformat(entry_date(entry)).astimezone(UTC)  # the true instant
    if column == "modality":
        if r["resourceType"] == "ImagingStudy":
            return "\\".join(c["code"] for c in r["modality"])
        return "\\".join(c["code"] for c in doc_codings(r, "modality"))
    if r["resourceType"] == "ImagingStudy":
        return r.get("description")
    return r["content"][0]["attachment"]["title"]


def order(query: SearchQuery) -> Callable[[Entry, Entry], int]:
    def compare(a: Entry, b: Entry) -> int:
        for key in query.sort:
            x, y = sort_value(a, key.column), sort_value(b, key.column)
            if x == y:
                continue
            if x is None or y is None:  # missing last, both ways
                return 1 if x is None else -1
            result = -1 if x < y else 1
            return -result if key.descending else result
        return -1 if a.tie < b.tie else (1 if a.tie > b.tie else 0)

    return compare


# --- strategies ------------------------------------------------------------------------------


def token_values(codes: list[str], systems: list[str]) -> st.SearchStrategy[str]:
    code = st.sampled_from([*codes, "NOPE"])
    forms = st.sampled_from([None, *systems, "urn:other"])
    return st.builds(lambda c, s: c if s is None else f"{s}|{c}", code, forms)


def ors(value: st.SearchStrategy[str], most: int = 3) -> st.SearchStrategy[str]:
    return st.lists(value, min_size=1, max_size=most).map(",".join)


@st.composite
def date_values(draw: st.DrawFn, moments: list[str]) -> str:
    moment = datetime.fromisoformat(draw(st.sampled_from(moments)))
    precision = draw(st.sampled_from(["year", "month", "day", "second", "zoned"]))
    text = {
        "year": moment.strftime("%Y"),
        "month": moment.strftime("%Y-%m"),
        "day": moment.strftime("%Y-%m-%d"),
        "second": moment.strftime("%Y-%m-%dT%H:%M:%S"),
        "zoned": moment.strftime("%Y-%m-%dT%H:%M:%S") + draw(st.sampled_from(["Z", "+02:00"])),
    }[precision]
    prefix = draw(st.sampled_from(["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]))
    return prefix + text


@st.composite
def searches(draw: st.DrawFn, world: World, rtype: str) -> list[tuple[str, str]]:
    v = world.values
    common: dict[str, st.SearchStrategy[str]] = {
        "modality": ors(token_values(v["modality"] + ["OT"], [DCM])),
        "bodysite": ors(
            token_values(v["body_part"] + ["816094009", "69536005"], [SNOMED, BODY_PART_SYSTEM])
        ),
        "_text": st.lists(
            st.sampled_from(v["word"]).map(lambda w: w.upper() if len(w) % 2 else w),
            min_size=1,
            max_size=2,
        ).map(" ".join),
        "_id": ors(
            st.sampled_from(
                [manifest_reference_id(u) for u in v["uid"][:5]] + v["report_id"][:5] + v["uid"][:5]
            )
        ),
    }
    date_strategy = ors(date_values(v["started"] + v["date"]), most=2)
    if rtype == "DocumentReference":
        specific = {
            "date": date_strategy,
            "event": ors(token_values(v["procedure"], [LOINC])),
            "setting": ors(token_values(v["requesting"], [SNOMED])),
            "study-instance-uid": ors(
                st.sampled_from(v["uid"]).flatmap(
                    lambda u: st.sampled_from([u, f"urn:oid:{u}", f"{UID_SYSTEM}|urn:oid:{u}"])
                )
            ),
            "accession-number": ors(token_values(v["accession"], v["accession_system"][:3])),
            "format": ors(token_values([MADO], [])),
            "type": ors(token_values(["18748-4"], [LOINC])),
            "status": ors(st.sampled_from(["current", "superseded", "entered-in-error"])),
        }
        sorts = ["date", "modality", "title"]
    else:
        specific = {
            "started": date_strategy,
            "study-type": ors(token_values(v["procedure"], [LOINC])),
            "requesting-specialty": ors(token_values(v["requesting"], [SNOMED])),
            "identifier": ors(
                st.one_of(
                    st.sampled_from(v["uid"]).map(lambda u: f"{UID_SYSTEM}|urn:oid:{u}"),
                    token_values(v["accession"], v["accession_system"][:3]),
                )
            ),
            "status": st.sampled_from(["available", "cancelled"]),
        }
        sorts = ["started", "modality", "description"]
    pool = {**common, **specific}
    # Broad filters weigh more, so that most answers are neither empty nor everything.
    broad = [n for n in ("date", "started", "modality", "bodysite", "_text", "status") if n in pool]
    weighted = sorted(pool) + broad * 3 + [n for n in ("date", "started") if n in pool] * 6
    how_many = draw(st.sampled_from([0, 1, 1, 1, 2, 2]))
    names = draw(st.lists(st.sampled_from(weighted), min_size=how_many, max_size=how_many))
    params = [(name, draw(pool[name])) for name in names]
    keys = draw(st.lists(st.sampled_from(sorts), unique=True, max_size=3))
    if keys:
        params.append(("_sort", ",".join(draw(st.sampled_from(["", "-"])) + k for k in keys)))
    return params


# --- the properties --------------------------------------------------------------------------


def paged(
    index: SearchIndex,  # noqa: F811
    rtype: str,
    who: tuple[str, str],
    params: list[tuple[str, str]],
    count: int,
) -> tuple[list[str], int]:
    found: list[str] = []
    offset: int | None = 0
    totals = set()
    with index.sessions() as session:
        while offset is not None:
            query = parse_search(rtype, [*params, ("_count", str(count)), ("_offset", str(offset))])
            page = run_search(session, query, patient=who, zone=ZONE)
            totals.add(page.total)
            assert len(page.matches) <= count
            for m in page.matches:
                if isinstance(m, ReportMatch):
                    found.append(f"{m.report.id}/{m.version.version}")
                elif isinstance(m, ManifestMatch):
                    found.append(manifest_reference_id(m.study.study_uid))
                else:
                    found.append(m.study.study_uid)
            offset = page.next_offset
    assert len(totals) == 1
    return found, totals.pop()


PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("rtype", ["DocumentReference", "ImagingStudy"])
def test_random_searches_equal_brute_force(
    index: SearchIndex,  # noqa: F811
    world: World,
    rtype: str,
) -> None:
    @PROPERTY_SETTINGS
    @given(
        params=searches(world, rtype),
        count=st.sampled_from([7, 25, 1000]),
        big=st.booleans(),
    )
    def check(params: list[tuple[str, str]], count: int, big: bool) -> None:
        who = index.big if big else index.small
        expected = oracle(world, rtype, who, params)
        found, total = paged(index, rtype, who, params, count)
        assert total == len(expected), params
        assert found == expected, params

    check()


def test_the_oracle_sees_what_the_list_shows(world: World, index: SearchIndex) -> None:  # noqa: F811
    """Guards the oracle: it holds every entry, and its filters are not vacuous."""
    docs = world.documents[index.big]
    assert len([e for e in docs if e.resource["status"] == "current"]) == len(
        oracle(world, "DocumentReference", index.big, [])
    )
    assert oracle(world, "DocumentReference", index.big, [("modality", "CT")])
    assert not oracle(world, "DocumentReference", index.big, [("modality", "NOPE")])
    assert len(world.studies[index.big]) == 60
