"""Builds the FastAPI application of a node's standard channel.

``build_app(node)`` serves metadata, patient identification and image access (``ncp.provider.api``),
the metadata list, reports and what they point to (``ncp.provider.list_api``,
``ncp.provider.report_api``, ``ncp.provider.resource_api``) and
``$validate``; ``build_app()`` without a node serves ``$validate`` only (tools and tests).

Errors are answered as OperationOutcomes by the handlers of :mod:`ncp.fhir.handlers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from ncp import __version__
from ncp.fhir.handlers import install_error_handlers
from ncp.fhir.http import FhirHttpError, error_response
from ncp.security.mtls import TlsPeerRefused, install
from ncp.validation.api import router as validation_router

if TYPE_CHECKING:
    from ncp.node import Node


def build_app(node: Node | None = None) -> FastAPI:
    app = FastAPI(
        title="ncp",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        # The CapabilityStatement describes this API for FHIR; the OpenAPI document is served
        # behind mutual TLS by the node's own route (GET /fhir/openapi.json), not FastAPI's.
        openapi_url=None,
    )
    if node is None:
        install_error_handlers(app)
        app.include_router(validation_router())
        return app
    from ncp.provider import list_api, report_api, resource_api
    from ncp.provider.api import router as provider_router
    from ncp.provider.auditing import audit_refusal
    from ncp.provider.auth import hp_context

    # Every refusal that no step recorded, and every 500, is audited by the provider's hook.
    install_error_handlers(app, audit=audit_refusal)
    app.state.node = node
    # Request-stage TLS refusals are audited by ncp.provider.auth with the request's id, so no
    # hook here; handshake refusals are audited by the server (ncp.serve).
    install(app, node.trust, None)
    app.add_exception_handler(TlsPeerRefused, _tls_refused)
    app.include_router(provider_router())
    app.include_router(list_api.router())
    app.include_router(report_api.router())
    app.include_router(resource_api.router())
    app.include_router(
        validation_router(
            node.settings.budget.validate_max_bytes,
            dependencies=[Depends(hp_context)],
            validator=lambda: (node.validator, node.validator_lock),
            work=node.heavy,
            time_budget_s=node.settings.budget.validate_time_s,
        )
    )
    return app


async def _tls_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TlsPeerRefused)
    return error_response(request, FhirHttpError(exc.status, "security", exc.diagnostics))
