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

import json
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
from ncp.fhir.http import FhirHttpError, fhir_json_response, outcome, wants_xml
from ncp.fhir.identifiers import is_fhir_id, issuer_of
from ncp.fhir.io import to_json
from ncp.fhir.manifest import Custodian
from ncp.node import Node, node_of
from ncp.provider.auditing import audit
from ncp.provider.auth import PatientDep
from ncp.provider.list_entries import EntryRenderer, Rendered, Source, store
from ncp.provider.search import (
    PageKeys,
    Paging,
    SearchError,
    SearchQuery,
    find_page,
    parse_search,
)
from ncp.security.pair import RequestContext

MAX_FORM_BYTES = 64 * 1024
"""Largest form body of ``POST .../_search``; the engine takes at most 64 parameters anyway."""
FORM_TYPE = "application/x-www-form-urlencoded"
SEARCH_TYPES = ("DocumentReference", "ImagingStudy")
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
        page = find_page(session, query, patient=(issuer, value), zone=_custodian(node).zone)
        renderer = EntryRenderer(node.settings, node.list_memory)
        bundle, fresh = searchset(session, renderer, page, _transport(params))
    store(node.sessions, fresh)
    audit(
        request,
        action=Action.LIST_QUERY,
        context=ctx,
        studies=list(bundle.studies),
        query=query_text,
        interaction="search-type",
        details={"resourceType": rtype, "total": page.total, "returned": len(page.matches)},
    )
    return fhir_json_response(request, bundle.json())


def read_one(request: Request, ctx: RequestContext, rtype: str, resource_id: str) -> Response:
    """One list resource of the TRC's patient by id; 404 for anything else (whether another
    patient's or unknown: the answer does not tell which)."""
    wants_xml(request)
    issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
    node = node_of(request)
    found: bytes | None = None
    studies: list[str] = []
    known_id = is_fhir_id(resource_id)
    if known_id:  # anything else is no id of ours (and is not written into the audit)
        query = parse_search(rtype, [("_id", resource_id), ("_count", "2")])
        with node.sessions() as session:
            page = find_page(session, query, patient=(issuer, value), zone=_custodian(node).zone)
            matches, _included, fresh = EntryRenderer(node.settings, node.list_memory).page(
                session, page
            )
        store(node.sessions, fresh)
        if len(matches) == 1 and matches[0].body is not None:
            found = matches[0].body
            studies = [matches[0].study_uid] if matches[0].study_uid else []
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
    return fhir_json_response(request, found)


def _transport(params: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in params if k in _KEPT_TRANSPORT][:1]


def _custodian(node: Node) -> Custodian:
    return Custodian.from_settings(node.settings)


# --- building the Bundle ---------------------------------------------------------------------


@dataclass(frozen=True)
class Searchset:
    """A searchset Bundle whose entries are kept as JSON already: written out by joining
    bytes (:meth:`json`); parsed only when XML is asked for."""

    head: dict[str, Any]
    base_url: str
    entries: tuple[tuple[Rendered, bytes], ...]
    """Each entry's resource and search mode (``match``, ``include``, ``outcome``)."""
    studies: tuple[str, ...]
    """The Study Instance UIDs the entries name (for the audit)."""

    def json(self) -> bytes:
        head = to_json(self.head)
        if not self.entries:
            return head
        base = json.dumps(self.base_url, ensure_ascii=False)[1:-1].encode("utf-8")
        out = [head[:-1], b',"entry":[']
        for i, (entry, mode) in enumerate(self.entries):
            out.append(b"{" if not i else b",{")
            if entry.resource_id:  # every entry but an OperationOutcome's
                # FHIR ids and resource types need no escaping.
                rid = f"/{entry.resource_type}/{entry.resource_id}".encode("ascii")
                out += (b'"fullUrl":"', base, rid, b'",')
            out += (b'"resource":', entry.body or b"{}", b',"search":{"mode":"', mode, b'"}}')
        out.append(b"]}")
        return b"".join(out)


def searchset(
    session: Session,
    renderer: EntryRenderer,
    keys: PageKeys,
    transport: Sequence[tuple[str, str]] = (),
) -> tuple[Searchset, list[Source]]:
    """The searchset Bundle of one page, and the entries built for it that the caller should
    keep (:func:`ncp.provider.list_entries.store`) once its read is over."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": keys.total,
        "link": links(renderer.base, keys, transport),
    }
    if keys.query.summary_count:
        return Searchset(bundle, renderer.base, (), ()), []
    matches, included, fresh = renderer.page(session, keys)
    entries: list[tuple[Rendered, bytes]] = []
    studies: dict[str, None] = {}  # ordered set: pages name a thousand studies
    problems: list[str] = []
    # Matches are distinct rows; an include may repeat a match or another include.
    seen = {(m.kind, m.pk) for m in matches}
    for entry, mode in [(m, b"match") for m in matches] + [(i, b"include") for i in included]:
        if entry.body is None:
            problems.append(entry.problem)
            continue
        if mode == b"include":
            if entry.kind is not None and (entry.kind, entry.pk) in seen:
                continue
            seen.add((entry.kind, entry.pk))
        if entry.study_uid is not None:  # the index's UIDs: valid (the audit checks again)
            studies[entry.study_uid] = None
        entries.append((entry, mode))
    if problems:
        report = {
            "resourceType": "OperationOutcome",
            "issue": [
                outcome("incomplete", text, severity="warning")["issue"][0] for text in problems
            ],
        }
        entries.append(
            (Rendered(None, 0, "OperationOutcome", "", None, to_json(report), None), b"outcome")
        )
    return Searchset(bundle, renderer.base, tuple(entries), tuple(studies)), fresh


def links(
    base: str, page: Paging, transport: Sequence[tuple[str, str]] = ()
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
