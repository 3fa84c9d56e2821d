"""Response headers every answer of the portal carries, and the request's correlation id.

- ``Content-Security-Policy``: scripts, styles, images, fonts and connections from the portal
  itself only; no inline script or style (nothing in the templates needs one, so an injected
  ``<script>`` or ``style`` attribute would not run); no plugins, no ``<base>``; forms post to
  the portal only; ``frame-ancestors 'none'`` (and ``X-Frame-Options: DENY`` for older
  browsers) so no other site can frame the portal and click through it.
- ``Cache-Control: no-store`` on pages: they carry patient data, which a shared computer's
  browser cache must not keep (static files are cached).
- ``Referrer-Policy: no-referrer``, ``X-Content-Type-Options: nosniff``, HSTS, a
  ``Permissions-Policy`` that turns off what the portal never uses, and COOP.

The correlation id of each request is a fresh UUID (a browser's ``X-Request-ID`` is not taken:
it is no peer node), kept where ``ncp.fhir.http.request_id`` finds it and echoed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC_PREFIX = "/static/"
VIEWER_PREFIX = "/viewer"
"""The local viewer mounted in the portal sets its own policy (it draws images from blobs);
below it, the portal's headers only fill in what the viewer did not set."""


class SecurityHeaders:
    """ASGI middleware: sets :data:`HEADERS` (and ``Cache-Control``) on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = rid
        path = str(scope.get("path", ""))
        static = path.startswith(STATIC_PREFIX)
        viewer = path == VIEWER_PREFIX or path.startswith(VIEWER_PREFIX + "/")
        await self.app(scope, receive, _with_headers(send, rid, static, viewer))


def _with_headers(send: Send, rid: str, static: bool, viewer: bool) -> Callable[[Message], Any]:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in HEADERS.items():
                if not viewer or name not in headers:
                    headers[name] = value
            headers["X-Request-ID"] = rid
            if not viewer or "cache-control" not in headers:
                headers["Cache-Control"] = "private, max-age=3600" if static else "no-store"
        await send(message)

    return sender


__all__ = ["CSP", "HEADERS", "SecurityHeaders"]
