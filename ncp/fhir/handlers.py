"""How every FHIR application of ncp answers errors, and the correlation id of each request.

One place turns errors into answers, as OperationOutcomes in the negotiated format:
:class:`~ncp.fhir.http.FhirHttpError` with its status, unknown paths 404, wrong methods 405,
unreadable parameters 400, anything unexpected 500 without internals (the log has the traceback,
tied to the request by its correlation id, which every answer echoes in ``X-Request-ID``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncp.fhir.http import (
    REQUEST_ID_HEADER,
    FhirHttpError,
    error_response,
    request_id,
    valid_request_id,
)

log = logging.getLogger(__name__)


# --- errors as OperationOutcomes -----------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as an OperationOutcome in the negotiated format."""
    app.add_exception_handler(FhirHttpError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)


async def _fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirHttpError)
    return error_response(request, exc)


_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        text = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        text = f"{request.method} is not supported on {request.url.path}"
    else:
        text = str(exc.detail)
    code = _HTTP_CODES.get(exc.status_code, "processing")
    headers = dict(exc.headers or {})
    return error_response(request, FhirHttpError(exc.status_code, code, text, headers=headers))


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
        for err in exc.errors()[:5]
    )
    return error_response(request, FhirHttpError(400, "invalid", problems or "invalid request"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log with the correlation id; the peer learns nothing inside.
    log.exception("request %s failed", request_id(request))
    return error_response(
        request,
        FhirHttpError(
            500,
            "exception",
            f"internal error; quote request id {request_id(request)} to the operator",
        ),
    )


# --- the correlation id --------------------------------------------------------------------------


class RequestIdMiddleware:
    """Fixes the request's correlation id before anything else runs (B's ``X-Request-ID``, or a
    new UUID when absent), refuses a malformed one with 400, and echoes it on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is not None and not valid_request_id(given):
            response = error_response(
                request,
                FhirHttpError(
                    400,
                    "value",
                    f"{REQUEST_ID_HEADER} must be 1 to 64 characters of A-Z a-z 0-9 . _ : -",
                ),
            )
            await response(scope, receive, send)
            return
        rid = request_id(request)  # stored in scope state: every later Request sees it
        await self.app(scope, receive, _echo(send, rid))


def _echo(send: Send, rid: str) -> Callable[[Message], Any]:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v)
                for k, v in message.get("headers", [])
                if k.decode("latin-1").lower() != REQUEST_ID_HEADER.lower()
            ]
            headers.append((REQUEST_ID_HEADER.encode("latin-1"), rid.encode("latin-1")))
            message = {**message, "headers": headers}
        await send(message)

    return sender
