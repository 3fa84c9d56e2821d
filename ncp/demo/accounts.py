"""The demo's logins of country B's portal: HP accounts made once in B's database through the
portal's own account functions (Argon2id password, TOTP secret), each marked as the demo's by
its organisation identifier (:data:`ncp.ops.demo_guard.DEMO_ORGANISATION_ID`), so that a portal
outside the demo refuses to serve them.

Their TOTP secrets are shown at every start (they are test logins); ``ncp demo --totp USER``
prints the current code, for a person without an authenticator app at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pyotp
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ncp.ops.demo_guard import DEMO_ORGANISATION_ID, DEMO_PASSWORD
from ncp.portal.accounts import HpProfile, create_account, otpauth_uri
from ncp.store.portal import HpAccount

ORGANISATION = "Demo hospital Leuven (demo)"

PROFILES: tuple[HpProfile, ...] = (
    HpProfile(
        username="anne",
        name="Dr. Anne Peeters",
        role_code="221",
        role_display="Medical doctors",
        organisation=ORGANISATION,
        organisation_id=DEMO_ORGANISATION_ID,
        point_of_care="Emergency department (demo)",
        language="en-BE",
    ),
    HpProfile(
        username="luc",
        name="Dr. Luc Dubois",
        role_code="2212",
        role_display="Specialist medical practitioners",
        organisation=ORGANISATION,
        organisation_id=DEMO_ORGANISATION_ID,
        point_of_care="Radiology (demo)",
        language="fr-BE",
    ),
)
"""Two HPs in two of the portal's languages."""


@dataclass(frozen=True)
class DemoLogin:
    username: str
    name: str
    language: str
    password: str
    totp_secret: str
    otpauth_uri: str

    def code(self, now: datetime | None = None) -> str:
        """The TOTP code of ``now`` (default: this moment)."""
        return pyotp.TOTP(self.totp_secret).at(now or datetime.now(UTC))

    def to_json(self) -> dict[str, str]:
        return {
            "username": self.username,
            "name": self.name,
            "language": self.language,
            "password": self.password,
            "totp_secret": self.totp_secret,
            "otpauth_uri": self.otpauth_uri,
        }


def ensure_demo_logins(sessions: sessionmaker[Session], issuer: str) -> list[DemoLogin]:
    """The demo's accounts in B's (migrated) database, made the first time; their logins."""
    with sessions() as session:
        existing = {
            a.username: a
            for a in session.scalars(
                select(HpAccount).where(HpAccount.organisation_id == DEMO_ORGANISATION_ID)
            )
        }
    logins = []
    for profile in PROFILES:
        account = existing.get(profile.username)
        if account is None:
            secret = create_account(sessions, profile, password=DEMO_PASSWORD)
        else:
            secret = account.totp_secret
        if secret is None:  # an account of that name without a second factor is not the demo's
            raise ValueError(f"portal account {profile.username!r} has no TOTP secret")
        logins.append(
            DemoLogin(
                username=profile.username,
                name=profile.name,
                language=profile.language,
                password=DEMO_PASSWORD,
                totp_secret=secret,
                otpauth_uri=otpauth_uri(secret, profile.username, issuer),
            )
        )
    return logins
