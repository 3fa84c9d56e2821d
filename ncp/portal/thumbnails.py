"""Study thumbnails in the list, from country A's rendered resources (option B).

A's viewer serves PS3.18 thumbnails (``<viewer>/studies/{uid}/thumbnail``) under a viewer
session, which a one-time launch code opens. B's server opens such sessions itself: it asks A
for a launch code (``$imaging-access`` option B, in the HP's name, audited on both sides),
follows the launch URL without a browser, keeps the session cookie A sets, and fetches the
thumbnails with it. The HP's browser only ever talks to B (``/patients/{key}/thumbnails/{uid}``,
same origin, behind the portal's login).

So that thumbnails never slow the list:

- lazy: the list page asks for a thumbnail only when its row is on the screen, and the list
  itself never waits for one;
- cached per portal session: each image is fetched from A once per session (an LRU bounded in
  bytes for the whole process, :data:`CACHE_BYTES`); a failure is remembered for a while, so a
  study A cannot show is not asked again at every scroll;
- bounded: a launch code covers at most 50 studies, so the studies A offers its viewer for are
  cut into batches of 50 in list order, one viewer session per batch, opened when a first
  thumbnail of the batch is asked for; at most :data:`PER_SESSION` fetches of one portal
  session run at once (a fast scroll queues, it does not flood A).

A's session lives ``viewer.session_lifetime_s`` at A and never past the HP's pair; a thumbnail
asked after that opens a new one.

What a portal session holds here goes when it logs out (:meth:`Thumbnails.forget`), and, for a
session that simply stopped (idle timeout, closed browser), once it has been unused for the
portal's idle timeout: a session that idle has ended, so nothing grows with the sessions a
long-running portal has seen.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from ncp.consumer.model import PeerAnswerInvalid, PeerRefused, PeerUnreachable
from ncp.errors import NcpError
from ncp.portal.patients import Confirmed
from ncp.portal.peering import ConfirmationExpired, PortalPeers

log = logging.getLogger(__name__)

BATCH = 50
"""Studies per launch code (A's ceiling for one token)."""
CACHE_BYTES = 48 * 1024 * 1024
PER_SESSION = 3
FAILURE_TTL_S = 120.0
SIZE = "96,96"
"""The thumbnail's viewport: twice the list's 48 CSS pixels, sharp on a high-density screen."""
_LAUNCH_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Thumbnail:
    body: bytes
    media_type: str


@dataclass
class _ViewerSession:
    base: str
    cookie: str
    opened: float


@dataclass
class _Patient:
    """One confirmed patient of one portal session: its batches and their viewer sessions."""

    used: float
    batches: list[tuple[str, ...]] = field(default_factory=list)
    sessions: dict[int, _ViewerSession] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(PER_SESSION))


class Thumbnails:
    """The thumbnail broker of one portal process."""

    def __init__(
        self,
        peers: PortalPeers,
        tls: Callable[[str], ssl.SSLContext],
        *,
        session_lifetime_s: float,
        idle_s: float,
        cache_bytes: int = CACHE_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peers = peers
        self.tls = tls
        self.session_lifetime_s = session_lifetime_s
        self.idle_s = idle_s
        self.monotonic = monotonic
        self.cache_bytes = cache_bytes
        self._patients: dict[tuple[str, str], _Patient] = {}
        self._cache: OrderedDict[tuple[str, str, str], Thumbnail] = OrderedDict()
        self._cached = 0
        self._failed: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()
        self._clients: dict[str, httpx.Client] = {}

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # -- what the list registers ----------------------------------------------------------------

    def offer(self, session: str, key: str, studies: Sequence[str]) -> None:
        """The studies (in list order) a patient's list offers thumbnails for: the batches."""
        batches = [tuple(studies[i : i + BATCH]) for i in range(0, len(studies), BATCH)]
        now = self.monotonic()
        with self._lock:
            self._drop_idle(now)
            entry = self._patients.setdefault((session, key), _Patient(used=now))
            entry.used = now
        with entry.lock:
            if entry.batches != batches:
                entry.batches = batches
                entry.sessions.clear()

    def forget(self, session: str) -> None:
        """A portal session ended: its viewer sessions and images go."""
        with self._lock:
            self._forget({session})

    def held(self) -> tuple[int, int, int]:
        """Patients, cached images and remembered failures held now (for tests and metrics)."""
        with self._lock:
            return len(self._patients), len(self._cache), len(self._failed)

    def _drop_idle(self, now: float) -> None:
        """Under ``_lock``: sessions unused for the idle timeout have ended; failures older
        than their time to live are forgotten."""
        ended = {k[0] for k, p in self._patients.items() if now - p.used > self.idle_s}
        if ended:
            self._forget(ended)
        for failed in [k for k, t in self._failed.items() if now - t >= FAILURE_TTL_S]:
            del self._failed[failed]

    def _forget(self, sessions: set[str]) -> None:
        for patient in [k for k in self._patients if k[0] in sessions]:
            del self._patients[patient]
        for image in [k for k in self._cache if k[0] in sessions]:
            self._cached -= len(self._cache.pop(image).body)
        for failed in [k for k in self._failed if k[0] in sessions]:
            del self._failed[failed]

    # -- one thumbnail --------------------------------------------------------------------------

    def get(self, session: str, confirmed: Confirmed, study: str) -> Thumbnail | None:
        """The study's thumbnail, or None (not offered, A refused, A unreachable)."""
        key = (session, confirmed.key, study)
        now = self.monotonic()
        with self._lock:
            entry = self._patients.get((session, confirmed.key))
            if entry is not None:
                entry.used = now
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            failed = self._failed.get(key)
            if failed is not None and now - failed < FAILURE_TTL_S:
                return None
        if entry is None:
            return None
        batch = next((i for i, b in enumerate(entry.batches) if study in b), None)
        if batch is None:
            return None
        with entry.slots:
            try:
                found = self._fetch(entry, batch, confirmed, study)
            except (ConfirmationExpired, PeerRefused, PeerUnreachable, PeerAnswerInvalid) as exc:
                log.info("no thumbnail of %s: %s", study, exc)
                found = None
            except (httpx.HTTPError, NcpError, ValueError) as exc:
                log.warning("no thumbnail of %s: %s", study, exc)
                found = None
        with self._lock:
            if found is None:
                self._failed[key] = self.monotonic()
                return None
            self._cache[key] = found
            self._cached += len(found.body)
            while self._cached > self.cache_bytes and self._cache:
                _, dropped = self._cache.popitem(last=False)
                self._cached -= len(dropped.body)
        return found

    def _fetch(
        self, entry: _Patient, batch: int, confirmed: Confirmed, study: str
    ) -> Thumbnail | None:
        for attempt in (1, 2):
            viewer = self._viewer_session(entry, batch, confirmed, renew=attempt == 2)
            client = self._client(confirmed.peer)
            answer = client.get(
                f"{viewer.base}/studies/{study}/thumbnail",
                params={"viewport": SIZE},
                headers={"Cookie": viewer.cookie, "Accept": "image/jpeg"},
            )
            if answer.status_code == 401 and attempt == 1:
                continue  # A's session ended (its lifetime, or A restarted): open a new one
            if answer.status_code != 200:
                log.info("A's viewer answered %s for a thumbnail", answer.status_code)
                return None
            media = answer.headers.get("content-type", "").split(";")[0].strip()
            if media not in ("image/jpeg", "image/png", "image/webp"):
                return None
            return Thumbnail(answer.content, media)
        return None

    def _viewer_session(
        self, entry: _Patient, batch: int, confirmed: Confirmed, *, renew: bool
    ) -> _ViewerSession:
        with entry.lock:
            current = entry.sessions.get(batch)
            fresh = (
                current is not None
                and not renew
                and self.monotonic() - current.opened < self.session_lifetime_s - 5
            )
            if fresh and current is not None:
                return current
            grant = self.peers.viewer_launch(
                confirmed, entry.batches[batch], emergency=confirmed.emergency
            )
            opened = self._launch(confirmed.peer, grant.url)
            entry.sessions[batch] = opened
            return opened

    def _launch(self, peer: str, url: str) -> _ViewerSession:
        """Follow A's launch URL as a browser would, without following its redirect: the
        viewer session is the cookie A sets."""
        parts = urlsplit(url)
        path = parts.path
        if parts.scheme != "https" or not path.endswith("/launch"):
            raise ValueError("the launch URL is not an https URL of a viewer's /launch")
        base = f"{parts.scheme}://{parts.netloc}{path.removesuffix('/launch')}"
        answer = self._client(peer).get(url)
        if answer.status_code != 303:
            raise ValueError(f"A's viewer answered {answer.status_code} to the launch")
        cookie = answer.headers.get("set-cookie", "").split(";", 1)[0].strip()
        if "=" not in cookie:
            raise ValueError("A's viewer set no session cookie")
        return _ViewerSession(base, cookie, self.monotonic())

    def _client(self, peer: str) -> httpx.Client:
        with self._lock:
            client = self._clients.get(peer)
            if client is None:
                client = httpx.Client(
                    verify=self.tls(peer),
                    timeout=httpx.Timeout(_LAUNCH_TIMEOUT_S, connect=5.0),
                    trust_env=False,
                    follow_redirects=False,
                    limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
                )
                self._clients[peer] = client
            return client


__all__ = ["BATCH", "Thumbnail", "Thumbnails"]
