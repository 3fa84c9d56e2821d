"""How fast B has pulled studies from a peer: the throughput the portal's list uses to say how
long a study will take to download.

Measured from B's own retrieval records: each finished job's bytes (``bytes_done``) over the time
it spent moving them (from its first ``downloading`` status to its end), for the last
:data:`RECENT_JOBS` jobs of that peer that stored something. Time waiting in the queue is not
counted: it says how busy B is, not how fast the channel is. A job that stored less than
:data:`MIN_BYTES` is left out (its time is mostly the exchange of tokens and manifests, which
would make every estimate pessimistic).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ncp.store.retrieval import RetrievalEvent, RetrievalJob

RECENT_JOBS = 20
MIN_BYTES = 64 * 1024


def measured_throughput(sessions: sessionmaker[Session], peer: str) -> float | None:
    """Bytes per second of recent pulls from ``peer``; None before a first measurable pull."""
    started = (
        select(RetrievalEvent.job_id, func.min(RetrievalEvent.at).label("at"))
        .where(RetrievalEvent.status == "downloading")
        .group_by(RetrievalEvent.job_id)
        .subquery()
    )
    query = (
        select(RetrievalJob.bytes_done, started.c.at, RetrievalJob.finished_at)
        .join(started, started.c.job_id == RetrievalJob.id)
        .where(
            RetrievalJob.peer == peer,
            RetrievalJob.status.in_(("stored", "purged")),
            RetrievalJob.finished_at.is_not(None),
            RetrievalJob.bytes_done >= MIN_BYTES,
        )
        .order_by(RetrievalJob.finished_at.desc())
        .limit(RECENT_JOBS)
    )
    total_bytes = 0
    total_s = 0.0
    with sessions() as session:
        for done, began, finished in session.execute(query):
            if finished is None or began is None:
                continue
            seconds = (finished - began).total_seconds()
            if seconds > 0:
                total_bytes += int(done)
                total_s += seconds
    return total_bytes / total_s if total_s > 0 else None


__all__ = ["MIN_BYTES", "RECENT_JOBS", "measured_throughput"]
