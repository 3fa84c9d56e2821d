"""The standard channel's own routes: ``GET /fhir/metadata``, ``GET /fhir/openapi.json``,
``POST /fhir/Patient/$match``, ``POST /fhir/$imaging-access``. Thin: the rules are in
:mod:`ncp.provider.match`, :mod:`ncp.provider.access`, :mod:`ncp.provider.capability` and
:mod:`ncp.provider.openapi`; every step is audited (:func:`ncp.provider.auditing.audit`, fail
closed) before it answers."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ncp import __version__
from ncp.audit.models import Action, Outcome
from ncp.fhir.http import FhirHttpError, fhir_response, read_resource_body, wants_xml
from ncp.node import node_of
from ncp.provider import access, match
from ncp.provider.auditing import audit
from ncp.provider.auth import HpDep, PatientDep, channel_client
from ncp.provider.capability import capability_statement, routes_of
from ncp.provider.openapi import standard_openapi
from ncp.security.pair import RequestContext

MAX_PARAMETERS_BYTES = 64 * 1024
"""Largest Parameters body of $match or $imaging-access: a few kilobytes in practice."""


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/fhir/metadata", dependencies=[Depends(channel_client)])
    def metadata(request: Request) -> Response:
        node = node_of(request)
        statement = capability_statement(
            node.base_url,
            name=node.settings.node.name,
            country=node.country,
            date=_started(request),
            routes=routes_of(request.app),
        )
        return fhir_response(request, statement)

    @api.get("/fhir/openapi.json", dependencies=[Depends(channel_client)])
    def openapi(request: Request) -> Response:
        state = request.app.state
        if not hasattr(state, "openapi_document"):  # the routes do not change once served
            node = node_of(request)
            document = standard_openapi(
                request.app.routes,
                base_url=node.base_url,
                title=f"{node.settings.node.name or 'ncp'}: standard channel",
                version=__version__,
            )
            state.openapi_document = json.dumps(document).encode("utf-8")
        return Response(state.openapi_document, media_type="application/json")

    @api.post("/fhir/Patient/$match")
    async def patient_match(request: Request, ctx: HpDep) -> Response:
        wants_xml(request)  # an unsupported format is refused before anything is done
        body = await read_resource_body(request, max_bytes=MAX_PARAMETERS_BYTES)
        return await run_in_threadpool(_match, request, ctx, body)

    @api.post("/fhir/$imaging-access")
    async def imaging_access(request: Request, ctx: PatientDep) -> Response:
        wants_xml(request)
        body = await read_resource_body(request, max_bytes=MAX_PARAMETERS_BYTES)
        return await run_in_threadpool(_access, request, ctx, body)

    return api


def _started(request: Request) -> Any:
    # The statement's date: when this app was built (its capabilities do not change after).
    state = request.app.state
    if not hasattr(state, "capability_date"):
        state.capability_date = node_of(request).clock()
    return state.capability_date


def _match(request: Request, ctx: Any, body: dict[str, Any]) -> Response:
    node = node_of(request)
    try:
        query = match.parse_parameters(body)
    except FhirHttpError as exc:
        audit(
            request,
            action=Action.PATIENT_IDENTIFY,
            outcome=Outcome.MINOR_FAILURE,
            context=ctx,
            interaction="operation",
            reason=exc.diagnostics,
        )
        raise
    with node.sessions() as session:
        candidates = match.find_candidates(session, query)
        bundle = match.searchset(node.base_url, candidates)
    grades = [c.grade for c in candidates]
    listed = [
        {"identifier": entry["resource"]["identifier"][0], "grade": grade}
        for entry, grade in zip(bundle.get("entry", []), grades, strict=True)
    ]
    single = len(candidates) == 1 and grades[0] == "certain"
    audit(
        request,
        action=Action.PATIENT_IDENTIFY,
        outcome=Outcome.SUCCESS if candidates else Outcome.MINOR_FAILURE,
        context=ctx,
        patient=_patient_ref(listed[0]["identifier"]) if single else None,
        query=query.text(),
        interaction="operation",
        reason=None if candidates else "no match",
        details={"candidates": listed, "result": _result(grades)},
    )
    return fhir_response(request, bundle)


def _result(grades: list[str]) -> str:
    if not grades:
        return "no-match"
    if len(grades) > 1:
        return "ambiguous"
    return "confirmed" if grades[0] == "certain" else "not-certain"


def _patient_ref(identifier: dict[str, str]) -> Any:
    from ncp.security.claims import PatientRef

    return PatientRef(identifier["system"], identifier["value"])


def _access(request: Request, ctx: RequestContext, body: dict[str, Any]) -> Response:
    node = node_of(request)

    def refused(exc: FhirHttpError, rule: str, **fields: Any) -> FhirHttpError:
        audit(
            request,
            action=Action.ACCESS_TOKEN_ISSUE,
            outcome=Outcome.SERIOUS_FAILURE if exc.status == 403 else Outcome.MINOR_FAILURE,
            context=ctx,
            interaction="operation",
            reason=exc.diagnostics,
            details={"rule": rule, "status": exc.status, "trc_jti": ctx.trc.jti},
            **fields,
        )
        return exc

    try:
        asked = access.parse_parameters(body)
    except FhirHttpError as exc:
        raise refused(exc, "InvalidParameters") from None
    facts: dict[str, Any] = {
        "studies": asked.studies,
        "option": asked.option,
        "priority": asked.priority,
    }
    if asked.purpose != ctx.purpose_of_use:
        raise refused(
            FhirHttpError(
                403,
                "forbidden",
                f"purpose {asked.purpose} is not the purpose of the treatment relationship "
                f"confirmation ({ctx.purpose_of_use})",
                expression="purpose",
            ),
            "PurposeMismatch",
            **facts,
        )
    with node.sessions() as session:
        try:
            access.check_studies(session, ctx, asked.studies)
        except access.StudyRefused as exc:
            # Studies that are not the patient's are named in the reason only, not as studies.
            raise refused(exc, exc.rule, option=asked.option, priority=asked.priority) from None
        renewal = access.is_renewal(session, ctx, node.settings.tokens.leeway_s)
    try:
        issued = access.issue_token(node, ctx, asked)
    except FhirHttpError as exc:
        raise refused(exc, "OptionNotAvailable", **facts) from None
    audit(
        request,
        action=Action.ACCESS_TOKEN_RENEW if renewal else Action.ACCESS_TOKEN_ISSUE,
        context=ctx,
        interaction="operation",
        token_jti=issued.jti,
        details={"trc_jti": ctx.trc.jti, "expires": issued.expires},
        **facts,
    )
    return fhir_response(request, access.answer(issued))
