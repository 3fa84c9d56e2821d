"""``GET <urls.viewer>/launch?code=...``: a one-time launch code exchanged for a viewer session
(option B at country A), and the viewer app A serves.

The code is a viewer launch token that ``$imaging-access`` issued (``ncp.provider.access``). It
passes only through the one access verifier (:class:`~ncp.security.access.AccessVerifier`: A's
keys, this viewer's exact audience, the token's kind, time and studies) with the node's database
replay guard (``ncp.store.replay``), so it opens one session, once, across every replica. Then:

1. the IHE IID parameters (RAD-106) choose what opens first and must agree with the token:
   ``requestType`` STUDY or PATIENT; ``studyUID`` (a comma list) only studies the token names;
   ``accessionNumber`` one of those studies' accession numbers; ``patientID`` (a value, or CX
   ``value^^^&issuer&ISO``) the token's patient. Other IID parameters are accepted and ignored;
2. a session row is written (:mod:`ncp.viewer.sessions`) and its cookie set;
3. the browser is sent to the viewer page (303), ``?study=`` the study to open first.

Every launch is audited, accepted or refused (``viewer-launch``); a refused one answers a page a
person can read (403 for a code that is forged, expired, replayed or for another viewer; 400 for
a malformed request), never a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

import anyio
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditError, AuditEvent, Auditor, request_id_of
from ncp.config import ArchiveSection, ViewerSection
from ncp.dicom.uids import is_uid
from ncp.errors import ConfigError
from ncp.fhir.identifiers import issuer_of
from ncp.security.access import AccessGrant, AccessVerifier
from ncp.security.claims import VIEWER_LAUNCH
from ncp.security.keys import KeySet
from ncp.security.replay import ReplayGuard, ReplayGuardFull
from ncp.security.tokens import DEFAULT_LEEWAY_S, MAX_LEEWAY_S, KeyResolver, TokenError
from ncp.viewer import i18n
from ncp.viewer.access import ViewerGrant, ViewerRefused
from ncp.viewer.app import build_viewer_app
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.frames import frame_source
from ncp.viewer.pages import refused_page
from ncp.viewer.render_service import RenderService
from ncp.viewer.sessions import (
    CLEARED,
    COOKIE,
    Opened,
    SessionAuth,
    SessionStore,
    cookie_header,
)

log = logging.getLogger(__name__)

_IID_IGNORED = frozenset(
    {
        "patientName",
        "patientBirthDate",
        "lowerDateTime",
        "upperDateTime",
        "mostRecentResults",
        "modalitiesInStudy",
        "viewerType",
        "diagnosticQuality",
        "keyImagesOnly",
    }
)
_IID_USED = frozenset({"code", "requestType", "studyUID", "accessionNumber", "patientID"})


class Launcher:
    """The ``/launch`` handler of A's viewer."""

    def __init__(
        self,
        *,
        verifier: AccessVerifier,
        store: SessionStore,
        audit: ViewAudit,
        service: RenderService,
        base_path: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.verifier = verifier
        self.store = store
        self.audit = audit
        self.service = service
        self.base = base_path.rstrip("/")
        self.clock = clock

    async def handle(self, request: Request) -> Response:
        rid = request_id_of(request.headers)
        access: AccessGrant | None = None
        try:
            params = _params(request)
            code = params.get("code", "")
            if not code:
                raise ViewerRefused(400, "the link has no launch code")
            wanted = _study_list(params.get("studyUID", ""))
            now = self.clock()
            try:
                # The first study asked for is checked before the code is used up, so a link
                # sent to the wrong study can still be opened rightly.
                access = await anyio.to_thread.run_sync(
                    lambda: self.verifier.check(
                        code, study_uid=wanted[0] if wanted else None, now=now
                    )
                )
            except TokenError as refused:
                template, fields = _readable(refused)
                raise ViewerRefused(403, template, params=fields, jti=refused.jti) from None
            except ReplayGuardFull:
                raise ViewerRefused(503, "the viewer is busy: try again in a minute") from None
            first = await self._first_study(access, params, wanted)
            opened: Opened = await anyio.to_thread.run_sync(
                lambda: self.store.open(access, now=now)  # type: ignore[arg-type]
            )
            await self.audit.record(
                self.audit.event(
                    Action.VIEWER_LAUNCH,
                    rid,
                    opened.grant,
                    studies=tuple(sorted(access.studies)),
                    details={
                        "session": opened.grant.session,
                        "expires": _instant(opened.grant.expires_at),
                        "first_study": first,
                        "request_type": params.get("requestType", ""),
                    },
                )
            )
        except ViewerRefused as refusal:
            return await self._refused(request, rid, refusal, access)
        except AuditError:
            return Response("the audit record could not be written\n", status_code=500)
        # A launch of one study opens it; of several, the one its IID parameters chose (else
        # the page opens the most recent). While the browser follows the redirect, the
        # studies' headers are read and the first frames decoded: the page and its first
        # image find them ready.
        studies = sorted(access.studies)
        first = first or (studies[0] if len(studies) == 1 else None)
        self.service.warm(studies, first=first)
        target = f"{self.base}/" + (f"?study={quote(first)}" if first else "")
        expires = opened.grant.expires_at or now
        return Response(
            status_code=303,
            headers={
                "Location": target,
                "Set-Cookie": cookie_header(opened.secret, expires, now),
                "X-Request-ID": rid,
            },
        )

    async def _first_study(
        self, access: AccessGrant, params: dict[str, str], wanted: list[str]
    ) -> str | None:
        kind = params.get("requestType", "")
        if kind not in ("", "STUDY", "PATIENT"):
            raise ViewerRefused(400, "requestType must be STUDY or PATIENT", jti=access.jti)
        for uid in wanted:
            if uid not in access.studies:
                raise ViewerRefused(
                    403, "the link asks for a study the launch code does not cover", jti=access.jti
                )
        patient = params.get("patientID")
        if patient is not None and not _same_patient(patient, access):
            raise ViewerRefused(
                403, "the link names another patient than the launch code", jti=access.jti
            )
        accession = params.get("accessionNumber")
        if accession:
            numbers = {a for a in accession.split(",") if a}
            for study in sorted(access.studies):
                images = await self.service.study(study)
                if images is None:
                    continue
                found = str(images.images[0].header.get("AccessionNumber", "") or "")
                if found in numbers:
                    return study
            raise ViewerRefused(
                404, "no study of this launch has the accession number asked for", jti=access.jti
            )
        return wanted[0] if wanted else None

    async def _refused(
        self, request: Request, rid: str, refusal: ViewerRefused, access: AccessGrant | None
    ) -> Response:
        grant = _grant_of(access) if access is not None else None
        try:
            await self.audit.record(
                self.audit.event(
                    Action.VIEWER_LAUNCH,
                    rid,
                    grant,
                    outcome=Outcome.SERIOUS_FAILURE,
                    reason=f"{refusal.status}: {refusal.reason}",
                    studies=tuple(sorted(access.studies)) if access else (),
                    details={"status": refusal.status},
                    **({"token_jti": refusal.jti} if refusal.jti and grant is None else {}),
                )
            )
        except AuditError:
            return Response("the audit record could not be written\n", status_code=500)
        language = (
            i18n.language_of(access.preferred_language)
            if access is not None
            else i18n.from_accept_language(request.headers.get("accept-language"))
        )
        html = refused_page(
            language,
            refusal.said_in(language),
            status=refusal.status,
            request_id=rid,
            original=refusal.reason,
        )
        return Response(
            html,
            status_code=refusal.status,
            media_type="text/html; charset=utf-8",
            headers={"X-Request-ID": rid, "Content-Language": language},
        )


def _params(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in out:
            raise ViewerRefused(
                400, "the link gives {name} twice", params={"name": repr(name[:40])}
            )
        if name not in _IID_USED and name not in _IID_IGNORED:
            raise ViewerRefused(
                400, "the link has an unknown parameter {name}", params={"name": repr(name[:40])}
            )
        out[name] = value
    return out


def _study_list(text: str) -> list[str]:
    uids = [u for u in text.split(",") if u] if text else []
    if len(uids) > 50 or not all(is_uid(u) for u in uids):
        raise ViewerRefused(400, "studyUID must be a comma list of Study Instance UIDs")
    return uids


def _same_patient(given: str, access: AccessGrant) -> bool:
    """IID's patientID: the identifier alone, or HL7 v2 CX with its assigning authority
    (``value^^^&1.2.3&ISO`` or ``value^^^authority``), compared exactly with the token's."""
    value, _, rest = given.partition("^^^")
    if value != access.patient.value:
        return False
    if not rest:
        return True
    parts = rest.split("&")
    authority = parts[1] if len(parts) > 1 and parts[1] else parts[0]
    return authority == issuer_of(access.patient.system) or authority == access.patient.system


def _grant_of(access: AccessGrant) -> ViewerGrant:
    return ViewerGrant(
        session="",
        subject=access.subject,
        studies=access.studies,
        locale=access.preferred_language or "en",
        patient=access.patient,
        requesting_country=access.requesting_country,
        purpose_of_use=access.purpose_of_use,
        priority=access.priority,
        token_jti=access.jti,
        option="B",
    )


def _readable(refused: TokenError) -> tuple[str, dict[str, object]]:
    """What the HP reads: the rule that failed, in a few words (the audit keeps the whole), as
    a reason of the viewer's catalogue and its fields."""
    from ncp.security import tokens

    if isinstance(refused, tokens.Replayed):
        return "this viewer link has been used already (each link opens the viewer once)", {}
    if isinstance(refused, tokens.Expired):
        return "this viewer link has expired (a link is valid for one minute)", {}
    if isinstance(refused, tokens.WrongAudience):
        return "this link is for another viewer", {}
    if isinstance(refused, tokens.StudyNotCovered):
        return "the link asks for a study the launch code does not cover", {}
    if isinstance(refused, tokens.WrongType):
        return "this is not a viewer launch code", {}
    return "the launch code is not valid ({kind})", {"kind": type(refused).__name__}


def _instant(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_option_b_app(
    *,
    archive: ArchiveSection,
    public_base: str,
    issuer: str,
    keys: KeySet | KeyResolver,
    replay: ReplayGuard,
    sessions: sessionmaker[Session],
    auditor: Auditor,
    settings: ViewerSection | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    """A's option B viewer: the viewer app over A's archive (which files make a study: the
    node's index in ``sessions``' database), behind launch sessions, with ``/launch``.

    ``public_base``: ``urls.viewer``, exactly the audience A writes into launch tokens; the
    routes live below its path. ``keys``: A's published keys (or a resolver by issuer);
    ``replay``: the node's database-backed guard, shared by every replica.
    """
    settings = settings or ViewerSection()
    now = clock or (lambda: datetime.now(UTC))
    parts = urlsplit(public_base)
    if parts.scheme != "https" or not parts.hostname or parts.query:
        raise ConfigError(
            f"urls.viewer must be an absolute https:// URL (browsers need a secure session "
            f"cookie): {public_base!r}"
        )
    base = parts.path.rstrip("/")
    verifier = AccessVerifier(
        keys,
        audience=public_base,
        issuer=issuer,
        replay=replay,
        kinds=(VIEWER_LAUNCH,),
        leeway_s=min(leeway_s, MAX_LEEWAY_S),
        clock=now,
    )
    service = RenderService(
        frame_source(archive, index=sessions),
        memory_bytes=settings.frame_memory_mib << 20,
        threads=settings.render_threads,
        read_ahead=settings.read_ahead_frames,
    )
    audit = ViewAudit(auditor, Side.VIEWER, idle_s=settings.audit_idle_s)
    store = SessionStore(sessions, lifetime=timedelta(seconds=settings.session_lifetime_s))
    launcher = Launcher(
        verifier=verifier, store=store, audit=audit, service=service, base_path=base, clock=now
    )

    async def sweep() -> None:
        ended = await anyio.to_thread.run_sync(lambda: store.ended(now=now()))
        if ended:
            # The ended sessions' viewing records come first.
            await audit.flush(ended={grant.session for grant, _ in ended})
        for grant, opened in ended:
            await audit.record(
                _session_end(audit, grant, opened, grant.expires_at or opened, "expired", None)
            )

    async def end_session(request: Request, grant: ViewerGrant, rid: str) -> dict[str, str]:
        """The HP's logout: the row closed (by this call or an earlier one), the end recorded
        by the call that closed it, after the session's viewing records."""
        at = now()
        secret = request.cookies.get(COOKIE, "")
        closed = await anyio.to_thread.run_sync(lambda: store.close(secret, now=at))
        if closed is not None:
            ended, opened = closed
            await audit.flush(ended={ended.session})
            await audit.record(_session_end(audit, ended, opened, at, "logout", rid))
        return {"Set-Cookie": CLEARED}

    return build_viewer_app(
        service=service,
        authorise=SessionAuth(store, now),
        audit=audit,
        settings=settings,
        base_path=base,
        extra_routes=[("/launch", launcher.handle)],
        on_tick=sweep,
        title="ncp option B viewer",
        end_session=end_session,
    )


def _session_end(
    audit: ViewAudit,
    grant: ViewerGrant,
    opened: datetime,
    ended: datetime,
    why: str,
    request_id: str | None,
) -> AuditEvent:
    """The ``viewer-session`` record of a session's end: ``why`` expired (the sweep) or
    logout (the HP)."""
    return audit.event(
        Action.VIEWER_SESSION,
        request_id or f"viewer-session-{grant.session}",
        grant,
        studies=tuple(sorted(grant.studies)),
        duration_ms=max(0, round((ended - opened).total_seconds() * 1000)),
        details={"session": grant.session, "phase": "ended", "why": why},
    )
