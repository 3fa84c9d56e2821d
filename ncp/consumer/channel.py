"""One peer's standard channel as B calls it: HTTPS with mutual TLS, pinned, with timeouts and
retries for transient failures only.

Trust (docs/trust.md): the TLS context holds B's client certificate and, as its only trust
anchors, the CAs the trust list names for that peer (never the system's web CAs, never
``REQUESTS_CA_BUNDLE``: httpx gets an ``ssl.SSLContext`` and ``trust_env=False``, which also keeps
proxies from the environment out); host names are checked. A peer that pins fingerprints has its
server certificate checked against the pins right after the handshake, inside the connection,
before a single byte of the request is written: ``ssl`` cannot pin, and a check after the
answer (as a JWKS fetch may do) would already have sent the HP's assertions to the wrong server.
Redirects are never followed, and only URLs under the peer's own base are called.

Retries (``[consumer]`` settings): a connection that could not be made (refused, reset, timed
out while connecting) and a 503 are tried again, up to ``attempts`` tries, waiting ``backoff_s``
doubled each time, or what the peer's ``Retry-After`` says, cut at ``retry_after_max_s``. Nothing
else is retried: a 4xx will not change by asking again, a TLS verification failure must not be
waited out, and a request whose answer was lost after sending (read timeout, connection closed)
may have been carried out already.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from ncp.consumer.model import PeerAnswerInvalid, PeerUnreachable, PeerUntrusted
from ncp.security.mtls import check_pinned
from ncp.security.trust import Peer, PeerNotTrusted

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""Largest answer read: a page of 1,000 list entries with includes is a few MB; a report Bundle
with its original rendering may be some MB more."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.5
    retry_after_max_s: float = 30.0

    def backoff(self, attempt: int) -> float:
        """The wait after failed try number ``attempt`` (1-based) when the peer named none."""
        return float(min(self.backoff_s * 2.0 ** (attempt - 1), self.retry_after_max_s))


@dataclass(frozen=True)
class Answer:
    """A peer's HTTP answer, read whole."""

    status: int
    content_type: str
    body: bytes
    url: str
    echoed_id: str | None
    """The X-Request-ID the peer echoed (A echoes B's)."""
    attempts: int
    waited_s: float
    """Time spent waiting between tries."""


class PeerChannel:
    """HTTPS to one peer's standard channel. Thread-safe (httpx's pool is); ``close`` at the end."""

    def __init__(
        self,
        peer: Peer,
        context: ssl.SSLContext,
        *,
        connect_timeout_s: float,
        timeout_s: float,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
        max_bytes: int = MAX_ANSWER_BYTES,
        max_connections: int = 8,
    ) -> None:
        self.peer = peer
        self.policy = policy
        self.sleep = sleep
        self.max_bytes = max_bytes
        base = urlsplit(peer.standard)
        self._origin = (base.scheme, base.netloc)
        self._base_path = base.path.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, keepalive_expiry=30.0)
        self._http = httpx.Client(
            transport=_PinnedTransport(context, peer, limits),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            trust_env=False,
            follow_redirects=False,
        )

    @property
    def base(self) -> str:
        return self.peer.standard

    def on_peer(self, url: str) -> bool:
        """Whether ``url`` lies under the peer's FHIR base (same scheme, host, port, path)."""
        parts = urlsplit(url)
        return (
            (parts.scheme, parts.netloc) == self._origin
            and parts.path.startswith(self._base_path + "/")
            and not parts.fragment
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        params: Sequence[tuple[str, str]] | None = None,
        content: bytes | None = None,
    ) -> Answer:
        """Send one request, trying again on transient failures (see the module doc).

        Raises PeerUntrusted (TLS identity wrong: never retried), PeerUnreachable (no answer
        within the budget), PeerAnswerInvalid (an answer too large to read). Any HTTP status is
        returned as it is, a 503 once the budget is spent.
        """
        if not self.on_peer(url):
            raise PeerAnswerInvalid(self.peer.country, f"{url} is not under {self.base}")
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                status, content_type, body, echoed, retry_after = self._send(
                    method, url, headers, params, content
                )
            except PeerNotTrusted as exc:
                raise PeerUntrusted(str(exc), peer=self.peer.country) from None
            except httpx.HTTPError as exc:
                transient, reason = _classify(exc)
                if transient is None:
                    raise PeerUntrusted(
                        f"{self.peer.country}: TLS with {self.base} failed: {reason}",
                        peer=self.peer.country,
                    ) from None
                if transient and attempt < self.policy.attempts:
                    delay = self.policy.backoff(attempt)
                    log.info(
                        "%s: try %d failed (%s), again in %.1f s",
                        self.peer.country,
                        attempt,
                        reason,
                        delay,
                    )
                    self.sleep(delay)
                    waited += delay
                    continue
                tries = f"after {attempt} tries" if attempt > 1 else "at the first try"
                raise PeerUnreachable(
                    f"{self.peer.country}: {self.base} not reached {tries}: {reason}",
                    peer=self.peer.country,
                ) from None
            if status == 503 and attempt < self.policy.attempts:
                delay = retry_after if retry_after is not None else self.policy.backoff(attempt)
                delay = min(max(delay, 0.0), self.policy.retry_after_max_s)
                log.info("%s: 503, try again in %.1f s", self.peer.country, delay)
                self.sleep(delay)
                waited += delay
                continue
            return Answer(status, content_type, body, url, echoed, attempt, waited)

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: Sequence[tuple[str, str]] | None,
        content: bytes | None,
    ) -> tuple[int, str, bytes, str | None, float | None]:
        # params None keeps the query of ``url`` (a next link); an empty list would drop it.
        with self._http.stream(
            method,
            url,
            headers=dict(headers),
            params=list(params) if params is not None else None,
            content=content,
        ) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise PeerAnswerInvalid(
                        self.peer.country, f"an answer larger than {self.max_bytes} bytes"
                    )
            return (
                response.status_code,
                response.headers.get("content-type", ""),
                bytes(body),
                response.headers.get("x-request-id"),
                retry_after_seconds(response.headers.get("retry-after")),
            )

    def close(self) -> None:
        self._http.close()


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP-date), None when
    absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def _classify(exc: httpx.HTTPError) -> tuple[bool | None, str]:
    """(transient?, reason): None when TLS verification failed (an identity problem, never
    retried), True when the connection could not be made, False otherwise."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return None, cause.verify_message or str(cause)
        if isinstance(cause, ssl.SSLError):
            return None, cause.reason or str(cause)
        cause = cause.__cause__ or cause.__context__
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True, reason
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        # The peer closed the connection before answering: a node closes without an answer
        # when it refuses the client certificate (asyncio sends no TLS alert).
        return False, f"{reason} (the peer may not trust this node's client certificate)"
    return False, reason


# --- pinning inside the connection ---------------------------------------------------------------


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's transport with a connection pool whose TLS streams check the peer's pins."""

    def __init__(self, context: ssl.SSLContext, peer: Peer, limits: httpx.Limits) -> None:
        super().__init__(verify=context, trust_env=False, limits=limits)
        # httpx takes no network backend; its pool does. Replace the pool it built with one
        # that pins (same settings).
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinningBackend(peer),
        )


class _PinningBackend(httpcore.NetworkBackend):
    def __init__(self, peer: Peer) -> None:
        self._inner = httpcore.SyncBackend()
        self._peer = peer

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _PinnedStream(stream, self._peer)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        raise PeerNotTrusted(f"{self._peer.country}: peers are reached over TCP only")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PinnedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, peer: Peer) -> None:
        self._inner = inner
        self._peer = peer

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        try:
            check_pinned(self._peer, der)
        except PeerNotTrusted:
            tls.close()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
