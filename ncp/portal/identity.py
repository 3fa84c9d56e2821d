"""The bridge from a portal session to the peer client: the HP identity B's assertions carry
(``ncp.consumer.assertions.HpIdentity``), from the authenticated HP's account and how the
session was authenticated (its ``acr``)."""

from __future__ import annotations

from ncp.consumer.assertions import HpIdentity, isco_role
from ncp.portal.sessions import PortalSessionView


class NotAuthenticated(ValueError):
    """The session is no authenticated HP's (a login under way): nothing may be signed."""


def hp_identity(session: PortalSessionView) -> HpIdentity:
    """What B's HP identity assertion says for this session's HP; its ``acr`` is the session's
    (the portal's own class for password + TOTP, or the national identity provider's)."""
    hp = session.hp
    if session.state != "active" or hp is None or not session.acr:
        raise NotAuthenticated("only an authenticated HP's session yields an HP identity")
    return HpIdentity(
        subject=hp.username,
        name=hp.name,
        role=isco_role(hp.role_code, hp.role_display),
        organisation=hp.organisation,
        organisation_id=hp.organisation_id,
        point_of_care=hp.point_of_care,
        language=hp.language,
        authentication=session.acr,
    )
