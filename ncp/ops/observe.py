"""What every listener of a node does around each request: its correlation id in the log's
context, its latency in the metrics by route template, and one log line for it.

:class:`ObservedApp` wraps a listener's ASGI app (``ncp serve`` wraps each role's app). It never
records a raw path or query: the route is the template the request matched
(``/fhir/DocumentReference``, ``/fhir/Bundle/{id}/_history``); below a catch-all route
(``{rest:path}``, the gateways) the rest is reduced to its shape (``studies/{study}/series/
{series}``), whatever the request carried; a request that matched nothing is ``<unmatched>``.

The request id is the caller's ``X-Request-ID`` when well formed; without one a new id is made
and handed to the app as if the caller had sent it, so the log, the answer's header and the
audit records all carry the same id. A malformed one is left for the app to refuse (400) and is
never logged.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncp.ops.logs import REQUEST_ID
from ncp.ops.metrics import Metrics

log = logging.getLogger("ncp.requests")

UNMATCHED = "<unmatched>"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_HEADER = b"x-request-id"
_CATCH_ALL = re.compile(r"\{(\w+):path\}$")
_WORDS = frozenset(
    {
        "studies",
        "series",
        "instances",
        "metadata",
        "frames",
        "bulk",
        "rendered",
        "thumbnail",
        "openapi.json",
    }
)
_PLACEHOLDER = {"studies": "{study}", "series": "{series}", "instances": "{instance}"}
_MAX_SEGMENTS = 12

RouteLabel = Callable[[Scope], str]


def shape(rest: str) -> str:
    """A path below a catch-all route reduced to its shape: the words of DICOMweb resources
    kept, every other segment replaced by a placeholder (no value of the request survives)."""
    segments = [segment for segment in rest.split("/") if segment]
    if len(segments) > _MAX_SEGMENTS:
        return "{other}"
    out: list[str] = []
    expect: str | None = None
    for segment in segments:
        if expect is not None:
            out.append(expect)  # the value after "studies", "series", "instances", "frames"
            expect = None
        elif segment == "bulk":
            out.append("bulk/{path}")  # tags and item numbers: one placeholder for them all
            break
        elif segment in _PLACEHOLDER:
            out.append(segment)
            expect = _PLACEHOLDER[segment]
        elif segment == "frames":
            out.append(segment)
            expect = "{frames}"
        else:
            out.append(segment if segment in _WORDS else "{other}")
    return "/".join(out)


def route_of(app: Any, scope: Scope) -> str:
    """The template of the route ``scope`` matched in ``app``: the one the router recorded
    (FastAPI), else the first route of ``app`` that matches fully; :data:`UNMATCHED` if none."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        template = None
        routes = getattr(getattr(app, "router", None), "routes", None) or []
        for candidate in routes:
            try:
                match, _ = candidate.matches(scope)
            except Exception:  # a route that cannot judge this scope does not match it
                continue
            if match is Match.FULL:
                template = getattr(candidate, "path", None)
                break
        if not isinstance(template, str):
            return UNMATCHED
    catch_all = _CATCH_ALL.search(template)
    if catch_all is not None:
        prefix = template[: catch_all.start()]
        rest = str(scope.get("path_params", {}).get(catch_all.group(1), ""))
        if not rest and scope.get("path", "").startswith(prefix):
            rest = scope["path"][len(prefix) :]
        template = prefix + shape(rest)
    return template


class ObservedApp:
    """An ASGI app observed: request id, latency by route template, one log line per request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        listener: str,
        metrics: Metrics | None,
        route_label: RouteLabel | None = None,
    ) -> None:
        self.app = app
        self.listener = listener
        self.metrics = metrics
        self.route_label = route_label or (lambda scope: route_of(app, scope))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _given_id(scope)
        if given is None:
            rid = str(uuid.uuid4())
            # Handed on as the caller's: the app, its audit records and the answer use it too.
            scope = {**scope, "headers": [*scope.get("headers", []), (_HEADER, rid.encode())]}
        elif _REQUEST_ID.match(given):
            rid = given
        else:
            rid = str(uuid.uuid4())  # the app refuses the malformed one; the log never shows it
            scope = {**scope}
        token = REQUEST_ID.set(rid)
        started = time.perf_counter()
        status = 0
        in_flight = self.metrics.in_flight.labels(self.listener) if self.metrics else None
        if in_flight is not None:
            in_flight.inc()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            elapsed = time.perf_counter() - started
            route = self.route_label(scope)
            method = str(scope.get("method", ""))
            if in_flight is not None:
                in_flight.dec()
            if self.metrics is not None:
                self.metrics.request_seconds.labels(
                    self.listener, method, route, str(status or 500)
                ).observe(elapsed)
            log.info(
                "%s %s %s %d %.1f ms",
                self.listener,
                method,
                route,
                status,
                elapsed * 1000,
                extra={
                    "listener": self.listener,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
            REQUEST_ID.reset(token)


def _given_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == _HEADER:
            return str(value.decode("latin-1"))
    return None
