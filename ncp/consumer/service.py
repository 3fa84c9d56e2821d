"""The retrieval workers of one process with the retention purge beside them: what
``ncp jobs work`` runs on its own and ``ncp serve`` runs as a role when ``[retrieval] enabled``.

:meth:`RetrievalService.start` starts the lanes' worker threads (``ncp.consumer.worker``) and a
thread that runs the purge every ``purge_every_s``; :meth:`RetrievalService.stop` hands back
the jobs under way (each stops after the instance it is receiving and is queued again, so that
another replica, or this node's next start, resumes it where it was), waits for the threads and
closes what the service was given to close (the peer client, the imaging channel's clients).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import ENDED, Status
from ncp.consumer.purge import purge_expired
from ncp.consumer.worker import Lane, Retriever

log = logging.getLogger(__name__)


class RetrievalService:
    """Workers of every lane and the purge, started and stopped together."""

    def __init__(
        self,
        env: RetrievalEnv,
        *,
        name: str | None = None,
        closing: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.env = env
        self.retriever = Retriever(env, name=name)
        self._closing = list(closing)
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.retriever.name

    def lanes(self) -> list[tuple[Lane, int]]:
        return self.retriever.lanes()

    def describe(self) -> str:
        """``worker-name running (emergency 1, normal 2, batch 1)``."""
        lanes = ", ".join(f"{lane} {n}" for lane, n in self.lanes())
        return f"{self.name} running ({lanes})"

    def start(self) -> None:
        self.retriever.start()
        self._purger = threading.Thread(
            target=self._purge_loop, name="retention-purge", daemon=True
        )
        self._purger.start()
        log.info("retrieval workers %s", self.describe())

    def stop(self, timeout: float = 30.0) -> None:
        """Hand back the running jobs and stop every thread (waiting at most ``timeout`` s for
        each to finish the instance it is receiving); then close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.retriever.stop(timeout)
        if self._purger is not None:
            self._purger.join(timeout)
        for close in self._closing:
            try:
                close()
            except Exception:  # closing one part must not keep the others open
                log.exception("closing the retrieval service failed")
        log.info("retrieval workers %s stopped", self.name)

    def idle(self) -> bool:
        """No job is queued, downloading or verifying (``ncp jobs work --until-idle``)."""
        busy = self.env.jobs.list(statuses=[Status.QUEUED, Status.DOWNLOADING, Status.VERIFYING])
        return not [j for j in busy if j.status not in ENDED]

    def _purge_loop(self) -> None:
        every = self.env.settings.purge_every_s
        next_purge = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_purge:
                try:
                    purge_expired(self.env)
                except Exception:  # the workers go on; the next round tries again
                    log.exception("the retention purge failed")
                next_purge = time.monotonic() + every
            self._stop.wait(min(1.0, max(0.0, next_purge - time.monotonic())))
