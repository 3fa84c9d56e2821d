"""The OpenAPI document of the standard channel, served at ``GET /fhir/openapi.json``.

The CapabilityStatement (``GET /fhir/metadata``) stays the FHIR description of this API; the
OpenAPI document describes the same routes for HTTP tools (a fuzzer, a gateway's config, an
API catalogue), in the words of OpenAPI 3.1: the paths come from the app's routes (FastAPI
reads them), and this module adds what the routes read by hand: the request bodies (FHIR JSON
or XML Parameters, resources, forms), the search parameters (the search routes' own table,
:mod:`ncp.provider.capability`), the security of each route (mutual TLS, the HP assertion, the
treatment relationship confirmation) and the OperationOutcome of every refusal. Decision record:
``docs/decisions/0017-openapi-documents.md``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi.openapi.utils import get_openapi

from ncp.provider.capability import SEARCH_PARAMS
from ncp.provider.search_params import RESULT_PARAMETERS

JSON = "application/fhir+json"
XML = "application/fhir+xml"
FORM = "application/x-www-form-urlencoded"

_REF = "#/components/schemas/"

MTLS: dict[str, list[str]] = {"mutualTLS": []}
HP: dict[str, list[str]] = {"mutualTLS": [], "hpAssertion": []}
PAIR: dict[str, list[str]] = {"mutualTLS": [], "hpAssertion": [], "treatmentRelationship": []}

_ERRORS = {
    "400": "the request cannot be read or does not fit the operation",
    "401": "no valid HP identity assertion (or confirmation) for this node",
    "403": "the caller is known but not allowed this",
    "404": "no such resource for the patient of the confirmation",
    "405": "the method is not served on this path",
    "406": "the answer cannot be given in the format asked for",
    "413": "the body is larger than its limit, or too costly to process",
    "415": "the body is neither FHIR JSON nor FHIR XML",
    "500": "the node failed (the request id is in the answer and the audit trail)",
    "503": "the node is busy: retry after the Retry-After seconds",
}


def _schemas() -> dict[str, Any]:
    coding_text = {"type": "string", "maxLength": 1024}
    patient = {
        "type": "object",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"const": "Patient"},
            "identifier": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"system": coding_text, "value": coding_text},
                },
            },
            "name": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "family": coding_text,
                        "given": {"type": "array", "items": coding_text},
                    },
                },
            },
            "birthDate": {"type": "string", "format": "date"},
            "gender": {"enum": ["male", "female", "other", "unknown"]},
        },
    }
    return {
        "Resource": {
            "type": "object",
            "description": "A FHIR R4 resource in its JSON form.",
            "required": ["resourceType"],
            "properties": {"resourceType": {"type": "string"}},
        },
        "OperationOutcome": {
            "type": "object",
            "required": ["resourceType", "issue"],
            "properties": {
                "resourceType": {"const": "OperationOutcome"},
                "issue": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["severity", "code"],
                        "properties": {
                            "severity": {"type": "string"},
                            "code": {"type": "string"},
                            "diagnostics": {"type": "string"},
                            "expression": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "MatchParameters": _parameters(
            "Patient/$match input: a Patient, onlyCertainMatches, count.",
            {
                "name": {"enum": ["resource", "onlyCertainMatches", "count"]},
                "resource": patient,
                "valueBoolean": {"type": "boolean"},
                "valueInteger": {"type": "integer", "minimum": 1},
            },
        ),
        "ImagingAccessParameters": _parameters(
            "$imaging-access input (OperationDefinition imaging-access).",
            {
                "name": {"enum": ["study", "option", "purpose", "priority"]},
                "valueString": {
                    "type": "string",
                    "pattern": "^[0-9]+(\\.[0-9]+)*$",
                    "maxLength": 64,
                },
                "valueCode": {
                    "enum": ["A", "B", "C", "TREAT", "ETREAT", "routine", "urgent",
                             "asap", "stat"],
                },
            },
        ),
    }  # fmt: skip


def _parameters(description: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The schema of a FHIR Parameters body whose ``parameter`` entries each have a ``name``
    and the properties ``entry`` (an operation's inputs)."""
    return {
        "type": "object",
        "description": description,
        "required": ["resourceType", "parameter"],
        "properties": {
            "resourceType": {"const": "Parameters"},
            "parameter": {
                "type": "array",
                "items": {"type": "object", "required": ["name"], "properties": entry},
            },
        },
    }


def _body(schema: str, *, xml: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": {"$ref": _REF + schema}}}
    if xml:
        content[XML] = {"schema": {"type": "string"}}
    return {"required": True, "content": content}


def _answer(description: str, schema: str) -> dict[str, Any]:
    ref = {"$ref": _REF + schema}
    return {
        "description": description,
        "content": {JSON: {"schema": ref}, XML: {"schema": {"type": "string"}}},
    }


def _query(name: str, description: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", "maxLength": 1024},
    }


_FORMAT = _query("_format", "json or xml (or a FHIR MIME type); wins over Accept")
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "The exchange's correlation id, echoed and written into every audit record",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
}


def _search_parameters(rtype: str) -> list[dict[str, Any]]:
    params = [_query(p.name, f"FHIR {p.type} search parameter") for p in SEARCH_PARAMS[rtype]]
    params += [_query(name) for name in sorted(RESULT_PARAMETERS)]
    return params


def _operation(method: str, path: str) -> dict[str, Any]:
    """What the route reads by hand, by (method, path template)."""
    parts = path.removeprefix("/fhir/").split("/")
    if path == "/fhir/metadata":
        return {"summary": "CapabilityStatement", "security": [MTLS], "answer": "Resource"}
    if path == "/fhir/openapi.json":
        return {"summary": "this OpenAPI document", "security": [MTLS], "raw": True}
    if path == "/fhir/Patient/$match":
        return {"summary": "patient identification", "security": [HP],
                "body": "MatchParameters", "answer": "Resource"}  # fmt: skip
    if path == "/fhir/$imaging-access":
        return {"summary": "an image access token", "security": [PAIR],
                "body": "ImagingAccessParameters", "answer": "Resource"}  # fmt: skip
    if path.endswith("/$validate"):
        return {"summary": "validate a resource", "security": [HP], "body": "Resource",
                "answer": "OperationOutcome", "query": [_query("profile")]}  # fmt: skip
    if method == "post" and path == "/fhir/Bundle":
        return {"summary": "report ingest (national systems of this country)",
                "security": [MTLS], "body": "Resource", "answer": "Resource"}  # fmt: skip
    if parts[0] in SEARCH_PARAMS and len(parts) == 1:
        return {"summary": f"search the {parts[0]} list", "security": [PAIR],
                "answer": "Resource", "query": _search_parameters(parts[0])}  # fmt: skip
    if parts[0] in SEARCH_PARAMS and parts[1:] == ["_search"]:
        return {"summary": f"search the {parts[0]} list (form)", "security": [PAIR],
                "answer": "Resource", "form": parts[0]}  # fmt: skip
    return {"summary": f"read {parts[0]}", "security": [PAIR], "answer": "Resource"}


def standard_openapi(routes: Any, *, base_url: str, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the standard channel served by ``routes``."""
    origin = urlsplit(base_url)
    document = get_openapi(
        title=title,
        version=version,
        summary="NCPeH imaging: the standard channel (FHIR R4 over HTTPS with mutual TLS)",
        description="The FHIR description of this API is its CapabilityStatement "
        "(GET /fhir/metadata); this document describes the same routes for HTTP tools.",
        routes=routes,
        servers=[{"url": f"{origin.scheme}://{origin.netloc}"}],
    )
    document.setdefault("components", {})
    document["components"]["schemas"] = _schemas()
    document["components"]["securitySchemes"] = {
        "mutualTLS": {
            "type": "mutualTLS",
            "description": "A client certificate of a peer on the trust list (or, for report "
            "ingest, of this node's own country)",
        },
        "hpAssertion": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWS (typ hp-assertion+jwt, ES256)",
            "description": "The HP identity assertion signed by the peer's node",
        },
        "treatmentRelationship": {
            "type": "apiKey",
            "in": "header",
            "name": "NCP-Treatment-Relationship",
            "description": "The treatment relationship confirmation (JWS, typ trc+jwt) bound "
            "to the HP assertion",
        },
    }
    for path, operations in document.get("paths", {}).items():
        for method, op in operations.items():
            spec = _operation(method, path)
            op["summary"] = spec["summary"]
            op["security"] = spec["security"]
            params = [p for p in op.get("parameters", []) if p.get("in") == "path"]
            for param in params:
                param["schema"] = {"type": "string", "maxLength": 128}
            params.append(_REQUEST_ID)
            if method == "get" and not spec.get("raw"):
                params.append(_FORMAT)
            params += spec.get("query", [])
            op["parameters"] = params
            if "body" in spec:
                op["requestBody"] = _body(spec["body"])
            elif "form" in spec:
                form = {p["name"]: {"type": "string"} for p in _search_parameters(spec["form"])}
                op["requestBody"] = {
                    "required": False,
                    "content": {FORM: {"schema": {"type": "object", "properties": form}}},
                }
            ok = (
                {"description": "the document", "content": {"application/json": {}}}
                if spec.get("raw")
                else _answer("the answer", spec["answer"])
            )
            responses: dict[str, Any] = {"200": ok}
            if method == "post" and path == "/fhir/Bundle":
                responses["201"] = _answer("the stored version", "Resource")
                responses["409"] = _answer("a clashing version", "OperationOutcome")
                responses["422"] = _answer("not a valid report", "OperationOutcome")
            if method == "get" and path.startswith("/fhir/Bundle/"):
                responses["304"] = {"description": "the client holds this version"}
            if path == "/fhir/$imaging-access":
                responses["422"] = _answer("the option is not offered", "OperationOutcome")
            for status, text in _ERRORS.items():
                responses[status] = _answer(text, "OperationOutcome")
            op["responses"] = responses
    return document
