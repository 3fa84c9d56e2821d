"""How every FHIR application of ncp answers errors, audits refusals, and the correlation id of
each request.

One place turns errors into answers, as OperationOutcomes in the negotiated format:
:class:`~ncp.fhir.http.FhirHttpError` with its status, unknown paths 404, wrong methods 405,
unreadable parameters 400, anything unexpected 500 without internals (the log has the traceback,
tied to the request by its correlation id, which every answer echoes in ``X-Request-ID``).

One place also sees every answer go out (:class:`AuditedRefusals`): an error answer (4xx) that
no step of the request audited, and every 500, is handed to the application's audit hook before
it is sent. The hook is passed in (the provider's, for the node): this package knows no auditor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncp.fhir.http import (
    REQUEST_ID_HEADER,
    FhirHttpError,
    answered_error,
    error_response,
    request_id,
    valid_request_id,
    was_audited,
)

log = logging.getLogger(__name__)

RefusalAudit = Callable[[Request, FhirHttpError], None]
"""Writes the audit record of a request answered with ``error`` (blocking: it runs in a worker
thread). Raising means the record is lost: the answer becomes a 500 (fail closed)."""


# --- errors as OperationOutcomes -----------------------------------------------------------------


def install_error_handlers(app: FastAPI, *, audit: RefusalAudit | None = None) -> None:
    """Answer every error of ``app`` as an OperationOutcome in the negotiated format, each
    answer carrying the request's correlation id; with ``audit``, every refusal and failure
    that no step recorded is recorded by it (:class:`AuditedRefusals`)."""
    app.add_exception_handler(FhirHttpError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(RequestIdMiddleware)
    if audit is not None:
        # Added last, so outermost: it also sees the 400 of a malformed X-Request-ID.
        app.add_middleware(AuditedRefusals, audit=audit)


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
    return error_response(request, _internal(request))


def _internal(request: Request) -> FhirHttpError:
    return FhirHttpError(
        500,
        "exception",
        f"internal error; quote request id {request_id(request)} to the operator",
    )


# --- every refusal audited -----------------------------------------------------------------------


class AuditedRefusals:
    """Hands every error answer that no step of its request audited (any 4xx), and every 5xx,
    to ``audit`` before the answer starts; an exception leaving the app is recorded as the 500
    it becomes. If the record cannot be written, a 4xx becomes a 500 instead (a refusal that is
    not audited is not answered as if it were)."""

    def __init__(self, app: ASGIApp, audit: RefusalAudit) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        started = False
        replaced = False

        async def watched(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the app's own answer was replaced by a 500: drop the rest of it
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                if status >= 500 or (status >= 400 and not was_audited(request)):
                    error = answered_error(request)
                    if error is None or error.status != status:
                        error = FhirHttpError(status, "processing", f"answered {status}")
                    if not await self._record(request, error) and status < 500:
                        replaced = True
                        response = error_response(request, _unaudited(request))
                        await response(scope, receive, send)
                        return
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if not started:
                await self._record(request, _internal(request))
            raise

    async def _record(self, request: Request, error: FhirHttpError) -> bool:
        try:
            await run_in_threadpool(self.audit, request, error)
        except Exception as exc:
            log.error(
                "request %s: the record of its %d answer was not written (%s)",
                request_id(request),
                error.status,
                type(exc).__name__,
            )
            return False
        return True


def _unaudited(request: Request) -> FhirHttpError:
    return FhirHttpError(
        500,
        "exception",
        f"the refusal of request {request_id(request)} could not be audited",
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
