"""Patient identification: ``POST /fhir/Patient/$match`` (FHIR R4 Patient-match).

Country B sends what its health professional knows: country A's identifier of the patient and
demographics. A answers with the candidates from its index, each graded
(``match-grade``: certain, probable, possible) and scored, and never picks one on B's behalf:

- identifier found and every demographic given agrees (at least family name and birth date
  given): **certain**; identifier found but a demographic disagrees: **possible**, never certain;
  identifier found without enough demographics to confirm it: **probable**;
- without an identifier match, demographics alone search the index only when at least family
  name and birth date are given, and are never certain (probable when all given agree);
- several candidates are all returned, none of them certain: the HP chooses;
- no candidate: an empty searchset (total 0).

Identifiers match exactly within their system (``ncp.fhir.identifiers.issuer_of``); names match
without regard to case, in any Unicode spelling of the same text (:func:`ncp.store.models.name_key`:
"ŻAK" is "Żak", a decomposed "Żak" too, "Zak" is not). The index keeps each family name's key,
so the comparison is the same on every database and uses an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.fhir.http import FhirHttpError
from ncp.fhir.identifiers import issuer_of
from ncp.fhir.listing import patient_resource
from ncp.fhir.parameters import object_list, optional_text, parameters_of, text_list
from ncp.fhir.patient_match import MATCH_GRADE_URL, query_text
from ncp.provider.describe import describe_patient
from ncp.store.models import Patient, name_key

MAX_CANDIDATES = 20
"""Most candidates returned (and looked at) by demographics, whatever ``count`` asks."""
_GENDERS = {"M": "male", "F": "female", "O": "other"}
"""DICOM Patient's Sex as FHIR gender, for comparing with what B sends."""
_GRADE_BASE = {"certain": 0.9, "probable": 0.6, "possible": 0.2}


@dataclass(frozen=True)
class MatchQuery:
    """What B asked, read from the Parameters of ``$match``."""

    identifiers: tuple[tuple[str, str], ...]
    """(system, value) pairs."""
    family: str | None = None
    given: str | None = None
    birth_date: date | None = None
    gender: str | None = None
    only_certain: bool = False
    count: int | None = None

    def text(self) -> str:
        """The query as the audit record keeps it (:func:`ncp.fhir.patient_match.query_text`)."""
        return query_text(
            self.identifiers,
            family=self.family,
            given=self.given,
            birth_date=self.birth_date,
            gender=self.gender,
            only_certain=self.only_certain,
            count=self.count,
        )


@dataclass
class Candidate:
    row: Patient
    grade: str
    score: float
    by_identifier: bool
    disagreements: list[str] = field(default_factory=list)


# --- reading the request -------------------------------------------------------------------------


def parse_parameters(body: dict[str, Any]) -> MatchQuery:
    """The query in a Parameters resource (``resource``, ``onlyCertainMatches``, ``count``).
    Any other shape of JSON is a 400 (:mod:`ncp.fhir.parameters`)."""
    patient: dict[str, Any] | None = None
    only_certain = False
    count: int | None = None
    for name, where, param in parameters_of(body, "$match"):
        if name == "resource":
            patient = param.get("resource")
        elif name == "onlyCertainMatches":
            value = param.get("valueBoolean")
            if not isinstance(value, bool):
                raise FhirHttpError(
                    400, "invalid", "onlyCertainMatches needs a valueBoolean", expression=where
                )
            only_certain = value
        elif name == "count":
            value = param.get("valueInteger")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FhirHttpError(
                    400, "invalid", "count needs a valueInteger of 1 or more", expression=where
                )
            count = value
        else:
            raise FhirHttpError(
                400, "not-supported", f"unknown $match parameter {name!r}", expression=where
            )
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise FhirHttpError(
            400,
            "required",
            "$match needs a 'resource' parameter holding a Patient",
            expression="Parameters.parameter",
        )
    return _query_of(patient, only_certain, count)


def _query_of(patient: dict[str, Any], only_certain: bool, count: int | None) -> MatchQuery:
    identifiers: list[tuple[str, str]] = []
    for i, ident in enumerate(object_list(patient.get("identifier"), "Patient.identifier")):
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not system or not isinstance(value, str) or not value:
            raise FhirHttpError(
                400,
                "required",
                "each Patient.identifier needs a system and a value: identifiers match exactly "
                "within the system that issued them",
                expression=f"Patient.identifier[{i}]",
            )
        identifiers.append((system, value))
    names = object_list(patient.get("name"), "Patient.name")
    family = given = None
    if names:
        family = optional_text(names[0].get("family"), "Patient.name[0].family")
        givens = text_list(names[0].get("given"), "Patient.name[0].given")
        given = givens[0] if givens else None
    birth: date | None = None
    raw_birth = optional_text(patient.get("birthDate"), "Patient.birthDate")
    if raw_birth is not None:
        try:
            birth = date.fromisoformat(raw_birth)
        except ValueError:
            raise FhirHttpError(
                400,
                "invalid",
                "birthDate must be a full date (YYYY-MM-DD) to match on",
                expression="Patient.birthDate",
            ) from None
    gender = optional_text(patient.get("gender"), "Patient.gender")
    if not identifiers and not (family and birth):
        raise FhirHttpError(
            400,
            "required",
            "give the patient's identifier, or at least family name and birth date: the index "
            "is not searched on less",
            expression="Patient",
        )
    return MatchQuery(tuple(identifiers), family, given, birth, gender, only_certain, count)


# --- matching ------------------------------------------------------------------------------------


def find_candidates(session: Session, query: MatchQuery) -> list[Candidate]:
    """The graded candidates for ``query``, best first (see the module doc for the rules)."""
    found: dict[int, Candidate] = {}
    for system, value in query.identifiers:
        row = session.scalar(
            select(Patient).where(Patient.patient_id == value, Patient.issuer == issuer_of(system))
        )
        if row is not None and row.id not in found:
            found[row.id] = _grade(row, query, by_identifier=True)
    if not found and query.family and query.birth_date:
        rows = session.scalars(
            select(Patient)
            .where(
                Patient.birth_date == query.birth_date,
                Patient.family_key == name_key(query.family),
                # Without an issuer a patient has no identifier B could name in a TRC.
                Patient.issuer != "",
            )
            .order_by(Patient.id)
            .limit(MAX_CANDIDATES)
        )
        for row in rows:
            found[row.id] = _grade(row, query, by_identifier=False)
    candidates = sorted(found.values(), key=lambda c: (-c.score, c.row.id))
    if len(candidates) > 1:
        # Several people fit: the health professional chooses, never the node.
        for c in candidates:
            if c.grade == "certain":
                c.grade, c.score = "probable", min(c.score, 0.89)
    if query.only_certain:
        certain = [c for c in candidates if c.grade == "certain"]
        return certain if len(certain) == 1 else []
    limit = min(query.count or MAX_CANDIDATES, MAX_CANDIDATES)
    return candidates[:limit]


def _grade(row: Patient, query: MatchQuery, *, by_identifier: bool) -> Candidate:
    agree: list[str] = []
    disagree: list[str] = []
    for name, asked, known in (
        ("family", _fold(query.family), _fold(row.family_name)),
        ("given", _fold(query.given), _fold(row.given_name)),
        ("birthDate", query.birth_date, row.birth_date),
        ("gender", query.gender, _GENDERS.get((row.sex or "").upper())),
    ):
        if asked is None or known is None:
            continue
        (agree if asked == known else disagree).append(name)
    compared = len(agree) + len(disagree)
    fraction = len(agree) / compared if compared else 0.0
    confirmed = {"family", "birthDate"} <= set(agree)
    if disagree:
        grade = "possible"
    elif by_identifier and confirmed:
        grade = "certain"
    elif confirmed:
        grade = "probable"
    else:
        grade = "probable" if by_identifier else "possible"
    score = round(_GRADE_BASE[grade] + 0.1 * fraction, 2)
    return Candidate(row, grade, min(score, 1.0), by_identifier, disagree)


_fold = name_key


# --- the answer ----------------------------------------------------------------------------------


def searchset(base_url: str, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """The ``$match`` answer: a searchset of the candidates with grade and score."""
    entries = []
    for c in candidates:
        resource = patient_resource(describe_patient(c.row))
        entries.append(
            {
                "fullUrl": f"{base_url}/Patient/{resource['id']}",
                "resource": resource,
                "search": {
                    "extension": [{"url": MATCH_GRADE_URL, "valueCode": c.grade}],
                    "mode": "match",
                    "score": c.score,
                },
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries)}
    if entries:
        bundle["entry"] = entries
    return bundle
