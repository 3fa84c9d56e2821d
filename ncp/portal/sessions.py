"""Server-side sessions of the portal, in the node's database (``portal_session``).

The cookie holds 256 random bits; the table keeps their SHA-256, so the database alone gives no
usable cookie. A session is found by that hash and is refused when unknown (forged, or ended by
a logout: a replayed cookie), when unused for longer than the idle timeout, or past its absolute
end; a refused session's row is deleted. Each change of state (password accepted, second factor
accepted) issues a new token and deletes the old row (no session fixation). Replicas share the
table, so any replica answers any request and a logout ends the session everywhere.

Each session carries its CSRF synchronizer token (:func:`csrf_ok`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import PortalSection
from ncp.store.portal import HpAccount, PortalSession

COOKIE = "__Host-ncp-portal"
"""The ``__Host-`` prefix makes the browser refuse the cookie unless it is Secure, has Path=/
and no Domain: no other host or path can set or shadow it."""

T = TypeVar("T")
State = Literal["login", "totp", "oidc", "active"]
Refusal = Literal["unknown", "idle", "expired"]


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Hp:
    """The authenticated health professional of a session (what the HP assertion needs)."""

    account_id: int
    username: str
    name: str
    role_code: str
    role_display: str
    organisation: str
    organisation_id: str
    point_of_care: str
    language: str


@dataclass(frozen=True)
class PortalSessionView:
    """One session as a request sees it."""

    id_hash: str
    state: State
    csrf_token: str
    language: str
    created: datetime
    expires: datetime
    last_seen: datetime
    acr: str | None = None
    amr: tuple[str, ...] = ()
    hp: Hp | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    session: PortalSessionView | None
    refusal: Refusal | None = None
    hp: Hp | None = None
    """The refused session's HP, for the audit record of its end."""


def csrf_ok(session: PortalSessionView | None, given: str | None) -> bool:
    """Whether a form's token is its session's synchronizer token (constant-time)."""
    if session is None or not given:
        return False
    return hmac.compare_digest(session.csrf_token.encode(), given.encode())


def _hp(account: HpAccount | None) -> Hp | None:
    if account is None:
        return None
    return Hp(
        account_id=account.id,
        username=account.username,
        name=account.name,
        role_code=account.role_code,
        role_display=account.role_display,
        organisation=account.organisation,
        organisation_id=account.organisation_id,
        point_of_care=account.point_of_care,
        language=account.language,
    )


def _view(row: PortalSession, account: HpAccount | None) -> PortalSessionView:
    state: State = row.state  # type: ignore[assignment]
    return PortalSessionView(
        id_hash=row.id_hash,
        state=state,
        csrf_token=row.csrf_token,
        language=row.language,
        created=_aware(row.created),
        expires=_aware(row.expires),
        last_seen=_aware(row.last_seen),
        acr=row.acr,
        amr=tuple((row.amr or "").split()),
        hp=_hp(account) if row.state == "active" else None,
        data=dict(row.data or {}),
    )


class SessionStore:
    """Opens, finds, renews and ends portal sessions. Thread-safe (a session per call)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: PortalSection,
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._clock = clock

    @property
    def idle(self) -> timedelta:
        return timedelta(seconds=self._settings.idle_timeout_s)

    def open(
        self,
        state: State,
        *,
        language: str,
        source: str,
        data: dict[str, Any] | None = None,
        account_id: int | None = None,
        acr: str | None = None,
        amr: tuple[str, ...] = (),
        replaces: str | None = None,
    ) -> tuple[str, PortalSessionView]:
        """A new session (new token), replacing the session ``replaces`` (its hash) if given.
        Returns the cookie's token and the session."""
        now = self._clock()
        life = (
            self._settings.absolute_lifetime_s
            if state == "active"
            else self._settings.login_timeout_s
        )
        token = secrets.token_urlsafe(32)
        row = PortalSession(
            id_hash=token_hash(token),
            state=state,
            account_id=account_id,
            csrf_token=secrets.token_urlsafe(32),
            created=_naive(now),
            last_seen=_naive(now),
            expires=_naive(now + timedelta(seconds=life)),
            acr=acr,
            amr=" ".join(amr) or None,
            language=language,
            source=source[:64],
            data=data or {},
        )
        with self._sessions.begin() as session:
            # Expired rows go as new ones come: the table holds live sessions only.
            session.execute(delete(PortalSession).where(PortalSession.expires < _naive(now)))
            if replaces is not None:
                session.execute(delete(PortalSession).where(PortalSession.id_hash == replaces))
            session.add(row)
            session.flush()
            account = session.get(HpAccount, account_id) if account_id is not None else None
            view = _view(row, account)
        return token, view

    def load(self, token: str | None) -> Loaded:
        """The session of a cookie's token, its last use moved to now; or why there is none."""
        if not token or len(token) > 128:
            return Loaded(None, "unknown" if token else None)
        now = self._clock()
        digest = token_hash(token)
        with self._sessions.begin() as session:
            row = session.get(PortalSession, digest)
            if row is None:
                return Loaded(None, "unknown")
            account = session.get(HpAccount, row.account_id) if row.account_id else None
            refusal: Refusal | None = None
            if _aware(row.expires) <= now:
                refusal = "expired"
            elif row.state == "active" and now - _aware(row.last_seen) > self.idle:
                refusal = "idle"
            elif row.state == "active" and (account is None or not account.active):
                refusal = "expired"
            if refusal is not None:
                hp = _hp(account) if row.state == "active" else None
                session.delete(row)
                return Loaded(None, refusal, hp)
            row.last_seen = _naive(now)
            return Loaded(_view(row, account))

    def update_data(self, id_hash: str, data: dict[str, Any]) -> None:
        with self._sessions.begin() as session:
            row = session.get(PortalSession, id_hash)
            if row is not None:
                row.data = data

    def change_data(self, id_hash: str, change: Callable[[dict[str, Any]], T]) -> T | None:
        """Apply ``change`` to the session's ``data`` in one transaction (the row locked where
        the database can, so two tabs of one HP do not lose each other's changes); returns what
        ``change`` returned, or None when the session has ended meanwhile."""
        with self._sessions.begin() as session:
            row = session.scalar(
                select(PortalSession).where(PortalSession.id_hash == id_hash).with_for_update()
            )
            if row is None:
                return None
            data = copy.deepcopy(dict(row.data or {}))
            result = change(data)
            row.data = data  # a new object: SQLAlchemy sees the JSON column changed
            return result

    def end(self, id_hash: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(PortalSession).where(PortalSession.id_hash == id_hash))


__all__ = ["COOKIE", "Hp", "Loaded", "PortalSessionView", "SessionStore", "csrf_ok"]
