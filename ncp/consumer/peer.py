"""Country B's peer client: asks a trusted peer's standard channel, in its health professional's
name, and hands back typed results (:mod:`ncp.consumer.results`, :mod:`ncp.consumer.model`).

What every call does (docs/consumer.md):

1. checks that B may ask this peer: on B's trust list and in ``[consumer] peers``
   (:class:`~ncp.consumer.model.PeerNotAllowed` otherwise, before any connection);
2. sends the request over mutual TLS pinned to the peer (:mod:`ncp.consumer.channel`) with the HP
   identity assertion (``Authorization: Bearer``), the TRC for patient-level requests
   (``NCP-Treatment-Relationship``) and an ``X-Request-ID`` correlation id that A echoes and writes
   into its own audit records; retries transient failures only;
3. turns a refusal into :class:`~ncp.consumer.model.PeerRefused` carrying A's OperationOutcome
   text, a network failure after the retry budget into
   :class:`~ncp.consumer.model.PeerUnreachable`, an answer B cannot use safely into
   :class:`~ncp.consumer.model.PeerAnswerInvalid`;
4. writes B's audit record of the request (:mod:`ncp.consumer.auditing`), whatever the outcome,
   and fails closed when it cannot.

The client implements :class:`~ncp.consumer.model.PeerAccess` (``manifests``,
``imaging_access``) for the retrieval jobs. It is thread-safe: one HTTPS connection pool per peer.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ncp.audit.models import Action, Outcome
from ncp.audit.record import Auditor
from ncp.config import ConsumerSection
from ncp.consumer.assertions import AssertionSigner, HpIdentity, Pair, own_claims, pair_of
from ncp.consumer.auditing import PeerStep, outcome_of_status, record
from ncp.consumer.channel import Answer, PeerChannel, RetryPolicy
from ncp.consumer.model import (
    ImageGrant,
    ImageOption,
    PeerAccess,
    PeerAnswerInvalid,
    PeerContext,
    PeerNotAllowed,
    PeerRefused,
    PeerUnreachable,
    PeerUntrusted,
    Priority,
    StudyManifest,
    ViewerGrant,
)
from ncp.consumer.queries import (
    WIRE_PRIORITY,
    ResourceType,
    access_parameters,
    list_parameters,
    match_parameters,
)
from ncp.consumer.read import (
    AccessAnswer,
    Notes,
    access_answer,
    list_entry,
    manifest,
    match_result,
    outcome_text,
    parse_body,
    report_document,
    report_history,
    searchset_page,
    viewer_audience,
)
from ncp.consumer.results import (
    ListedReport,
    ListedStudy,
    ListFilters,
    ManifestList,
    MatchResult,
    MetadataList,
    PatientQuery,
    ReportDocument,
    ReportHistory,
)
from ncp.errors import ConfigError
from ncp.fhir.http import JSON_TYPE, REQUEST_ID_HEADER, XML_TYPE, valid_request_id
from ncp.fhir.identifiers import is_fhir_id
from ncp.fhir.io import to_json, to_xml
from ncp.security.claims import (
    HP_ASSERTION,
    IMAGE_ACCESS,
    IMAGE_ACCESS_CEILING,
    VIEWER_LAUNCH,
    PatientRef,
    StudyGrant,
)
from ncp.security.keystore import KeyStore
from ncp.security.mtls import client_ssl_context
from ncp.security.replay import MemoryReplayGuard
from ncp.security.tokens import (
    DEFAULT_LEEWAY_S,
    MAX_LEEWAY_S,
    KeyNotFound,
    TokenError,
    verify,
)
from ncp.security.trust import Peer, TrustList, UnknownPeer

if TYPE_CHECKING:
    from ncp.node import Node

Format = Literal["json", "xml"]
TRC_HEADER = "NCP-Treatment-Relationship"
_MIME = {"json": JSON_TYPE, "xml": XML_TYPE}
T = TypeVar("T")
_EntryReader = Callable[[Sequence[tuple[int, Mapping[str, Any]]], PeerContext, Notes], list[Any]]
"""Reads the matches of one searchset page into typed entries."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Call:
    """One request's audit step and what the outcome will be when nothing goes wrong."""

    step: PeerStep
    outcome: Outcome = Outcome.SUCCESS
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Listed:
    """What a list search gave, every page followed (:meth:`PeerClient._list_all`)."""

    entries: list[Any]
    total: int | None
    pages: int
    warnings: tuple[str, ...]
    quirks: tuple[str, ...]


class PeerClient:
    """B's client of its trusted peers' standard channels (see the module doc).

    Build with :meth:`from_node` (B's node: its key store, trust list, audit chain and
    ``[consumer]`` settings); ``close`` (or ``with``) at the end.
    """

    def __init__(
        self,
        *,
        keystore: KeyStore,
        trust: TrustList,
        auditor: Auditor,
        settings: ConsumerSection,
        clock: Callable[[], datetime] = _utc_now,
        sleep: Callable[[float], None] = time.sleep,
        leeway_s: int = DEFAULT_LEEWAY_S,
    ) -> None:
        self.country = keystore.country
        self.keystore = keystore
        self.trust = trust
        self.auditor = auditor
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.leeway_s = leeway_s
        self.signer = AssertionSigner(
            keystore, lifetime=timedelta(seconds=settings.assertion_lifetime_s), clock=clock
        )
        self.policy = RetryPolicy(
            attempts=settings.attempts,
            backoff_s=settings.backoff_s,
            retry_after_max_s=settings.retry_after_max_s,
        )
        for code in settings.peers:
            if code == self.country:
                raise ConfigError(f"consumer.peers: {code} is this node's own country")
            try:
                trust.peer(code)
            except UnknownPeer:
                raise ConfigError(
                    f"consumer.peers: {code} is not on the trust list ({trust.source})"
                ) from None
        self._channels: dict[str, PeerChannel] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_node(cls, node: Node, **options: Any) -> PeerClient:
        """The client of B's node: its keys, trust list, audit chain, settings and clock."""
        return cls(
            keystore=node.keystore,
            trust=node.trust,
            auditor=node.auditor,
            settings=node.settings.consumer,
            clock=node.clock,
            # The verifier takes at most MAX_LEEWAY_S; the setting allows more for A's side.
            leeway_s=min(node.settings.tokens.leeway_s, MAX_LEEWAY_S),
            **options,
        )

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- peers and assertions ----------------------------------------------------------------

    def peers(self) -> tuple[Peer, ...]:
        """The peers this node may ask (``[consumer] peers``), as the trust list names them."""
        return tuple(self.trust.peer(code) for code in self.settings.peers)

    def peer(self, country: str) -> Peer:
        """The trust list's entry of a peer B may ask; PeerNotAllowed otherwise."""
        if country not in self.settings.peers:
            raise PeerNotAllowed(
                country, "not among the peers this node may ask ([consumer] peers)"
            )
        try:
            return self.trust.peer(country)
        except UnknownPeer:
            raise PeerNotAllowed(country, f"not on the trust list ({self.trust.source})") from None

    def hp_assertion(self, peer: str, hp: HpIdentity) -> str:
        """Sign the HP identity assertion for ``peer`` (its audience: the peer's FHIR base).
        Used for ``$match``, then as the assertion the TRC is bound to."""
        return self.signer.hp_assertion(hp, self.peer(peer).standard)

    def confirm(
        self,
        peer: str,
        hp_assertion: str,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
        request_id: str | None = None,
    ) -> PeerContext:
        """Sign the TRC (the HP confirmed the treatment relationship, and that the patient was
        informed unless in an emergency) under ``hp_assertion``; audited as ``trc-confirm``."""
        audience = self.peer(peer).standard
        if own_claims(HP_ASSERTION, hp_assertion).audience != audience:
            raise ValueError(f"the HP assertion was signed for another peer than {peer}")
        context = self.signer.context(
            peer, hp_assertion, patient, purpose=purpose, informed=informed
        )
        pair = pair_of(context)
        step = PeerStep(
            Action.TRC_CONFIRM,
            peer,
            self._request_id(request_id),
            hp=pair.hp,
            trc=pair.trc,
            details={"informed": informed, "expires": _instant(context.expires_at)},
        )
        record(self.auditor, step, Outcome.SUCCESS)
        return context

    def context(
        self,
        peer: str,
        hp: HpIdentity,
        patient: PatientRef,
        *,
        purpose: str,
        informed: bool,
        request_id: str | None = None,
    ) -> PeerContext:
        """Sign both assertions at once (an HP assertion, and a TRC under it)."""
        token = self.hp_assertion(peer, hp)
        return self.confirm(
            peer, token, patient, purpose=purpose, informed=informed, request_id=request_id
        )

    # --- Patient/$match ----------------------------------------------------------------------

    def match(
        self,
        peer: str,
        hp_assertion: str,
        query: PatientQuery,
        *,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> MatchResult:
        """Identify a patient in A: certain, probable or possible (one candidate), ambiguous
        (several: the HP chooses), or no match."""
        body = match_parameters(query)
        hp = own_claims(HP_ASSERTION, hp_assertion)
        step = PeerStep(
            Action.PATIENT_IDENTIFY,
            peer,
            self._request_id(request_id),
            hp=hp,
            patient=query.identifier,
            query=query.text(),
            interaction="operation",
        )
        with self._audited(step) as call:
            channel = self._channel(peer)
            resource, _answer = self._exchange(
                call,
                channel,
                "POST",
                f"{channel.base}/Patient/$match",
                hp_assertion=hp_assertion,
                body=body,
                fmt=fmt,
            )
            result = match_result(
                resource,
                asked_system=query.identifier.system if query.identifier else None,
                peer=peer,
            )
            call.details.update(
                result=result.outcome,
                candidates=[
                    {"identifier": f"{c.patient.system}|{c.patient.value}", "grade": c.grade}
                    for c in result.candidates
                ],
                quirks=list(result.quirks),
            )
            if result.outcome == "no-match":
                call.outcome, call.reason = Outcome.MINOR_FAILURE, "no candidate"
            return result

    # --- the metadata list -------------------------------------------------------------------

    def metadata_list(
        self,
        context: PeerContext,
        filters: ListFilters | None = None,
        *,
        page_size: int = 1000,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> MetadataList:
        """The patient's studies (manifest entries) and reports, every page followed."""
        listed = self._list_all(
            context, "DocumentReference", filters, page_size, fmt, request_id, _list_entries
        )
        studies: list[ListedStudy] = []
        reports: list[ListedReport] = []
        for entry in listed.entries:
            (studies if isinstance(entry, ListedStudy) else reports).append(entry)
        return MetadataList(
            studies=tuple(studies),
            reports=tuple(reports),
            total=listed.total,
            pages=listed.pages,
            warnings=listed.warnings,
            quirks=listed.quirks,
        )

    def imaging_studies(
        self,
        context: PeerContext,
        filters: ListFilters | None = None,
        *,
        page_size: int = 1000,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> ManifestList:
        """The patient's ImagingStudy manifests (series, instances, sizes, endpoints)."""
        listed = self._list_all(
            context, "ImagingStudy", filters, page_size, fmt, request_id, _manifests
        )
        found: list[StudyManifest] = listed.entries
        uids = [m.study_uid for m in found]
        if len(set(uids)) != len(uids):
            raise PeerAnswerInvalid(context.peer, "a study's manifest was listed twice")
        return ManifestList(
            tuple(found), listed.total, listed.pages, listed.warnings, listed.quirks
        )

    def manifests(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        *,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> Mapping[str, StudyManifest]:
        """A's manifests of these studies of the context's patient (PeerAccess), by Study
        Instance UID. A study A does not list (unknown, or not this patient's) is absent."""
        wanted = list(dict.fromkeys(study_uids))
        out: dict[str, StudyManifest] = {}
        for start in range(0, len(wanted), 100):
            chunk = tuple(wanted[start : start + 100])
            listed = self.imaging_studies(
                context,
                ListFilters(study_uids=chunk),
                fmt=fmt,
                request_id=request_id,
            )
            for item in listed.manifests:
                if item.study_uid in chunk:
                    out[item.study_uid] = item
        return out

    # --- reports -----------------------------------------------------------------------------

    def report(
        self,
        context: PeerContext,
        report_id: str,
        *,
        version: str | None = None,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> ReportDocument:
        """A report Bundle: its latest version, or ``version`` (``_history/<version>``)."""
        _check_id("report id", report_id)
        if version is not None:
            _check_id("version", version)
        path = f"Bundle/{report_id}" + (f"/_history/{version}" if version else "")
        step = self._patient_step(
            Action.REPORT_READ, context, request_id, "vread" if version else "read", path
        )
        with self._audited(step) as call:
            channel = self._channel(context.peer)
            resource, _ = self._exchange(
                call, channel, "GET", f"{channel.base}/{path}", context=context, fmt=fmt
            )
            notes = Notes(context.peer)
            document = report_document(resource, context.patient, notes, report_id)
            call.step.studies = document.study_uids
            call.details.update(
                version=document.version, status=document.status, quirks=list(document.quirks)
            )
            return document

    def report_history(
        self,
        context: PeerContext,
        report_id: str,
        *,
        fmt: Format = "json",
        request_id: str | None = None,
    ) -> ReportHistory:
        """Every version of a report, newest first."""
        _check_id("report id", report_id)
        path = f"Bundle/{report_id}/_history"
        step = self._patient_step(Action.REPORT_READ, context, request_id, "history-instance", path)
        with self._audited(step) as call:
            channel = self._channel(context.peer)
            resource, _ = self._exchange(
                call, channel, "GET", f"{channel.base}/{path}", context=context, fmt=fmt
            )
            history = report_history(resource, context.patient, Notes(context.peer), report_id)
            call.step.studies = tuple(
                dict.fromkeys(uid for v in history.versions for uid in v.study_uids)
            )
            call.details.update(
                versions=[v.version for v in history.versions], quirks=list(history.quirks)
            )
            return history

    # --- $imaging-access ---------------------------------------------------------------------

    def imaging_access(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        option: ImageOption,
        priority: Priority,
        *,
        request_id: str | None = None,
    ) -> ImageGrant:
        """An image access token for these studies, option A (A's gateway) or C (A's edge):
        also how a token is renewed while the pair is valid (PeerAccess).

        The priority travels as FHIR request-priority (emergency -> ``stat``), the purpose is
        the TRC's (A refuses any other). The token is checked before it is handed on: signed by
        the peer (its keys on B's trust list), for the address A named, the studies asked and
        the context's patient."""
        if option not in ("A", "C"):
            raise ValueError("imaging_access is for options A and C; option B: viewer_launch")

        def grant(call: _Call, answer: AccessAnswer, studies: tuple[str, ...]) -> ImageGrant:
            if answer.dicomweb is None:
                raise PeerAnswerInvalid(context.peer, "$imaging-access: no dicomweb address")
            peer = self.trust.peer(context.peer)
            if option == "A" and peer.imaging and answer.dicomweb.rstrip("/") != peer.imaging:
                raise PeerAnswerInvalid(
                    context.peer,
                    f"$imaging-access: option A at {answer.dicomweb}, but the trust list names "
                    f"{peer.imaging} as the peer's gateway",
                )
            claims = self._verify_grant(
                context, answer.token, answer.dicomweb, studies, option, one_time=False
            )
            call.step.token_jti = claims.jti
            call.details["expires"] = _instant(claims.expires_at)
            return ImageGrant(
                token=answer.token,
                base_url=answer.dicomweb.rstrip("/"),
                option=option,
                studies=studies,
                expires_at=claims.expires_at,
            )

        return self._access(context, study_uids, option, priority, request_id, grant)

    def viewer_launch(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        priority: Priority = "normal",
        *,
        request_id: str | None = None,
    ) -> ViewerGrant:
        """Option B: a one-time launch URL of A's viewer, for the HP's browser to open now."""

        def grant(call: _Call, answer: AccessAnswer, studies: tuple[str, ...]) -> ViewerGrant:
            if answer.viewer is None:
                raise PeerAnswerInvalid(context.peer, "$imaging-access: no viewer URL (option B)")
            audience, code = viewer_audience(answer.viewer)
            if code != answer.token:
                raise PeerAnswerInvalid(
                    context.peer, "$imaging-access: the viewer URL does not carry the token"
                )
            claims = self._verify_grant(
                context, answer.token, audience, studies, "B", one_time=True
            )
            call.step.token_jti = claims.jti
            call.details["expires"] = _instant(claims.expires_at)
            return ViewerGrant(url=answer.viewer, studies=studies, expires_at=claims.expires_at)

        return self._access(context, study_uids, "B", priority, request_id, grant)

    def _access(
        self,
        context: PeerContext,
        study_uids: Sequence[str],
        option: Literal["A", "B", "C"],
        priority: Priority,
        request_id: str | None,
        grant: Callable[[_Call, AccessAnswer, tuple[str, ...]], T],
    ) -> T:
        """One audited ``$imaging-access`` exchange; ``grant`` checks the answer into a result
        within the same step (a token B refuses is a failed step)."""
        pair = pair_of(context)
        body = access_parameters(study_uids, option, pair.trc.purpose_of_use, priority)
        studies = tuple(dict.fromkeys(study_uids))
        step = self._patient_step(
            Action.VIEWER_LAUNCH if option == "B" else Action.ACCESS_TOKEN_ISSUE,
            context,
            request_id,
            "operation",
            "$imaging-access",
            query="&".join(
                [f"study={uid}" for uid in studies]
                + [
                    f"option={option}",
                    f"purpose={pair.trc.purpose_of_use}",
                    f"priority={WIRE_PRIORITY[priority]}",
                ]
            ),
            pair=pair,
        )
        step.studies = studies
        step.option = option
        step.priority = WIRE_PRIORITY[priority]
        step.details.update(lane=priority, trc_jti=pair.trc.jti)
        with self._audited(step) as call:
            channel = self._channel(context.peer)
            resource, _ = self._exchange(
                call,
                channel,
                "POST",
                f"{channel.base}/$imaging-access",
                context=context,
                body=body,
                fmt="json",
            )
            return grant(call, access_answer(resource, Notes(context.peer)), studies)

    def _verify_grant(
        self,
        context: PeerContext,
        token: str,
        audience: str,
        studies: tuple[str, ...],
        option: str,
        *,
        one_time: bool,
    ) -> StudyGrant:
        kind = VIEWER_LAUNCH if one_time else IMAGE_ACCESS

        def check(claims: StudyGrant) -> None:
            if claims.patient != context.patient:
                raise TokenError("the token names another patient than the context's")
            missing = [uid for uid in studies if not claims.covers(uid)]
            if missing:
                raise TokenError(f"the token does not cover {', '.join(missing)}")
            if option != "B" and getattr(claims, "option", option) != option:
                raise TokenError(f"a token for option {getattr(claims, 'option', '?')}")
            if claims.requesting_country != self.country:
                raise TokenError("the token was issued to another country")

        def attempt() -> StudyGrant:
            return verify(
                kind,
                token,
                self.trust.keys_for,
                audience=audience,
                issuer=context.peer,
                now=self.clock(),
                leeway_s=self.leeway_s,
                max_lifetime=None if one_time else IMAGE_ACCESS_CEILING,
                replay=MemoryReplayGuard() if one_time else None,
                check=check,
            )

        try:
            try:
                return attempt()
            except KeyNotFound as exc:
                # A rotated its key: fetch its key set again (rate-limited), then once more.
                self.trust.key_set(context.peer, exc.kid)
                return attempt()
        except TokenError as exc:
            raise PeerAnswerInvalid(context.peer, f"$imaging-access: {exc}") from None

    # --- the exchange ------------------------------------------------------------------------

    def _list_all(
        self,
        context: PeerContext,
        rtype: ResourceType,
        filters: ListFilters | None,
        page_size: int,
        fmt: Format,
        request_id: str | None,
        read_entries: _EntryReader,
    ) -> _Listed:
        """A list search of the context's patient, every page followed (:meth:`_pages`): the
        entries of all pages in order, the last total a page gave, the pages' warnings and
        what the readers tolerated."""
        params = list_parameters(
            rtype, context.patient, filters or ListFilters(), page_size=page_size
        )
        notes = Notes(context.peer)
        found: list[Any] = []
        warnings: list[str] = []
        total: int | None = None
        pages = 0
        for page, entries in self._pages(
            context, rtype, params, fmt, request_id, notes, read_entries
        ):
            pages += 1
            total = page.total if page.total is not None else total
            warnings += page.warnings
            found += entries
        return _Listed(found, total, pages, tuple(warnings), tuple(notes.quirks))

    def _pages(
        self,
        context: PeerContext,
        rtype: str,
        params: list[tuple[str, str]],
        fmt: Format,
        request_id: str | None,
        notes: Notes,
        read_entries: _EntryReader,
    ) -> Iterator[tuple[Any, list[Any]]]:
        """Each page of a search, read and audited (one record per page, one correlation id
        for the whole list); next links are followed only under the peer's own base, never
        twice, at most ``max_pages``."""
        correlation = self._request_id(request_id or context.request_id)
        channel: PeerChannel | None = None
        url: str | None = rtype  # made absolute once the peer is known to be one B may ask
        page_params: list[tuple[str, str]] | None = params
        seen: set[str] = set()
        number = 0
        while url is not None:
            number += 1
            query = _query_text(page_params) if page_params is not None else url.partition("?")[2]
            step = self._patient_step(
                Action.LIST_QUERY, context, correlation, "search-type", rtype, query=query
            )
            step.details["page"] = number
            with self._audited(step) as call:
                if channel is None:
                    channel = self._channel(context.peer)
                    url = f"{channel.base}/{rtype}"
                resource, answer = self._exchange(
                    call, channel, "GET", url, context=context, params=page_params, fmt=fmt
                )
                page = searchset_page(resource, notes)
                entries = read_entries(page.matches, context, notes)
                call.step.studies = tuple(
                    dict.fromkeys(
                        uid
                        for e in entries
                        for uid in [getattr(e, "study_uid", None)]
                        if isinstance(uid, str)
                    )
                )
                call.details.update(resourceType=rtype, total=page.total, returned=len(entries))
                seen.add(answer.url if page_params is None else f"{url}?{query}")
                next_url = page.next_url
                if next_url is not None:
                    if not channel.on_peer(next_url):
                        raise PeerAnswerInvalid(
                            context.peer, f"a next page at {next_url}, not under {channel.base}"
                        )
                    if next_url in seen:
                        raise PeerAnswerInvalid(context.peer, "the next page link goes round")
                    if number >= self.settings.max_pages:
                        raise PeerAnswerInvalid(
                            context.peer,
                            f"a list of more than {self.settings.max_pages} pages "
                            "([consumer] max_pages)",
                        )
            yield page, entries
            url, page_params = next_url, None

    def _exchange(
        self,
        call: _Call,
        channel: PeerChannel,
        method: str,
        url: str,
        *,
        fmt: Format,
        context: PeerContext | None = None,
        hp_assertion: str | None = None,
        params: Sequence[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], Answer]:
        """Send, then read the answer as a FHIR resource; a refusal as PeerRefused."""
        headers = {
            "Authorization": f"Bearer {context.hp_assertion if context else hp_assertion}",
            REQUEST_ID_HEADER: call.step.request_id,
            "Accept": _MIME[fmt],
        }
        if context is not None:
            headers[TRC_HEADER] = context.trc
        content = None
        if body is not None:
            content = to_xml(dict(body)) if fmt == "xml" else to_json(dict(body))
            headers["Content-Type"] = _MIME[fmt]
        answer = channel.request(method, url, headers=headers, params=params, content=content)
        call.details.update(
            method=method,
            url=url.partition("?")[0],
            status=answer.status,
            attempts=answer.attempts,
            content_type=answer.content_type.partition(";")[0].strip(),
        )
        if answer.waited_s:
            call.details["waited_s"] = round(answer.waited_s, 3)
        if answer.echoed_id is not None and answer.echoed_id != call.step.request_id:
            call.details["echoed_request_id"] = answer.echoed_id[:128]
        resource: dict[str, Any] | None
        try:
            resource = parse_body(answer.body)
        except ValueError as exc:
            resource = None
            problem = str(exc)
        if answer.status >= 300:
            text, code = outcome_text(resource)
            if not text:
                text = f"HTTP {answer.status} without an OperationOutcome"
            raise PeerRefused(channel.peer.country, answer.status, text, code=code)
        if resource is None:
            raise PeerAnswerInvalid(channel.peer.country, f"the answer is not FHIR: {problem}")
        return resource, answer

    @contextmanager
    def _audited(self, step: PeerStep) -> Iterator[_Call]:
        """Record the step whatever happens (the outcome from the typed error that ends it)."""
        call = _Call(step)
        started = time.monotonic()
        try:
            yield call
        except PeerRefused as exc:
            self._record(call, outcome_of_status(exc.status), exc.diagnostics, started)
            raise
        except (PeerUntrusted, PeerNotAllowed) as exc:
            self._record(call, Outcome.SERIOUS_FAILURE, str(exc), started)
            raise
        except (PeerUnreachable, PeerAnswerInvalid) as exc:
            self._record(call, Outcome.MAJOR_FAILURE, str(exc), started)
            raise
        except Exception as exc:
            self._record(call, Outcome.MAJOR_FAILURE, f"{type(exc).__name__}: {exc}", started)
            raise
        self._record(call, call.outcome, call.reason, started)

    def _record(self, call: _Call, outcome: Outcome, reason: str | None, started: float) -> None:
        call.step.details.update(call.details)
        record(
            self.auditor,
            call.step,
            outcome,
            reason,
            duration_ms=round((time.monotonic() - started) * 1000),
        )

    def _patient_step(
        self,
        action: Action,
        context: PeerContext,
        request_id: str | None,
        interaction: str,
        target: str,
        *,
        query: str | None = None,
        pair: Pair | None = None,
    ) -> PeerStep:
        pair = pair or pair_of(context)
        return PeerStep(
            action,
            context.peer,
            self._request_id(request_id or context.request_id),
            hp=pair.hp,
            trc=pair.trc,
            patient=context.patient,
            query=query if query is not None else target,
            interaction=interaction,
        )

    def _channel(self, country: str) -> PeerChannel:
        peer = self.peer(country)
        with self._lock:
            channel = self._channels.get(country)
            if channel is None:
                # A peer pinned by fingerprint only chains to a shared CA: any trust anchor may
                # have issued it, and the pin decides (checked inside the connection).
                anchors = peer.tls_ca or tuple(self.trust.ca_certificates())
                channel = PeerChannel(
                    peer,
                    client_ssl_context(self.keystore, anchors),
                    connect_timeout_s=self.settings.connect_timeout_s,
                    timeout_s=self.settings.timeout_s,
                    policy=self.policy,
                    sleep=self.sleep,
                )
                self._channels[country] = channel
            return channel

    @staticmethod
    def _request_id(given: str | None) -> str:
        if given is None:
            return f"b-{uuid.uuid4()}"
        if not valid_request_id(given):
            raise ValueError("request_id: 1 to 64 of A-Z a-z 0-9 . _ : -")
        return given


def _list_entries(
    matches: Sequence[tuple[int, Mapping[str, Any]]], context: PeerContext, notes: Notes
) -> list[ListedStudy | ListedReport]:
    out: list[ListedStudy | ListedReport] = []
    for index, resource in matches:
        entry = list_entry(resource, context.patient, notes, f"entry[{index}]")
        if entry is not None:
            out.append(entry)
    return out


def _manifests(
    matches: Sequence[tuple[int, Mapping[str, Any]]], context: PeerContext, notes: Notes
) -> list[StudyManifest]:
    return [
        manifest(resource, context.patient, notes, f"entry[{index}]") for index, resource in matches
    ]


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not is_fhir_id(value):
        raise ValueError(f"{name} {value!r} is not a FHIR id")


def _query_text(params: Sequence[tuple[str, str]]) -> str:
    from urllib.parse import urlencode

    return urlencode(list(params))


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


if TYPE_CHECKING:

    def _implements(client: PeerClient) -> PeerAccess:
        """mypy checks here that the client is what the retrieval jobs need."""
        return client


__all__ = ["Format", "PeerClient"]
