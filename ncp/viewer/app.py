"""The viewer as an ASGI application: one factory for A's option B viewer and B's local viewer.

:func:`build_viewer_app` takes a :class:`~ncp.viewer.render_service.RenderService` (a frame
source: A's archive, or B's local store), an :data:`~ncp.viewer.access.Authorise` dependency
(A: the launch session; B: the portal's login) and a :class:`~ncp.viewer.auditing.ViewAudit`
(side ``viewer`` at A, ``consumer`` at B). Routes, below ``base_path``:

| route | answers |
| --- | --- |
| ``/`` | the viewer page (``?study=UID`` opens that study first), with its data when it can |
| ``/static/viewer.js``, ``/static/viewer.css`` | the page's script and style (package data) |
| ``/context`` | the session as the page needs it: language, labels, coded displays, expiry |
| ``/initial`` | what the page needs to start (context, study, series, first series' images) |
| ``/studies`` | the session's studies, DICOM JSON (QIDO-RS study attributes) |
| ``/studies/{s}/series`` | its series, DICOM JSON |
| ``/studies/{s}/first-image`` | the frame the study opens on, as the page shows it first |
| ``/studies/{s}/series/{r}/instances`` | a series' images with what a viewer shows (DICOM JSON) |
| ``/studies/{s}[/series/{r}[/instances/{i}[/frames/{n,...}]]]/rendered`` | PS3.18 rendered |
| ``/studies/{s}[/series/{r}[/instances/{i}[/frames/{n,...}]]]/thumbnail`` | PS3.18 thumbnail |
| ``POST /logout`` | with ``end_session`` only (A): the session ends now |

A's composition adds ``/launch`` (:mod:`ncp.viewer.launch`). Rendered resources take PS3.18's
``window`` (centre,width[,linear|linear-exact|sigmoid]), ``viewport`` (vw,vh[,sx,sy,sw,sh]),
``quality`` (1-100) and ``accept`` (or the Accept header): JPEG, PNG or WebP, one image, or
``multipart/related`` of images for several. Nothing here ever answers a DICOM object, bulk
data or pixel data in DICOM form (``tests/test_viewer_app.py`` walks every route).

Every request: the path (UIDs only, no percent-encoding, no dot segments: 400), then the grant
(401 without a session, 403 for a study it does not cover), then the archive (404: not held);
each refusal audited and said in the HP's language. A frame that cannot be decoded is a
placeholder image, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from pydicom.multival import MultiValue
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ncp.audit.record import AuditError, request_id_of
from ncp.config import ViewerSection
from ncp.dicom.uids import is_uid
from ncp.errors import ArchiveError
from ncp.viewer import i18n
from ncp.viewer.access import Authorise, EndSession, ViewerGrant, ViewerRefused
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.dicomjson import instance_json, series_json, study_json
from ncp.viewer.frames import ImageRef, StudyImages
from ncp.viewer.pages import CSP, refused_page, viewer_page
from ncp.viewer.render import FUNCTIONS, Window
from ncp.viewer.render_output import (
    BadParameter,
    NotAcceptable,
    Viewport,
    choose_media_type,
    parse_quality,
    parse_viewport,
    parse_window,
)
from ncp.viewer.render_service import THUMBNAIL, Rendered, RenderService, representative

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
STATIC = {"viewer.js": "text/javascript; charset=utf-8", "viewer.css": "text/css; charset=utf-8"}
_RENDERED_PARAMS = frozenset({"window", "viewport", "quality", "accept"})
_THUMBNAIL_PARAMS = frozenset({"viewport", "accept"})
_QIDO_FILTERS = {
    "StudyInstanceUID": "0020000D",
    "AccessionNumber": "00080050",
    "PatientID": "00100020",
    "ModalitiesInStudy": "00080061",
}
_QIDO_IGNORED = frozenset({"includefield", "fuzzymatching", "limit", "offset"})
_TICK_S = 5.0


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
    return bytes(raw).decode("latin-1")[:1000]


def _path_trick(raw: str) -> str | None:
    """Why a path as sent is refused, or None. UIDs never need escaping, and no route has a
    dot segment, so an escaped or dotted path is a trick (%2F, %2E%2E, %00, /../)."""
    path = raw.split("?", 1)[0]
    if "%" in path:
        return "percent-encoded characters in the path"
    if "\\" in path or "//" in path:
        return "a backslash or an empty segment in the path"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "a dot segment in the path"
    return None


class _Guard:
    """Pure ASGI middleware: refuses path tricks before routing (a decoded path could route
    somewhere else) and puts the security headers on every answer."""

    def __init__(self, app: ASGIApp, viewer: ViewerApp) -> None:
        self.app = app
        self.viewer = viewer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trick = _path_trick(_raw_path(scope))
        if trick is not None:
            request = Request(scope, receive)
            response = await self.viewer.refuse(request, ViewerRefused(400, trick), page=False)
            await _secured(response)(scope, receive, send)
            return

        async def send_secured(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in _SECURITY_HEADERS:
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)


_SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
    # Patient images are kept in the page's memory, never in the browser's disk cache.
    (b"cache-control", b"no-store"),
)


def _secured(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS:
        key = name.decode("ascii")
        if key not in response.headers:
            response.headers[key] = value.decode("ascii")
    return response


class ViewerApp:
    """The request handling behind :func:`build_viewer_app`."""

    def __init__(
        self,
        *,
        service: RenderService,
        authorise: Authorise,
        audit: ViewAudit,
        settings: ViewerSection,
        end_session: EndSession | None = None,
    ) -> None:
        self.service = service
        self.authorise = authorise
        self.audit = audit
        self.settings = settings
        self.end_session = end_session
        self.static = {name: _asset(name) for name in STATIC}
        self.asset_version = hashlib.sha256(b"".join(self.static.values())).hexdigest()[:12]

    # -- refusals ------------------------------------------------------------------------------

    async def refuse(
        self, request: Request, refusal: ViewerRefused, *, page: bool, study: str | None = None
    ) -> Response:
        """The audited answer to a refusal: a page a person can read (``page``) or a short
        text, in the language of the grant (when known) or of the browser; the audit keeps
        the reason in English."""
        rid = request_id_of(request.headers)
        language = _language(request, refusal.grant)
        try:
            await self.audit.refused(
                rid,
                refusal.reason,
                status=refusal.status,
                path=_raw_path(request.scope),
                grant=refusal.grant,
                study=study,
                jti=refusal.jti,
            )
        except AuditError:
            return _audit_failed(rid, language)
        said = refusal.said_in(language)
        if page:
            html = refused_page(
                language,
                said,
                status=refusal.status,
                request_id=rid,
                original=refusal.reason,
                asset_version=self.asset_version,
            )
            return Response(
                html,
                status_code=refusal.status,
                media_type="text/html; charset=utf-8",
                headers={"X-Request-ID": rid, "Content-Language": language},
            )
        return _text(refusal.status, said, rid, language)

    async def guarded(
        self,
        request: Request,
        work: Callable[[ViewerGrant, str], Awaitable[Response]],
        *,
        page: bool = False,
        study: str | None = None,
    ) -> Response:
        """Authorise, run ``work``, and turn every refusal into an audited answer."""
        rid = request_id_of(request.headers)
        grant: ViewerGrant | None = None
        try:
            grant = await self.authorise(request)
            response = await work(grant, rid)
        except ViewerRefused as refusal:
            if refusal.grant is None and grant is not None:
                refusal.grant = grant
            return await self.refuse(request, refusal, page=page, study=study)
        except ArchiveError as exc:
            log.warning("archive failed for request %s: %s", rid, exc)
            unavailable = ViewerRefused(503, "the image archive is not available now", grant=grant)
            return await self.refuse(request, unavailable, page=page, study=study)
        except AuditError:
            return _audit_failed(rid, _language(request, grant))
        response.headers["X-Request-ID"] = rid
        return response

    # -- checks --------------------------------------------------------------------------------

    async def images_of(self, grant: ViewerGrant, study: str) -> StudyImages:
        if not is_uid(study):
            raise ViewerRefused(400, "a path segment that should be a UID is not one")
        if not grant.covers(study):
            raise ViewerRefused(403, "this session does not cover the study asked for")
        images = await self.service.study(study)
        if images is None:
            raise ViewerRefused(404, "the archive holds no images of this study")
        return images

    # -- handlers ------------------------------------------------------------------------------

    def context_of(self, grant: ViewerGrant) -> dict[str, Any]:
        """What the page needs of the session: language, labels, coded displays, presets."""
        return {
            "locale": grant.locale,
            "language": i18n.language_of(grant.locale),
            "labels": i18n.labels(grant.locale),
            "displays": i18n.coded_displays(grant.locale, _ALL_MODALITIES, _ALL_BODY_PARTS),
            "presets": [{"key": key, "center": c, "width": w} for key, c, w in i18n.PRESETS],
            "studies": sorted(grant.studies),
            "expires": _instant(grant.expires_at),
            "subject": grant.subject_name or grant.subject,
            "can_end": self.end_session is not None,
        }

    async def context(self, request: Request) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            return JSONResponse(self.context_of(grant))

        return await self.guarded(request, work)

    async def study_list(
        self, grant: ViewerGrant, filters: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """The grant's studies the archive holds, most recent first (DICOM JSON)."""
        found: list[dict[str, Any]] = []
        held = await asyncio.gather(*(self.service.study(s) for s in sorted(grant.studies)))
        for images in held:
            if images is None:
                continue
            item = study_json(images)
            if all(_matches(item, tag, value) for tag, value in (filters or {}).items()):
                found.append(item)
        found.sort(key=lambda i: _first(i, "00080020") + _first(i, "00080030"), reverse=True)
        return found

    async def studies(self, request: Request) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            found = await self.study_list(grant, _qido_filters(request))
            return JSONResponse(found, media_type=DICOM_JSON)

        return await self.guarded(request, work)

    # -- the page --------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The page (decision record ``viewer-first-image-critical-path``). Its HTML asks for
        the first image of the study it opens (``?study=``) itself, through
        ``studies/{study}/first-image``, beside its script and style, so that image needs no
        request of the script's before it. When the request carries the session (a
        navigation from the viewer's own site, the portal's login at B), the page's data
        comes with it too (a JSON data block); otherwise (a launch from another site: the
        SameSite=Strict cookie does not travel on that navigation) the script asks for it
        with one request, ``/initial``, while the image loads.

        Without a session the page still loads and holds nothing of any study; what it asks
        for next is refused and audited.
        """
        rid = request_id_of(request.headers)
        grant: ViewerGrant | None = None
        initial: dict[str, Any] = {}
        with contextlib.suppress(ViewerRefused, ArchiveError):
            grant = await self.authorise(request)
            initial = await self.initial(grant, request)
        asked = request.query_params.get("study", "")
        study = asked if is_uid(asked) else initial.get("study")
        language = _language(request, grant)
        if not initial:
            initial = {"labels": i18n.labels(language)}  # words for a refusal, nothing more
        html = await asyncio.to_thread(
            viewer_page,
            self.asset_version,
            language=language,
            initial=initial,
            first_image=f"studies/{study}/first-image" if study else None,
        )
        return Response(
            html,
            media_type="text/html; charset=utf-8",
            headers={"X-Request-ID": rid, "Content-Language": language},
        )

    async def initial_data(self, request: Request) -> Response:
        """``GET /initial?study=UID``: the page's data, when the page came without it."""

        async def work(grant: ViewerGrant, rid: str) -> Response:
            data = await self.initial(grant, request)
            # Written off the event loop: a hundred images' lists is some 100 KB of JSON,
            # and the first image may be waiting for the loop meanwhile.
            body = await asyncio.to_thread(_json_bytes, data)
            return Response(body, media_type="application/json")

        return await self.guarded(request, work)

    async def initial(self, grant: ViewerGrant, request: Request) -> dict[str, Any]:
        """What the page needs to start: the session's context, the study it opens (the one
        asked for when the session covers it, else the most recent), that study's series,
        the first series' images, and ``first``: the URL of its first frame as the script
        asks for it (the page's ``first-image`` is the same frame).

        Only the study the page opens is waited for: with several studies and one chosen
        (``?study=``, as a launch sends), the others' headers are read in the background and
        the page asks for the whole list once its first image is shown (``complete`` false).
        """
        granted = sorted(grant.studies)
        asked = request.query_params.get("study", "")
        chosen = asked if is_uid(asked) and grant.covers(asked) else None
        if chosen is None and len(granted) == 1:
            chosen = granted[0]
        images = await self.service.study(chosen) if chosen is not None else None
        if images is None:
            studies = await self.study_list(grant)
            complete = True
            chosen = _first(studies[0], "0020000D") if studies else None
            images = await self.service.study(chosen) if chosen else None
        else:
            studies = [study_json(images)]
            complete = len(granted) == 1
            self.service.warm([s for s in granted if s != chosen])
        out: dict[str, Any] = {
            "context": self.context_of(grant),
            "studies": studies,
            "complete": complete,
            "study": chosen,
        }
        if images is None or not images.images:
            return out
        opening = images.series_uids()[0]
        members = images.of_series(opening)
        # The first frame starts decoding now, before the browser asks for it.
        self.service.read_ahead(images, members[0], 0, this_one=True)
        series, instances = await asyncio.to_thread(_lists, images, members)
        out.update(
            series=series,
            seriesUid=opening,
            instances=instances,
            first=_first_frame_url(members[0]),
        )
        return out

    async def first_image(self, request: Request, study: str) -> Response:
        """``GET /studies/{study}/first-image``: the frame the viewer opens a study on (the
        first frame of its first series) as the page's script would ask for it, JPEG of
        quality 90 in the image's own window: what the page's HTML shows first."""

        async def work(grant: ViewerGrant, rid: str) -> Response:
            _no_params(request)
            images = await self.images_of(grant, study)
            image = images.of_series(images.series_uids()[0])[0]
            center = _number(image.header.get("WindowCenter"))
            width = _number(image.header.get("WindowWidth"))
            window = None
            if center is not None and width is not None and width >= 1:
                window = Window(center, width, _voi_function(image))
            await self.audit.viewed(rid, grant, study, frames=1, instances=(image.sop,))
            shown = await self.service.render(
                image,
                0,
                media_type="image/jpeg",
                window=window,
                quality=90,
                study=images,
                language=i18n.language_of(grant.locale),
            )
            return _answer([shown], "image/jpeg", single=True)

        return await self.guarded(request, work, study=study)

    async def logout(self, request: Request) -> Response:
        """``POST /logout``: the session ends now (the composition's ``end_session``: the
        row closed, the end audited once), its viewing counted, its cookie cleared."""

        async def work(grant: ViewerGrant, rid: str) -> Response:
            if self.end_session is None:  # pragma: no cover - the route exists only with it
                raise ViewerRefused(404, "no such viewer resource")
            if not _same_origin(request):
                raise ViewerRefused(403, "ending a session must come from the viewer's own page")
            headers = await self.end_session(request, grant, rid)
            return Response(status_code=204, headers=dict(headers))

        return await self.guarded(request, work)

    async def series(self, request: Request, study: str) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            _no_params(request)
            images = await self.images_of(grant, study)
            return JSONResponse(series_json(images), media_type=DICOM_JSON)

        return await self.guarded(request, work, study=study)

    async def instances(self, request: Request, study: str, series: str) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            _no_params(request)
            images = await self.images_of(grant, study)
            members = _series(images, series)
            # A series being opened: its first frames start decoding before they are asked for.
            self.service.read_ahead(images, members[0], 0, this_one=True)
            listed = await asyncio.to_thread(_instances_json, members)
            return Response(listed, media_type=DICOM_JSON)

        return await self.guarded(request, work, study=study)

    async def rendered(
        self,
        request: Request,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        frames: str | None = None,
        *,
        thumbnail: bool = False,
    ) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            allowed = _THUMBNAIL_PARAMS if thumbnail else _RENDERED_PARAMS
            params = _single_params(request, allowed)
            try:
                media = choose_media_type(params.get("accept") or request.headers.get("accept"))
                window = parse_window(params["window"]) if "window" in params else None
                viewport = parse_viewport(params["viewport"]) if "viewport" in params else None
                quality = parse_quality(params["quality"]) if "quality" in params else None
            except NotAcceptable as exc:
                raise ViewerRefused(406, exc.template, params=exc.params) from None
            except BadParameter as exc:
                raise ViewerRefused(400, exc.template, params=exc.params) from None
            images = await self.images_of(grant, study)
            targets = _targets(images, series, sop, frames, thumbnail=thumbnail)
            if len(targets) > self.settings.max_parts:
                raise ViewerRefused(
                    413,
                    "{count} images asked for at once; at most {limit}: ask per instance or "
                    "per frame",
                    params={"count": len(targets), "limit": self.settings.max_parts},
                )
            if thumbnail:
                viewport = viewport or THUMBNAIL
            # The view is audited before any image leaves (AuditError: nothing is sent).
            await self.audit.viewed(
                rid,
                grant,
                study,
                frames=0 if thumbnail else len(targets),
                thumbnails=len(targets) if thumbnail else 0,
                instances=tuple({image.sop for image, _ in targets}),
            )
            # One frame asked for: its series is read ahead from there (a page scrolling).
            ahead = images if len(targets) == 1 and not thumbnail else None
            try:
                shown = [
                    await self.service.render(
                        image,
                        index,
                        media_type=media,
                        window=window,
                        viewport=viewport,
                        quality=quality,
                        study=ahead,
                        language=i18n.language_of(grant.locale),
                    )
                    for image, index in targets
                ]
            except BadParameter as exc:  # a viewport region outside this image
                raise ViewerRefused(400, exc.template, params=exc.params) from None
            # One image for a thumbnail, a frame, or a single-frame instance; study, series,
            # multi-frame and frame-list answers are multipart (PS3.18 8.7.4).
            single = len(targets) == 1 and (thumbnail or sop is not None)
            return _answer(shown, media, single=single)

        return await self.guarded(request, work, study=study)


def _answer(shown: list[Rendered], media: str, *, single: bool) -> Response:
    reasons = [r.placeholder for r in shown if r.placeholder]
    headers: dict[str, str] = {}
    if reasons:
        text = _header_text(f"image cannot be displayed: {reasons[0]}")
        headers["Warning"] = f'299 ncp "{text}"'
    if single and len(shown) == 1:
        return Response(shown[0].body, media_type=media, headers=headers)
    boundary = uuid.uuid4().hex
    body = bytearray()
    for part in shown:
        body += f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode("ascii")
        body += part.body + b"\r\n"
    body += f"--{boundary}--\r\n".encode("ascii")
    return Response(
        bytes(body),
        media_type=f'multipart/related; type="{media}"; boundary={boundary}',
        headers=headers,
    )


def _targets(
    images: StudyImages,
    series: str | None,
    sop: str | None,
    frames: str | None,
    *,
    thumbnail: bool,
) -> list[tuple[ImageRef, int]]:
    """(image, 0-based frame) pairs a rendered or thumbnail resource names."""
    members = _series(images, series) if series is not None else list(images.images)
    if sop is None:
        if thumbnail:
            chosen = representative(images, series)
            if chosen is None:
                raise ViewerRefused(404, "no image to make a thumbnail of")
            return [chosen]
        return [(image, 0) for image in members]
    if not is_uid(sop):
        raise ViewerRefused(400, "a path segment that should be a UID is not one")
    image = next((i for i in members if i.sop == sop), None)
    if image is None:
        raise ViewerRefused(404, "no such image in the series")
    if frames is None:
        if thumbnail:
            return [(image, image.frames // 2)]
        return [(image, n) for n in range(image.frames)]
    numbers = frames.split(",")
    if len(numbers) > 1000 or not all(re.fullmatch(r"[1-9][0-9]{0,8}", n) for n in numbers):
        raise ViewerRefused(400, "frame numbers must be positive whole numbers")
    chosen_frames = [int(n) for n in numbers]
    if any(n > image.frames for n in chosen_frames):
        raise ViewerRefused(404, "the image has {frames} frame(s)", params={"frames": image.frames})
    if thumbnail:
        chosen_frames = chosen_frames[:1]
    return [(image, n - 1) for n in chosen_frames]


def _series(images: StudyImages, series: str) -> list[ImageRef]:
    if not is_uid(series):
        raise ViewerRefused(400, "a path segment that should be a UID is not one")
    members = images.of_series(series)
    if not members:
        raise ViewerRefused(404, "no such series in the study")
    return members


def _single_params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise _unsupported(name)
        if name in out:
            raise ViewerRefused(
                400, "query parameter {name} is given twice", params={"name": repr(name[:40])}
            )
        out[name] = value
    return out


def _unsupported(name: str) -> ViewerRefused:
    return ViewerRefused(
        400, "query parameter {name} is not supported here", params={"name": repr(name[:40])}
    )


def _no_params(request: Request) -> None:
    for name, _ in request.query_params.multi_items():
        if name not in _QIDO_IGNORED:
            raise _unsupported(name)


def _qido_filters(request: Request) -> dict[str, str]:
    filters: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in _QIDO_IGNORED:
            continue
        tag = _QIDO_FILTERS.get(name)
        if tag is None:
            raise _unsupported(name)
        filters[tag] = value
    return filters


def _matches(item: dict[str, Any], tag: str, wanted: str) -> bool:
    """Exact matching only: a caller's value never widens an answer (no wildcards)."""
    values = item.get(tag, {}).get("Value", [])
    return wanted in [str(v) for v in values]


def _first(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def _text(status: int, message: str, rid: str, language: str = "en") -> Response:
    return Response(
        message + "\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={"X-Request-ID": rid, "Content-Language": language},
    )


def _audit_failed(rid: str, language: str) -> Response:
    reason = "the audit record could not be written"
    return _text(500, i18n.reason_in(reason, language), rid, language)


def _language(request: Request, grant: ViewerGrant | None) -> str:
    """The language to answer a person in: their grant's (the launch's ``locale``), else their
    browser's."""
    if grant is not None:
        return i18n.language_of(grant.locale)
    return i18n.from_accept_language(request.headers.get("accept-language"))


def _header_text(text: str) -> str:
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:300]


def _lists(
    images: StudyImages, members: list[ImageRef]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return series_json(images), [instance_json(i) for i in members]


def _instances_json(members: list[ImageRef]) -> bytes:
    return _json_bytes([instance_json(i) for i in members])


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _first_frame_url(image: ImageRef) -> str:
    """The URL of the first frame of ``image`` as the page's script asks for it while
    scrolling: JPEG of quality 90 in the image's own first window (when it has one)."""
    query = "accept=image%2Fjpeg"
    center = _number(image.header.get("WindowCenter"))
    width = _number(image.header.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        function = _voi_function(image).lower().replace("_", "-")
        query += f"&window={_short(center)},{_short(width)},{function}"
    query += "&quality=90"
    return (
        f"studies/{image.study}/series/{image.series}/instances/{image.sop}/frames/1/rendered"
        f"?{query}"
    )


def _voi_function(image: ImageRef) -> str:
    """The image's VOI LUT Function; an unknown one is read as LINEAR (C.11.2.1.3)."""
    function = str(image.header.get("VOILUTFunction") or "LINEAR").strip().upper()
    return function if function in FUNCTIONS else "LINEAR"


def _number(value: Any) -> float | None:
    """The first value of a DS element as a finite number."""
    first = value[0] if isinstance(value, MultiValue | list | tuple) and value else value
    try:
        number = float(first)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _short(x: float) -> str:
    """A number as the page's script writes it (at most two decimals, no trailing zeros)."""
    text = f"{round(x, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _same_origin(request: Request) -> bool:
    """Whether a request that changes something comes from the viewer's own page: the
    browser's ``Sec-Fetch-Site`` and ``Origin`` must say so when sent (the SameSite=Strict
    cookie already keeps other sites' requests out; this is the second lock)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def _instant(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _asset(name: str) -> bytes:
    return resources.files("ncp.viewer").joinpath("static", name).read_bytes()


_ALL_MODALITIES = (
    "CR",
    "CT",
    "DX",
    "ES",
    "IO",
    "MG",
    "MR",
    "NM",
    "OT",
    "PR",
    "PT",
    "PX",
    "RF",
    "RG",
    "SEG",
    "SR",
    "US",
    "XA",
    "KO",
    "RTSTRUCT",
    "OPT",
)
_ALL_BODY_PARTS = (
    "ABDOMEN",
    "ANKLE",
    "BRAIN",
    "BREAST",
    "CHEST",
    "CSPINE",
    "ELBOW",
    "EXTREMITY",
    "FOOT",
    "HAND",
    "HEAD",
    "HEART",
    "HIP",
    "KNEE",
    "LSPINE",
    "NECK",
    "PELVIS",
    "SHOULDER",
    "SKULL",
    "TSPINE",
    "WHOLEBODY",
    "WRIST",
    "ABDOMENPELVIS",
    "CHESTABDOMEN",
    "LEG",
    "ARM",
    "SPINE",
    "HEADNECK",
    "JAW",
)


def build_viewer_app(
    *,
    service: RenderService,
    authorise: Authorise,
    audit: ViewAudit,
    settings: ViewerSection | None = None,
    base_path: str = "",
    extra_routes: Sequence[tuple[str, Callable[[Request], Awaitable[Response]]]] = (),
    on_tick: Callable[[], Awaitable[None]] | None = None,
    title: str = "ncp viewer",
    end_session: EndSession | None = None,
) -> FastAPI:
    """The viewer app (see the module doc).

    ``base_path``: where its routes live (``/viewer`` for ``https://host/viewer``; empty when
    the portal mounts the app). ``extra_routes``: (path below the base, handler), e.g. A's
    ``/launch``. ``on_tick``: run every few seconds beside the audit flush (A's session sweep).
    ``end_session``: what ``POST /logout`` does (A: close the session row, audit its end);
    without it the page offers no logout (B: the portal's own logout ends the viewing).
    The service is closed and pending view counts are written when the app stops.
    """
    base = base_path.rstrip("/")
    if base and not base.startswith("/"):
        raise ValueError(f"base_path must start with '/': {base_path!r}")
    viewer = ViewerApp(
        service=service,
        authorise=authorise,
        audit=audit,
        settings=settings or ViewerSection(),
        end_session=end_session,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def tick() -> None:
            while True:
                await asyncio.sleep(_TICK_S)
                try:
                    await audit.flush()
                    if on_tick is not None:
                        await on_tick()
                except Exception:  # the next tick tries again; the server keeps serving
                    log.exception("viewer housekeeping failed")

        task = asyncio.create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await audit.flush(everything=True)
            await service.aclose()

    app = FastAPI(title=title, openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.viewer = viewer

    async def to_page(request: Request) -> Response:
        return RedirectResponse(f"{base}/", status_code=308)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in viewer.static:
            return await viewer.refuse(request, ViewerRefused(404, "no such file"), page=False)
        # The page names its files with their version (?v=): such a URL never changes, so the
        # browser keeps it and a later launch needs no request for it at all.
        versioned = request.query_params.get("v") == viewer.asset_version
        cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
        return Response(
            viewer.static[name], media_type=STATIC[name], headers={"Cache-Control": cache}
        )

    def rendered(level: str, thumbnail: bool) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            p = request.path_params
            return await viewer.rendered(
                request,
                p["study"],
                p.get("series"),
                p.get("sop"),
                p.get("frames"),
                thumbnail=thumbnail,
            )

        handler.__name__ = f"{level}_{'thumbnail' if thumbnail else 'rendered'}"
        return handler

    async def series_list(request: Request) -> Response:
        return await viewer.series(request, request.path_params["study"])

    async def first_image(request: Request) -> Response:
        return await viewer.first_image(request, request.path_params["study"])

    async def instance_list(request: Request) -> Response:
        p = request.path_params
        return await viewer.instances(request, p["study"], p["series"])

    async def not_found(request: Request) -> Response:
        refusal = ViewerRefused(404, "no such viewer resource")
        return await viewer.refuse(request, refusal, page=False)

    levels = {
        "study": "/studies/{study}",
        "series": "/studies/{study}/series/{series}",
        "instance": "/studies/{study}/series/{series}/instances/{sop}",
        "frames": "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    }
    routes: list[tuple[str, Callable[[Request], Awaitable[Response]]]] = [
        ("/", viewer.page),
        ("/static/{name}", static),
        ("/context", viewer.context),
        ("/initial", viewer.initial_data),
        ("/studies", viewer.studies),
        ("/studies/{study}/series", series_list),
        ("/studies/{study}/first-image", first_image),
        ("/studies/{study}/series/{series}/instances", instance_list),
    ]
    for level, prefix in levels.items():
        routes.append((f"{prefix}/rendered", rendered(level, False)))
        routes.append((f"{prefix}/thumbnail", rendered(level, True)))
    routes.extend(extra_routes)
    for path, handler in routes:
        app.router.add_route(base + path, handler, methods=["GET"], include_in_schema=False)
    if end_session is not None:
        app.router.add_route(
            base + "/logout", viewer.logout, methods=["POST"], include_in_schema=False
        )
    if base:
        app.router.add_route(base, to_page, methods=["GET"], include_in_schema=False)
    app.router.add_route(
        f"{base}/{{rest:path}}", not_found, methods=["GET"], include_in_schema=False
    )
    return _wrap(app, viewer)


def _wrap(app: FastAPI, viewer: ViewerApp) -> FastAPI:
    app.add_middleware(_Guard, viewer=viewer)
    return app


__all__ = ["STATIC", "ViewerApp", "Viewport", "build_viewer_app"]
