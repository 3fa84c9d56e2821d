"""The DICOMweb gateway as an ASGI application: option A inside the node, option C in ``ncp edge``.

:func:`build_gateway_app` serves QIDO-RS and WADO-RS below the path of its public base (for
``https://gw.at.example/dicomweb``: ``/dicomweb/studies...``). Every request, in this order:

1. the bearer token, through the one verifier (``ncp.security.access``): 401 without a valid
   token for this gateway's audience, 403 for a study it does not name;
2. the path, UIDs only (digits and dots; percent-encoded paths are refused): 400 otherwise;
3. the study's patient, read from the archive and compared exactly with the token's: 403;
4. series and instances mapped to their study through the archive, checked exactly on our side
   (404 when they are not in that study, whatever the archive's own matching says);
5. the answer: JSON filtered and its URLs rewritten to the public base; instances streamed
   through a transfer slot (:mod:`ncp.gateway.limits`), each part checked to be an instance of
   the study (series, instance) asked for, once, and all of them sent
   (:class:`ncp.gateway.stream.Expected`: the node's index, or the archive's series counts);
6. the audit record (:mod:`ncp.gateway.auditing`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditError, Auditor, printable, request_id_of
from ncp.config import ArchiveSection, DicomwebArchive, FolderArchive, GatewaySection, TokensSection
from ncp.dicom.mapping import patient_issuer
from ncp.dicom.uids import is_uid
from ncp.fhir.identifiers import issuer_of
from ncp.gateway.access import BearerAuth
from ncp.gateway.auditing import GatewayAudit, RequestInfo
from ncp.gateway.dicomjson import (
    ISSUER_OF_PATIENT_ID,
    PATIENT_ID,
    RETRIEVE_URL,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    element,
    single_text,
    values,
)
from ncp.gateway.errors import (
    BadArchiveAnswer,
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    StreamBroken,
)
from ncp.gateway.limits import TransferSlots, rank_of
from ncp.gateway.multipart import MultipartWriter, PartHead
from ncp.gateway.openapi import gateway_openapi
from ncp.gateway.qido import TRUNCATED_WARNING, Query, parse_query
from ncp.gateway.relay import Chunk
from ncp.gateway.relay import relay as fast_relay
from ncp.gateway.rewrite import UrlRewriter
from ncp.gateway.stream import (
    DicomPart,
    Expected,
    NotListed,
    Relay,
    StreamedAnswer,
    Tally,
    dicom_answer,
)
from ncp.gateway.studyindex import DISTRUST_S, StudyIndex
from ncp.gateway.upstream import GatewayArchive, RawPart, open_gateway_archive, studies_of
from ncp.gateway.wado import archive_accept, choose_syntax, dicom_syntaxes
from ncp.security.access import AccessGrant, AccessVerifier
from ncp.security.claims import PatientRef
from ncp.security.keys import KeySet
from ncp.security.tokens import MAX_LEEWAY_S, KeyResolver

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_PATIENT_TTL_S = 60.0
_PARALLEL = 8
_BULK_SEGMENT_LIMIT = 12
SERIES_INSTANCES = "00201209"
"""Number of Series Related Instances."""
_LEVEL_UIDS = {
    "studies": (STUDY_UID,),
    "series": (STUDY_UID, SERIES_UID),
    "instances": (STUDY_UID, SERIES_UID, SOP_UID),
}


@dataclass(frozen=True, slots=True)
class Target:
    """What a request path names."""

    kind: str
    """search, retrieve, metadata, frames or bulk."""
    study: str | None = None
    series: str | None = None
    sop: str | None = None
    level: str | None = None
    """For a search: studies, series or instances."""
    tail: str = ""
    """Frames list or bulk data path, already checked."""


def parse_path(rest: str) -> Target:
    """The target of a path below the gateway's root. UIDs must be UIDs (BadRequest); unknown
    shapes are NotFound."""
    parts = rest.split("/")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # one trailing slash is tolerated
    if len(parts) == 1 and parts[0] in ("studies", "series", "instances"):
        return Target("search", level=parts[0])
    if len(parts) < 2 or parts[0] != "studies":
        raise NotFound("no such DICOMweb resource")
    uids = [parts[1]]
    shape = [parts[0]]
    i = 2
    # studies/{s}[/series/{r}[/instances/{i}]] then an optional action.
    for word in ("series", "instances"):
        if len(parts) > i + 1 and parts[i] == word:
            uids.append(parts[i + 1])
            shape.append(word)
            i += 2
        else:
            break
    for uid in uids:
        if not is_uid(uid):
            raise BadRequest("a path segment that should be a UID is not one")
    study, series, sop = ([*uids, None, None])[:3]
    tail = parts[i:]
    if not tail:
        return Target("retrieve", study, series, sop)
    if tail == ["metadata"]:
        return Target("metadata", study, series, sop)
    if len(tail) == 1 and tail[0] in ("series", "instances") and sop is None:
        if tail[0] == "series" and series is not None:
            raise NotFound("no such DICOMweb resource")
        return Target("search", study, series, level=tail[0])
    if sop is not None and tail[0] == "frames" and len(tail) == 2:
        frames = tail[1].split(",")
        if len(frames) > 10_000 or not all(
            f.isascii() and f.isdigit() and 0 < int(f) < 1 << 31 for f in frames
        ):
            raise BadRequest("frame numbers must be positive integers")
        return Target("frames", study, series, sop, tail=tail[1])
    if sop is not None and tail[0] == "bulk" and 1 < len(tail) <= _BULK_SEGMENT_LIMIT:
        for segment in tail[1:]:
            if not (segment.isascii() and segment.isdigit() and len(segment) < 8) and not (
                len(segment) == 8 and all(c in "0123456789abcdefABCDEF" for c in segment)
            ):
                raise BadRequest("a bulk data path names tags and item numbers only")
        return Target("bulk", study, series, sop, tail="/".join(tail[1:]))
    raise NotFound("no such DICOMweb resource")


class Gateway:
    """The request handling of one gateway; :func:`build_gateway_app` wraps it in an app."""

    def __init__(
        self,
        *,
        archive: GatewayArchive,
        public_base: str,
        auth: BearerAuth,
        audit: GatewayAudit,
        slots: TransferSlots,
        relay: Relay,
        chunk_bytes: int = 1 << 20,
        index: StudyIndex | None = None,
        patient_id_issuer: str = "",
    ) -> None:
        self.archive = archive
        self.patient_id_issuer = patient_id_issuer
        """The archive's assigning authority of Patient IDs without issuer (``[archive]``)."""
        self.chunk_bytes = chunk_bytes
        self.public_base = public_base.rstrip("/")
        self.auth = auth
        self.audit = audit
        self.slots = slots
        self.relay = relay
        self.rewriter = UrlRewriter(self.public_base, archive.archive_base)
        self._patients: dict[str, tuple[float, str, str | None]] = {}
        self.index = index
        self._distrusted: dict[str, float] = {}
        """Studies whose indexed instances proved wrong, until when the archive lists them."""

    # -- entry ---------------------------------------------------------------------------

    async def handle(self, request: Request, rest: str | None) -> Any:
        """The answer to one request; ``rest`` is the path below the gateway's root, None for a
        path outside it. Every refusal and failure is audited; nothing escapes as a 500 of
        the server's own (issue 13: plain-text 500s, unaudited)."""
        info = RequestInfo(
            request_id=request_id_of(request.headers),
            # As sent (still percent-encoded): a decoded path may hold NUL or other controls.
            path=(request.scope.get("raw_path") or b"").decode("latin-1")[:1000],
            query=request.url.query,
            client=f"{request.client.host}:{request.client.port}" if request.client else None,
        )
        grant: AccessGrant | None = None
        study: str | None = None
        try:
            authorization = request.headers.getlist("authorization")
            if rest is None or request.method not in ("GET", "HEAD"):
                grant = self._grant_if_any(authorization)  # who it was, for the record
                if rest is None:
                    raise NotFound("no such DICOMweb resource")
                raise MethodNotAllowed(
                    f"{request.method} is not served: DICOMweb QIDO-RS and WADO-RS are GET"
                )
            raw_path = request.scope.get("raw_path") or b""
            # UIDs never need escaping: an escaped path is a trick (%2F, %2E%2E, %00).
            if b"%" in raw_path.split(b"?")[0]:
                grant = self.auth.grant(authorization, None)
                raise BadRequest("percent-encoded characters in the path")
            try:
                target = parse_path(rest)
            except GatewayError:
                # The token is checked first: without a valid one, nothing is said of the path.
                grant = self.auth.grant(authorization, None)
                raise
            study = target.study
            grant = self.auth.grant(authorization, target.study)
            if target.kind == "search":
                return await self._search(request, info, grant, target)
            await self._check_patient(target.study, grant)
            if target.kind == "metadata":
                return await self._metadata(info, grant, target)
            if target.kind == "retrieve":
                return await self._retrieve(request, info, grant, target)
            return await self._raw(request, info, grant, target)
        except GatewayError as exc:
            return await self._refuse(info, grant, exc, study)
        except AuditError:
            return _error_response(500, "the audit record could not be written", info, {})
        except Exception:
            log.exception("request %s failed", info.request_id)
            return await self._refuse(info, grant, _Failed(info.request_id), study)

    def _grant_if_any(self, authorization: list[str]) -> AccessGrant | None:
        try:
            return self.auth.grant(authorization, None)
        except GatewayError:
            return None

    async def _refuse(
        self, info: RequestInfo, grant: AccessGrant | None, exc: GatewayError, study: str | None
    ) -> Any:
        refused = exc.status in (400, 401, 403, 405) or exc.status >= 500
        action = Action.REFUSAL if refused and exc.status != 503 else Action.IMAGE_RETRIEVE
        outcome = Outcome.MINOR_FAILURE if exc.status == 404 else Outcome.SERIOUS_FAILURE
        if isinstance(exc, _Failed):
            action, outcome = Action.REFUSAL, Outcome.MAJOR_FAILURE
        try:
            event = self.audit.event(
                info,
                action,
                grant,
                outcome=outcome,
                reason=f"{exc.status}: {exc.message}",
                jti=exc.jti,
                details={"status": exc.status, "query": printable(info.query)},
                studies=(study,) if study and grant is not None else (),
            )
            await self.audit.record(event)
        except AuditError:
            return _error_response(500, "the audit record could not be written", info, {})
        return _error_response(exc.status, exc.message, info, exc.headers)

    # -- patient and mapping -------------------------------------------------------------------

    async def _check_patient(self, study: str | None, grant: AccessGrant) -> None:
        """The study must belong to the token's patient, compared exactly (the archive's own
        matching is loose). Cached briefly: a study does not change patients between requests."""
        assert study is not None
        now = time.monotonic()
        cached = self._patients.get(study)
        if cached is None or now - cached[0] > _PATIENT_TTL_S:
            found = [
                item
                for item in await self.archive.study(study, {PATIENT_ID, ISSUER_OF_PATIENT_ID})
                if single_text(item, STUDY_UID) == study
            ]
            if not found:
                raise NotFound("no such study in the archive")
            patient = single_text(found[0], PATIENT_ID) or ""
            issuer = single_text(found[0], ISSUER_OF_PATIENT_ID) or None
            cached = (now, patient, issuer)
            if len(self._patients) > 10_000:
                self._patients.clear()
            self._patients[study] = cached
        if not _same_patient(grant.patient, cached[1], cached[2], self.patient_id_issuer):
            raise Forbidden("the study belongs to another patient than the token's", jti=grant.jti)

    async def _instances(self, study: str, series: str | None, sop: str | None) -> frozenset[str]:
        """The SOP Instance UIDs the target names, listed by the archive and checked exactly."""
        items = await self.archive.search(
            study, "instances", series, {STUDY_UID, SERIES_UID, SOP_UID}
        )
        found = frozenset(
            uid
            for item in items
            if single_text(item, STUDY_UID) == study
            and (series is None or single_text(item, SERIES_UID) == series)
            and (uid := single_text(item, SOP_UID)) is not None
            and is_uid(uid)
            and (sop is None or uid == sop)
        )
        if not found:
            raise NotFound("no such instance in the study" if series else "the study is empty")
        return found

    async def _expected(self, study: str, series: str | None, sop: str | None) -> Expected:
        """What a retrieve may send: the exact instances from the node's index (when it holds
        the study and has not proved wrong for it lately), else the archive's instance counts
        per series (:meth:`_counted`), the parts then naming themselves in their data sets."""
        if self.index is not None and self._distrusted.get(study, 0.0) <= time.monotonic():
            indexed = await self.index.instances(study)
            if indexed is not None:
                found = frozenset(
                    uid
                    for uid, in_series in indexed.items()
                    if (series is None or in_series == series)
                    and (sop is None or uid == sop)
                    and is_uid(uid)
                )
                if not found:
                    raise NotFound("no such instance in the study")
                return Expected(study, series, sop, listed=found)
        return await self._counted(study, series, sop)

    async def _counted(self, study: str, series: str | None, sop: str | None) -> Expected:
        """The study's instances per series from a series-level search (an instance listing
        takes Orthanc about a second for 1000 instances; this, a few milliseconds), checked
        exactly: each series once, of this study, with a count."""
        items = await self.archive.search(
            study, "series", None, {STUDY_UID, SERIES_UID, SERIES_INSTANCES}
        )
        counts: dict[str, int] = {}
        for item in items:
            uid = single_text(item, SERIES_UID)
            if single_text(item, STUDY_UID) != study or uid is None or not is_uid(uid):
                continue
            found = values(item, SERIES_INSTANCES)
            count = found[0] if len(found) == 1 else None
            if isinstance(count, str) and count.strip().isascii() and count.strip().isdigit():
                count = int(count)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise BadArchiveAnswer("the archive gave a series without its number of instances")
            if uid in counts:
                raise BadArchiveAnswer("the archive gave a series twice")
            counts[uid] = count
        if series is not None:
            if not counts.get(series):
                raise NotFound("no such series in the study")
            counts = {series: 1 if sop is not None else counts[series]}
        counts = {uid: n for uid, n in counts.items() if n}
        if not counts:
            raise NotFound("the study is empty")
        return Expected(study, series, sop, counts=counts)

    async def _index_is_stale(self, study: str) -> bool:
        """Whether the archive's series-level listing of ``study`` (its instances per series)
        disagrees with the node's index; False when either cannot tell."""
        if self.index is None:
            return False
        try:
            indexed = await self.index.instances(study)
            listed = await self._counted(study, None, None)
        except (GatewayError, OSError):
            return False  # the archive (or the index) failing says nothing of staleness
        if indexed is None:
            return True
        per_series: dict[str, int] = {}
        for series in indexed.values():
            per_series[series] = per_series.get(series, 0) + 1
        return dict(listed.counts or {}) != per_series

    def _distrust_index(self, study: str) -> None:
        if len(self._distrusted) > 10_000:
            self._distrusted.clear()
        self._distrusted[study] = time.monotonic() + DISTRUST_S

    # -- QIDO-RS ---------------------------------------------------------------------------------

    async def _search(
        self, request: Request, info: RequestInfo, grant: AccessGrant, target: Target
    ) -> Response:
        query = parse_query(parse_qsl(request.url.query, keep_blank_values=True))
        level = target.level or "studies"
        if target.study is not None:
            studies = [target.study]
        else:
            wanted = query.uids.get(STUDY_UID)
            studies = sorted(s for s in grant.studies if wanted is None or s in wanted)
        fields = set(query.include) | set(_LEVEL_UIDS[level])
        if level == "studies":
            # One archive search for all of them (a token may name fifty studies).
            found = await self._studies(studies, fields)
            matched = [
                item
                for study in studies
                for item, patient, issuer in found.get(study, ())
                if _same_patient(grant.patient, patient, issuer, self.patient_id_issuer)
                and (kept := self._kept(item, study, level, None)) is not None
                and query.matches(kept)
            ]
        else:
            matched = await self._search_levels(studies, level, target, fields, grant, query)
        page = query.page(matched)
        body = json.dumps(page, separators=(",", ":")).encode("utf-8")
        shown = sorted({s for item in page if (s := single_text(item, STUDY_UID))})
        await self.audit.record(
            self.audit.event(
                info,
                Action.LIST_QUERY,
                grant,
                studies=tuple(shown),
                query=printable(request.url.query) or None,
                interaction="search-type",
                details={"service": "QIDO-RS", "level": level, "results": len(page)},
                size_bytes=len(body),
            )
        )
        headers = {"X-Request-ID": info.request_id}
        warnings = [TRUNCATED_WARNING] if query.truncated(len(matched)) else []
        if query.fuzzy:
            warnings.append('299 ncp: "fuzzymatching is not supported; matched exactly"')
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return Response(body, media_type=DICOM_JSON, headers=headers)

    async def _search_levels(
        self,
        studies: list[str],
        level: str,
        target: Target,
        fields: set[str],
        grant: AccessGrant,
        query: Query,
    ) -> list[dict[str, Any]]:
        """Series or instances of the studies, matched, in study order. Studies are asked
        _PARALLEL at a time, and no more once the page (and one result past it) is matched."""
        if target.study is None and len(studies) > 1:
            await self._studies(  # the patients of the studies not cached, in one search
                [s for s in studies if not self._patient_known(s)], {STUDY_UID}
            )

        async def one(study: str) -> list[dict[str, Any]]:
            if target.study is None:
                try:
                    await self._check_patient(study, grant)
                except (NotFound, Forbidden):
                    return []  # gone, or not this patient's: not in the answer
            else:
                await self._check_patient(study, grant)
            items = await self.archive.search(study, level, target.series, fields)  # type: ignore[arg-type]
            return [
                kept
                for item in items
                if (kept := self._kept(item, study, level, target.series)) is not None
                and query.matches(kept)
            ]

        matched: list[dict[str, Any]] = []
        for start in range(0, len(studies), _PARALLEL):
            for found in await asyncio.gather(*map(one, studies[start : start + _PARALLEL])):
                matched += found
            if len(matched) > query.end:
                break
        return matched

    async def _studies(
        self, studies: list[str], fields: set[str]
    ) -> dict[str, list[tuple[dict[str, Any], str, str | None]]]:
        """The archive's study-level items by Study Instance UID, for those asked only (exact
        UID), each with its Patient ID and Issuer of Patient ID; the patient of each study
        found is cached for :meth:`_check_patient`.

        The Patient ID comes from the archive every time. The issuer is asked for only when
        some study's patient is not cached: Orthanc reads it from each study's stored files
        unless it keeps it as a main tag (50 studies: about 40 ms more), and a study does
        not change issuing domains within the cache's lifetime."""
        if not studies:
            return {}
        wanted = set(studies)
        found: dict[str, list[tuple[dict[str, Any], str, str | None]]] = {}
        cached = all(self._patient_known(s) for s in studies)
        issuers = {s: self._patients[s][2] for s in studies} if cached else {}
        asked = fields | {PATIENT_ID} | (set() if cached else {ISSUER_OF_PATIENT_ID})
        for item in await studies_of(self.archive, studies, asked):
            if isinstance(item, dict) and (uid := single_text(item, STUDY_UID)) in wanted:
                patient = single_text(item, PATIENT_ID) or ""
                if cached:
                    issuer = issuers[uid]
                    if issuer is not None and ISSUER_OF_PATIENT_ID not in item:
                        # As an uncached answer gives it: the archive's value, remembered.
                        item[ISSUER_OF_PATIENT_ID] = element("LO", issuer)
                else:
                    issuer = single_text(item, ISSUER_OF_PATIENT_ID) or None
                found.setdefault(uid, []).append((item, patient, issuer))
        if cached:
            return found  # the cache's entries stand; they expire as they were written
        now = time.monotonic()
        if len(self._patients) > 10_000:
            self._patients.clear()
        for uid, items in found.items():
            self._patients[uid] = (now, items[0][1], items[0][2])  # as _check_patient reads it
        return found

    def _patient_known(self, study: str) -> bool:
        cached = self._patients.get(study)
        return cached is not None and time.monotonic() - cached[0] <= _PATIENT_TTL_S

    def _kept(self, item: Any, study: str, level: str, series: str | None) -> dict[str, Any] | None:
        """``item`` with its URLs rewritten when it is of the study (and series) asked for and
        names valid UIDs at its level; None when it must be dropped."""
        if not isinstance(item, dict) or single_text(item, STUDY_UID) != study:
            return None
        if series is not None and single_text(item, SERIES_UID) != series:
            return None
        if level != "studies" and not is_uid(single_text(item, SERIES_UID) or ""):
            return None
        if level == "instances" and not is_uid(single_text(item, SOP_UID) or ""):
            return None
        # Ours replaces the archive's RetrieveURL: not rewritten first (URL checks cost).
        item.pop(RETRIEVE_URL, None)
        self.rewriter.dataset(item)
        item[RETRIEVE_URL] = element("UR", self._url(item, level, study))
        return item

    def _url(self, item: dict[str, Any], level: str, study: str) -> str:
        url = f"{self.public_base}/studies/{study}"
        if level in ("series", "instances"):
            url += f"/series/{single_text(item, SERIES_UID)}"
        if level == "instances":
            url += f"/instances/{single_text(item, SOP_UID)}"
        return url

    # -- WADO-RS metadata ----------------------------------------------------------------------

    async def _metadata(self, info: RequestInfo, grant: AccessGrant, target: Target) -> Response:
        assert target.study is not None
        items = await self.archive.metadata(target.study, target.series, target.sop)
        kept = [
            self.rewriter.dataset(item)
            for item in items
            if isinstance(item, dict)
            and single_text(item, STUDY_UID) == target.study
            and (target.series is None or single_text(item, SERIES_UID) == target.series)
            and (target.sop is None or single_text(item, SOP_UID) == target.sop)
        ]
        if not kept:
            raise NotFound("no such series or instance in the study")
        body = json.dumps(kept, separators=(",", ":")).encode("utf-8")
        await self.audit.record(
            self.audit.event(
                info,
                Action.IMAGE_RETRIEVE,
                grant,
                studies=(target.study,),
                num_instances=len(kept),
                size_bytes=len(body),
                details={"service": "WADO-RS metadata"},
            )
        )
        return Response(body, media_type=DICOM_JSON, headers={"X-Request-ID": info.request_id})

    # -- WADO-RS retrieve ------------------------------------------------------------------------

    async def _retrieve(
        self, request: Request, info: RequestInfo, grant: AccessGrant, target: Target
    ) -> Any:
        assert target.study is not None
        if request.url.query:
            raise BadRequest("a retrieve takes no query parameters here")
        accepted = dicom_syntaxes(request.headers.get("accept"))
        expected = await self._expected(target.study, target.series, target.sop)
        indexed = expected.listed is not None
        stored = self.archive.stored_syntaxes(target.study, target.series, target.sop)
        syntax = choose_syntax(accepted, stored)
        writer = MultipartWriter("application/dicom")
        tally = Tally()

        async def chunks(parts: AsyncIterator[DicomPart]) -> AsyncIterator[Chunk]:
            try:
                async for chunk in dicom_answer(
                    parts, expected, writer, tally, flush_bytes=self.chunk_bytes
                ):
                    yield chunk
            except NotListed:
                # The parts and the index disagree: a stale index, or an archive that failed
                # (a transcode it could not do, an instance it left out). Only the archive's
                # own listing disagreeing with the index says stale; then the study is listed
                # there for a while. An archive error is not staleness.
                if indexed and await self._index_is_stale(target.study or ""):
                    self._distrust_index(target.study or "")
                raise

        return await self._transfer(
            info,
            grant,
            target,
            open_parts=lambda: self.archive.retrieve(
                target.study or "", target.series, target.sop, syntax
            ),
            make_chunks=chunks,
            writer=writer,
            tally=tally,
            details={
                "service": "WADO-RS",
                "transfer_syntax": syntax,
                "expected": expected.total,
                # index: the node's exact list; archive: its series counts, parts named by
                # their data sets.
                "listed_by": "index" if indexed else "archive",
            },
        )

    async def _raw(
        self, request: Request, info: RequestInfo, grant: AccessGrant, target: Target
    ) -> Any:
        assert target.study is not None and target.series is not None and target.sop is not None
        if request.url.query:
            raise BadRequest("frames and bulk data take no query parameters here")
        await self._instances(target.study, target.series, target.sop)
        default = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        accept = archive_accept(request.headers.get("accept"), default)
        path = f"/studies/{target.study}/series/{target.series}/instances/{target.sop}"
        path += f"/{target.kind}/{target.tail}"
        tally = Tally()
        holder: dict[str, MultipartWriter] = {}

        async def open_raw() -> AsyncIterator[RawPart]:
            part_type, parts = await self.archive.raw(path, accept)
            holder["writer"] = MultipartWriter(part_type)
            return parts

        async def chunks(parts: AsyncIterator[RawPart]) -> AsyncIterator[Chunk]:
            writer = holder["writer"]
            async for kind, body in parts:
                head = writer.open_part(PartHead(kind))
                first = True
                async for piece in body:
                    yield head + bytes(piece) if first else piece
                    first = False
                    tally.dicom_bytes += len(piece)
                if first:
                    yield head
            tally.instances = 1
            yield writer.close()

        return await self._transfer(
            info,
            grant,
            target,
            open_parts=open_raw,
            make_chunks=chunks,
            writer=None,
            holder=holder,
            tally=tally,
            details={"service": f"WADO-RS {target.kind}"},
        )

    async def _transfer(
        self,
        info: RequestInfo,
        grant: AccessGrant,
        target: Target,
        *,
        open_parts: Callable[[], Any],
        make_chunks: Callable[[Any], AsyncIterator[Chunk]],
        writer: MultipartWriter | None,
        tally: Tally,
        details: dict[str, Any],
        holder: dict[str, MultipartWriter] | None = None,
    ) -> Any:
        """Take a slot, open the archive, check the first part, record the transfer's begin,
        then stream and record how it ended; the slot is held until the last byte is sent or
        the transfer ends otherwise."""
        await self.slots.acquire(rank_of(grant.priority, grant.purpose_of_use))
        started = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.release()

        try:
            parts = await open_parts()
            chunks = make_chunks(parts)
            # The first bytes are read before the answer starts, so an archive that fails at
            # once still gets a proper status rather than a broken body.
            try:
                first = await anext(chunks)
            except StreamBroken as exc:
                raise _BrokenBeforeStart(str(exc)) from None
            except StopAsyncIteration:
                first = None
        except BaseException:
            release()
            raise
        answer_writer = writer or (holder or {}).get("writer")
        assert answer_writer is not None
        try:
            # Before the first byte leaves: a transfer cut short by a crash of this process
            # still leaves its trace (the end record would never be written).
            await self.audit.record(
                self.audit.event(
                    info,
                    Action.IMAGE_TRANSFER_BEGIN,
                    grant,
                    studies=(target.study or "",),
                    details=details,
                )
            )
        except BaseException:
            release()
            await chunks.aclose()  # type: ignore[attr-defined]
            raise

        async def all_chunks() -> AsyncIterator[Chunk]:
            try:
                if first is not None:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]

        async def finish(done: Tally) -> None:
            release()
            failed = done.error is not None or done.disconnected
            reason = done.error or ("client went away" if done.disconnected else None)
            # A complete transfer is finished only once recorded (AuditError aborts it); a
            # failed one is recorded as well as can be, its failure is what the client sees.
            write = self.audit.record_late if failed else self.audit.record
            await write(
                self.audit.event(
                    info,
                    Action.IMAGE_RETRIEVE,
                    grant,
                    outcome=Outcome.SERIOUS_FAILURE if failed else Outcome.SUCCESS,
                    reason=reason,
                    studies=(target.study or "",),
                    num_instances=done.instances,
                    size_bytes=done.body_bytes,
                    duration_ms=round((time.monotonic() - started) * 1000),
                    details={
                        **details,
                        "dicom_bytes": done.dicom_bytes,
                        "instances": done.sops,
                        "disconnected": done.disconnected,
                    },
                )
            )

        return StreamedAnswer(
            all_chunks(),
            content_type=answer_writer.content_type,
            relay=self.relay,
            tally=tally,
            on_end=finish,
            headers={"X-Request-ID": info.request_id},
        )


class _Failed(GatewayError):
    """The gateway itself failed (a bug): 500, audited, the traceback in the log only."""

    status = 500

    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error; quote request id {request_id} to the operator")


class _BrokenBeforeStart(GatewayError):
    """The archive's answer was wrong before anything was sent: 502."""

    status = 502


def _same_patient(token: PatientRef, patient_id: str, issuer: str | None, default: str) -> bool:
    """The archive's Patient ID and its issuer are the token's patient, compared exactly. The
    issuer is the Issuer of Patient ID the archive gives, else the archive's configured
    assigning authority ``default`` (:func:`ncp.dicom.mapping.patient_issuer`, as the index
    read it); with neither, no token's patient is the study's."""
    if patient_id != token.value:
        return False
    return patient_issuer(issuer, default) == _issuer_of(token.system)


_issuer_of = lru_cache(maxsize=1024)(issuer_of)
"""Asked once per item of a search answer; a handful of patient systems in all."""


def _error_response(
    status: int, message: str, info: RequestInfo, headers: dict[str, str]
) -> Response:
    text = "".join(c for c in message if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:300]
    return Response(
        message.encode("utf-8") + b"\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={**headers, "Warning": f'299 ncp: "{text}"', "X-Request-ID": info.request_id},
    )


def build_gateway_app(
    *,
    archive: ArchiveSection | GatewayArchive,
    public_base: str,
    issuer: str,
    keys: KeySet | KeyResolver,
    auditor: Auditor,
    side: Side = Side.GATEWAY,
    limits: GatewaySection | None = None,
    tokens: TokensSection | None = None,
    clock: Callable[[], datetime] | None = None,
    relay: Relay = fast_relay,
    index: StudyIndex | None = None,
    patient_id_issuer: str | None = None,
) -> FastAPI:
    """The DICOMweb gateway of one public base URL.

    ``archive``: the ``[archive]`` settings (opened and closed with the app) or an open
    GatewayArchive (the caller closes it). ``public_base``: the gateway's public DICOMweb base,
    exactly the audience A writes into its tokens (node: ``settings.urls.imaging``; edge:
    ``edge.audience``); routes live below its path. ``issuer``: A's country code; ``keys``:
    A's KeySet or a resolver from issuer to KeySet. ``auditor``: where records go; ``side``:
    GATEWAY (option A) or EDGE (option C). ``limits``/``tokens``: the settings sections.
    ``clock``: for tests. ``relay``: the byte mover (see :mod:`ncp.gateway.stream`); the default,
    :func:`ncp.gateway.relay.relay`, writes straight to the transport and sends folder files by
    ``sendfile`` when served with ``uvicorn.Config(http=RelayH11Protocol)`` (ASGI messages
    elsewhere). ``index``: where a retrieve finds the study's instances before asking the
    archive (option A: the node's index, :class:`ncp.gateway.studyindex.NodeIndex`).
    ``patient_id_issuer``: the archive's assigning authority of Patient IDs without issuer;
    None: the ``[archive]`` settings' own (none for an open GatewayArchive).
    """
    limits = limits or GatewaySection()
    tokens = tokens or TokensSection()
    parts = urlsplit(public_base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"public base must be an absolute http(s) URL: {public_base!r}")
    root = parts.path.rstrip("/")
    verifier = AccessVerifier(
        keys,
        audience=public_base,
        issuer=issuer,
        max_lifetime=timedelta(seconds=tokens.image_access_lifetime_s),
        leeway_s=min(tokens.leeway_s, MAX_LEEWAY_S),
        clock=clock,
    )
    owned = isinstance(archive, FolderArchive | DicomwebArchive)
    if patient_id_issuer is None:
        patient_id_issuer = (
            archive.patient_id_issuer
            if isinstance(archive, FolderArchive | DicomwebArchive)
            else ""
        )
    upstream = (
        open_gateway_archive(
            archive,  # type: ignore[arg-type]
            timeout_s=limits.archive_timeout_s,
            retry_after_s=limits.retry_after_s,
            chunk_bytes=limits.chunk_bytes,
        )
        if owned
        else archive
    )
    gateway = Gateway(
        archive=upstream,  # type: ignore[arg-type]
        public_base=public_base,
        auth=BearerAuth(verifier, public_base),
        audit=GatewayAudit(auditor, side),
        slots=TransferSlots(
            limits.max_transfers,
            queue_timeout_s=limits.queue_timeout_s,
            retry_after_s=limits.retry_after_s,
        ),
        relay=relay,
        chunk_bytes=limits.chunk_bytes,
        index=index,
        patient_id_issuer=patient_id_issuer,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before the server accepts a request (uvicorn binds after the startup): a folder's
        # catalogue is built here, so the first search is answered in milliseconds.
        warm = getattr(gateway.archive, "warm", None)
        if warm is not None:
            await warm()
        yield
        if owned:
            await gateway.archive.aclose()

    app = FastAPI(
        title="ncp DICOMweb gateway",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    document = json.dumps(gateway_openapi(public_base)).encode("utf-8")
    # Every method and every path reaches the gateway's own handler, so that each refusal is
    # a DICOMweb status with its audit record, never the framework's own unaudited 404 or 405:
    # one catch-all route of every method below the root (an ASGI endpoint, not a function,
    # takes them all; its template names requests in metrics), and the same handler for
    # anything no route matches (a path outside the root, or with a newline in it).
    endpoint = _Endpoint(gateway, root, document)
    app.router.routes.append(Route(f"{root}/{{rest:path}}", endpoint))
    app.router.default = endpoint
    return app


class _Endpoint:
    """The ASGI endpoint of every request of a gateway: the OpenAPI document (public: it names
    no study and no patient), or the gateway's handler."""

    def __init__(self, gateway: Gateway, root: str, document: bytes) -> None:
        self.gateway = gateway
        self.root = root
        self.document = document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is the app's; nothing else is served
            return
        request = Request(scope, receive)
        path = request.url.path
        if path == f"{self.root}/openapi.json" and request.method in ("GET", "HEAD"):
            await Response(self.document, media_type="application/json")(scope, receive, send)
            return
        prefix = f"{self.root}/"
        rest = path[len(prefix) :] if path.startswith(prefix) else None
        response = await self.gateway.handle(request, rest)
        await response(scope, receive, send)
