"""The database-backed ReplayGuard: one-time token ids shared by every replica of a node.

A one-time token (the viewer launch token) is used once across the whole node, not once per
process: replicas behind a load balancer share the ``used_token`` table. Recording and asking are
one statement: the ``INSERT`` of the id either succeeds (first use) or violates the primary key
(used before), atomically on SQLite and PostgreSQL alike, so of two replicas racing with one id
exactly one wins. Ids are kept until their token has expired (plus the verifier's leeway), then
deleted by the next call that passes by.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ncp.store.models import UsedToken


def _naive_utc(moment: datetime) -> datetime:
    # The node's database keeps naive UTC times (ncp.store.models).
    if moment.utcoffset() is None:
        raise ValueError("times given to the replay guard must be aware (UTC)")
    return moment.astimezone(UTC).replace(tzinfo=None)


class DatabaseReplayGuard:
    """``ncp.security.replay.ReplayGuard`` over the ``used_token`` table. Thread-safe: each call
    has its own session and transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def seen_before(self, jti: str, expires_at: datetime, *, now: datetime) -> bool:
        if not jti or len(jti) > 128:
            raise ValueError("a token id is 1 to 128 characters")
        keep_until = _naive_utc(expires_at)
        cutoff = _naive_utc(now)
        self._forget_expired(cutoff)
        session = self._sessions()
        try:
            session.add(UsedToken(jti=jti, expires_at=keep_until))
            session.commit()
        except IntegrityError:
            # The primary key says it: another call (this replica or another) recorded it first.
            session.rollback()
            return True
        finally:
            session.close()
        return False

    def _forget_expired(self, cutoff: datetime) -> None:
        # Its own transaction: a failed insert above must not undo the clean-up, nor the reverse.
        with self._sessions.begin() as session:
            session.execute(delete(UsedToken).where(UsedToken.expires_at < cutoff))
