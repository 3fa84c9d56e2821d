"""What the portal lends the pieces it mounts: the logged-in HP and their confirmation.

- The jobs' JSON API (``ncp.consumer.jobs_api``) at ``/api/retrieval``: ``current_hp`` is the
  portal session's HP (401 without one), and a request that changes something (any method but
  GET and HEAD) must carry the session's CSRF token in ``X-CSRF-Token`` (the pages' script sends
  it; the session cookie is ``SameSite=Strict`` as well, a second line). ``confirmation`` is the
  pair the session holds for that patient at that peer, when it has not expired: the signed
  pair never comes from the browser.
- B's local viewer at ``/viewer``: the session's HP, language and end, for its grant
  (``ncp.portal.localviewer``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException

from ncp.consumer import jobs_api
from ncp.consumer.jobs import Requester
from ncp.consumer.model import PeerContext
from ncp.portal.app import Portal
from ncp.portal.sessions import csrf_ok
from ncp.security.claims import PatientRef

SAFE_METHODS = frozenset({"GET", "HEAD"})


def jobs_router(portal: Portal) -> APIRouter:
    def current_hp(request: Request) -> Requester:
        view = portal.session(request)
        if view is None or view.hp is None:
            raise HTTPException(401, "log in to the portal first")
        if request.method not in SAFE_METHODS and not csrf_ok(
            view, request.headers.get("x-csrf-token")
        ):
            raise HTTPException(403, "the request's CSRF token is missing or not this session's")
        return portal.requester(view)

    def confirmation(
        request: Request, hp: Requester, peer: str, patient: PatientRef
    ) -> PeerContext | None:
        view = portal.session(request)
        if view is None:
            return None
        confirmed = portal.patients.for_patient(view, peer, patient)
        if confirmed is None or confirmed.expired(portal.clock()):
            return None
        return confirmed.context

    return jobs_api.router(portal.jobs, current_hp, confirmation)


def viewer_login(
    portal: Portal,
) -> Callable[[Request], tuple[str, Requester, str, datetime] | None]:
    def login(request: Request) -> tuple[str, Requester, str, datetime] | None:
        view = portal.session(request)
        if view is None or view.hp is None:
            return None
        return view.id_hash, portal.requester(view), view.hp.language, view.expires

    return login


__all__ = ["jobs_router", "viewer_login"]
