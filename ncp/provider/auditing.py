"""One call records a step of the standard channel in the node's audit chain, fail closed.

Routes and the auth dependencies call :func:`audit` with what they know: the verified context
(who asks, from which country, under which assertions), the patient, the studies, the query.
When the record cannot be written the request ends with a 500 and answers nothing else: a step
that is not audited did not happen (eHDSI).

:func:`audit_refusal` is the node's hook for :class:`ncp.fhir.handlers.AuditedRefusals`: the
record of a request answered with an error that no step recorded (a body of the wrong media type,
an unknown path, an unexpected failure...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditError, AuditEvent, hp_fields, patient_fields
from ncp.fhir.http import FhirHttpError, mark_audited, request_id
from ncp.node import node_of
from ncp.security.claims import PatientRef
from ncp.security.pair import RequestContext

if TYPE_CHECKING:
    from ncp.provider.auth import HpContext

log = logging.getLogger(__name__)


def audit(
    request: Request,
    *,
    action: Action,
    outcome: Outcome = Outcome.SUCCESS,
    context: RequestContext | HpContext | None,
    patient: PatientRef | None = None,
    studies: Sequence[str] = (),
    query: str | None = None,
    interaction: str | None = None,
    **fields: Any,
) -> None:
    """Record one provider-side step of this request. ``fields`` are further
    :class:`ncp.audit.record.AuditEvent` fields (``reason``, ``option``, ``token_jti``,
    ``details``...) and win over what the context gives.

    Raises FhirHttpError 500 when the record cannot be written (fail closed)."""
    values: dict[str, Any] = {}
    # The path as sent, still percent-encoded: a decoded one may carry NULs or control characters
    # that the audit record refuses, and a request must not fail for being audited.
    raw_path = request.scope.get("raw_path") or request.url.path.encode("utf-8")
    details: dict[str, Any] = {"method": request.method, "path": raw_path.decode("latin-1")}
    if context is not None:
        hp = context.hp
        values.update(hp_fields(hp), peer_country=context.country, token_jti=hp.jti)
        policies = [hp.audit_policy]
        if isinstance(context, RequestContext):
            values.update(purpose=context.purpose_of_use, token_jti=context.trc.jti)
            policies.append(context.trc.audit_policy)
            if patient is None:
                patient = context.patient
        details["policies"] = policies
    if patient is not None:
        values.update(patient_fields(patient))
    details.update(fields.pop("details", None) or {})
    values.update(fields)
    try:
        event = AuditEvent(
            action=action,
            side=Side.PROVIDER,
            request_id=request_id(request),
            outcome=outcome,
            studies=tuple(studies),
            query=query,
            interaction=interaction,
            details=details,
            **values,
        )
        node_of(request).auditor.record(event)
        mark_audited(request)
    except AuditError as exc:
        # The message names the step and the request only (AuditError keeps patient data out).
        log.error("request %s not answered: %s", request_id(request), exc)
        raise FhirHttpError(
            500,
            "exception",
            f"the {action} step could not be audited, so it was not carried out "
            f"(request {request_id(request)})",
        ) from None


_RULES = {
    400: "InvalidRequest",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "UnknownEndpoint",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    408: "RequestTimeout",
    409: "Conflict",
    413: "TooLarge",
    415: "UnsupportedMediaType",
    422: "Unprocessable",
    429: "TooManyRequests",
    500: "InternalError",
    503: "Unavailable",
}


def audit_refusal(request: Request, error: FhirHttpError) -> None:
    """The ``refusal`` record of a request answered with ``error`` that no step recorded (a
    serious failure; a major failure for a 5xx), with what the request established of its caller
    (the verified assertions, or the mutual TLS peer). Raises FhirHttpError 500 when the record
    cannot be written."""
    context = getattr(request.state, "auth_context", None)
    peer = getattr(request.state, "tls_peer", None)
    fields: dict[str, Any] = {}
    if context is None and peer is not None:
        fields["peer_country"] = peer.country
    audit(
        request,
        action=Action.REFUSAL,
        outcome=Outcome.MAJOR_FAILURE if error.status >= 500 else Outcome.SERIOUS_FAILURE,
        context=context,
        reason=error.diagnostics[:2000],
        details={
            "rule": _RULES.get(error.status, f"Http{error.status}"),
            "status": error.status,
            "code": error.code,
        },
        **fields,
    )
