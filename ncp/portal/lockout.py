"""Lock-out after repeated failed logins, per account and per source address.

Failures are rows of ``login_failure`` (shared by replicas). An account is locked when it has
``max_failures_account`` failures within ``failure_window_s``: ``locked_until`` is set on the
account (a failure under a user name with no account is counted all the same, so guessing
names locks as guessing passwords does, and the answer never tells which names exist). A source
is blocked while it has ``max_failures_source`` failures within the window. A lock lasts
``lockout_s``; a successful login clears its account's failures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.config import PortalSection
from ncp.store.portal import HpAccount, LoginFailure


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Blocked:
    scope: Literal["account", "source"]
    until: datetime
    """Aware UTC."""

    def minutes_left(self, now: datetime) -> int:
        return max(1, math.ceil((self.until - now).total_seconds() / 60))


class Lockout:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: PortalSection,
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._clock = clock

    def _window_start(self, now: datetime) -> datetime:
        return _naive(now - timedelta(seconds=self._settings.failure_window_s))

    def check(self, username: str | None, source: str) -> Blocked | None:
        """Whether a login of ``username`` from ``source`` must be refused now."""
        now = self._clock()
        with self._sessions() as session:
            return self._blocked(session, username, source, now)

    def _blocked(
        self, session: Session, username: str | None, source: str, now: datetime
    ) -> Blocked | None:
        s = self._settings
        if username:
            account = session.execute(
                select(HpAccount.locked_until).where(HpAccount.username == username)
            ).scalar_one_or_none()
            if account is not None and account.replace(tzinfo=UTC) > now:
                return Blocked("account", account.replace(tzinfo=UTC))
            last = self._recent(session, LoginFailure.username == username, now)
            if last is not None and last[0] >= s.max_failures_account:
                until = last[1].replace(tzinfo=UTC) + timedelta(seconds=s.lockout_s)
                if until > now:
                    return Blocked("account", until)
        last = self._recent(session, LoginFailure.source == source, now)
        if last is not None and last[0] >= s.max_failures_source:
            until = last[1].replace(tzinfo=UTC) + timedelta(seconds=s.lockout_s)
            if until > now:
                return Blocked("source", until)
        return None

    def _recent(
        self, session: Session, where: object, now: datetime
    ) -> tuple[int, datetime] | None:
        count, latest = session.execute(
            select(func.count(), func.max(LoginFailure.at))
            .where(where)  # type: ignore[arg-type]
            .where(LoginFailure.at >= self._window_start(now))
        ).one()
        return (int(count), latest) if count else None

    def fail(self, username: str | None, source: str) -> Blocked | None:
        """Record a failed step; returns the block it causes (or that was there)."""
        now = self._clock()
        with self._sessions.begin() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.at < self._window_start(now)))
            session.add(LoginFailure(at=_naive(now), username=(username or None), source=source))
            session.flush()
            blocked = self._blocked(session, username, source, now)
            if blocked is not None and blocked.scope == "account" and username:
                account = session.execute(
                    select(HpAccount).where(HpAccount.username == username)
                ).scalar_one_or_none()
                if account is not None:
                    account.locked_until = _naive(blocked.until)
            return blocked

    def succeed(self, username: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.username == username))
            account = session.execute(
                select(HpAccount).where(HpAccount.username == username)
            ).scalar_one_or_none()
            if account is not None:
                account.locked_until = None


__all__ = ["Blocked", "Lockout"]
