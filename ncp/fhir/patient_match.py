"""``Patient/$match`` (FHIR R4 Patient-match) as both sides of the standard channel write it: the
``match-grade`` extension A grades each candidate with, and the query as the audit records keep
it, so that A's record of an identification and B's say the same of what was asked."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"


def query_text(
    identifiers: Iterable[tuple[str, str]],
    *,
    family: str | None,
    given: str | None,
    birth_date: date | None,
    gender: str | None,
    only_certain: bool,
    count: int | None,
) -> str:
    """The query as an audit record keeps it (the audit table may hold patient data):
    ``identifier=<system>|<value>`` for each (system, value), the demographics given, then
    ``onlyCertainMatches`` and ``count``."""
    parts = [f"identifier={system}|{value}" for system, value in identifiers]
    for name, value in (
        ("family", family),
        ("given", given),
        ("birthdate", birth_date.isoformat() if birth_date else None),
        ("gender", gender),
    ):
        if value is not None:
            parts.append(f"{name}={value}")
    parts.append(f"onlyCertainMatches={str(only_certain).lower()}")
    if count is not None:
        parts.append(f"count={count}")
    return "&".join(parts)
