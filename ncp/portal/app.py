"""The portal's FastAPI application: ``build_portal_app(node)``.

Pages are rendered on the server from Jinja2 templates (``templates/``, autoescaped) with a
little JavaScript from ``static/``; nothing is fetched from elsewhere. Routes (docs/portal.md):

| route | what |
| --- | --- |
| ``GET /login``, ``POST /login`` | user name and password (first factor) |
| ``GET /login/totp``, ``POST /login/totp`` | the TOTP code (second factor) |
| ``GET /login/oidc``, ``GET /login/oidc/callback`` | the national identity provider |
| ``POST /logout`` | ends the session |
| ``GET /`` | start page: identify a patient (form; its data path is phase 2) |
| ``POST /identify``, ``POST /confirm``, ``POST /retrieve`` | phase 2; answer 503 until wired |
| ``GET /account`` | the HP's session: who, how authenticated, until when |
| ``GET /patients/{key}/list`` | the list page of a patient (from the ``list_source``) |
| ``GET /static/...`` | CSS, JavaScript, icons (package data) |

Every 4xx and 5xx is a readable page in the HP's language (never a stack trace); every answer
carries the headers of :mod:`ncp.portal.security`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from ncp import __version__
from ncp.audit.models import Action, Outcome
from ncp.config import PortalSection
from ncp.fhir.http import request_id
from ncp.node import Node
from ncp.portal import auditing
from ncp.portal.i18n import Translator, from_accept_language, translator_for
from ncp.portal.lockout import Lockout
from ncp.portal.oidc import OidcClient
from ncp.portal.security import SecurityHeaders
from ncp.portal.sessions import Hp, PortalSessionView, SessionStore

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
    """Where the list page's view model comes from (phase 2: the peer client's list for the
    patient of the HP's confirmation); tests give generated lists."""

    def __call__(self, hp: Hp, key: str, t: Translator) -> Mapping[str, Any] | None:
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

    @property
    def settings(self) -> PortalSection:
        return self.node.settings.portal

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
) -> FastAPI:
    """The portal of ``node`` (``[portal]`` of its settings). ``oidc`` defaults to a client of
    the configured provider (``portal.oidc``), if any."""
    from ncp.portal import login, pages

    settings = node.settings.portal
    now = clock or node.clock
    if oidc is None and settings.oidc is not None:
        oidc = OidcClient(settings.oidc, f"{settings.url}/login/oidc/callback")
    app = FastAPI(
        title="ncp portal",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.portal = Portal(
        node=node,
        store=SessionStore(node.sessions, settings, now),
        lockout=Lockout(node.sessions, settings, now),
        templates=templates(),
        oidc=oidc,
        list_source=list_source,
        clock=now,
    )
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    app.include_router(login.router())
    app.include_router(pages.router())
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
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


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    allowed = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers else None
    return error_page(request, exc.status_code, allowed)


async def _invalid(request: Request, exc: Exception) -> Response:
    return error_page(request, 400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("portal request %s failed: %s", request_id(request), type(exc).__name__, exc_info=exc)
    return error_page(request, 500)


__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "ListSource", "Portal", "build_portal_app"]
