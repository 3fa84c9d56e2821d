"""The HP's pages that need no peer: the start page (identify a patient; the patients
confirmed in this session) and the session page."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ncp.fhir.datatypes import zone_of
from ncp.portal.app import portal_of
from ncp.portal.login import LOCAL_ACR


def router() -> APIRouter:
    api = APIRouter()
    api.add_api_route("/", home, methods=["GET"])
    api.add_api_route("/account", account, methods=["GET"])
    return api


def home(request: Request) -> Response:
    from ncp.portal.usecase import recent_patients

    portal = portal_of(request)
    view = portal.hp_session(request)
    t = portal.translator(request, view)
    peers = portal.peers.countries() if portal.peers is not None else []
    return portal.render(
        request,
        "home.html",
        session=view,
        peers=peers,
        asked=None,
        error=None,
        recent=recent_patients(portal, view, t),
    )


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
