"""The byte mover of the imaging channel (``docs/decisions/0006-imaging-byte-path.md``).

The gateway decides (token, study, the exact archive URL, audit, per-part checks); this module
only moves bytes, with constant memory and honest failure:

- archive reads (:func:`open_upstream`, :meth:`Upstream.body`): a raw non-blocking socket,
  one ``recv`` of up to ``chunk_bytes`` per hand-over, taking what the socket holds
  (no HTTP client library on the hot path: httpx/h11 cost most of a naive proxy's time). A body
  is complete only when the archive's framing says so: Content-Length reached, the last chunk,
  or, for a body delimited by the connection's close (Orthanc answers WADO-RS that way), the
  closing delimiter of its multipart. Otherwise :class:`TransferBroken`.
- client writes (:func:`relay`, the gateway's ``relay`` hook; :class:`RelayResponse`): under
  uvicorn with ``http=RelayH11Protocol`` and a chunked answer, pieces go straight to the
  transport and :class:`FileRegion` pieces by ``sendfile`` (zero-copy on plain TCP), and on
  plain TCP :class:`ArchiveRange` pieces (part bodies not read yet) by ``os.splice`` from the
  archive's socket (:mod:`ncp.gateway.splice`); elsewhere, ASGI body messages. Either way the
  next piece is produced only when the transport has room, so a slow client slows the archive
  read instead of filling memory.
- a failure after the answer began propagates; the direct path aborts the connection first, and
  the ASGI server closes it without the last chunk: the client sees a broken transfer, never a
  clean short study.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ncp.errors import ArchiveError, NcpError
from ncp.gateway.splice import Pipe, SinkFailed, SourceFailed, move

MAX_HEAD_BYTES = 64 * 1024
_JOIN_BYTES = 64 * 1024
"""Pieces up to this size are written in one piece with their chunk framing."""
DEFAULT_CHUNK_BYTES = 1 << 20
_HEAD_READ_BYTES = 16 * 1024
"""Read after an archive range, in as many reads as it takes: the next part's delimiter and
head, not its body."""
# Headers of the archive's answer that describe its connection or framing, never ours.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
    }
)
_BOUNDARY = re.compile(r'boundary="?([^";,\s]+)"?', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FileRegion:
    """``count`` bytes of the file at ``path`` from ``offset``: sent with ``sendfile`` where the
    connection allows it (plain TCP), else read in pieces. ``file``: the file already open
    (unbuffered, binary), so what is sent is what the sender checked, even if the path changed
    since; the sender keeps it open until the region is sent. Without it, ``path`` is opened
    (not following a symbolic link)."""

    path: Path
    offset: int
    count: int
    file: Any = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return self.count


class ArchiveRange:
    """The next ``count`` bytes of an archive's body, not read yet (:meth:`Upstream.range`):
    moved by ``os.splice`` from the archive's socket to the client's (:meth:`RawBody.splice`,
    plain TCP) or read in pieces (:meth:`Upstream.read_range`). Moved once, before anything
    further is read from that archive. ``prefix``: bytes sent just before them, in the same
    chunk and write (a part's header and head: one send per part, not two)."""

    __slots__ = ("count", "moved", "prefix", "source")

    def __init__(self, source: Upstream, count: int) -> None:
        self.source = source
        self.count = count
        self.moved = 0
        self.prefix = b""

    def __len__(self) -> int:
        return len(self.prefix) + self.count

    @property
    def done(self) -> bool:
        return self.moved == self.count

    async def pieces(self) -> AsyncIterator[bytes]:
        """The prefix, then the range read from the archive in pieces (movers that do not
        splice)."""
        if self.prefix:
            yield self.prefix
        async for data in self.source.read_range(self):
            yield data


Buffer = bytes | bytearray | memoryview
"""Bytes as they are passed along the path: chunks read and views into them, never copied."""
Chunk = Buffer | FileRegion | ArchiveRange


class RawBody:
    """One HTTP/1.1 connection's transport, for writing a chunked answer's body directly.

    :class:`RelayH11Protocol` makes one per request and publishes it through a ContextVar (ASGI
    middlewares wrap ``send``, so an attribute on it would not reach the response). It watches
    the answer's start: only when h11 will frame the body as chunked (HTTP/1.1, not HEAD, no
    Content-Length) is it :attr:`active`. The head and the last chunk still go through the
    server, so h11's state stays right; the chunks in between are written here, without h11's
    per-piece copy.
    """

    def __init__(self, transport: asyncio.Transport, flow: Any, scope: Scope) -> None:
        self._transport = transport
        self._flow = flow
        self._eligible = scope.get("http_version") == "1.1" and scope.get("method") != "HEAD"
        self.active = False
        self.tls = transport.get_extra_info("sslcontext") is not None
        # A chunk's closing CRLF goes out with the next chunk's size line (one small write
        # per chunk, not two); :meth:`finish` writes the last one before h11 ends the body.
        self._open = False

    def started(self, message: Mapping[str, Any]) -> None:
        headers = message.get("headers", [])
        sized = any(bytes(k).lower() == b"content-length" for k, _ in headers)
        self.active = self._eligible and not sized

    @property
    def closing(self) -> bool:
        return self._transport.is_closing()

    def _lead(self, size: int) -> bytes:
        lead = (b"\r\n%x\r\n" if self._open else b"%x\r\n") % size
        self._open = True
        return lead

    async def write(self, data: Buffer) -> None:
        if not len(data):
            return  # a zero-size chunk would end the body
        lead = self._lead(len(data))
        if len(data) <= _JOIN_BYTES:  # one write, framing and all: the copy is cheap
            self._transport.write(lead + data)
        else:
            self._transport.write(lead)
            self._transport.write(_frozen(data))
        await self.drain()

    def finish(self) -> None:
        """End the last chunk written here: the server's end of body may follow."""
        if self._open:
            self._open = False
            self._transport.write(b"\r\n")

    async def send_file(self, region: FileRegion, chunk_bytes: int) -> None:
        self._transport.write(self._lead(region.count))
        if self.tls:  # sendfile cannot encrypt: read and write in pieces, with back-pressure
            async for data in read_region(region, chunk_bytes):
                self._transport.write(data)
                await self.drain()
        else:
            with open_region(region) as file:
                loop = asyncio.get_running_loop()
                sent = await loop.sendfile(
                    self._transport, file, region.offset, region.count, fallback=True
                )
            if sent != region.count:
                raise TransferBroken("a file of the study is shorter than listed")
        await self.drain()

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ClientGone("the client's connection closed")
        await self._flow.drain()

    def abort(self) -> None:
        self._transport.abort()

    @property
    def can_splice(self) -> bool:
        """Plain TCP with a socket of its own: bytes written to it reach the client as they
        are (never under TLS, asyncio's or a thread's)."""
        extra = self._transport.get_extra_info
        return not self.tls and extra("ssl_object") is None and extra("socket") is not None

    async def splice(self, region: ArchiveRange, pipe: Pipe) -> None:
        """Move an archive range to the client's socket in the kernel (plain TCP only): one
        chunk, its size line written through the transport, whose buffer is then let drain to
        empty (so the range follows it on the socket), then ``os.splice`` into a duplicate of
        the socket's descriptor (the loop refuses to watch a transport's own one), the
        transport left as it was. :class:`ClientGone` when the client's connection fails."""
        transport = self._transport
        transport.write(self._lead(len(region)) + region.prefix)
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0)  # paused until the buffer is empty
        try:
            while transport.get_write_buffer_size():
                await self.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)
        if pipe.sink is None:
            sock = transport.get_extra_info("socket")
            if sock is None or transport.is_closing():
                raise ClientGone("the client's connection closed")
            pipe.sink = os.dup(sock.fileno())
        SPLICED.started += 1
        try:
            await region.source.splice_into(region, pipe.sink, pipe)
        except SinkFailed as e:
            raise ClientGone(str(e)) from None
        if transport.is_closing():
            raise ClientGone("the client's connection closed")
        SPLICED.ranges += 1
        SPLICED.bytes += region.count


@dataclass(slots=True)
class SpliceCount:
    """Archive ranges moved by ``os.splice`` in this process (how often the path is taken)."""

    started: int = 0
    ranges: int = 0
    bytes: int = 0


SPLICED = SpliceCount()

_splicing: ContextVar[bool] = ContextVar("ncp_relay_splicing", default=False)


def splice_wanted() -> bool:
    """Whether the mover now iterating the answer's chunks moves :class:`ArchiveRange` pieces
    with ``os.splice`` (:func:`relay` on plain TCP): only then is an archive range worth
    making, elsewhere today's reads are as fast."""
    return _splicing.get()


def _frozen(data: Buffer) -> bytes | memoryview:
    """``data``, or a copy if it could change: a transport may keep a reference to what the
    socket did not take yet (TLS until encrypted; plain ones from Python 3.12). The byte path's
    pieces are bytes or read-only views of bytes (the archive's reads), so nothing is copied."""
    if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
        return data
    return bytes(data)


_raw_body: ContextVar[RawBody | None] = ContextVar("ncp_relay_raw_body", default=None)


class RelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol offering :class:`RawBody` to :func:`relay`
    (``uvicorn.Config(app, http=RelayH11Protocol)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _WithRawBody(self.config.loaded_app, transport, self.flow)


class _WithRawBody:
    def __init__(self, app: Any, transport: asyncio.Transport, flow: Any) -> None:
        self.app = app
        self.transport = transport
        self.flow = flow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = RawBody(self.transport, self.flow, scope)

        async def watched(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                raw.started(message)
            await send(message)

        token = _raw_body.set(raw)
        try:
            await self.app(scope, receive, watched)
        finally:
            _raw_body.reset(token)


async def relay(
    chunks: AsyncIterator[Chunk],
    send: Send,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    splice: bool = True,
) -> int:
    """Send every chunk of an answer whose head was sent; returns the body bytes sent.

    The contract of ``ncp.gateway.stream.relay`` (the gateway's ``relay`` hook): the answer's
    last message is the caller's, sent once the transfer's audit record is written. Faster:
    under :class:`RelayH11Protocol` with a chunked answer, pieces go straight to the transport
    and :class:`FileRegion` pieces by ``sendfile`` (plain TCP); on plain TCP and with
    ``splice``, :class:`ArchiveRange` pieces by ``os.splice`` (:func:`splice_wanted` tells the
    producer while ``chunks`` is iterated). A failure of ``chunks`` propagates (the caller lets
    the server drop the connection); on the direct path the connection is aborted first, so no
    end of body can follow.
    """
    raw = _raw_body.get()
    if raw is not None and not raw.active:
        raw = None
    pipe: Pipe | None = None
    splicing = raw is not None and splice and raw.can_splice
    token = _splicing.set(splicing)
    sent = 0
    try:
        async for chunk in chunks:
            if not len(chunk):
                continue
            if isinstance(chunk, ArchiveRange) and raw is not None and splicing:
                pipe = pipe or Pipe()
                await raw.splice(chunk, pipe)
            elif isinstance(chunk, ArchiveRange):
                async for data in chunk.pieces():
                    if raw is not None:
                        await raw.write(data)
                    else:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
            elif raw is not None:
                if isinstance(chunk, FileRegion):
                    await raw.send_file(chunk, chunk_bytes)
                else:
                    await raw.write(chunk)
            elif isinstance(chunk, FileRegion):
                async for data in read_region(chunk, chunk_bytes):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            sent += len(chunk)
    except BaseException:
        if raw is not None:
            raw.abort()  # never let a partial chunk or a clean close look like an end
        raise
    finally:
        _splicing.reset(token)
        if pipe is not None:
            pipe.close()
    if raw is not None:
        raw.finish()
    return sent


def open_region(region: FileRegion) -> Any:
    """The region's file (a context manager): its open ``file`` (left open), or ``path``
    opened for reading without following a symbolic link."""
    if region.file is not None:
        return contextlib.nullcontext(region.file)
    try:
        fd = os.open(region.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise TransferBroken(f"a file of the study cannot be opened ({e.strerror})") from None
    return os.fdopen(fd, "rb", buffering=0)


async def read_region(region: FileRegion, chunk_bytes: int) -> AsyncIterator[bytes]:
    """A file region in pieces of at most ``chunk_bytes``; TransferBroken if the file is short."""
    with open_region(region) as file:
        file.seek(region.offset)
        left = region.count
        while left:
            data = file.read(min(chunk_bytes, left))
            if not data:
                raise TransferBroken("a file of the study is shorter than listed")
            left -= len(data)
            yield data


class ClientGone(NcpError):
    """The client closed its connection during a transfer."""


class ArchiveUnavailable(ArchiveError):
    """The archive could not be reached or gave no valid answer head; nothing was sent yet."""


class TransferBroken(ArchiveError):
    """The archive's body ended early or was malformed after the client's answer had begun."""


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """How one transfer ended, for the gateway's audit record (no patient data)."""

    status: int
    bytes_sent: int
    complete: bool
    error: str | None = None


OnComplete = Callable[[RelayOutcome], Awaitable[None] | None]


class Upstream:
    """The archive's answer to one GET: status and headers read, body not yet.

    Built by :func:`open_upstream`; read the body once with :meth:`body`; always
    :meth:`aclose` (or use ``async with``).
    """

    def __init__(
        self,
        sock: socket.socket,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        first: bytes,
        *,
        timeout: float,
        chunk_bytes: int,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._sock: socket.socket | None = sock
        self._first = first
        self._timeout = timeout
        self._chunk_bytes = chunk_bytes
        self._used = False
        # For ranges taken from the socket past the reader (:meth:`range`): the body's framing,
        # what a sized body has left, the tail a close-delimited one ends with, and how much
        # to read in small pieces (after a range: the next part's head, not its body, which
        # is left in the socket for the next range).
        self._framing = ""
        self._left = 0
        self._tail = b""
        self._small_reads = 0

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k == wanted), None)

    @property
    def content_type(self) -> str | None:
        return self.header("content-type")

    def end_to_end_headers(self) -> list[tuple[str, str]]:
        """The archive's headers a client may see (no hop-by-hop or framing headers)."""
        return [(k, v) for k, v in self.headers if k not in _HOP_BY_HOP]

    async def body(self) -> AsyncIterator[bytes]:
        """The body in pieces of at most ``chunk_bytes`` (each a new object, never reused by
        the reader, so views into it stay valid); raises :class:`TransferBroken`
        unless the archive's framing says the body is complete."""
        if self._used:
            raise RuntimeError("the body of an Upstream can be read once")
        self._used = True
        encoding = (self.header("transfer-encoding") or "").lower()
        length = self.header("content-length")
        if "chunked" in encoding:
            self._framing = "chunked"
            pieces = self._chunked()
        elif length is not None:
            try:
                size = int(length)
            except ValueError:
                raise TransferBroken(f"archive sent Content-Length {length!r}") from None
            self._framing = "sized"
            pieces = self._sized(size)
        else:
            self._framing = "close"
            pieces = self._until_close()
        async for piece in pieces:
            yield piece

    # -- framing ------------------------------------------------------------------------------

    async def _reads(self) -> AsyncIterator[bytes]:
        """Raw bytes from the socket, in pieces of up to ``chunk_bytes``; b"" once at EOF.

        One ``recv`` per piece, taking what the socket holds (a full 1 MiB when the archive is
        ahead of us, which is when it matters): a new bytes object each time, never reused, and
        not zero-filled first as a ``bytearray`` for ``recv_into`` would be."""
        if self._first:
            first, self._first = self._first, b""
            yield first
        while True:
            size = self._chunk_bytes
            if self._small_reads:
                size = self._small_reads
            data = await self._recv(size)
            self._small_reads = max(self._small_reads - len(data), 0)
            yield data
            if not data:
                return

    async def _recv(self, size: int) -> bytes:
        sock = self._sock
        if sock is None:
            raise TransferBroken("archive connection closed")
        try:
            try:
                return sock.recv(size)  # what is at hand, without a trip through the loop
            except BlockingIOError:
                loop = asyncio.get_running_loop()
                return await asyncio.wait_for(loop.sock_recv(sock, size), self._timeout)
        except TimeoutError:
            raise TransferBroken("archive stopped sending (timeout)") from None
        except OSError as e:
            raise TransferBroken(f"archive connection failed: {e.strerror or e}") from e

    async def _sized(self, size: int) -> AsyncIterator[bytes]:
        self._left = size  # less what ranges take while a piece is out
        async for data in self._reads():
            if not data:
                break
            if len(data) > self._left:
                data = data[: self._left]  # an archive sending more than it announced: ignore
            self._left -= len(data)
            yield data
            if self._left == 0:
                return
        if self._left:
            raise TransferBroken(
                f"archive body ended {self._left} bytes short of its Content-Length"
            )

    async def _until_close(self) -> AsyncIterator[bytes]:
        match = _BOUNDARY.search(self.content_type or "")
        closing = b"--" + match.group(1).encode("latin-1") + b"--" if match else None
        keep = len(closing) + 64 if closing is not None else 0
        self._tail = b""  # emptied by a range: what ends the body is read after it
        async for data in self._reads():
            if not data:
                break
            if closing is not None:
                self._tail = (self._tail + data[-keep:])[-keep:]
            yield data
        # Orthanc (and others) end WADO-RS multipart with the closing delimiter, maybe a CRLF.
        if closing is not None and not self._tail.rstrip().endswith(closing):
            raise TransferBroken("archive body ended before the closing multipart delimiter")

    # -- ranges: bytes taken from the socket past the reader ----------------------------------

    def range(self, count: int) -> ArchiveRange | None:
        """The ``count`` bytes that follow everything :meth:`body` handed out, as an
        :class:`ArchiveRange` to move before the body is read on; None when they cannot be
        taken from the socket untouched (a chunked body, a sized one with fewer left, the
        connection closed). The body's framing is kept: a sized body counts the range, a
        close-delimited one still needs its closing delimiter after it."""
        if count <= 0 or self._sock is None or self._first or self._framing == "":
            return None
        if self._framing == "chunked" or (self._framing == "sized" and count > self._left):
            return None
        if self._framing == "sized":
            self._left -= count
        self._tail = b""
        self._small_reads = _HEAD_READ_BYTES
        return ArchiveRange(self, count)

    async def splice_into(self, region: ArchiveRange, fd: int, pipe: Pipe) -> None:
        """Move ``region`` to the socket ``fd`` in the kernel (:func:`ncp.gateway.splice.move`);
        :class:`TransferBroken` when the archive ends or fails first, ``SinkFailed`` when the
        client does."""
        sock = self._sock
        if sock is None or region.source is not self or region.moved:
            raise TransferBroken("archive connection closed")
        try:
            await move(sock.fileno(), fd, region.count, pipe, timeout=self._timeout)
        except SourceFailed as e:
            raise TransferBroken(f"{e} (inside a spliced range)") from None
        region.moved = region.count

    async def read_range(self, region: ArchiveRange) -> AsyncIterator[bytes]:
        """``region`` read from the socket in pieces (where it cannot be spliced)."""
        if region.source is not self or region.moved:
            raise TransferBroken("archive connection closed")
        while region.moved < region.count:
            data = await self._recv(min(self._chunk_bytes, region.count - region.moved))
            if not data:
                raise TransferBroken("archive closed its connection inside a range")
            region.moved += len(data)
            yield data
        self._small_reads = _HEAD_READ_BYTES

    async def _chunked(self) -> AsyncIterator[bytes]:
        pending = bytearray()
        reads = self._reads()
        eof = False

        async def more() -> None:
            nonlocal eof
            data = await anext(reads, b"")
            if not data:
                eof = True
            pending.extend(data)

        while True:
            while b"\r\n" not in pending:
                if eof or len(pending) > 1024:
                    raise TransferBroken("archive sent a malformed or truncated chunked body")
                await more()
            line, _, _ = bytes(pending[: pending.index(b"\r\n")]).partition(b";")
            try:
                size = int(line.strip(), 16)
            except ValueError:
                raise TransferBroken("archive sent a malformed chunk size") from None
            del pending[: pending.index(b"\r\n") + 2]
            if size == 0:
                return  # trailers, if any, are not ours to forward
            while size:
                if not pending:
                    if eof:
                        raise TransferBroken("archive body ended inside a chunk")
                    await more()
                    continue
                take = min(size, len(pending))
                yield bytes(pending[:take])
                del pending[:take]
                size -= take
            while len(pending) < 2:
                if eof:
                    raise TransferBroken("archive body ended inside a chunk")
                await more()
            if pending[:2] != b"\r\n":
                raise TransferBroken("archive sent a malformed chunk end")
            del pending[:2]

    async def aclose(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_upstream(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Upstream:
    """Connect to the archive, send ``GET url`` and read the answer's head.

    ``url`` is the exact archive URL the gateway built (plain ``http://``: the archive sits next to
    the gateway). ``timeout`` bounds the connect, the answer head, and every later read.
    Raises :class:`ArchiveUnavailable`; a non-2xx status is returned for the caller to map.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ArchiveUnavailable(f"the relay reads plain http:// archive URLs, not {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for name, value in (headers or {}).items():
        if "\r" in name + value or "\n" in name + value or ":" in name:
            raise ValueError("header names and values must be single-line")
        lines.append(f"{name}: {value}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, request)
            head, rest = await _read_head(loop, sock)
        status, reason, parsed = _parse_head(head)
    except (OSError, TimeoutError, ArchiveUnavailable) as e:
        if sock is not None:
            sock.close()
        if isinstance(e, ArchiveUnavailable):
            raise
        what = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ArchiveUnavailable(f"archive {parts.hostname}:{port}: {what}") from e
    return Upstream(
        sock, status, reason, parsed, rest, timeout=timeout, chunk_bytes=max(chunk_bytes, 4096)
    )


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD_BYTES:
            raise ArchiveUnavailable("archive answer head is too large")
        piece = await loop.sock_recv(sock, 65536)
        if not piece:
            raise ArchiveUnavailable("archive closed the connection before answering")
        data.extend(piece)
    end = data.index(b"\r\n\r\n")
    return bytes(data[:end]), bytes(data[end + 4 :])


def _parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    valid_code = len(code) == 3 and code.isascii() and code.isdigit()
    if not version.startswith("HTTP/1.") or not valid_code:
        raise ArchiveUnavailable("archive answered something that is not HTTP/1.x")
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ArchiveUnavailable("archive sent a malformed header line")
        headers.append((name.lower(), value.strip()))
    return int(code), reason, headers


class RelayResponse(Response):
    """Streams an :class:`Upstream`'s body to the client with constant memory.

    The content type is the archive's unless ``headers`` names one. ``on_complete`` runs once,
    after the last byte or the abort, with a :class:`RelayOutcome` (the audit record's facts).
    A broken archive body re-raises :class:`TransferBroken` after the answer has begun, so the
    ASGI server drops the connection without ending the body.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
        on_complete: OnComplete | None = None,
    ) -> None:
        self.upstream = upstream
        self.status_code = status_code or upstream.status
        self.on_complete = on_complete
        self.background = None
        chosen = {k.lower(): v for k, v in (headers or {}).items()}
        if "content-type" not in chosen and upstream.content_type:
            chosen["content-type"] = upstream.content_type
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in chosen.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0
        raw: RawBody | None = None
        error: str | None = None
        complete = False
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            raw = _raw_body.get()
            if raw is not None and not raw.active:
                raw = None
            async for piece in self.upstream.body():
                if gone.is_set():
                    error = "client went away"
                    break
                if raw is not None:
                    await raw.write(piece)
                else:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                sent += len(piece)
            else:
                if raw is not None:
                    raw.finish()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                complete = not gone.is_set()
                if not complete:
                    error = "client went away"
        except ClientGone:
            error = "client went away"
        except TransferBroken as e:
            error = str(e)
            if raw is not None:
                raw.abort()
            raise
        except OSError as e:  # the client's connection failed under a server that raises
            error = f"client connection failed: {e.strerror or e}"
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.upstream.aclose()
            if self.on_complete is not None:
                outcome = RelayOutcome(self.status_code, sent, complete, error)
                result = self.on_complete(outcome)
                if inspect.isawaitable(result):
                    await result


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message: Any = await receive()
        if message.get("type") == "http.disconnect":
            gone.set()
            return
