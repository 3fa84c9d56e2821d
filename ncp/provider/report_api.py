"""Imaging reports on the standard channel: read, history, version read, and ingest.

- ``GET /fhir/Bundle/{id}``: the latest version of a report (ETag ``W/"<version>"``,
  Last-Modified), ``GET /fhir/Bundle/{id}/_history``: every version, newest first, as a FHIR
  history Bundle; ``GET /fhir/Bundle/{id}/_history/{vid}``: one version. Each needs a verified
  pair (HP assertion and TRC) and a report of the TRC's patient. Reads of a version are
  conditional (``If-None-Match``, ``If-Modified-Since``: 304 when the client holds it,
  :mod:`ncp.provider.conditional`).
- ``GET /fhir/Bundle/{id}`` with the id of a study's manifest (``m`` and a digest, never a
  report's): the study's IHE MADO manifest document (:mod:`ncp.provider.resource_api`).
- ``POST /fhir/Bundle``: a national system of this node's own country submits a report version
  (JSON or XML, at most :data:`MAX_REPORT_BYTES`); it is validated and stored in one
  transaction. 201 with ``Location: {base}/Bundle/{id}/_history/{vid}`` and the stored Bundle
  (``Prefer: return=minimal`` no body, ``return=OperationOutcome`` a note); 200 when the same
  version is posted again unchanged; 422 with the validator's OperationOutcome when invalid
  (nothing stored); 409 when it clashes with a stored version or names another patient.

A report of another patient is answered exactly like an unknown id: 404 with the same
OperationOutcome. Answering 403 would tell a peer that the id exists for someone else (report ids
are derived from business identifiers, so they can be guessed); the audit record keeps the real
reason (patient mismatch, serious failure) for the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ncp.audit.models import Action, Outcome
from ncp.fhir.http import FhirHttpError, fhir_response, outcome, read_resource_body, wants_xml
from ncp.fhir.identifiers import is_fhir_id, issuer_of
from ncp.fhir.mado import is_manifest_bundle_id
from ncp.node import node_of
from ncp.provider import reports
from ncp.provider.auditing import audit
from ncp.provider.auth import national_system, patient_context
from ncp.provider.conditional import not_modified
from ncp.provider.resource_api import read_manifest
from ncp.security.claims import PatientRef
from ncp.security.pair import RequestContext
from ncp.security.trust import Peer
from ncp.store.models import ReportVersion
from ncp.validation.engine import OverBudget

MAX_REPORT_BYTES = 5 * 1024 * 1024
"""Largest report accepted on ingest: a report bundle is tens of kilobytes; a rendering (PDF in a
Binary) may add a few megabytes."""

Context = Annotated[RequestContext, Depends(patient_context)]
NationalSystem = Annotated[Peer, Depends(national_system)]

_NOT_FOUND = "no report with this id is available for the patient of the treatment relationship"


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/fhir/Bundle/{report_id}")
    def read(request: Request, report_id: str, ctx: Context) -> Response:
        if is_manifest_bundle_id(report_id):  # a study's IHE MADO manifest document
            return read_manifest(request, ctx, report_id)
        row = _served(request, ctx, report_id, None, "read")
        return _version_response(request, row)

    @api.get("/fhir/Bundle/{report_id}/_history")
    def history(request: Request, report_id: str, ctx: Context) -> Response:
        wants_xml(request)  # an unsupported format fails before anything is read or audited
        node = node_of(request)
        if not is_fhir_id(report_id):
            _refuse_unknown(request, ctx, "", "history-instance", Outcome.MINOR_FAILURE)
        with node.sessions() as session:
            rows = reports.history(session, report_id)
            _check_patient(request, ctx, report_id, rows[0] if rows else None, "history-instance")
            served = [reports.as_served(row) for row in rows]
            studies = list(dict.fromkeys(uid for row in rows for uid in _studies(row)))
        audit(
            request,
            action=Action.REPORT_READ,
            context=ctx,
            patient=ctx.patient,
            studies=studies,
            interaction="history-instance",
            details={"report": report_id, "versions": len(served)},
        )
        bundle = history_bundle(node.base_url, report_id, served, node.clock())
        return fhir_response(request, bundle)

    @api.get("/fhir/Bundle/{report_id}/_history/{vid}")
    def vread(request: Request, report_id: str, vid: str, ctx: Context) -> Response:
        # Not a version number: no such version (0 never is one).
        number = int(vid) if vid.isascii() and vid.isdigit() and len(vid) < 10 else 0
        row = _served(request, ctx, report_id, number, "vread")
        return _version_response(request, row)

    @api.post("/fhir/Bundle")
    async def ingest(request: Request, system: NationalSystem) -> Response:
        wants_xml(request)
        heavy = node_of(request).heavy
        try:
            body = await read_resource_body(request, max_bytes=MAX_REPORT_BYTES, offload=heavy.run)
        except FhirHttpError as exc:
            await run_in_threadpool(_audit_ingest, request, Outcome.MINOR_FAILURE, str(exc))
            raise
        # Validating a bundle is CPU-heavy: off the event loop, within the node's budget.
        return await heavy.run(lambda: _ingest(request, body))

    return api


# --- reading ---------------------------------------------------------------------------------


def _served(
    request: Request, ctx: RequestContext, report_id: str, version: int | None, interaction: str
) -> dict[str, Any]:
    """The served Bundle of the latest (``version`` None) or given version, audited."""
    wants_xml(request)  # an unsupported format fails before anything is read or audited
    node = node_of(request)
    if not is_fhir_id(report_id):
        _refuse_unknown(request, ctx, "", interaction, Outcome.MINOR_FAILURE)
    with node.sessions() as session:
        latest = _check_patient(
            request, ctx, report_id, reports.latest(session, report_id), interaction
        )
        row = latest if version is None else reports.version(session, report_id, version)
        if row is None:
            _refuse_unknown(request, ctx, report_id, interaction, Outcome.MINOR_FAILURE)
        served = reports.as_served(row)
        studies = _studies(row)
    audit(
        request,
        action=Action.REPORT_READ,
        context=ctx,
        patient=ctx.patient,
        studies=studies,
        interaction=interaction,
        details={"report": report_id, "version": _version_of(served)},
    )
    return served


def _check_patient(
    request: Request,
    ctx: RequestContext,
    report_id: str,
    row: ReportVersion | None,
    interaction: str,
) -> ReportVersion:
    """``row``, unless the report is unknown or not the TRC's patient's: then 404 (audited)."""
    if row is None:
        _refuse_unknown(request, ctx, report_id, interaction, Outcome.MINOR_FAILURE)
    if (row.report.patient_id, row.report.patient_issuer) != _index_patient(ctx.patient):
        _refuse_unknown(
            request,
            ctx,
            report_id,
            interaction,
            Outcome.SERIOUS_FAILURE,
            reason="the report is about another patient than the treatment relationship's",
        )
    return row


def _refuse_unknown(
    request: Request,
    ctx: RequestContext,
    report_id: str,
    interaction: str,
    result: Outcome,
    *,
    reason: str = "unknown report id or version",
) -> NoReturn:
    audit(
        request,
        action=Action.REPORT_READ,
        outcome=result,
        context=ctx,
        patient=ctx.patient,
        interaction=interaction,
        reason=reason,
        details={"report": report_id} if report_id else {},
    )
    # The same answer whatever the reason (see the module docstring).
    raise FhirHttpError(404, "not-found", _NOT_FOUND, expression="Bundle.id")


def _index_patient(patient: PatientRef) -> tuple[str, str]:
    """(patient id, issuer) as the report store keeps them."""
    return patient.value, issuer_of(patient.system)


def _studies(row: ReportVersion) -> Sequence[str]:
    return (row.study_uid,) if row.study_uid else ()


def _version_of(served: dict[str, Any]) -> str:
    return str(served.get("meta", {}).get("versionId", ""))


def _last_updated(served: dict[str, Any]) -> datetime | None:
    modified = served.get("meta", {}).get("lastUpdated")
    if not isinstance(modified, str):
        return None
    return datetime.fromisoformat(modified.replace("Z", "+00:00")).astimezone(UTC)


def _version_headers(served: dict[str, Any]) -> dict[str, str]:
    headers = {"ETag": f'W/"{_version_of(served)}"'}
    moment = _last_updated(served)
    if moment is not None:
        headers["Last-Modified"] = format_datetime(moment, usegmt=True)
    return headers


def _version_response(request: Request, served: dict[str, Any]) -> Response:
    """The version, or ``304 Not Modified`` when the client's copy is this version (the read
    is audited all the same: the client learnt the version is current)."""
    headers = _version_headers(served)
    if not_modified(request.headers, headers["ETag"], _last_updated(served)):
        return Response(status_code=304, headers=headers)
    return fhir_response(request, served, headers=headers)


def history_bundle(
    base: str, report_id: str, served: Sequence[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """A FHIR history Bundle of a report's versions, newest first.

    Every version arrived through ``POST /fhir/Bundle``, so each entry's request is that POST
    and its response ``201 Created`` with the version's ETag and time (bdl-3, bdl-4). Entries
    share the report's fullUrl and differ by ``meta.versionId`` (bdl-7).
    """
    entries = []
    for bundle in sorted(served, key=lambda b: int(_version_of(b)), reverse=True):
        vid = _version_of(bundle)
        response: dict[str, Any] = {
            "status": "201 Created",
            "location": f"{base}/Bundle/{report_id}/_history/{vid}",
            "etag": f'W/"{vid}"',
        }
        modified = bundle.get("meta", {}).get("lastUpdated")
        if modified:
            response["lastModified"] = modified
        entries.append(
            {
                "fullUrl": f"{base}/Bundle/{report_id}",
                "resource": bundle,
                "request": {"method": "POST", "url": "Bundle"},
                "response": response,
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": _instant(now),
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{base}/Bundle/{report_id}/_history"}],
        "entry": entries,
    }


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- ingest ----------------------------------------------------------------------------------


def _ingest(request: Request, body: dict[str, Any]) -> Response:
    """Validate and store one report version in one transaction, audited, then answer."""
    node = node_of(request)
    try:
        with node.sessions.begin() as session:
            result = reports.ingest_bundle(
                session,
                body,
                validator=node.validator,
                validator_lock=node.validator_lock,
                now=node.clock(),
                time_budget_s=node.settings.budget.validate_time_s,
            )
            row = result.row
            patient = (row.report.patient_id, row.report.patient_issuer)
            studies = _studies(row)
    except reports.InvalidReport as exc:
        _audit_ingest(request, Outcome.MINOR_FAILURE, str(exc))
        return fhir_response(request, exc.outcome, status=422)
    except (reports.VersionConflict, reports.PatientConflict) as exc:
        _audit_ingest(request, Outcome.MINOR_FAILURE, str(exc))
        return fhir_response(request, exc.outcome, status=409)
    except OverBudget:
        reason = (
            f"the validation did not finish within the time budget of "
            f"{node.settings.budget.validate_time_s} s"
        )
        _audit_ingest(request, Outcome.MINOR_FAILURE, reason)
        raise FhirHttpError(413, "too-costly", reason) from None
    _audit_ingest(
        request,
        Outcome.SUCCESS,
        None,
        patient=patient,
        studies=studies,
        details={"report": result.report_id, "version": result.version, "new": result.created},
    )
    with node.sessions() as session:
        stored = reports.version(session, result.report_id, result.version)
        if stored is None:  # pragma: no cover - committed above
            raise FhirHttpError(500, "exception", "the stored report could not be read back")
        served = reports.as_served(stored)
    location = f"{node.base_url}/Bundle/{result.report_id}/_history/{result.version}"
    headers = _version_headers(served) | {"Location": location}
    status = 201 if result.created else 200
    prefer = _prefer_return(request)
    if prefer == "minimal":
        return Response(status_code=status, headers=headers)
    if prefer == "OperationOutcome":
        done = "stored" if result.created else "was stored already with the same content"
        note = outcome(
            "informational", f"report version {result.version} {done}", severity="information"
        )
        return fhir_response(request, note, status=status, headers=headers)
    return fhir_response(request, served, status=status, headers=headers)


def _prefer_return(request: Request) -> str:
    """The ``return`` preference of a ``Prefer`` header (RFC 7240), default representation."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "return":
            return value.strip().strip('"')
    return "representation"


def _audit_ingest(
    request: Request,
    result: Outcome,
    reason: str | None,
    *,
    patient: tuple[str, str] | None = None,
    studies: Sequence[str] = (),
    details: dict[str, Any] | None = None,
) -> None:
    fields: dict[str, Any] = {}
    if patient is not None:
        fields.update(patient_id=patient[0], patient_issuer=patient[1])
    audit(
        request,
        action=Action.INGEST,
        outcome=result,
        context=None,
        studies=studies,
        interaction="create",
        reason=reason[:2000] if reason else None,
        peer_country=node_of(request).country,
        details=details or {},
        **fields,
    )
