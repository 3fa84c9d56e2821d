"""Liveness and readiness of a node, and the operations listener that answers them.

The operations listener (``listen.ops_port``; decision record "operations listener") is plain
HTTP on loopback by default, separate from the channels: the standard channel demands a client
certificate that no load balancer or kubelet holds, and the gateways answer DICOMweb only.

- ``GET /healthz``: 200 while the process runs its event loop. Nothing else is checked: a
  liveness probe that fails when the database is down would restart healthy processes.
- ``GET /readyz``: 200 when every required dependency answers, else 503, with one line per
  check in JSON. Required: the database (``SELECT 1``) and the archive (a folder that can be
  listed; a DICOMweb archive answering a one-study QIDO-RS). Informative only: each peer this
  node calls (``consumer.peers``, and peers whose keys it fetches by ``jwks_url``), reached by a
  TLS handshake with the node's client certificate against the trust list's anchors and pins,
  with ``ops.peer_timeout_s``. A peer that is down must not take this node out of its load
  balancer: it still serves everything else. While the node shuts down, 503 ``draining``.
  Answers are cached ``ops.readiness_cache_s``, peers ``ops.peer_cache_s``, and each check
  runs once at a time, so probes from many places never multiply the load on a peer.
- ``GET /metrics``: the Prometheus exposition (:mod:`ncp.ops.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ncp.config import ArchiveSection, DicomwebArchive, FolderArchive
from ncp.ops.metrics import Metrics

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    required: bool = True
    """A failed required check makes the node not ready; an informative one is only shown."""


Probe = Callable[[], Awaitable[str]]
"""Returns a short description of what answered, or raises with a short reason."""


@dataclass
class Check:
    """One dependency, probed at most once per ``cache_s`` and once at a time."""

    name: str
    probe: Probe
    timeout_s: float
    required: bool = True
    cache_s: float = 0.0
    _last: CheckResult | None = field(default=None, init=False)
    _at: float = field(default=0.0, init=False)
    _lock: asyncio.Lock | None = field(default=None, init=False)

    async def result(self) -> CheckResult:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._at < self.cache_s:
                return self._last
            try:
                detail = await asyncio.wait_for(self.probe(), self.timeout_s)
                found = CheckResult(self.name, True, detail, self.required)
            except TimeoutError:
                found = CheckResult(
                    self.name, False, f"no answer in {self.timeout_s:g} s", self.required
                )
            except Exception as exc:
                found = CheckResult(self.name, False, _reason(exc), self.required)
            self._last, self._at = found, time.monotonic()
            return found


class Readiness:
    """The node's readiness: its checks, a short cache of the whole answer, and draining."""

    def __init__(self, checks: Sequence[Check], *, cache_s: float = 0.0) -> None:
        self.checks = list(checks)
        self.cache_s = cache_s
        self.draining = False
        self._last: tuple[float, bool, list[CheckResult]] | None = None
        self._lock = asyncio.Lock()

    async def report(self) -> tuple[bool, list[CheckResult]]:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.cache_s:
                return self._last[1], self._last[2]
            results = list(await asyncio.gather(*(check.result() for check in self.checks)))
            ready = all(r.ok for r in results if r.required)
            self._last = (time.monotonic(), ready, results)
            return ready, results


def ops_app(readiness: Readiness, metrics: Metrics | None) -> Starlette:
    """The operations listener's app: /healthz, /readyz, /metrics."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    async def readyz(request: Request) -> Response:
        if readiness.draining:
            return JSONResponse({"status": "draining", "checks": {}}, status_code=503)
        ready, results = await readiness.report()
        body = {
            "status": "ready" if ready else "not ready",
            "checks": {
                r.name: {"ok": r.ok, "required": r.required, "detail": r.detail} for r in results
            },
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_page(request: Request) -> Response:
        if metrics is None:
            return PlainTextResponse("no metrics in this process\n", status_code=404)
        # Collectors read the database: off the event loop that serves the channels.
        body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=PROMETHEUS_TEXT)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ]
    )


# -- the probes -----------------------------------------------------------------------------------


def database_probe(engine: Engine) -> Probe:
    """``SELECT 1`` on a connection of the node's pool (in a worker thread)."""

    def ping() -> str:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return f"{engine.dialect.name} answers"

    async def probe() -> str:
        return await run_in_threadpool(ping)

    return probe


def archive_probe(archive: ArchiveSection, timeout_s: float) -> Probe:
    """A folder archive that can be listed, or a DICOMweb archive answering a one-study search
    (2xx); the answer's content is not read."""
    if isinstance(archive, FolderArchive):
        root = archive.path

        def listed() -> str:
            if not root.is_dir():
                raise FileNotFoundError(f"folder {root} is missing")
            with os.scandir(root) as entries:
                next(entries, None)
            return "folder can be read"

        async def folder() -> str:
            return await run_in_threadpool(listed)

        return folder
    assert isinstance(archive, DicomwebArchive)
    url = archive.url.rstrip("/") + "/studies"

    async def dicomweb() -> str:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
            answer = await client.get(
                url,
                params={"limit": "1", "includefield": "0020000D"},
                headers={"Accept": "application/dicom+json"},
            )
        if not 200 <= answer.status_code < 300:
            raise RuntimeError(f"QIDO-RS answered {answer.status_code}")
        return f"QIDO-RS answered {answer.status_code}"

    return dicomweb


def peer_probe(
    base_url: str, context: ssl.SSLContext, check_certificate: Callable[[bytes | None], None]
) -> Probe:
    """A TLS handshake with the peer's standard channel under ``context`` (this node's client
    certificate, the peer's anchors), then ``check_certificate`` on its certificate (the pins);
    no HTTP request is sent, so the peer records nothing of it."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    port = parts.port or 443

    async def probe() -> str:
        _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            check_certificate(der)
            version = ssl_object.version() if ssl_object is not None else "?"
        finally:
            writer.close()
            # The peer may drop a connection that asks nothing: it was reached all the same.
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return f"TLS handshake with {host}:{port} ({version})"

    return probe


def _reason(exc: BaseException) -> str:
    """A failure in a few words: its type and first line, no more (nothing from a body)."""
    text_ = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    return f"{name}: {text_}"[:300] if text_ else name
