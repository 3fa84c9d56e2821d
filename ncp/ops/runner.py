"""Running a node's servers together, and stopping them gracefully.

All servers of a process (its channels, then its operations listener) run in one event loop.
uvicorn installs its own signal handlers per server, one after the other, so that a SIGTERM
would stop them one at a time and end the process by the signal; here one handler stops them
all at once instead:

1. SIGTERM or SIGINT: every channel stops accepting connections at the same moment and
   ``/readyz`` answers 503 ``draining`` (the load balancer stops sending); idle connections
   are closed, and a request under way (a study being streamed) is let finish, its connection
   closed after it.
2. After ``grace_s`` whatever still runs is cancelled (a transfer cut there is audited by the
   gateway as broken, and the client sees a broken transfer, never a clean short one).
3. The operations listener stops last; the process exits 0. A second signal cuts step 2 short.

If a server cannot start (a port taken), the others are stopped and the exit code is 1.

A role may also be work without a listener (:class:`NamedWorker`: country B's retrieval
workers). It starts once the servers run and is stopped at step 1 beside them, in a thread of
its own, with up to ``grace_s`` to hand back what it holds; the operations listener waits for
it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.config import HttpSection
from ncp.ops.health import Readiness, ops_app
from ncp.ops.metrics import Metrics
from ncp.security.http_limits import guarded, uvicorn_options

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True)
class NamedServer:
    """One listener of a process: its name (in logs and metrics) and its uvicorn server."""

    name: str
    server: uvicorn.Server


class Worker(Protocol):
    """Work a process does besides answering requests, started and stopped with its servers."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None:
        """Stop, handing back what is under way, within about ``timeout`` seconds."""
        ...


@dataclass(frozen=True)
class NamedWorker:
    """One worker of a process and its name (in logs)."""

    name: str
    worker: Worker


def ops_server(
    readiness: Readiness,
    metrics: Metrics | None,
    *,
    host: str,
    port: int,
    log_level: str,
    limits: HttpSection | None = None,
) -> NamedServer:
    """The operations listener: plain HTTP, /healthz, /readyz and /metrics (decision record
    "operations listener"), unobserved (probes are not requests to count); its connections
    held to ``limits`` (``[http]``) like every listener's."""
    limits = limits or HttpSection()
    config = uvicorn.Config(
        ops_app(readiness, metrics),
        host=host,
        port=port,
        http=guarded(H11Protocol, limits),
        ws="none",
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_level=log_level,
        **uvicorn_options(limits),
    )
    return NamedServer("ops", uvicorn.Server(config))


@contextlib.contextmanager
def _no_signals() -> Iterator[None]:
    yield  # the runner's handler stops every server; uvicorn's own would stop them one by one


def _quiet(server: uvicorn.Server) -> None:
    server.capture_signals = _no_signals  # type: ignore[method-assign]


async def _serve(named: NamedServer) -> int:
    try:
        await named.server.serve()
    except SystemExit as exc:  # uvicorn exits when it cannot bind or start its app
        log.error("%s could not start (exit %s)", named.name, exc.code)
        return EXIT_FAILED
    return EXIT_OK if named.server.started else EXIT_FAILED


async def run_servers(
    servers: Sequence[NamedServer],
    *,
    grace_s: float,
    ops: NamedServer | None = None,
    readiness: Readiness | None = None,
    workers: Sequence[NamedWorker] = (),
) -> int:
    """Serve until SIGTERM/SIGINT (graceful, as in the module doc) or a server fails; returns
    the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    failed = False
    started: list[NamedWorker] = []
    stopped_workers: list[asyncio.Future[None]] = []

    def stop_workers() -> None:
        for part in started:
            log.info("stopping %s: handing back what it holds", part.name)
            stopped_workers.append(loop.run_in_executor(None, part.worker.stop, grace_s))
        started.clear()

    def stop_all(reason: str) -> None:
        if stopping.is_set():
            log.warning("%s again: closing what is left now", reason)
            for named in servers:
                named.server.force_exit = True
            return
        stopping.set()
        log.info(
            "%s: no new connections; requests under way get up to %g s to finish", reason, grace_s
        )
        if readiness is not None:
            readiness.draining = True
        for named in servers:
            named.server.should_exit = True
        stop_workers()

    for named in [*servers, *([ops] if ops else [])]:
        _quiet(named.server)
        named.server.config.timeout_graceful_shutdown = grace_s  # type: ignore[assignment]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all, signal.Signals(sig).name)
    ops_task = asyncio.create_task(_serve(ops)) if ops is not None else None
    tasks = {asyncio.create_task(_serve(named)): named for named in servers}
    if ops is not None and ops_task is not None:
        tasks[ops_task] = ops
    if workers:
        # Workers start once the listeners are up (a port taken stops everything first).
        while not stopping.is_set() and not all(named.server.started for named in servers):
            if any(task.done() for task in tasks if task is not ops_task):
                break
            await asyncio.sleep(0.05)
        if not stopping.is_set() and not any(t.done() for t in tasks if t is not ops_task):
            for part in workers:
                try:
                    await loop.run_in_executor(None, part.worker.start)
                except Exception:
                    log.exception("%s could not start", part.name)
                    failed = True
                    stop_all(f"{part.name} failed")
                    break
                started.append(part)
                if stopping.is_set():
                    stop_workers()  # a signal came while it was starting
                    break
    try:
        pending = set(tasks)
        while pending - {ops_task}:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not stopping.is_set():
                    failed = True  # ended without being asked: stop the others
                    stop_all(f"{tasks[task].name} stopped")
                elif task.result() != EXIT_OK:
                    failed = True
        stop_workers()  # a server that failed without a signal: the workers stop too
        for future in stopped_workers:
            try:
                await future
            except Exception:
                log.exception("a worker did not stop cleanly")
                failed = True
        if ops is not None and ops_task is not None:
            ops.server.should_exit = True  # last: /readyz said "draining" until now
            if await ops_task != EXIT_OK:
                failed = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return EXIT_FAILED if failed else EXIT_OK
