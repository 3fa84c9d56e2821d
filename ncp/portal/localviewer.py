"""B's local viewer behind the portal's login: the viewer app (``ncp.viewer.app``) over B's store
of pulled studies (the ``[retrieval] store``: a folder, or B's archive by DICOMweb), mounted at
``/viewer``.

Who sees what is decided here, on every request: the portal session's HP, and only the studies
that HP's own retrieval jobs stored (and retention has not purged). Another HP's studies, even
in the same store, answer 403 as any study outside the grant does. Views and refusals are
audited in B's chain (side ``consumer``) by the viewer's own audit hook.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from ncp.audit.models import Side
from ncp.config import FolderStoreSection, StoreSection
from ncp.consumer.jobs import Requester
from ncp.dicom.folder import FolderSource
from ncp.node import Node
from ncp.store.retrieval import RetrievalJob, RetrievalJobStudy, StoredStudy
from ncp.viewer.access import ViewerGrant, ViewerRefused
from ncp.viewer.app import build_viewer_app
from ncp.viewer.auditing import ViewAudit
from ncp.viewer.frames import DicomwebFrames, FolderFrames, FrameSource, ScanCatalogue
from ncp.viewer.render_service import RenderService

GRANT_TTL_S = 2.0
"""How long one session's list of stored studies is reused: a page asks for dozens of frames a
second; a study a job has just stored shows within this."""


def stored_studies(sessions: sessionmaker[Session], hp: Requester) -> frozenset[str]:
    """Studies the HP's jobs stored that are still in the store."""
    query = (
        select(RetrievalJobStudy.study_uid)
        .join(RetrievalJob, RetrievalJob.id == RetrievalJobStudy.job_id)
        .outerjoin(StoredStudy, StoredStudy.study_uid == RetrievalJobStudy.study_uid)
        .where(
            RetrievalJob.hp_id == hp.id,
            RetrievalJob.hp_source == hp.source,
            RetrievalJobStudy.status == "stored",
            StoredStudy.purged_at.is_(None),
        )
    )
    with sessions() as session:
        return frozenset(session.scalars(query))


RESCAN_S = 1.0
"""A folder store is scanned again when a granted study is not in its catalogue, at most this
often: the HP's grant names only studies their jobs stored, so a missing one has just come."""


def store_frames(store: StoreSection) -> FrameSource:
    if isinstance(store, FolderStoreSection):
        source = FolderSource(store.path)
        return FolderFrames(source, ScanCatalogue(source, rescan_s=RESCAN_S))
    return DicomwebFrames(store.url, timeout_s=store.timeout_s)


class PortalGrants:
    """The viewer's ``Authorise`` dependency: the portal session's HP and their stored studies."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        login: Callable[[Request], tuple[str, Requester, str, datetime] | None],
    ) -> None:
        self.sessions = sessions
        self.login = login
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    async def __call__(self, request: Request) -> ViewerGrant:
        found = self.login(request)
        if found is None:
            raise ViewerRefused(401, "log in to the portal first")
        session_hash, hp, locale, expires = found
        studies = self._studies(session_hash, hp)
        return ViewerGrant(
            # Not the session's database key itself: a value audit may show.
            session=hashlib.sha256(session_hash.encode()).hexdigest()[:16],
            subject=hp.id,
            subject_name=hp.name,
            studies=studies,
            locale=locale,
            expires_at=expires,
        )

    def _studies(self, session_hash: str, hp: Requester) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(session_hash)
            if cached is not None and now - cached[0] < GRANT_TTL_S:
                return cached[1]
        studies = stored_studies(self.sessions, hp)
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[session_hash] = (now, studies)
        return studies


def local_viewer(node: Node, grants: PortalGrants) -> FastAPI:
    """The viewer app over B's store, for the portal to mount (its routes at the mount's root)."""
    settings = node.settings
    service = RenderService(
        store_frames(settings.retrieval.store),
        memory_bytes=settings.viewer.frame_memory_mib << 20,
        threads=settings.viewer.render_threads,
    )
    return build_viewer_app(
        service=service,
        authorise=grants,
        audit=ViewAudit(node.auditor, Side.CONSUMER, idle_s=settings.viewer.audit_idle_s),
        settings=settings.viewer,
        title="ncp local viewer",
    )


__all__ = ["PortalGrants", "local_viewer", "store_frames", "stored_studies"]
