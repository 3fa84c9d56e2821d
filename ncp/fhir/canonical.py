"""Canonical URLs of the conformance resources this project publishes (profiles, extensions,
code systems, value sets, search parameters, operations).

The base uses the reserved ``.example`` top-level domain (RFC 2606) until the project has a
registered home for its implementation guide; see docs/decisions/0003-canonical-base.md. Every
canonical URL the code writes is built here, so moving the base is a one-line change.
"""

from __future__ import annotations

BASE = "https://ncp.example/fhir"


def structure_definition(name: str) -> str:
    """Profiles and extensions: ``{BASE}/StructureDefinition/{name}``."""
    return f"{BASE}/StructureDefinition/{name}"


def code_system(name: str) -> str:
    return f"{BASE}/CodeSystem/{name}"


def value_set(name: str) -> str:
    return f"{BASE}/ValueSet/{name}"


def concept_map(name: str) -> str:
    return f"{BASE}/ConceptMap/{name}"


def search_parameter(name: str) -> str:
    return f"{BASE}/SearchParameter/{name}"


def operation(name: str) -> str:
    return f"{BASE}/OperationDefinition/{name}"


# Identifier systems the node mints itself.
REPORT_IDENTIFIER_SYSTEM = f"{BASE}/sid/report"
"""Business identifier of an imaging report, stable across its versions."""
