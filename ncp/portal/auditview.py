"""The HP's own requests, from B's audit chain: what was asked, when, with what outcome.

Only records B wrote (side ``consumer``) that name the logged-in HP as the actor (their user
name is the HP assertion's ``sub`` and every portal record's actor), newest first, a page at a
time; records of the same identifier that the command line wrote for its configured HP
(``hp_source`` ``cli``) are not the HP's and are left out. Nobody sees another HP's records here;
operators read the whole chain with ``ncp audit``.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from ncp.audit.models import AuditRecord, Outcome, Side
from ncp.portal.app import portal_of
from ncp.portal.i18n import Translator
from ncp.portal.usecase import local_time

PAGE = 50


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/audit", audit_page, methods=["GET"])
    return api


def own_records(
    sessions: Any, username: str, *, before: int | None, limit: int
) -> list[AuditRecord]:
    query = (
        select(AuditRecord)
        .where(AuditRecord.actor_id == username, AuditRecord.side == Side.CONSUMER.value)
        .order_by(AuditRecord.seq.desc())
    )
    if before is not None:
        query = query.where(AuditRecord.seq < before)
    out: list[AuditRecord] = []
    with sessions() as session:
        # A few more than a page: records of the command line's HP are filtered out below.
        for record in session.scalars(query.limit(limit * 2)):
            if (record.details or {}).get("hp_source") == "cli":
                continue
            out.append(record)
            if len(out) == limit:
                break
    return out


def _asked(record: AuditRecord, t: Translator) -> str:
    details = record.details or {}
    parts: list[str] = []
    if record.peer_country:
        parts.append(t("audit.to", country=record.peer_country))
    if record.patient_id:
        parts.append(t("audit.patient", patient=record.patient_id))
    if record.query:
        parts.append(_readable_query(record.query)[:300])
    if record.studies:
        parts.append(t("audit.studies", count=len(record.studies)))
    if record.option:
        parts.append(t("audit.option", option=record.option))
    if record.purpose:
        parts.append(record.purpose)
    step = details.get("step")
    if isinstance(step, str):
        parts.append(step)
    return " · ".join(parts)


def audit_page(request: Request, before: int | None = Query(None, ge=1, le=2**62)) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    assert view.hp is not None
    t = portal.translator(request, view)
    records = own_records(portal.node.sessions, view.hp.username, before=before, limit=PAGE)
    rows = []
    for r in records:
        action_key = f"audit.action.{r.action}"
        outcome = Outcome(r.outcome)
        rows.append(
            {
                "seq": r.seq,
                "when": local_time(portal, t, r.recorded.replace(tzinfo=UTC)),
                "action": t(action_key) if action_key in t.messages else r.action,
                "asked": _asked(r, t),
                "outcome": outcome.label,
                "outcome_display": t(f"audit.outcome.{outcome.label}"),
                "ok": outcome == Outcome.SUCCESS,
                "reason": r.reason or "",
                "request_id": r.request_id,
            }
        )
    older = records[-1].seq if len(records) == PAGE else None
    return portal.render(request, "audit.html", session=view, rows=rows, older=older,
                         newest=before is not None)  # fmt: skip


def _readable_query(query: str) -> str:
    """The query as a person reads it: its parameters decoded (the record keeps it as sent,
    percent-encoded), one after another."""
    if "=" not in query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return ", ".join(f"{k}={v}" for k, v in pairs) if pairs else query


__all__ = ["own_records", "router"]
