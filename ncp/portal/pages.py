"""The HP's pages after login: the start page (identify a patient), the session page, the list
page, and the forms of the use case whose data paths phase 2 wires (identify, confirm,
retrieve: until then they answer a readable 503)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ncp.fhir.datatypes import zone_of
from ncp.portal import listview
from ncp.portal.app import portal_of
from ncp.portal.login import LOCAL_ACR
from ncp.portal.sessions import PortalSessionView, csrf_ok

MAX_KEY = 128


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/", home, methods=["GET"])
    api.add_api_route("/account", account, methods=["GET"])
    api.add_api_route("/patients/{key}/list", list_page, methods=["GET"])
    api.add_api_route("/identify", identify, methods=["POST"])
    api.add_api_route("/confirm", confirm, methods=["POST"])
    api.add_api_route("/retrieve", retrieve, methods=["POST"])
    return api


def _form_session(request: Request, csrf_token: str) -> PortalSessionView:
    """The HP's session of a form, its CSRF token checked (403 otherwise)."""
    portal = portal_of(request)
    view = portal.hp_session(request)
    if not csrf_ok(view, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or not this session's")
    return view


def home(request: Request) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    peers = sorted(p.country for p in portal.node.trust.peers())
    return portal.render(request, "home.html", session=view, peers=peers)


def account(request: Request) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    t = portal.translator(request, view)
    acr = t("account.acr.local") if view.acr == LOCAL_ACR else (view.acr or "")
    return portal.render(
        request,
        "account.html",
        session=view,
        acr_display=acr,
        expires_display=t.datetime(view.expires.astimezone(zone_of(portal.node.country))),
        idle_minutes=portal.settings.idle_timeout_s // 60,
    )


def list_page(request: Request, key: str) -> Response:
    portal = portal_of(request)
    view = portal.hp_session(request)
    assert view.hp is not None
    if portal.list_source is None or len(key) > MAX_KEY:
        raise HTTPException(404)
    t = portal.translator(request, view)
    model = portal.list_source(view.hp, key, t)
    if model is None:
        raise HTTPException(404)
    messages = t.subset("list.") | t.subset("report.status.")
    return portal.render(
        request,
        "list.html",
        session=view,
        model=model,
        messages=messages,
        columns=listview.COLUMNS,
    )


def _unavailable(request: Request, view: PortalSessionView) -> Response:
    portal = portal_of(request)
    return portal.render(request, "unavailable.html", session=view, status=503)


def identify(request: Request, csrf_token: str = Form("", max_length=128)) -> Response:
    return _unavailable(request, _form_session(request, csrf_token))


def confirm(request: Request, csrf_token: str = Form("", max_length=128)) -> Response:
    return _unavailable(request, _form_session(request, csrf_token))


def retrieve(request: Request, csrf_token: str = Form("", max_length=128)) -> Response:
    return _unavailable(request, _form_session(request, csrf_token))
