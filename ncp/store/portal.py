"""Database models of country B's portal: health professionals' accounts, server-side sessions
and failed logins (``ncp.portal``).

Sessions live in the node's database, not in a cookie or a process, so that several replicas
of B behind a load balancer share them and a logout ends a session everywhere at once. The
cookie carries only a random token; the table keeps its SHA-256 (``id_hash``), so that a copy of
the database gives no one a usable cookie.

Times are naive UTC, as everywhere in the node's database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ncp.store.models import LO, Base


class HpAccount(Base):
    """A health professional who may log in to the portal, with what B's HP identity assertion
    says of them (docs/tokens.md): name, role (ISCO-08), organisation and its id, point of care,
    preferred language."""

    __tablename__ = "hp_account"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    """The login name; also the HP's identifier in B (the assertion's ``sub``)."""
    password_hash: Mapped[str | None] = mapped_column(String(256))
    """Argon2id (PHC string); None for an account that only logs in through the IdP."""
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    """Base32 TOTP secret (RFC 6238); required with a password."""
    totp_last_step: Mapped[int | None] = mapped_column(Integer)
    """The last TOTP time step accepted: a code is accepted once (RFC 6238 section 5.2)."""
    oidc_subject: Mapped[str | None] = mapped_column(LO, unique=True)
    """The national identity provider's ``sub`` of this HP, when linked."""
    name: Mapped[str] = mapped_column(LO)
    role_code: Mapped[str] = mapped_column(String(16))
    """ISCO-08 code, e.g. 221 (medical doctors)."""
    role_display: Mapped[str] = mapped_column(LO)
    organisation: Mapped[str] = mapped_column(LO)
    organisation_id: Mapped[str] = mapped_column(LO)
    """A URI (``urn:oid:...`` or a URL), as IUA's subject_organization_id."""
    point_of_care: Mapped[str] = mapped_column(LO)
    language: Mapped[str] = mapped_column(String(35))
    """BCP 47 tag, e.g. de-AT; the portal's pages use its primary language."""
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)
    created: Mapped[datetime] = mapped_column(DateTime)


class PortalSession(Base):
    """One browser's session: anonymous while logging in (``state`` login, totp or oidc), then
    ``active`` for an authenticated HP. Each change of state gets a new cookie token."""

    __tablename__ = "portal_session"
    __table_args__ = (Index(None, "expires"), Index(None, "account_id"))

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    """SHA-256 (hex) of the cookie's token."""
    state: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("hp_account.id"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    """The synchronizer token every form of this session must send back."""
    created: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    expires: Mapped[datetime] = mapped_column(DateTime)
    """The absolute end of the session (or of the login under way)."""
    acr: Mapped[str | None] = mapped_column(LO)
    """How the HP authenticated: the portal's own class for password + TOTP, or the
    identity provider's ``acr``; B's HP assertion carries it."""
    amr: Mapped[str | None] = mapped_column(String(64))
    """Authentication methods (RFC 8176), space separated, e.g. ``pwd otp``."""
    language: Mapped[str] = mapped_column(String(35))
    source: Mapped[str] = mapped_column(String(64))
    """The client address the session was opened from."""
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Per-state values: the login under way (user, OpenID state, nonce, PKCE verifier)."""


class LoginFailure(Base):
    """One failed login step, counted for lock-outs per account and per source address."""

    __tablename__ = "login_failure"
    __table_args__ = (Index(None, "username", "at"), Index(None, "source", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    username: Mapped[str | None] = mapped_column(String(64))
    """As typed (also for names with no account, so that guessing names locks them too)."""
    source: Mapped[str] = mapped_column(String(64))


__all__ = ["HpAccount", "LoginFailure", "PortalSession"]
