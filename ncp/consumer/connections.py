"""The imaging channel's HTTPS connections to peers' gateways, kept alive between requests.

The retriever reads WADO-RS answers of hundreds of megabytes. ``http.client`` (the standard
library) reads a response body straight into the caller's buffer (``readinto``, the chunked
transfer coding undone in large pieces), where httpx hands out one small chunk per TLS record
through several layers: measured on a 525 MB study, about half the CPU of B's process
(docs/decisions/0015-retrieval-jobs.md). JSON requests to peers stay on httpx (the peer client).

One :class:`Connections` per process: idle connections are kept per host and port (at most
``keep_idle``) and reused; how many are open at once is bounded by the callers
(:class:`ncp.consumer.env.PeerSlots`). A request on a kept connection that the peer closed
meanwhile is sent once more on a new connection (GET is idempotent, nothing was received).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

NetworkError = (OSError, http.client.HTTPException)
"""What a request or a read on the network raises (timeouts, resets, TLS and HTTP framing
errors, a chunked body cut short)."""


_GONE = (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError, http.client.RemoteDisconnected)
"""What a kept connection the peer closed meanwhile raises on its next request."""


class Connection(http.client.HTTPSConnection):
    """An HTTPS connection whose connect has its own (shorter) timeout; every later read or
    write waits at most ``timeout`` seconds."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls = context
        self._connect_timeout = connect_timeout
        self.used = False
        """Whether a request was sent on it already (a kept-alive connection)."""

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class Connections:
    """HTTPS connections to peers' gateways; ``tls(peer)`` is what a peer's connections trust."""

    def __init__(
        self,
        tls: Callable[[str], ssl.SSLContext],
        *,
        timeout_s: float,
        connect_timeout_s: float,
        keep_idle: int,
    ) -> None:
        self._tls = tls
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._timeout = timeout_s
        self._connect_timeout = connect_timeout_s
        self._keep = keep_idle
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _context(self, peer: str) -> ssl.SSLContext:
        with self._lock:
            context = self._contexts.get(peer)
            if context is None:
                context = self._contexts[peer] = self._tls(peer)
            return context

    def _take(self, key: tuple[str, str, int]) -> Connection:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        return self._new(key)

    def _new(self, key: tuple[str, str, int]) -> Connection:
        peer, host, port = key
        return Connection(
            host,
            port,
            context=self._context(peer),
            timeout=self._timeout,
            connect_timeout=self._connect_timeout,
        )

    def _give_back(self, key: tuple[str, str, int], conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < self._keep:
                idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def get(
        self, peer: str, url: str, headers: dict[str, str]
    ) -> Iterator[http.client.HTTPResponse]:
        """``GET url`` on a connection to ``peer``; the response while the block runs. The
        connection is kept for the next request when the block read the whole body, else
        closed. Raises what the network raises (:data:`NetworkError`)."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url[:100]!r}")
        key = (peer, parts.hostname, parts.port or 443)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._take(key)
        try:
            kept = conn.used
            try:
                response = _send(conn, target, headers)
            except _GONE:
                if not kept:
                    raise
                # The peer closed the kept connection meanwhile: once more on a new one.
                conn.close()
                conn = self._new(key)
                response = _send(conn, target, headers)
            yield response
            reusable = response.isclosed() and not response.will_close
        except BaseException:
            conn.close()
            raise
        if reusable:
            self._give_back(key, conn)
        else:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()


def _send(conn: Connection, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn.used = True
    conn.request("GET", target, headers=headers)
    return conn.getresponse()
