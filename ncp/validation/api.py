"""``$validate`` on the node's FHIR API: ``POST /fhir/$validate``, ``POST /fhir/{type}/$validate``.

The body is the resource itself, or a Parameters resource with a ``resource`` parameter (and
optionally ``profile``), in JSON or XML. The answer is an OperationOutcome, 200 whether or not the
resource is valid (FHIR's $validate reports problems in the outcome); 400 when the input cannot be
read or does not fit the request, 413 when it is too large. Bodies are read in chunks up to the
limit, never whole beyond it.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ncp.fhir.io import DEFAULT_MAX_BYTES, FhirReadError, read_resource, to_json, to_xml
from ncp.validation.engine import UnknownProfile, Validator
from ncp.validation.issues import Issue, to_operation_outcome

JSON_TYPE = "application/fhir+json"
XML_TYPE = "application/fhir+xml"

# fhirpathpy keeps global state per evaluation: one validation at a time per process.
_LOCK = threading.Lock()


class _Refused(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, location: str = "") -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issue = Issue("error", code, location, diagnostics, "$validate")


def router(max_bytes: int = DEFAULT_MAX_BYTES) -> APIRouter:
    api = APIRouter()

    async def validate(request: Request, resource_type: str | None) -> Response:
        wants_xml = _wants_xml(request)
        try:
            body = await _read_body(request, max_bytes)
            resource = read_resource(body, max_bytes=max_bytes)
            target, profiles = _unwrap(resource, request.query_params.getlist("profile"))
            if resource_type is not None and target.get("resourceType") != resource_type:
                raise _Refused(
                    400,
                    "invalid",
                    f"the resource is a {target.get('resourceType')!r}, the request names "
                    f"{resource_type!r}",
                    "resourceType",
                )
            validator = Validator.default()
            for url in profiles:
                validator.check_profile(url)
            with _LOCK:
                issues = validator.validate(target, profiles=profiles)
            return _answer(200, to_operation_outcome(issues), wants_xml)
        except FhirReadError as exc:
            status = 413 if exc.issue.code == "too-costly" else 400
            return _answer(status, to_operation_outcome([exc.issue]), wants_xml)
        except UnknownProfile as exc:
            issue = Issue("error", "not-supported", "profile", str(exc), "$validate")
            return _answer(400, to_operation_outcome([issue]), wants_xml)
        except _Refused as exc:
            return _answer(exc.status, to_operation_outcome([exc.issue]), wants_xml)

    @api.post("/fhir/$validate")
    async def validate_any(request: Request) -> Response:
        return await validate(request, None)

    @api.post("/fhir/{resource_type}/$validate")
    async def validate_type(request: Request, resource_type: str) -> Response:
        return await validate(request, resource_type)

    return api


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _Refused(413, "too-costly", f"the body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _Refused(413, "too-costly", f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    if not size:
        raise _Refused(400, "required", "the body is empty: send a resource or Parameters")
    return b"".join(chunks)


def _unwrap(resource: dict[str, Any], profiles: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The resource to validate and the profiles asked for (query and Parameters)."""
    if resource.get("resourceType") != "Parameters":
        return resource, profiles
    target = None
    asked = list(profiles)
    for i, param in enumerate(resource.get("parameter") or []):
        name = param.get("name")
        if name == "resource":
            target = param.get("resource")
        elif name == "profile":
            url = param.get("valueUri") or param.get("valueCanonical")
            if not isinstance(url, str):
                raise _Refused(400, "invalid", "profile needs a valueUri", f"parameter[{i}]")
            asked.append(url)
    if not isinstance(target, dict):
        # A Parameters resource without a 'resource' parameter is itself what is validated.
        return resource, asked
    return target, asked


def _wants_xml(request: Request) -> bool:
    fmt = request.query_params.get("_format", "")
    if fmt:
        return "xml" in fmt
    accept = request.headers.get("accept", "")
    return "xml" in accept and "json" not in accept


def _answer(status: int, outcome: dict[str, Any], xml: bool) -> Response:
    if xml:
        return Response(to_xml(outcome), status_code=status, media_type=XML_TYPE)
    return Response(to_json(outcome), status_code=status, media_type=JSON_TYPE)
