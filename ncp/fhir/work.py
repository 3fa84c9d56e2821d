"""CPU-heavy steps of requests, off the event loop and a few at a time.

Parsing a large body and validating a resource take the CPU for seconds (issue 13: one 9 MB
``$validate`` body held the standard channel and the option A gateway, which share the event
loop, for 19 s). Such steps run here, on threads of their own (``slots`` of them), never on the
event loop and never on the thread pool that audit writes and database reads share, so that a
burst of them can starve neither. A step that cannot start within ``queue_timeout_s``, or that
finds ``slots`` steps running and as many waiting, is refused at once: 503 with Retry-After and
an OperationOutcome (:class:`Busy`), audited like every refusal.

A thread cannot be stopped from outside: the steps bound themselves (a size budget checked
before they start, a time budget they check as they go, e.g. the validator's ``deadline``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ncp.fhir.http import FhirHttpError

T = TypeVar("T")


class Busy(FhirHttpError):
    """Every slot for heavy work is taken and the step could not start in time (503)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            503,
            "transient",
            "the node is busy with other large requests: try again later",
            headers={"Retry-After": str(retry_after_s)},
        )


class _Late(Exception):
    """A step whose turn came after its queue timeout: it is not started."""


class HeavyWork:
    """Runs CPU-heavy steps of requests on ``slots`` threads of their own."""

    def __init__(
        self, slots: int = 2, *, queue_timeout_s: float = 5.0, retry_after_s: int = 5
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._threads = ThreadPoolExecutor(slots, thread_name_prefix="heavy-work")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Steps running or waiting."""
        return self._pending

    async def run(self, step: Callable[[], T]) -> T:
        """``step()`` on a heavy-work thread; :class:`Busy` when it cannot start in time."""
        with self._lock:
            if self._pending >= 2 * self.slots:
                raise Busy(self.retry_after_s)
            self._pending += 1
        queued = time.monotonic()

        def job() -> T:
            if time.monotonic() - queued > self.queue_timeout_s:
                raise _Late
            return step()

        try:
            future = self._threads.submit(job)
        except RuntimeError:  # shut down
            self._release()
            raise Busy(self.retry_after_s) from None
        # Counted until the thread is done with it, even when the request is cancelled first
        # (its client went away): the step still holds its thread until it ends.
        future.add_done_callback(lambda _: self._release())
        try:
            return await asyncio.wrap_future(future)
        except _Late:
            raise Busy(self.retry_after_s) from None

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
