"""Health professionals' local accounts: Argon2id password hashes (argon2-cffi) and a TOTP
second factor (pyotp, RFC 6238), as eHDSI requires two factors for HPs.

A password is checked against a dummy hash when the account does not exist, so that the time
of an answer does not tell which user names exist. A TOTP code is accepted once: the account
keeps the last time step accepted, and the update that records a step only succeeds while the
stored one is older (a replayed code fails, also when two replicas race with it).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ncp.errors import NcpError
from ncp.portal.i18n import normalise_tag
from ncp.store.portal import HpAccount

MIN_PASSWORD = 12
"""NIST SP 800-63B asks for at least 8 characters; a portal that signs in a doctor's name asks
for more."""
TOTP_WINDOW = 1
"""Codes of the previous and next 30-second step are accepted too (clock drift of a phone)."""

_HASHER = PasswordHasher()  # argon2id with the library's RFC 9106 defaults


class AccountError(NcpError, ValueError):
    """An account cannot be created as asked (the message says which value is wrong)."""


@dataclass(frozen=True)
class HpProfile:
    """What B's HP identity assertion says of a health professional (docs/tokens.md)."""

    username: str
    name: str
    role_code: str
    """ISCO-08, e.g. 221 medical doctors, 2212 specialist medical practitioners."""
    role_display: str
    organisation: str
    organisation_id: str
    point_of_care: str
    language: str
    """BCP 47, e.g. de-AT."""


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
    return _HASHER.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (Argon2 PHC string); with ``stored`` None it
    spends the same time and answers False."""
    try:
        _HASHER.verify(stored or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return stored is not None


def new_totp_secret() -> str:
    return pyotp.random_base32()


def otpauth_uri(secret: str, username: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as a QR code, or typed)."""
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The TOTP time step ``code`` belongs to within the window, or None."""
    if not (len(code) == 6 and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    for offset in range(-TOTP_WINDOW, TOTP_WINDOW + 1):
        if hmac.compare_digest(totp.at(now, counter_offset=offset), code):
            return int(totp.timecode(now)) + offset
    return None


def accept_totp(sessions: sessionmaker[Session], account_id: int, code: str, now: datetime) -> bool:
    """Check ``code`` for the account and record its step, once: a code used before (or an
    older one) is refused."""
    with sessions.begin() as session:
        account = session.get(HpAccount, account_id)
        if account is None or account.totp_secret is None:
            return False
        step = matching_step(account.totp_secret, code, now)
        if step is None:
            return False
        done = session.execute(
            update(HpAccount)
            .where(HpAccount.id == account_id)
            .where(or_(HpAccount.totp_last_step.is_(None), HpAccount.totp_last_step < step))
            .values(totp_last_step=step)
        )
        return bool(getattr(done, "rowcount", 0))


def _check_profile(profile: HpProfile) -> HpProfile:
    if not profile.username or len(profile.username) > 64 or not profile.username.isprintable():
        raise AccountError("a user name is 1 to 64 printable characters")
    if any(c.isspace() for c in profile.username):
        raise AccountError("a user name has no spaces")
    for field in ("name", "role_code", "role_display", "organisation", "organisation_id",
                  "point_of_care"):  # fmt: skip
        value = getattr(profile, field)
        if not value.strip() or len(value) > 256:
            raise AccountError(f"{field} is required (at most 256 characters)")
    if not profile.role_code.isdigit() or len(profile.role_code) > 4:
        raise AccountError("role_code is an ISCO-08 code: 1 to 4 digits, e.g. 221")
    if ":" not in profile.organisation_id:
        raise AccountError("organisation_id is a URI, e.g. urn:oid:1.2.3 or https://...")
    tag = normalise_tag(profile.language)
    if tag is None:
        raise AccountError("language is a BCP 47 tag, e.g. de-AT")
    return HpProfile(**{**profile.__dict__, "language": tag})


def create_account(
    sessions: sessionmaker[Session],
    profile: HpProfile,
    *,
    password: str | None,
    oidc_subject: str | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> str | None:
    """Create an account; returns its new TOTP secret when it has a password (a password
    always comes with a second factor), else None. Raises :class:`AccountError`."""
    profile = _check_profile(profile)
    if password is None and oidc_subject is None:
        raise AccountError("an account needs a password (with TOTP) or an OpenID subject")
    secret = new_totp_secret() if password is not None else None
    row = HpAccount(
        username=profile.username,
        password_hash=hash_password(password) if password is not None else None,
        totp_secret=secret,
        oidc_subject=oidc_subject,
        name=profile.name,
        role_code=profile.role_code,
        role_display=profile.role_display,
        organisation=profile.organisation,
        organisation_id=profile.organisation_id,
        point_of_care=profile.point_of_care,
        language=profile.language,
        active=True,
        created=clock().astimezone(UTC).replace(tzinfo=None),
    )
    try:
        with sessions.begin() as session:
            session.add(row)
    except IntegrityError:
        raise AccountError(
            f"user name {profile.username!r} or that OpenID subject is taken"
        ) from None
    return secret


def find_account(session: Session, username: str) -> HpAccount | None:
    return session.execute(
        select(HpAccount).where(HpAccount.username == username)
    ).scalar_one_or_none()


def list_accounts(sessions: sessionmaker[Session]) -> list[HpAccount]:
    with sessions() as session:
        return list(session.execute(select(HpAccount).order_by(HpAccount.username)).scalars())


__all__ = [
    "AccountError",
    "HpProfile",
    "accept_totp",
    "check_password",
    "create_account",
    "list_accounts",
    "otpauth_uri",
]
