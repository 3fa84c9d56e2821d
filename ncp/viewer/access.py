"""Who may view what: the one interface between the viewer and whoever lets people in.

The viewer app never decides who the viewer is. It calls an :data:`Authorise` dependency on
every request and serves only the studies of the :class:`ViewerGrant` it returns:

- at country A (option B), :class:`ncp.viewer.sessions.SessionAuth`: the session a one-time
  launch code was exchanged for (``ncp.viewer.launch``);
- at country B, the portal's login: the portal builds a grant for its logged-in health
  professional and the studies its retrieval jobs stored.

A dependency that refuses raises :class:`ViewerRefused`; the app answers it (a readable page
for the page, a short text otherwise) and audits it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import Request

from ncp.errors import NcpError
from ncp.security.claims import PatientRef
from ncp.viewer.i18n import reason_in


@dataclass(frozen=True, slots=True)
class ViewerGrant:
    """What one viewer (a session at A, a logged-in HP at B) may see, and what audit names."""

    session: str
    """A stable, non-secret id of the session, for audit (never the cookie itself)."""
    subject: str
    """The health professional (``sub`` of the launch token; B's own HP id)."""
    studies: frozenset[str]
    """The Study Instance UIDs that may be shown; nothing else is, whatever the archive holds."""
    locale: str = "en"
    """BCP 47 tag of the HP's language (the launch token's ``locale``)."""
    expires_at: datetime | None = None
    """When the session ends (aware UTC); None when the caller's login decides."""
    patient: PatientRef | None = None
    requesting_country: str | None = None
    purpose_of_use: str | None = None
    priority: str | None = None
    token_jti: str | None = None
    """The launch token's ``jti``, named on the audit records of the session."""
    option: str | None = None
    """``B`` at A; None at B (B's own viewing of pulled studies)."""
    subject_name: str | None = None

    def covers(self, study: str) -> bool:
        return study in self.studies


class ViewerRefused(NcpError):
    """A request the viewer does not serve: ``status`` (400, 401, 403, 404...) and a reason a
    person can read. ``jti``: the token the refusal concerns, once its signature verified.

    ``reason`` is English, with ``{name}`` fields filled from ``params`` when given: the audit
    keeps it so. The person refused reads it in their language (:meth:`said_in`) when the
    viewer's catalogue (:mod:`ncp.viewer.i18n`) has it; a reason it does not know (a portal's
    own words) is shown as given.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        params: Mapping[str, object] | None = None,
        jti: str | None = None,
        grant: ViewerGrant | None = None,
    ) -> None:
        self.template = reason
        self.params = dict(params or {})
        self.reason = reason.format(**self.params) if self.params else reason
        super().__init__(self.reason)
        self.status = status
        self.jti = jti
        self.grant = grant

    def said_in(self, language: str | None) -> str:
        """The reason in ``language`` (a BCP 47 tag; English when the catalogue lacks it)."""
        return reason_in(self.template, language, self.params)


Authorise = Callable[[Request], Awaitable[ViewerGrant]]
"""The dependency every viewer request goes through: the grant, or ViewerRefused."""


EndSession = Callable[[Request, ViewerGrant, str], Awaitable[Mapping[str, str]]]
"""Ends a session now, on the HP's ``POST /logout`` (A: the session row closed and its end
audited; given the request, its grant and its request id), returning headers for the answer
(A: the cookie cleared)."""
