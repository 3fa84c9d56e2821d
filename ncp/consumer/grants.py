"""What a job attempt shows A: the HP's confirmation it holds, and the image access token it
renews through the standard channel.

The job's token is used while it has more than ``renew_before_s`` of life left, and renewed
through ``PeerAccess.imaging_access`` then, or when a gateway answered 401 to it (parallel
requests renew it once). When the HP's assertion or TRC has expired (or A no longer accepts
them) the job waits for the HP (:class:`~ncp.consumer.attempt.NeedsHp`).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from ncp.consumer.attempt import Attempt, Declined, NeedsHp, aware
from ncp.consumer.jobs import token_claims, utc_naive
from ncp.consumer.model import ImageGrant, PeerContext, PeerRefused
from ncp.consumer.retrieve import Transient
from ncp.errors import NcpError
from ncp.store.retrieval import RetrievalJob

CONTEXT_MARGIN = timedelta(seconds=5)
"""A confirmation this close to its expiry is treated as expired (A's clock may run ahead)."""


def context(attempt: Attempt) -> PeerContext:
    """The HP's assertion and TRC the job holds, while they are valid."""
    held = attempt.row.context
    if held is None:
        raise NeedsHp("the HP's confirmation is no longer held: the HP must confirm again")
    if held.expires_at - CONTEXT_MARGIN <= aware(attempt.env.now()):
        raise NeedsHp(
            "the HP's treatment relationship confirmation expired at "
            f"{held.expires_at:%Y-%m-%d %H:%M}Z: the HP must confirm again"
        )
    return held


def grant(attempt: Attempt, *, refused: str | None = None) -> ImageGrant:
    """The token to use now: the job's own unless it is close to expiry, or it is the
    token ``refused`` (a gateway answered 401 to it; parallel requests renew it once)."""
    with attempt.grant_lock:
        current = attempt.row.grant
        renew_before = timedelta(seconds=attempt.settings.renew_before_s)
        now = aware(attempt.env.now())
        fresh = current is not None and current.expires_at - renew_before > now
        if current is not None and fresh and current.token != refused:
            return current
        pair = context(attempt)
        try:
            issued = attempt.env.peers(attempt.row.peer).imaging_access(
                pair,
                list(attempt.manifests),
                "C" if attempt.row.option == "C" else "A",
                attempt.row.priority,
            )
        except PeerRefused as exc:
            raise refusal(exc) from None
        if issued.expires_at <= now:
            raise Transient("A issued an image access token that has expired already")
        attempt.row.grant = issued
        jti = token_claims(issued.token).get("jti")
        if isinstance(jti, str):
            attempt.jtis.add(jti)
        with attempt.env.sessions.begin() as session:
            session.execute(
                update(RetrievalJob)
                .where(RetrievalJob.id == attempt.row.id, RetrievalJob.worker == attempt.worker)
                .values(
                    token=issued.token,
                    token_base_url=issued.base_url,
                    token_expires_at=utc_naive(issued.expires_at),
                )
            )
        return issued


def refusal(exc: PeerRefused) -> NcpError:
    """What A's refusal on the standard channel means for the job."""
    if exc.status >= 500:
        return Transient(f"A could not answer ({exc.status}): {exc.diagnostics}")
    if exc.status == 401:
        return NeedsHp(
            f"A no longer accepts the HP's assertion or confirmation: {exc.diagnostics}; "
            "the HP must confirm again"
        )
    return Declined(f"A declined ({exc.status}): {exc.diagnostics}")
