"""The instances of a study from the node's index, for option A's retrieves.

A retrieve must know the instances it may send (each part is checked against them, and all of
them must come). Asking a DICOMweb archive for them is an instance-level QIDO, which Orthanc
answers in about a second for a 1000-instance study, as long as moving the study itself. The
node already has them in its index (``ncp index``: ``Study`` / ``Series`` / ``Instance``), so
inside ``ncp serve`` the gateway reads them there. Without them (``ncp edge``, or a study the
index does not hold) the gateway checks each part's own data set against the archive's
instance counts per series instead (``ncp.gateway.stream.Expected``).

The index can lag the archive (it is as fresh as the last ``ncp index`` run). A study whose
transfer disagreed with the index (an instance the index does not name, or one it names that
did not come) is checked the other way for :data:`DISTRUST_S` afterwards, but only when the
archive's own series-level listing of it disagrees with the index too (``Gateway`` does
that): an archive that failed to send an instance (a transcode it could not do) is not a
stale index.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ncp.store.models import Instance, Series, Study

DISTRUST_S = 600.0


class StudyIndex(Protocol):
    """Where a gateway looks up a study's instances before asking its archive."""

    async def instances(self, study: str) -> dict[str, str] | None:
        """SOP Instance UID -> Series Instance UID of every instance of ``study``; None when
        the index does not hold the study."""
        ...


class NodeIndex:
    """The node's index database (read only)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    async def instances(self, study: str) -> dict[str, str] | None:
        return await anyio.to_thread.run_sync(self._instances, study)

    def _instances(self, study: str) -> dict[str, str] | None:
        query = (
            select(Instance.sop_uid, Series.series_uid)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_uid == study)
        )
        with self._sessions() as session:
            rows = session.execute(query).all()
        return {sop: series for sop, series in rows} or None
