"""Connection limits of every HTTP listener of a node: idle and slowloris clients, oversized
heads, request smuggling (issue 13, item 12).

uvicorn's h11 protocol closes a kept-alive connection after ``timeout_keep_alive`` only if no
byte at all arrives: a new connection that sends nothing, or a client that sends its head one
byte at a time, holds a connection for ever. h11 limits a head only while it is incomplete
(``max_incomplete_event_size``): a 100 KB head that arrives in one read is accepted. And a
request with both ``Content-Length`` and ``Transfer-Encoding`` is read as chunked, where a proxy
in front may have read it by its length: the classic request smuggling.

:func:`guarded` makes a subclass of any uvicorn ``H11Protocol`` (the standard channel's, the
gateways' ``RelayH11Protocol``) that enforces ``[http]`` (:class:`ncp.config.HttpSection`):

- **idle**: a connection with no request under way (new, or after an answer) is closed after
  ``idle_timeout_s`` without a byte;
- **head**: a request's head must be whole ``header_timeout_s`` after its first byte: 408;
- **body**: while a body is received, ``body_timeout_s`` without a byte closes the connection
  (408 when the answer has not started); the time the server itself does not read is not
  counted;
- **size**: a head larger than ``max_header_bytes`` is 431, whether it arrives whole or not;
- **framing**: ``Content-Length`` with ``Transfer-Encoding``, or either given twice: 400.

Each refusal (not an idle close: that is how kept-alive connections end) is answered in the
listener's own form (``render``: an OperationOutcome on the standard channel, a DICOMweb status
on the gateways), then reported to ``on_refusal`` (the audit trail) off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.config import HttpSection

log = logging.getLogger(__name__)

Render = Callable[[int, str], tuple[list[tuple[bytes, bytes]], bytes]]
"""(status, reason) to the headers (besides framing) and body of a refusal."""
ProtocolRefusal = Callable[[int, str, str | None, str], None]
"""(status, reason, client address, request id): a refusal below the application, for the
audit trail. Called on a worker thread. The request id is a new one (a head refused here is not
read, so the caller's ``X-Request-ID`` is unknown) and the answer carries it in its own
``X-Request-ID``, so that a caller can name the record of its refusal."""

_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def plain_text(status: int, reason: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A refusal as text, with the DICOMweb ``Warning`` (PS3.18 8.6)."""
    text = "".join(c for c in reason if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:300]
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"warning", f'299 ncp: "{text}"'.encode("ascii")),
    ]
    return headers, reason.encode("utf-8") + b"\n"


class _Refused(h11.RemoteProtocolError):
    pass


class _GuardedConnection(h11.Connection):
    """h11's server side, refusing what h11 lets through: heads larger than the limit however
    they arrive, and ambiguous body framing. The last refusal is kept for the answer."""

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.refusal: tuple[int, str] | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if self.refusal is None:
                hint = exc.error_status_hint
                if hint == 431:
                    self.refusal = (431, self._too_large())
                else:
                    self.refusal = (400, f"not a valid HTTP/1.1 request: {exc}"[:300])
            raise
        if isinstance(event, h11.Request):
            self._check(event)
        return event

    def _too_large(self) -> str:
        return f"the request head is larger than {self.max_header_bytes} bytes"

    def _check(self, event: h11.Request) -> None:
        size = len(event.method) + len(event.target) + 12
        counts: dict[bytes, int] = {}
        for name, value in event.headers:
            size += len(name) + len(value) + 4
            counts[name] = counts.get(name, 0) + 1
        if size > self.max_header_bytes:
            self.refusal = (431, self._too_large())
        elif counts.get(b"content-length") and counts.get(b"transfer-encoding"):
            self.refusal = (
                400,
                "Content-Length and Transfer-Encoding together: refused (request smuggling)",
            )
        elif counts.get(b"content-length", 0) > 1 or counts.get(b"transfer-encoding", 0) > 1:
            self.refusal = (400, "Content-Length or Transfer-Encoding given twice: refused")
        else:
            return
        raise _Refused(self.refusal[1], error_status_hint=self.refusal[0])


class _Guard(H11Protocol):
    """The limits, as a mixin before a uvicorn H11Protocol subclass (see :func:`guarded`)."""

    limits: HttpSection = HttpSection()
    render: Render = staticmethod(plain_text)  # type: ignore[assignment]
    on_refusal: ProtocolRefusal | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _GuardedConnection(self.limits.max_header_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "idle"

    # -- uvicorn's hooks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait("idle")

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._wait("head")
        elif self._phase == "body":
            self._wait("body")  # a byte arrived: the silence starts again
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._phase == "app":
            self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._phase = "closed"
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        status, reason = self.conn.refusal or (400, msg)  # type: ignore[attr-defined]
        self._refuse(status, reason)

    # -- the phases --------------------------------------------------------------------------

    def _follow(self) -> None:
        """The phase after h11 has seen what arrived: reading a head, a body, or neither."""
        if self._phase == "closed" or self.transport.is_closing():
            return
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            if self._phase != "body":
                self._wait("body")
        elif their is h11.IDLE:
            if self._phase not in ("idle", "head"):
                buffered = bool(self.conn.trailing_data[0])
                self._wait("head" if buffered else "idle")
        else:  # the request is whole: the application's turn, or the connection's end
            self._cancel()
            self._phase = "app"

    def _wait(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        seconds = {
            "idle": self.limits.idle_timeout_s,
            "head": self.limits.header_timeout_s,
            "body": self.limits.body_timeout_s,
        }[phase]
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, phase: str) -> None:
        self._timer = None
        if self._phase != phase or self.transport.is_closing():
            return
        if phase == "idle":
            self.transport.close()  # how an unused or kept-alive connection ends: no record
            return
        if phase == "body":
            if self.flow.read_paused:  # we are not reading: the client cannot send
                self._wait("body")
                return
            cycle = self.cycle
            reason = f"the request body stalled: no byte for {self.limits.body_timeout_s:g} s"
            started = cycle is not None and cycle.response_started
            if cycle is not None:
                # The application sees the client gone, and nothing it sends goes out.
                cycle.disconnected = True
                cycle.message_event.set()
            if started:
                self.transport.close()
                self._report(408, reason, str(uuid.uuid4()))
                return
            self._refuse(408, reason)
            return
        self._refuse(
            408, f"the request head did not arrive within {self.limits.header_timeout_s:g} s"
        )

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` in the listener's form, close, and report it."""
        self._cancel()
        self._phase = "closed"
        request_id = str(uuid.uuid4())
        headers, body = self.render(status, reason)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Error"))]
        for name, value in [
            *headers,
            (b"content-length", str(len(body)).encode("ascii")),
            (b"x-request-id", request_id.encode("ascii")),
            (b"connection", b"close"),
        ]:
            head.append(name + b": " + value + b"\r\n")
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + b"\r\n" + body)
            self.transport.close()
        self._report(status, reason, request_id)

    def _report(self, status: int, reason: str, request_id: str) -> None:
        client = f"{self.client[0]}:{self.client[1]}" if self.client else None
        hook = self.on_refusal
        if hook is None:
            log.warning("HTTP %d for %s: %s [%s]", status, client or "?", reason, request_id)
        else:
            task = self.loop.run_in_executor(
                None, _call, hook, status, reason, client, request_id
            )
            task.add_done_callback(_discard)


def _call(
    hook: ProtocolRefusal, status: int, reason: str, client: str | None, request_id: str
) -> None:
    try:
        hook(status, reason, client, request_id)
    except Exception:  # the refusal stands even if recording it failed
        log.exception("on_refusal hook failed")


def _discard(_: Any) -> None:
    pass


def guarded(
    base: type[H11Protocol],
    limits: HttpSection,
    *,
    render: Render = plain_text,
    on_refusal: ProtocolRefusal | None = None,
) -> type[H11Protocol]:
    """A subclass of ``base`` (uvicorn's ``H11Protocol`` or one of its subclasses) enforcing
    ``limits``; refusals answered by ``render`` and reported to ``on_refusal``."""
    return type(
        f"Guarded{base.__name__}",
        (_Guard, base),
        {
            "limits": limits,
            "render": staticmethod(render),
            "on_refusal": staticmethod(on_refusal) if on_refusal else None,
        },
    )


def uvicorn_options(limits: HttpSection) -> dict[str, Any]:
    """The uvicorn Config options that go with ``limits``."""
    return {
        "timeout_keep_alive": max(1, math.ceil(limits.idle_timeout_s)),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
