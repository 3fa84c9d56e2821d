"""Builds the FastAPI application of a node's standard channel.

``build_app(node)`` serves metadata, patient identification and image access (``ncp.provider.api``),
the metadata list and reports (``ncp.provider.list_api``, ``ncp.provider.report_api``) and
``$validate``; ``build_app()`` without a node serves ``$validate`` only (tools and tests).

One place turns errors into answers, as OperationOutcomes in the negotiated format:
:class:`~ncp.provider.http.FhirHttpError` with its status, unknown paths 404, wrong methods 405,
unreadable parameters 400, anything unexpected 500 without internals (the log has the traceback,
tied to the request by its correlation id, which every answer echoes in ``X-Request-ID``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncp import __version__
from ncp.provider.http import (
    REQUEST_ID_HEADER,
    FhirHttpError,
    error_response,
    request_id,
    valid_request_id,
)
from ncp.security.mtls import TlsPeerRefused, install
from ncp.validation.api import router as validation_router

if TYPE_CHECKING:
    from ncp.node import Node

log = logging.getLogger(__name__)

# Routers other modules add to the standard channel, each a module with `router() -> APIRouter`.
_OPTIONAL_ROUTERS = ("ncp.provider.list_api", "ncp.provider.report_api")


def build_app(node: Node | None = None) -> FastAPI:
    app = FastAPI(
        title="ncp",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # the CapabilityStatement describes this API, not OpenAPI
    )
    _handlers(app)
    app.add_middleware(RequestIdMiddleware)
    if node is None:
        app.include_router(validation_router())
        return app
    from ncp.provider.api import router as provider_router
    from ncp.provider.auth import hp_context

    app.state.node = node
    # Request-stage TLS refusals are audited by ncp.provider.auth with the request's id, so no
    # hook here; handshake refusals are audited by the server (ncp.provider.serve).
    install(app, node.trust, None)
    app.add_exception_handler(TlsPeerRefused, _tls_refused)
    app.include_router(provider_router())
    for name in _OPTIONAL_ROUTERS:
        module = _optional(name)
        if module is not None:
            app.include_router(module.router())
    app.include_router(
        validation_router(
            dependencies=[Depends(hp_context)],
            validator=lambda: (node.validator, node.validator_lock),
        )
    )
    return app


def _optional(name: str) -> Any:
    """A router module written by another part of the project, if it is there yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # the module is there but one of its imports is not: a real error
        log.info("%s not available: its routes are not served", name)
        return None


# --- errors as OperationOutcomes -----------------------------------------------------------------


def _handlers(app: FastAPI) -> None:
    app.add_exception_handler(FhirHttpError, _fhir_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)


async def _fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirHttpError)
    return error_response(request, exc)


async def _tls_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TlsPeerRefused)
    return error_response(request, FhirHttpError(exc.status, "security", exc.diagnostics))


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
