"""The metadata list on the standard channel (design.md step 5): FHIR searches for one patient.

- ``GET /fhir/DocumentReference``, ``GET /fhir/ImagingStudy`` and their ``POST .../_search``
  (form-encoded body, parameters of query and body together): FHIR searchset Bundles of report
  and manifest entries, or of ImagingStudy manifests.
- ``GET /fhir/ImagingStudy/{id}``, ``GET /fhir/DocumentReference/{id}``: one of those, as the
  list entries' attachment URLs name them.

Every request needs a verified pair (``patient_context``). A search must name its patient
(``patient``/``subject``, by id or ``.identifier``: 400 otherwise), and that patient must be the
TRC's (403 otherwise): the node never answers a list for anyone else, even an empty one.
Parameter parsing and the query are the search engine's (:mod:`ncp.provider.search`); this module
only checks the patient, builds the resources (:mod:`ncp.fhir.listing`, :mod:`ncp.fhir.manifest`)
and the Bundle, and audits each request (``list-query``: query string, patient, result count).

Links (self/next/previous) are absolute on ``urls.standard`` and repeat the parameters the
engine accepted, in its canonical order, with ``_count``/``_offset`` for paging; ``_format`` is
kept as given, so a client following links gets the format it asked for. An entry the builders
cannot turn into a valid resource (a study without instances, say) is left out and reported in an
OperationOutcome entry (search mode ``outcome``) instead of failing the whole list.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ncp.audit.models import Action, Outcome
from ncp.dicom.uids import is_uid
from ncp.fhir.identifiers import issuer_of
from ncp.fhir.listing import manifest_reference, patient_resource, report_reference
from ncp.fhir.manifest import Custodian, ImagingEndpoints, ManifestError, imaging_study
from ncp.node import Node
from ncp.provider.auditing import audit
from ncp.provider.auth import PatientDep
from ncp.provider.http import FhirHttpError, fhir_response, node_of, outcome, wants_xml
from ncp.provider.search import (
    ManifestMatch,
    PatientInclude,
    ReportMatch,
    SearchError,
    SearchPage,
    SearchQuery,
    StudyMatch,
    parse_search,
    run_search,
)
from ncp.security.pair import RequestContext
from ncp.store.models import Patient

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024
"""Largest form body of ``POST .../_search``; the engine takes at most 64 parameters anyway."""
FORM_TYPE = "application/x-www-form-urlencoded"
SEARCH_TYPES = ("DocumentReference", "ImagingStudy")
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""The FHIR id grammar: what a resource id in a path must be."""
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")
"""A search parameter's name, as the OperationOutcome's expression names it."""
_KEPT_TRANSPORT = ("_format",)
"""Transport parameters repeated in the links (the engine leaves them out of its query)."""


def router() -> APIRouter:
    api = APIRouter()

    for rtype in SEARCH_TYPES:
        _add_search(api, rtype)
    return api


def _add_search(api: APIRouter, rtype: str) -> None:
    def search_get(request: Request, ctx: PatientDep) -> Response:
        params = list(request.query_params.multi_items())
        return search(request, ctx, rtype, params, request.url.query)

    async def search_post(request: Request, ctx: PatientDep) -> Response:
        params = list(request.query_params.multi_items()) + await _form(request)
        return await run_in_threadpool(search, request, ctx, rtype, params, urlencode(params))

    def read(request: Request, resource_id: str, ctx: PatientDep) -> Response:
        return read_one(request, ctx, rtype, resource_id)

    api.add_api_route(f"/fhir/{rtype}", search_get, methods=["GET"], name=f"search-{rtype}")
    api.add_api_route(
        f"/fhir/{rtype}/_search", search_post, methods=["POST"], name=f"search-post-{rtype}"
    )
    api.add_api_route(f"/fhir/{rtype}/{{resource_id}}", read, methods=["GET"], name=f"read-{rtype}")


async def _form(request: Request) -> list[tuple[str, str]]:
    """The parameters of a form-encoded body, read up to :data:`MAX_FORM_BYTES`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != FORM_TYPE:
        raise FhirHttpError(
            415, "not-supported", f"POST _search takes a body of Content-Type {FORM_TYPE}"
        )
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise FhirHttpError(
                413, "too-costly", f"the form is larger than {MAX_FORM_BYTES} bytes"
            )
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise FhirHttpError(400, "invalid", "the form body is not UTF-8") from None
    return parse_qsl(text, keep_blank_values=True)


# --- the search ------------------------------------------------------------------------------


def search(
    request: Request,
    ctx: RequestContext,
    rtype: str,
    params: Sequence[tuple[str, str]],
    query_text: str,
) -> Response:
    """Answer one search of the TRC's patient's list (audited whatever the outcome)."""
    wants_xml(request)  # an unsupported format fails before the search runs

    def refuse(status: int, code: str, text: str, expression: str | None = None) -> NoReturn:
        audit(
            request,
            action=Action.LIST_QUERY,
            outcome=Outcome.SERIOUS_FAILURE if status == 403 else Outcome.MINOR_FAILURE,
            context=ctx,
            query=query_text,
            interaction="search-type",
            reason=text[:2000],
            details={"status": status, "resourceType": rtype},
        )
        raise FhirHttpError(status, code, text, expression=expression)

    try:
        query = parse_search(rtype, params)
    except SearchError as exc:
        named = _PARAMETER_NAME.fullmatch(exc.parameter) is not None
        refuse(400, exc.code, str(exc), exc.parameter if named else None)
    if not query.names_patient:
        refuse(
            400,
            "required",
            f"a {rtype} search names its patient: 'patient' (Patient/<id>) or "
            "'patient.identifier' (system|value), the patient of the treatment relationship",
            "patient",
        )
    issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
    if not query.allows_patient(issuer, value):
        refuse(
            403,
            "forbidden",
            "the search names another patient than the treatment relationship confirmation",
            "patient",
        )
    node = node_of(request)
    with node.sessions() as session:
        page = run_search(session, query, patient=(issuer, value), zone=_custodian(node).zone)
        bundle, studies = searchset(session, node, page, _transport(params))
    audit(
        request,
        action=Action.LIST_QUERY,
        context=ctx,
        studies=studies,
        query=query_text,
        interaction="search-type",
        details={"resourceType": rtype, "total": page.total, "returned": len(page.matches)},
    )
    return fhir_response(request, bundle)


def read_one(request: Request, ctx: RequestContext, rtype: str, resource_id: str) -> Response:
    """One list resource of the TRC's patient by id; 404 for anything else (whether another
    patient's or unknown: the answer does not tell which)."""
    wants_xml(request)
    issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
    node = node_of(request)
    found: dict[str, Any] | None = None
    studies: list[str] = []
    known_id = FHIR_ID.fullmatch(resource_id) is not None
    if known_id:  # anything else is no id of ours (and is not written into the audit)
        query = parse_search(rtype, [("_id", resource_id), ("_count", "2")])
        with node.sessions() as session:
            page = run_search(session, query, patient=(issuer, value), zone=_custodian(node).zone)
            built = _Builder(session, node).matches(page.matches)
            if len(built) == 1 and built[0].resource is not None:
                found, studies = built[0].resource, built[0].studies
    audit(
        request,
        action=Action.LIST_QUERY,
        outcome=Outcome.SUCCESS if found is not None else Outcome.MINOR_FAILURE,
        context=ctx,
        studies=studies,
        query=f"_id={resource_id}" if known_id else None,
        interaction="read",
        reason=None if found is not None else "unknown id for the patient",
        details={"resourceType": rtype},
    )
    if found is None:
        raise FhirHttpError(
            404,
            "not-found",
            f"no {rtype} with this id for the patient of the treatment relationship",
        )
    return fhir_response(request, found)


def _transport(params: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in params if k in _KEPT_TRANSPORT][:1]


def _custodian(node: Node) -> Custodian:
    return Custodian.from_settings(node.settings)


# --- building the Bundle ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    """One entry's resource (None: the builder refused it, ``problem`` says why)."""

    rtype: str
    resource: dict[str, Any] | None
    studies: list[str]
    problem: str = ""


class _Builder:
    """Turns the engine's rows into resources with the node's endpoints and custodian."""

    def __init__(self, session: Session, node: Node) -> None:
        self.session = session
        self.node = node
        self.base = node.base_url
        self.custodian = _custodian(node)
        self._endpoints: ImagingEndpoints | None = None

    @property
    def endpoints(self) -> ImagingEndpoints:
        if self._endpoints is None:
            self._endpoints = ImagingEndpoints.from_settings(self.node.settings)
        return self._endpoints

    def matches(self, rows: Iterable[Any]) -> list[_Built]:
        return [self.one(row) for row in rows]

    def one(self, row: Any) -> _Built:
        try:
            return self._build(row)
        except ManifestError as exc:
            rtype = "ImagingStudy" if isinstance(row, StudyMatch) else "DocumentReference"
            log.warning("list entry left out: %s", type(exc).__name__)
            return _Built(rtype, None, [], str(exc))

    def _build(self, row: Any) -> _Built:
        if isinstance(row, StudyMatch):
            instances = {s.series_uid: row.instances_of(s) for s in row.series}
            resource = imaging_study(row.study, self.endpoints, self.custodian, instances=instances)
            return _Built("ImagingStudy", resource, [row.study.study_uid])
        if isinstance(row, ManifestMatch):
            resource = manifest_reference(row.study, self.custodian, base_url=self.base)
            return _Built("DocumentReference", resource, [row.study.study_uid])
        if isinstance(row, ReportMatch):
            # The engine found the report's indexed study of this patient, if any.
            resource = report_reference(
                row.report,
                row.version,
                base_url=self.base,
                study=row.study,
                custodian=self.custodian,
            )
            # Versions of one report share the entry's id: the version tells them apart (bdl-7).
            resource["meta"] = {**resource.get("meta", {}), "versionId": str(row.version.version)}
            uid = row.version.study_uid
            return _Built("DocumentReference", resource, [uid] if uid else [])
        if isinstance(row, PatientInclude):
            patient = row.patient or Patient(patient_id=row.value, issuer=row.issuer)
            return _Built("Patient", patient_resource(patient), [])
        raise TypeError(f"unexpected search row {type(row).__name__}")


def searchset(
    session: Session, node: Node, page: SearchPage, transport: Sequence[tuple[str, str]] = ()
) -> tuple[dict[str, Any], list[str]]:
    """The searchset Bundle of one page, and the Study Instance UIDs it names (for the audit)."""
    query = page.query
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": page.total,
        "link": links(node.base_url, page, transport),
    }
    if query.summary_count:
        return bundle, []
    builder = _Builder(session, node)
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    studies: dict[str, None] = {}  # ordered set: pages name a thousand studies
    problems: list[str] = []

    def add(built: _Built, mode: str) -> None:
        if built.resource is None:
            problems.append(built.problem)
            return
        resource = built.resource
        full_url = f"{node.base_url}/{resource['resourceType']}/{resource['id']}"
        version = resource.get("meta", {}).get("versionId")
        key = f"{full_url}|{version}"
        if key in seen:
            return  # an include that is a match already, or included twice
        seen.add(key)
        studies.update((uid, None) for uid in built.studies if is_uid(uid))
        entries.append({"fullUrl": full_url, "resource": resource, "search": {"mode": mode}})

    for built in builder.matches(page.matches):
        add(built, "match")
    for built in builder.matches(page.included):
        add(built, "include")
    if problems:
        entries.append(
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        outcome("incomplete", text, severity="warning")["issue"][0]
                        for text in problems
                    ],
                },
                "search": {"mode": "outcome"},
            }
        )
    if entries:
        bundle["entry"] = entries
    return bundle, list(studies)


def links(
    base: str, page: SearchPage, transport: Sequence[tuple[str, str]] = ()
) -> list[dict[str, str]]:
    """self, and next/previous where there is such a page (absolute URLs, canonical params)."""
    rtype = page.query.resource_type

    def url(offset: int | None) -> str:
        params = page.link_params(offset) + list(transport)
        return f"{base}/{rtype}?{urlencode(params)}"

    out = [{"relation": "self", "url": url(None)}]
    if page.next_offset is not None:
        out.append({"relation": "next", "url": url(page.next_offset)})
    if page.previous_offset is not None:
        out.append({"relation": "previous", "url": url(page.previous_offset)})
    return out


__all__ = ["SearchQuery", "links", "read_one", "router", "search", "searchset"]
