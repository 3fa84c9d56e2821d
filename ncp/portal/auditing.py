"""Audit records of the portal's steps in B's chain (``ncp.audit.record``): every login step
that succeeds or fails, every lock-out, logout and end of a session, every refused session
cookie. A step whose record cannot be written fails (the auditor raises ``AuditError``)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditEvent, Auditor
from ncp.fhir.http import request_id
from ncp.portal.sessions import Hp


def record(
    auditor: Auditor,
    request: Request,
    action: Action,
    *,
    outcome: Outcome = Outcome.SUCCESS,
    reason: str | None = None,
    hp: Hp | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    extra: dict[str, Any] = {"source": _source(request), **(details or {})}
    auditor.record(
        AuditEvent(
            action=action,
            side=Side.CONSUMER,
            request_id=request_id(request),
            outcome=outcome,
            reason=reason,
            actor_id=hp.username if hp else None,
            actor_name=hp.name if hp else None,
            actor_role=hp.role_code if hp else None,
            actor_organisation=hp.organisation if hp else None,
            actor_organisation_id=hp.organisation_id if hp else None,
            actor_point_of_care=hp.point_of_care if hp else None,
            actor_country=auditor.country if hp else None,
            details=extra,
        )
    )


def _source(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"
