"""HTTP pieces every FHIR route of the node shares: the error that becomes an OperationOutcome,
format negotiation (JSON or XML), bounded body reading, the request's correlation id.

Routes raise :class:`FhirHttpError` (or let a typed error be mapped to one); the app's exception
handler (:mod:`ncp.app`) answers it as an OperationOutcome in the negotiated format. Routes never
build error responses themselves, so every refusal looks the same to a peer.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ncp.errors import NcpError
from ncp.fhir.io import FhirReadError, read_resource, to_json, to_xml

JSON_TYPE = "application/fhir+json"
XML_TYPE = "application/fhir+xml"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")

# _format values FHIR R4 allows (http.html#mime-type), and what they mean.
_FORMATS = {
    "json": False,
    "application/json": False,
    "application/fhir+json": False,
    "application/json+fhir": False,
    "xml": True,
    "text/xml": True,
    "application/xml": True,
    "application/fhir+xml": True,
    "application/xml+fhir": True,
}


class FhirHttpError(NcpError):
    """A request ends with ``status`` and an OperationOutcome of one issue (``code`` is a FHIR
    issue-type code, ``expression`` the element concerned when there is one)."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        return outcome(self.code, self.diagnostics, expression=self.expression)


def outcome(
    code: str, diagnostics: str, *, severity: str = "error", expression: str | None = None
) -> dict[str, Any]:
    """An OperationOutcome with one issue."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def wants_xml(request: Request) -> bool:
    """Whether to answer in XML: ``_format`` wins over ``Accept``; JSON unless XML is asked for.

    An unsupported ``_format``, or an ``Accept`` naming neither FHIR format nor anything that
    JSON satisfies, is a 406.
    """
    fmt = request.query_params.get("_format")
    if fmt is not None:
        key = fmt.split(";")[0].strip().lower()
        if key not in _FORMATS:
            raise FhirHttpError(
                406, "not-supported", f"_format {fmt!r}: this server speaks FHIR JSON and XML"
            )
        return _FORMATS[key]
    accept = request.headers.get("accept", "").strip().lower()
    if not accept:
        return False
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    for media in types:
        if media in _FORMATS:
            return _FORMATS[media]
    if any(m in ("*/*", "application/*", "text/*") for m in types):
        return False
    raise FhirHttpError(
        406,
        "not-supported",
        f"Accept {accept[:100]!r}: this server answers application/fhir+json or "
        "application/fhir+xml",
    )


def fhir_response(
    request: Request,
    resource: dict[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """``resource`` as FHIR JSON or XML, as the request negotiated."""
    xml = wants_xml(request)
    return _respond(resource, xml, status, headers)


def fhir_json_response(request: Request, body: bytes, *, status: int = 200) -> Response:
    """A resource the caller has as FHIR JSON already (rendered list entries joined as text):
    sent as it is, or parsed once when XML was asked for."""
    if wants_xml(request):
        return _respond(json.loads(body), True, status, None)
    return Response(body, status_code=status, media_type=f"{JSON_TYPE}; charset=utf-8")


def _respond(
    resource: dict[str, Any], xml: bool, status: int, headers: Mapping[str, str] | None
) -> Response:
    body = to_xml(resource) if xml else to_json(resource)
    media = XML_TYPE if xml else JSON_TYPE
    return Response(
        body,
        status_code=status,
        media_type=f"{media}; charset=utf-8",
        headers=dict(headers or {}),
    )


def error_response(request: Request, error: FhirHttpError) -> Response:
    """The answer to a FhirHttpError: never fails on negotiation (an error about ``_format``
    itself is answered in JSON). The error is kept with the request, for the record of a
    refusal that no step audited (:class:`ncp.fhir.handlers.AuditedRefusals`)."""
    request.state.fhir_error = error
    try:
        xml = wants_xml(request)
    except FhirHttpError:
        xml = False
    headers = {REQUEST_ID_HEADER: request_id(request), **error.headers}
    return _respond(error.outcome(), xml, error.status, headers)


Offload = Callable[[Callable[[], dict[str, Any]]], Awaitable[dict[str, Any]]]
"""Runs a parse off the event loop (``ncp.fhir.work.HeavyWork.run``)."""
INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones
on a thread, so that a large body never holds the loop (and every other request) while parsed."""


async def read_resource_body(
    request: Request, *, max_bytes: int, offload: Offload | None = None
) -> dict[str, Any]:
    """The request's body as a resource (JSON or XML by Content-Type, or by its first byte when
    the type is generic). Read in chunks up to ``max_bytes``, never beyond: 413 when larger,
    415 for another media type, 400 when it is not a readable resource. A body larger than
    :data:`INLINE_PARSE_BYTES` is parsed by ``offload`` (default: the shared thread pool)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media not in _FORMATS and media != "application/octet-stream":
        raise FhirHttpError(
            415,
            "not-supported",
            f"Content-Type {media!r}: send application/fhir+json or application/fhir+xml",
        )
    declared = request.headers.get("content-length")
    # isascii: "²".isdigit() is true, and int("²") raises.
    if declared and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise FhirHttpError(413, "too-costly", f"the body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise FhirHttpError(413, "too-costly", f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    if not size:
        raise FhirHttpError(400, "required", "the body is empty: send a FHIR resource")
    data = b"".join(chunks)

    def parse() -> dict[str, Any]:
        return read_resource(data, max_bytes=max_bytes)

    try:
        if size <= INLINE_PARSE_BYTES:
            return parse()
        return await (offload or run_in_threadpool)(parse)
    except FhirReadError as exc:
        status = 413 if exc.issue.code == "too-costly" else 400
        raise FhirHttpError(
            status, exc.issue.code, exc.issue.diagnostics, expression=exc.issue.expression or None
        ) from None


def mark_audited(request: Request) -> None:
    """Note that a step of this request wrote its audit record (its refusal needs no other)."""
    request.state.audited = True


def was_audited(request: Request) -> bool:
    return bool(getattr(request.state, "audited", False))


def answered_error(request: Request) -> FhirHttpError | None:
    """The FhirHttpError this request was answered with, if any (see :func:`error_response`)."""
    error = getattr(request.state, "fhir_error", None)
    return error if isinstance(error, FhirHttpError) else None


def request_id(request: Request) -> str:
    """The exchange's correlation id: B's ``X-Request-ID`` when it is a valid one (1-64 of
    ``[A-Za-z0-9._:-]``), else a UUID generated once for this request. The app echoes it in the
    answer and every audit record of the request carries it."""
    known = getattr(request.state, "request_id", None)
    if isinstance(known, str):
        return known
    given = request.headers.get(REQUEST_ID_HEADER)
    chosen = given if given is not None and _REQUEST_ID.match(given) else str(uuid.uuid4())
    request.state.request_id = chosen
    return chosen


def valid_request_id(value: str) -> bool:
    return bool(_REQUEST_ID.match(value))
