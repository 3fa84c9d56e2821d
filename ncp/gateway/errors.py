"""The answers a gateway gives instead of images: each refusal or failure is a type with its
HTTP status, so routes raise and one handler (``app.py``) writes the answer.

DICOMweb (PS3.18 8.6) answers errors with a status code and a ``Warning`` header; the bearer
token errors add ``WWW-Authenticate`` as RFC 6750 3 says.
"""

from __future__ import annotations

from collections.abc import Mapping

from ncp.errors import NcpError


class GatewayError(NcpError):
    """A request the gateway answers with ``status`` and a short text (never patient data)."""

    status = 500

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        jti: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.jti = jti
        """The token's id, once its signature verified (for the audit record)."""


class BadRequest(GatewayError):
    """A parameter or path the gateway does not accept (400)."""

    status = 400


class Unauthorized(GatewayError):
    """No token, or a token that is not valid here (401 with ``WWW-Authenticate``)."""

    status = 401


class Forbidden(GatewayError):
    """A valid token that does not cover what was asked (403)."""

    status = 403


class NotFound(GatewayError):
    """Nothing of that name in a study the token covers (404)."""

    status = 404


class MethodNotAllowed(GatewayError):
    """A method other than GET or HEAD (405 with ``Allow``)."""

    status = 405

    def __init__(self, message: str, *, jti: str | None = None) -> None:
        super().__init__(message, headers={"Allow": "GET, HEAD"}, jti=jti)


class NotAcceptable(GatewayError):
    """No representation the caller accepts can be served (406)."""

    status = 406


class BadArchiveAnswer(GatewayError):
    """The archive answered something that is not what was asked (502)."""

    status = 502


class Unavailable(GatewayError):
    """The gateway is full or the archive is down or slow: try again later (503)."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class StreamBroken(NcpError):
    """The archive failed after the answer had started: the transfer is aborted without its
    closing boundary, so the client sees an incomplete body, never a shorter study."""
