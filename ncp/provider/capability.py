"""The node's CapabilityStatement (``GET /fhir/metadata``), built from the tables the routes use.

``SEARCH_PARAMS`` lists the search parameters the standard channel accepts, per resource type,
read from the table the search routes parse with (``ncp.provider.search_params``), so the
statement cannot promise what the code does not do.
The interactions are read from the app's routes (:func:`interactions_of`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fastapi.routing

from ncp import __version__

FHIR_VERSION = "4.0.1"
_BASE = "http://hl7.org/fhir/SearchParameter/"
_NCP = "https://ncp.example/fhir/"


@dataclass(frozen=True)
class SearchParam:
    """One search parameter as CapabilityStatement.rest.resource.searchParam states it."""

    name: str
    type: str
    """FHIR search-param-type: token, date, reference, string..."""
    definition: str
    """Canonical URL of its SearchParameter (base FHIR, or ours in profiles/); empty if none."""
    documentation: str = ""


# Canonical URL and type of every search parameter name the list routes may accept. The names
# themselves come from ncp.provider.search_params (the table the routes parse with), so the
# statement lists exactly what is accepted; a name missing here is listed without a definition.
_DEFINITIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("DocumentReference", "patient"): ("reference", _BASE + "clinical-patient"),
    ("DocumentReference", "subject"): ("reference", _BASE + "DocumentReference-subject"),
    ("DocumentReference", "date"): ("date", _BASE + "DocumentReference-date"),
    ("DocumentReference", "type"): ("token", _BASE + "clinical-type"),
    ("DocumentReference", "event"): ("token", _BASE + "DocumentReference-event"),
    ("DocumentReference", "setting"): ("token", _BASE + "DocumentReference-setting"),
    ("DocumentReference", "format"): ("token", _BASE + "DocumentReference-format"),
    ("DocumentReference", "status"): ("token", _BASE + "DocumentReference-status"),
    ("DocumentReference", "related"): ("reference", _BASE + "DocumentReference-related"),
    ("DocumentReference", "modality"): (
        "token",
        _NCP + "SearchParameter/DocumentReference-modality",
    ),
    ("DocumentReference", "bodysite"): (
        "token",
        _NCP + "SearchParameter/DocumentReference-bodysite",
    ),
    ("DocumentReference", "anatomical-region"): (
        "token",
        _NCP + "SearchParameter/DocumentReference-bodysite",
    ),
    ("DocumentReference", "study-instance-uid"): (
        "token",
        _NCP + "SearchParameter/DocumentReference-study-instance-uid",
    ),
    ("DocumentReference", "accession-number"): (
        "token",
        _NCP + "SearchParameter/DocumentReference-accession-number",
    ),
    ("ImagingStudy", "patient"): ("reference", _BASE + "clinical-patient"),
    ("ImagingStudy", "subject"): ("reference", _BASE + "ImagingStudy-subject"),
    ("ImagingStudy", "started"): ("date", _BASE + "ImagingStudy-started"),
    ("ImagingStudy", "identifier"): ("token", _BASE + "clinical-identifier"),
    ("ImagingStudy", "modality"): ("token", _BASE + "ImagingStudy-modality"),
    ("ImagingStudy", "bodysite"): ("token", _BASE + "ImagingStudy-bodysite"),
    ("ImagingStudy", "status"): ("token", _BASE + "ImagingStudy-status"),
    ("ImagingStudy", "study-type"): ("token", _NCP + "SearchParameter/ImagingStudy-study-type"),
    ("ImagingStudy", "requesting-specialty"): (
        "token",
        _NCP + "SearchParameter/ImagingStudy-requesting-specialty",
    ),
}
_COMMON: dict[str, tuple[str, str]] = {
    "_id": ("token", _BASE + "Resource-id"),
    "_text": ("string", _BASE + "DomainResource-text"),
    "_content": ("string", _BASE + "Resource-content"),
}


def _declared() -> dict[str, tuple[SearchParam, ...]]:
    """The search parameters the list routes accept, by resource type, from their own table."""
    try:
        from ncp.provider import search_params as table
    except ModuleNotFoundError:  # the list routes are not in this build: nothing is searched
        return {}
    out: dict[str, tuple[SearchParam, ...]] = {}
    for rtype in table.RESOURCE_TYPES:
        names = [
            *sorted(table.REFERENCE_PARAMETERS),
            table.DATE_PARAMETERS[rtype],
            *sorted(table.TOKEN_PARAMETERS[rtype]),
            *sorted(table.TEXT_PARAMETERS),
        ]
        if rtype == "DocumentReference":
            names.append(table.RELATED_PARAMETER)
        params = []
        for name in dict.fromkeys(names):
            kind, definition = _DEFINITIONS.get((rtype, name)) or _COMMON.get(name, ("token", ""))
            params.append(SearchParam(name, kind, definition))
        out[rtype] = tuple(params)
    return out


SEARCH_PARAMS: dict[str, tuple[SearchParam, ...]] = _declared()
"""What the search routes accept besides the result parameters (_count, _sort, _format...)."""

_TYPES = ("Bundle", "DocumentReference", "ImagingStudy", "Organization", "Patient")


def interactions_of(routes: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """The FHIR interactions per resource type that the app's routes (method, path) serve: the
    statement is derived from what is routed, never written beside it."""
    found: dict[str, list[str]] = {t: [] for t in _TYPES}

    def add(rtype: str, code: str) -> None:
        if rtype in found and code not in found[rtype]:
            found[rtype].append(code)

    for method, path in routes:
        parts = path.removeprefix("/fhir/").split("/")
        rtype = parts[0]
        searched = (method == "GET" and len(parts) == 1) or (
            method == "POST" and parts[1:] == ["_search"]
        )
        if searched:
            add(rtype, "search-type")
        elif method == "POST" and len(parts) == 1:
            add(rtype, "create")
        elif method == "GET" and len(parts) == 2 and parts[1].startswith("{"):
            add(rtype, "read")
        elif method == "GET" and len(parts) == 3 and parts[2] == "_history":
            add(rtype, "history-instance")
        elif method == "GET" and len(parts) == 4 and parts[2] == "_history":
            add(rtype, "vread")
    order = ("read", "vread", "history-instance", "create", "search-type")
    return {t: sorted(codes, key=order.index) for t, codes in found.items()}


PROFILES: dict[str, str] = {
    "DocumentReference": _NCP + "StructureDefinition/ncp-imaging-documentreference",
    "ImagingStudy": _NCP + "StructureDefinition/ncp-imaging-study-manifest",
    "Bundle": _NCP + "StructureDefinition/ncp-imaging-report-bundle",
    "Organization": _NCP + "StructureDefinition/ncp-organization",
    "Patient": _NCP + "StructureDefinition/ncp-patient",
}
GUIDE_PROFILES: dict[str, tuple[str, ...]] = {
    # The guides' profiles the node's resources also claim (and the project transcribes).
    "Bundle": (
        "http://hl7.eu/fhir/imaging/StructureDefinition/BundleReportEuImaging",
        "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoFhirBundle",
    ),
    "ImagingStudy": ("https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoImagingStudy",),
    "Organization": (
        "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoCreatorOrganization",
    ),
    "Patient": ("https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoPatient",),
}

MATCH_DEFINITION = "http://hl7.org/fhir/OperationDefinition/Patient-match"
IMAGING_ACCESS_DEFINITION = _NCP + "OperationDefinition/imaging-access"
VALIDATE_DEFINITION = "http://hl7.org/fhir/OperationDefinition/Resource-validate"

SECURITY_TEXT = (
    "Mutual TLS (TLS 1.2 or newer) with a client certificate of a peer on this node's trust "
    "list. Every request but GET /metadata carries the health professional's identity "
    "assertion signed by the peer's node (Authorization: Bearer, typ hp-assertion+jwt, ES256); "
    "every patient-level request also carries a treatment relationship confirmation bound to "
    "it (NCP-Treatment-Relationship, typ trc+jwt). The assertions' issuer must be the country "
    "of the TLS client certificate, their audience this node's FHIR base URL."
)


def capability_statement(
    base_url: str,
    *,
    name: str,
    country: str,
    date: datetime,
    routes: Iterable[tuple[str, str]],
) -> dict[str, Any]:
    """The CapabilityStatement of a node serving the standard channel at ``base_url`` with
    ``routes`` (method, path template), as :func:`routes_of` reads them from the app."""
    served = interactions_of(routes)
    resources = []
    for rtype in _TYPES:
        entry: dict[str, Any] = {
            "type": rtype,
            "supportedProfile": [PROFILES[rtype], *GUIDE_PROFILES.get(rtype, ())],
        }
        interactions = served[rtype]
        if interactions:
            entry["interaction"] = [{"code": code} for code in interactions]
        if "vread" in interactions:
            entry["versioning"] = "versioned"
            entry["readHistory"] = True
            entry["conditionalRead"] = "full-support"  # ncp.provider.conditional
        params = SEARCH_PARAMS.get(rtype, ()) if "search-type" in interactions else ()
        if params:
            includes, revincludes = _includes(rtype)
            if includes:
                entry["searchInclude"] = includes
            if revincludes:
                entry["searchRevInclude"] = revincludes
            entry["searchParam"] = [_search_param(p) for p in params]
        operations = [{"name": "validate", "definition": VALIDATE_DEFINITION}]
        if rtype == "Patient":
            operations.insert(0, {"name": "match", "definition": MATCH_DEFINITION})
        entry["operation"] = operations
        resources.append(entry)
    label = name or f"ncp node {country}"
    narrative = (
        f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{_escape(label)}: FHIR R4 server of the '
        "NCPeH imaging standard channel (mutual TLS, signed assertions).</p></div>"
    )
    return {
        "resourceType": "CapabilityStatement",
        "text": {"status": "generated", "div": narrative},
        "status": "active",
        "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "publisher": label,
        "kind": "instance",
        "software": {"name": "ncp", "version": __version__},
        "implementation": {
            "description": f"{label}: NCPeH imaging connector, standard channel",
            "url": base_url,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "application/fhir+xml"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "Certificates",
                                }
                            ],
                            "text": "mutual TLS, signed assertions",
                        }
                    ],
                    "description": SECURITY_TEXT,
                },
                "resource": resources,
                "operation": [
                    {"name": "imaging-access", "definition": IMAGING_ACCESS_DEFINITION},
                    {"name": "validate", "definition": VALIDATE_DEFINITION},
                ],
            }
        ],
    }


def _includes(rtype: str) -> tuple[list[str], list[str]]:
    """The ``_include`` and ``_revinclude`` values the search routes accept for a type, from the
    table they parse with."""
    try:
        from ncp.provider import search_params as table
    except ModuleNotFoundError:
        return [], []
    includes = next((v for k, v in table.INCLUDES.items() if k == rtype), {})
    revincludes = next((v for k, v in table.REVINCLUDES.items() if k == rtype), {})
    return sorted(includes), sorted(revincludes)


def _search_param(param: SearchParam) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "type": param.type}
    if param.definition:
        out["definition"] = param.definition
    if param.documentation:
        out["documentation"] = param.documentation
    return out


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def routes_of(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every FHIR route of a FastAPI app. From FastAPI 0.137 on,
    ``app.routes`` holds each included router as one node of a tree, so a plain walk sees none
    of their routes; ``iter_route_contexts`` flattens the tree (older versions copied them in)."""
    routes = getattr(app, "routes", [])
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    out = []
    for route in flatten(routes) if flatten is not None else routes:
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if path.startswith("/fhir/"):
                out.append((method, path))
    return out
