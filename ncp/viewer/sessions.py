"""Sessions of A's option B viewer: opened by a launch, kept in the node's database, carried by
the browser as a cookie.

Why the database and not a signed cookie (decision record
``docs/decisions/0012-viewer-sessions-in-the-database.md``): every replica of the node reads the
same table, so a session opened on one replica works on the next; a session names up to 50
studies of 64-character UIDs, more than a cookie may carry (4 KB); and a session's end can be
recorded once, by whichever replica sees it first. The cost is one indexed read per request,
cut to one every :data:`CACHE_S` seconds per process by a small memory of recent sessions,
which never keeps a session past its own expiry.

The cookie (:data:`COOKIE`) holds 256 random bits; the table holds their SHA-256 only, so its
rows open nothing. ``__Host-`` pins the cookie to this origin (Secure, Path=/, no Domain);
``HttpOnly`` keeps it from scripts, ``SameSite=Strict`` from other sites' requests. A session is
bound to the HP, the patient and the studies of its launch token and to an expiry: the launch
time plus ``viewer.session_lifetime_s``, never later than the pair the token was issued under.
Nothing extends it; a new launch opens a new session.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from ncp.security.access import AccessGrant
from ncp.security.claims import PatientRef
from ncp.store.models import ViewerSession
from ncp.viewer.access import ViewerGrant, ViewerRefused

COOKIE = "__Host-ncp-viewer"
CACHE_S = 5.0
"""How long a process trusts its memory of a session before reading the table again."""
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}\Z")


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def session_id(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Opened:
    secret: str
    """The cookie's value: shown to the browser once, never stored."""
    grant: ViewerGrant


class SessionStore:
    """The ``viewer_session`` table. Thread-safe; each call has its own database session."""

    def __init__(self, sessions: sessionmaker[Session], *, lifetime: timedelta) -> None:
        self._sessions = sessions
        self.lifetime = lifetime
        self._memory: dict[str, tuple[float, ViewerGrant | None, bool]] = {}
        self._lock = threading.Lock()

    def open(self, access: AccessGrant, *, now: datetime) -> Opened:
        """A new session for a verified launch token."""
        expires = now + self.lifetime
        if access.pair_expires_at is not None:
            expires = min(expires, access.pair_expires_at)
        if expires <= now:
            raise ViewerRefused(403, "the assertions this launch was issued under have expired")
        secret = secrets.token_urlsafe(32)
        row = ViewerSession(
            id=session_id(secret),
            created_at=_naive(now),
            expires_at=_naive(expires),
            closed_at=None,
            subject=access.subject,
            requesting_country=access.requesting_country,
            patient_system=access.patient.system,
            patient_value=access.patient.value,
            purpose=access.purpose_of_use,
            priority=access.priority,
            locale=access.preferred_language,
            studies=sorted(access.studies),
            launch_jti=access.jti,
        )
        with self._sessions.begin() as session:
            session.add(row)
        opened = Opened(secret, _grant(row))
        # Remembered here at once: the page that follows the launch is served without
        # reading the row back.
        with self._lock:
            self._memory[row.id] = (time.monotonic(), opened.grant, False)
        return opened

    def remembered(self, secret: str, *, now: datetime) -> ViewerGrant | None:
        """The grant of a live session this process remembers (no database read, so callable
        on the event loop); None when it must be read (or refused) by :meth:`grant_of`."""
        if not _SECRET.fullmatch(secret):
            return None
        with self._lock:
            found = self._memory.get(session_id(secret))
        if found is None or time.monotonic() - found[0] > CACHE_S:
            return None
        _, grant, closed = found
        if grant is None or closed or (grant.expires_at is not None and grant.expires_at <= now):
            return None
        return grant

    def grant_of(self, secret: str, *, now: datetime) -> ViewerGrant:
        """The grant of a live session, or ViewerRefused (401) saying why not."""
        if not _SECRET.fullmatch(secret):
            raise ViewerRefused(401, "no viewer session: open the images from your portal")
        key = session_id(secret)
        mono = time.monotonic()
        with self._lock:
            remembered = self._memory.get(key)
        if remembered is None or mono - remembered[0] > CACHE_S:
            with self._sessions() as session:
                row = session.get(ViewerSession, key)
                grant = None if row is None else _grant(row)
                closed = row is not None and row.closed_at is not None
            remembered = (mono, grant, closed)
            with self._lock:
                if len(self._memory) > 10_000:
                    self._memory.clear()
                self._memory[key] = remembered
        _, grant, closed = remembered
        if grant is None:
            raise ViewerRefused(401, "no such viewer session: open the images from your portal")
        if closed or (grant.expires_at is not None and grant.expires_at <= now):
            raise ViewerRefused(
                401,
                "the viewer session has ended: open the images again from your portal",
                grant=grant,
            )
        return grant

    def close(self, secret: str, *, now: datetime) -> tuple[ViewerGrant, datetime] | None:
        """End the session of ``secret`` now (the HP logged out): its row closed, so that no
        replica serves it once its memory of it is older than :data:`CACHE_S`, and this
        process at once. Returns its grant and opening time when this call closed it (its
        end is then recorded by the caller, once), None when it was closed already."""
        if not _SECRET.fullmatch(secret):
            return None
        key = session_id(secret)
        with self._sessions.begin() as session:
            claimed = session.execute(
                update(ViewerSession)
                .where(ViewerSession.id == key, ViewerSession.closed_at.is_(None))
                .values(closed_at=_naive(now))
            ).rowcount  # type: ignore[attr-defined]
            row = session.get(ViewerSession, key) if claimed == 1 else None
            found = None if row is None else (_grant(row), _aware(row.created_at))
        with self._lock:
            remembered = self._memory.get(key)
            if remembered is not None:
                self._memory[key] = (remembered[0], remembered[1], True)
        return found

    def ended(self, *, now: datetime, limit: int = 100) -> list[tuple[ViewerGrant, datetime]]:
        """Sessions past their expiry that no replica has closed yet, each closed here once
        (of two replicas racing, the one whose update changed the row records the end)."""
        out: list[tuple[ViewerGrant, datetime]] = []
        with self._sessions() as session:
            rows = list(
                session.scalars(
                    select(ViewerSession)
                    .where(ViewerSession.expires_at <= _naive(now))
                    .where(ViewerSession.closed_at.is_(None))
                    .limit(limit)
                )
            )
        for row in rows:
            with self._sessions.begin() as session:
                claimed = session.execute(
                    update(ViewerSession)
                    .where(ViewerSession.id == row.id, ViewerSession.closed_at.is_(None))
                    .values(closed_at=_naive(now))
                ).rowcount  # type: ignore[attr-defined]
            if claimed == 1:
                out.append((_grant(row), _aware(row.created_at)))
        return out


def _grant(row: ViewerSession) -> ViewerGrant:
    return ViewerGrant(
        session=row.id[:16],
        subject=row.subject,
        studies=frozenset(row.studies),
        locale=row.locale or "en",
        expires_at=_aware(row.expires_at),
        patient=PatientRef(row.patient_system, row.patient_value),
        requesting_country=row.requesting_country,
        purpose_of_use=row.purpose,
        priority=row.priority,
        token_jti=row.launch_jti,
        option="B",
    )


class SessionAuth:
    """The viewer's :data:`~ncp.viewer.access.Authorise` at A: the session cookie."""

    def __init__(self, store: SessionStore, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))

    async def __call__(self, request: Request) -> ViewerGrant:
        secret = request.cookies.get(COOKIE, "")
        now = self.clock()
        # Most requests find the session remembered: no thread for them (a page scrolling a
        # series asks many times a second); a database read goes to a thread.
        grant = self.store.remembered(secret, now=now)
        if grant is not None:
            return grant
        return await anyio.to_thread.run_sync(lambda: self.store.grant_of(secret, now=now))


def cookie_header(secret: str, expires_at: datetime, now: datetime) -> str:
    max_age = max(0, int((expires_at - now).total_seconds()))
    return f"{COOKIE}={secret}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict"


CLEARED = f"{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"
"""The cookie of an ended session, cleared in the browser."""
