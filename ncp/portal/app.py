"""The portal's FastAPI application: ``build_portal_app(node)``.

Pages are rendered on the server from Jinja2 templates (``templates/``, autoescaped) with a
little JavaScript from ``static/``; nothing is fetched from elsewhere. Routes (docs/portal.md):

| route | what |
| --- | --- |
| ``GET /login``, ``POST /login`` | user name and password (first factor) |
| ``GET /login/totp``, ``POST /login/totp`` | the TOTP code (second factor) |
| ``GET /login/oidc``, ``GET /login/oidc/callback`` | the national identity provider |
| ``POST /logout`` | ends the session |
| ``GET /`` | start page: identify a patient; the patients confirmed in this session |
| ``POST /identify`` | ``$match`` at A: certain, candidates, no match (``ncp.portal.usecase``) |
| ``POST /confirm``, ``GET /patients/{key}/confirm`` | B signs the TRC; confirm again |
| ``GET /patients/{key}/list`` | the list of a confirmed patient |
| ``GET /patients/{key}/reports/{id}`` | a report with its versions |
| ``GET /patients/{key}/thumbnails/{uid}`` | a study's thumbnail from A's viewer (option B) |
| ``POST /retrieve``, ``POST /view`` | jobs (options A, C); A's viewer (option B) |
| ``GET /jobs``, ``GET /jobs/{id}``, ``POST /jobs/{id}/cancel``, ``.../confirm`` | the HP's jobs |
| ``GET /audit`` | the HP's own requests from B's audit chain |
| ``GET /account`` | the HP's session: who, how authenticated, until when |
| ``/api/retrieval/...`` | the jobs' JSON API (``ncp.consumer.jobs_api``) for the HP's jobs |
| ``/viewer/...`` | B's local viewer over its store, the HP's stored studies only |
| ``GET /static/...`` | CSS, JavaScript, icons (package data) |

Every 4xx and 5xx is a readable page in the HP's language (never a stack trace; JSON below
``/api/``); every answer carries the headers of :mod:`ncp.portal.security`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from ncp import __version__
from ncp.audit.models import Action, Outcome
from ncp.config import PortalSection
from ncp.consumer.jobs import Jobs, Requester
from ncp.fhir.http import request_id
from ncp.node import Node
from ncp.portal import auditing
from ncp.portal.i18n import Translator, from_accept_language, translator_for
from ncp.portal.lockout import Lockout
from ncp.portal.oidc import OidcClient
from ncp.portal.patients import SessionPatients
from ncp.portal.peering import PortalPeers
from ncp.portal.security import SecurityHeaders
from ncp.portal.sessions import PortalSessionView, SessionStore
from ncp.portal.thumbnails import Thumbnails

log = logging.getLogger(__name__)

SESSION_COOKIE = "__Host-ncp-session"
"""The authenticated session: ``SameSite=Strict``. B signs requests to other countries in the
HP's name from it, and some GETs (the list) make B ask A: no request started on another site,
not even a link, may carry it. ``__Host-``: Secure, Path=/, no Domain, or the browser refuses."""
LOGIN_COOKIE = "__Host-ncp-login"
"""A login under way (password, then code; or the identity provider's round trip):
``SameSite=Lax``, because the provider sends the browser back by a cross-site redirect, which
must carry it. It authorises nothing but the next login step."""


class ListSource(Protocol):
    """A list page's view model from elsewhere than A (tests and the benchmark of the page's
    script give generated lists); by default the list is the peer client's for the patient of
    the HP's confirmation."""

    def __call__(
        self, session: PortalSessionView, key: str, t: Translator
    ) -> Mapping[str, Any] | None:
        """The view model (``ncp.portal.listview.build_list``), or None when ``key`` names no
        list this HP may see."""
        ...


class LoginRequired(Exception):
    """A page needs an authenticated HP; ``reason`` goes to the login page."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "login required")
        self.reason = reason


@dataclass
class Portal:
    """Everything the portal's routes share (``request.app.state.portal``)."""

    node: Node
    store: SessionStore
    lockout: Lockout
    templates: Environment
    oidc: OidcClient | None
    list_source: ListSource | None
    clock: Callable[[], datetime]
    peers: PortalPeers | None
    """B's peer client for the HP's questions; None when the node may ask no peer."""
    patients: SessionPatients
    jobs: Jobs
    thumbnails: Thumbnails | None

    @property
    def settings(self) -> PortalSection:
        return self.node.settings.portal

    @staticmethod
    def requester(view: PortalSessionView) -> Requester:
        """The HP as the retrieval jobs know them (their identifier in B is the user name, as
        in the HP assertion's ``sub``)."""
        assert view.hp is not None
        return Requester(view.hp.username, view.hp.name, "portal")

    def session(self, request: Request, cookie: str = SESSION_COOKIE) -> PortalSessionView | None:
        """The request's session from ``cookie``, loaded once per request. A refused cookie
        (forged, replayed after logout, idle, past its end) is audited and forgotten."""
        cache: dict[str, PortalSessionView | None] = request.state.__dict__.setdefault(
            "portal_sessions", {}
        )
        if cookie in cache:
            return cache[cookie]
        loaded = self.store.load(request.cookies.get(cookie))
        view = loaded.session
        if cookie == SESSION_COOKIE and view is not None and view.state != "active":
            view = None  # a login cookie's value in the session cookie authorises nothing
        if cookie == LOGIN_COOKIE and view is not None and view.state == "active":
            view = None
        if loaded.refusal is not None:
            request.state.session_refusal = loaded.refusal
            if loaded.refusal == "unknown":
                auditing.record(
                    self.node.auditor,
                    request,
                    Action.REFUSAL,
                    outcome=Outcome.SERIOUS_FAILURE,
                    reason="portal session cookie unknown (forged, or ended before)",
                    details={"cookie": cookie},
                )
            elif loaded.hp is not None:
                auditing.record(
                    self.node.auditor,
                    request,
                    Action.HP_LOGOUT,
                    reason=f"session ended: {loaded.refusal}",
                    hp=loaded.hp,
                )
        cache[cookie] = view
        return view

    def hp_session(self, request: Request) -> PortalSessionView:
        """The active session of an authenticated HP, or :class:`LoginRequired`."""
        view = self.session(request)
        if view is None or view.hp is None:
            raise LoginRequired(getattr(request.state, "session_refusal", None))
        return view

    def translator(self, request: Request, session: PortalSessionView | None = None) -> Translator:
        if session is not None:
            return translator_for(session.language)
        cached = request.state.__dict__.get("portal_sessions", {})
        for known in (cached.get(SESSION_COOKIE), cached.get(LOGIN_COOKIE)):
            if known is not None:
                return translator_for(known.language)
        return translator_for(
            from_accept_language(
                request.headers.get("accept-language"), self.settings.default_language
            )
        )

    def render(
        self,
        request: Request,
        name: str,
        *,
        session: PortalSessionView | None = None,
        status: int = 200,
        t: Translator | None = None,
        **context: Any,
    ) -> HTMLResponse:
        t = t or self.translator(request, session)
        template = self.templates.get_template(name)
        html = template.render(
            t=t,
            lang=t.language,
            session=session,
            hp=session.hp if session is not None else None,
            csrf=session.csrf_token if session is not None else "",
            node=self.node.settings.node,
            version=__version__,
            request_id=request_id(request),
            **context,
        )
        return HTMLResponse(html, status_code=status)


def portal_of(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("ncp.portal", "templates"),
        autoescape=select_autoescape(["html"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def static_dir() -> Path:
    return Path(str(resources.files("ncp.portal") / "static"))


def set_cookie(response: Response, name: str, token: str, *, max_age: int) -> None:
    response.set_cookie(
        name,
        token,
        max_age=max_age,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict" if name == SESSION_COOKIE else "lax",
    )


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(
        name,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict" if name == SESSION_COOKIE else "lax",
    )


def build_portal_app(
    node: Node,
    *,
    oidc: OidcClient | None = None,
    list_source: ListSource | None = None,
    clock: Callable[[], datetime] | None = None,
    peers: PortalPeers | None = None,
) -> FastAPI:
    """The portal of ``node`` (``[portal]`` of its settings). ``oidc`` defaults to a client of
    the configured provider (``portal.oidc``), if any; ``peers`` to the node's peer client when
    ``[consumer] peers`` names any. The retrieval jobs, the local viewer over the
    ``[retrieval] store`` and the jobs' JSON API are the node's own."""
    from ncp.portal import api, auditview, images, login, pages, usecase
    from ncp.portal.localviewer import PortalGrants, local_viewer
    from ncp.security.mtls import client_ssl_context

    settings = node.settings.portal
    now = clock or node.clock
    if oidc is None and settings.oidc is not None:
        oidc = OidcClient(settings.oidc, f"{settings.url}/login/oidc/callback")
    if peers is None and node.settings.consumer.peers:
        peers = PortalPeers.from_node(node, now)
    thumbnails = None
    if peers is not None:
        thumbnails = Thumbnails(
            peers,
            lambda peer: client_ssl_context(node.keystore, node.trust.peer(peer).tls_ca),
            session_lifetime_s=node.settings.viewer.session_lifetime_s,
            idle_s=settings.idle_timeout_s,
        )
    store = SessionStore(node.sessions, settings, now)
    portal = Portal(
        node=node,
        store=store,
        lockout=Lockout(node.sessions, settings, now),
        templates=templates(),
        oidc=oidc,
        list_source=list_source,
        clock=now,
        peers=peers,
        patients=SessionPatients(store),
        jobs=Jobs(node.sessions, node.auditor, clock=now),
        thumbnails=thumbnails,
    )
    viewer = local_viewer(node, PortalGrants(node.sessions, api.viewer_login(portal)))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A mounted app's own lifespan is not run by Starlette: the viewer's (its audit
        # flushes, its render threads) runs inside the portal's.
        async with viewer.router.lifespan_context(viewer):
            try:
                yield
            finally:
                if thumbnails is not None:
                    thumbnails.close()
                if peers is not None:
                    with contextlib.suppress(Exception):
                        peers.close()

    app = FastAPI(
        title="ncp portal",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.portal = portal
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    app.mount("/viewer", viewer, name="viewer")
    app.include_router(login.router())
    app.include_router(pages.router())
    app.include_router(usecase.router())
    app.include_router(images.router())
    app.include_router(auditview.router())
    app.include_router(api.jobs_router(portal), prefix="/api/retrieval")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    usecase.add_handlers(app)
    app.add_exception_handler(Exception, _unexpected)
    return app


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    target = "/login" + (f"?reason={exc.reason}" if exc.reason in ("idle", "expired") else "")
    response = RedirectResponse(target, status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        clear_cookie(response, SESSION_COOKIE)
    return response


def error_page(request: Request, status: int, headers: Mapping[str, str] | None = None) -> Response:
    portal = portal_of(request)
    try:
        cached = portal.session(request)  # the HP's language, also on a 404 of no route
    except Exception:  # an error page must not fail on the database that failed
        cached = None
    t = portal.translator(request, cached)
    key = (
        f"error.{status}"
        if f"error.{status}" in t.messages
        else ("error.500" if status >= 500 else "error.400")
    )
    response = portal.render(
        request,
        "error.html",
        session=cached,
        status=status,
        t=t,
        status_code=status,
        message=t(key),
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    allowed = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
    if is_api(request):
        code = {401: "login-required", 403: "forbidden", 404: "not-found"}.get(
            exc.status_code, "error"
        )
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=allowed,
        )
    return error_page(request, exc.status_code, allowed)


async def _invalid(request: Request, exc: Exception) -> Response:
    if is_api(request):
        assert isinstance(exc, RequestValidationError)
        fields = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid", "detail": fields}, status_code=422)
    return error_page(request, 400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("portal request %s failed: %s", request_id(request), type(exc).__name__, exc_info=exc)
    return error_page(request, 500)


__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "ListSource",
    "LoginRequired",
    "Portal",
    "build_portal_app",
    "error_page",
    "portal_of",
]
