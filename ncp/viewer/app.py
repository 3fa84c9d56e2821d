"""The viewer as an ASGI application: one factory for A's option B viewer and B's local viewer.

:func:`build_viewer_app` takes a :class:`~ncp.viewer.render_service.RenderService` (a frame
source: A's archive, or B's local store), an :data:`~ncp.viewer.access.Authorise` dependency
(A: the launch session; B: the portal's login) and a :class:`~ncp.viewer.auditing.ViewAudit`
(side ``viewer`` at A, ``consumer`` at B). Routes, below ``base_path``:

| route | answers |
| --- | --- |
| ``/`` | the viewer page (HTML shell; ``?study=UID`` opens that study first) |
| ``/static/viewer.js``, ``/static/viewer.css`` | the page's script and style (package data) |
| ``/context`` | the session as the page needs it: language, labels, coded displays, expiry |
| ``/studies`` | the session's studies, DICOM JSON (QIDO-RS study attributes) |
| ``/studies/{s}/series`` | its series, DICOM JSON |
| ``/studies/{s}/series/{r}/instances`` | a series' images with what a viewer shows (DICOM JSON) |
| ``/studies/{s}[/series/{r}[/instances/{i}[/frames/{n,...}]]]/rendered`` | PS3.18 rendered |
| ``/studies/{s}[/series/{r}[/instances/{i}[/frames/{n,...}]]]/thumbnail`` | PS3.18 thumbnail |

A's composition adds ``/launch`` (:mod:`ncp.viewer.launch`). Rendered resources take PS3.18's
``window`` (centre,width[,linear|linear-exact|sigmoid]), ``viewport`` (vw,vh[,sx,sy,sw,sh]),
``quality`` (1-100) and ``accept`` (or the Accept header): JPEG, PNG or WebP, one image, or
``multipart/related`` of images for several. Nothing here ever answers a DICOM object, bulk
data or pixel data in DICOM form (``tests/test_viewer_routes.py`` walks every route).

Every request: the path (UIDs only, no percent-encoding, no dot segments: 400), then the grant
(401 without a session, 403 for a study it does not cover), then the archive (404: not held);
each refusal audited. A frame that cannot be decoded is a placeholder image, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ncp.audit.record import AuditError
from ncp.config import ViewerSection
from ncp.dicom.uids import is_uid
from ncp.errors import ArchiveError
from ncp.viewer import i18n
from ncp.viewer.access import Authorise, ViewerGrant, ViewerRefused
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.dicomjson import instance_json, series_json, study_json
from ncp.viewer.frames import ImageRef, StudyImages
from ncp.viewer.pages import CSP, refused_page, viewer_page
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
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
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


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else str(uuid.uuid4())


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
    ) -> None:
        self.service = service
        self.authorise = authorise
        self.audit = audit
        self.settings = settings
        self.static = {name: _asset(name) for name in STATIC}
        digest = hashlib.sha256(b"".join(self.static.values())).hexdigest()[:12]
        self.page = viewer_page(digest).encode("utf-8")

    # -- refusals ------------------------------------------------------------------------------

    async def refuse(
        self, request: Request, refusal: ViewerRefused, *, page: bool, study: str | None = None
    ) -> Response:
        rid = _request_id(request)
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
            return _text(500, "the audit record could not be written", rid)
        if page:
            language = (
                i18n.language_of(refusal.grant.locale)
                if refusal.grant is not None
                else i18n.from_accept_language(request.headers.get("accept-language"))
            )
            html = refused_page(language, refusal.reason, status=refusal.status, request_id=rid)
            return Response(
                html,
                status_code=refusal.status,
                media_type="text/html; charset=utf-8",
                headers={"X-Request-ID": rid},
            )
        return _text(refusal.status, refusal.reason, rid)

    async def guarded(
        self,
        request: Request,
        work: Callable[[ViewerGrant, str], Awaitable[Response]],
        *,
        page: bool = False,
        study: str | None = None,
    ) -> Response:
        """Authorise, run ``work``, and turn every refusal into an audited answer."""
        rid = _request_id(request)
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
            return _text(500, "the audit record could not be written", rid)
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

    async def context(self, request: Request) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            terms = i18n.coded_displays(grant.locale, _ALL_MODALITIES, _ALL_BODY_PARTS)
            body = {
                "locale": grant.locale,
                "language": i18n.language_of(grant.locale),
                "labels": i18n.labels(grant.locale),
                "displays": terms,
                "presets": [{"key": key, "center": c, "width": w} for key, c, w in i18n.PRESETS],
                "studies": sorted(grant.studies),
                "expires": _instant(grant.expires_at),
                "subject": grant.subject_name or grant.subject,
            }
            return JSONResponse(body)

        return await self.guarded(request, work)

    async def studies(self, request: Request) -> Response:
        async def work(grant: ViewerGrant, rid: str) -> Response:
            filters = _qido_filters(request)
            found: list[dict[str, Any]] = []
            held = await asyncio.gather(*(self.service.study(s) for s in sorted(grant.studies)))
            for images in held:
                if images is None:
                    continue
                item = study_json(images)
                if all(_matches(item, tag, value) for tag, value in filters.items()):
                    found.append(item)
            found.sort(key=lambda i: _first(i, "00080020") + _first(i, "00080030"), reverse=True)
            return JSONResponse(found, media_type=DICOM_JSON)

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
            return JSONResponse([instance_json(i) for i in members], media_type=DICOM_JSON)

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
                raise ViewerRefused(406, str(exc)) from None
            except BadParameter as exc:
                raise ViewerRefused(400, str(exc)) from None
            images = await self.images_of(grant, study)
            targets = _targets(images, series, sop, frames, thumbnail=thumbnail)
            if len(targets) > self.settings.max_parts:
                raise ViewerRefused(
                    413,
                    f"{len(targets)} images asked for at once; at most "
                    f"{self.settings.max_parts}: ask per instance or per frame",
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
            shown = [
                await self.service.render(
                    image,
                    index,
                    media_type=media,
                    window=window,
                    viewport=viewport,
                    quality=quality,
                )
                for image, index in targets
            ]
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
        raise ViewerRefused(404, f"the image has {image.frames} frame(s)")
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
            raise ViewerRefused(400, f"query parameter {name[:40]!r} is not supported here")
        if name in out:
            raise ViewerRefused(400, f"query parameter {name!r} is given twice")
        out[name] = value
    return out


def _no_params(request: Request) -> None:
    for name, _ in request.query_params.multi_items():
        if name not in _QIDO_IGNORED:
            raise ViewerRefused(400, f"query parameter {name[:40]!r} is not supported here")


def _qido_filters(request: Request) -> dict[str, str]:
    filters: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in _QIDO_IGNORED:
            continue
        tag = _QIDO_FILTERS.get(name)
        if tag is None:
            raise ViewerRefused(400, f"query parameter {name[:40]!r} is not supported here")
        filters[tag] = value
    return filters


def _matches(item: dict[str, Any], tag: str, wanted: str) -> bool:
    """Exact matching only: a caller's value never widens an answer (no wildcards)."""
    values = item.get(tag, {}).get("Value", [])
    return wanted in [str(v) for v in values]


def _first(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def _text(status: int, message: str, rid: str) -> Response:
    return Response(
        message + "\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={"X-Request-ID": rid},
    )


def _header_text(text: str) -> str:
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:300]


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
) -> FastAPI:
    """The viewer app (see the module doc).

    ``base_path``: where its routes live (``/viewer`` for ``https://host/viewer``; empty when
    the portal mounts the app). ``extra_routes``: (path below the base, handler), e.g. A's
    ``/launch``. ``on_tick``: run every few seconds beside the audit flush (A's session sweep).
    The service is closed and pending view counts are written when the app stops.
    """
    base = base_path.rstrip("/")
    if base and not base.startswith("/"):
        raise ValueError(f"base_path must start with '/': {base_path!r}")
    viewer = ViewerApp(
        service=service, authorise=authorise, audit=audit, settings=settings or ViewerSection()
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

    async def page(request: Request) -> Response:
        return Response(viewer.page, media_type="text/html; charset=utf-8")

    async def to_page(request: Request) -> Response:
        return RedirectResponse(f"{base}/", status_code=308)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in viewer.static:
            return await viewer.refuse(request, ViewerRefused(404, "no such file"), page=False)
        return Response(
            viewer.static[name],
            media_type=STATIC[name],
            headers={"Cache-Control": "private, max-age=3600"},
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
        ("/", page),
        ("/static/{name}", static),
        ("/context", viewer.context),
        ("/studies", viewer.studies),
        ("/studies/{study}/series", series_list),
        ("/studies/{study}/series/{series}/instances", instance_list),
    ]
    for level, prefix in levels.items():
        routes.append((f"{prefix}/rendered", rendered(level, False)))
        routes.append((f"{prefix}/thumbnail", rendered(level, True)))
    routes.extend(extra_routes)
    for path, handler in routes:
        app.router.add_route(base + path, handler, methods=["GET"], include_in_schema=False)
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
