"""multipart/related (RFC 2387, RFC 2046 5.1) on the byte path: reading an archive's answer part
by part in constant memory, and writing our own answer.

The reader never holds more than one upstream chunk plus a boundary's length: a part's body is
handed on as it arrives, as views into the chunks read (:meth:`MultipartReader.read`). The
writer frames parts with a fresh boundary and only the headers we choose, so nothing of the
archive's part headers (a ``Content-Location`` with its address, say) reaches the client.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message

from ncp.gateway.errors import StreamBroken
from ncp.gateway.relay import ArchiveRange, Upstream

Buffer = bytes | bytearray | memoryview
"""A piece of a body: chunks and part bodies are passed on without copying."""

MAX_PART_HEADER = 16 * 1024
_TOKEN_PARAM = re.compile(r"[\x21-\x7e]+\Z")


class MultipartError(StreamBroken):
    """A multipart body that does not follow RFC 2046 (mid-stream: the transfer is broken)."""


def content_type(value: str) -> Message:
    msg = Message()
    msg["content-type"] = value
    return msg


def boundary_of(value: str) -> bytes:
    """The boundary of a multipart/related Content-Type, or MultipartError."""
    ctype = content_type(value)
    boundary = ctype.get_param("boundary")
    if ctype.get_content_type() != "multipart/related" or not isinstance(boundary, str):
        raise MultipartError(f"not multipart/related with a boundary: {value[:100]!r}")
    # RFC 2046 allows 70 characters; Orthanc writes 73. Tolerated when reading, within reason.
    if not 1 <= len(boundary) <= 200:
        raise MultipartError("a boundary of implausible length")
    return boundary.encode("latin-1")


def safe_header_value(value: str) -> str | None:
    """A part's media type as we pass it on: printable ASCII, no line breaks, or None."""
    text = value.strip()
    if not text or len(text) > 256 or any(not 0x20 <= ord(c) < 0x7F for c in text):
        return None
    return text


def part_headers(head: bytes) -> dict[str, str]:
    """A part's headers by lower-case name, from what follows its boundary up to the empty
    line: the rest of the boundary line (only whitespace may stand there), then header lines."""
    lines = head.split(b"\r\n")
    if lines[0].strip(b" \t"):
        raise MultipartError("garbage after a boundary")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise MultipartError("a part header line without ':'")
        headers[name.strip().lower()] = value.strip()
    return headers


class MultipartReader:
    """Parts of a streamed multipart body: ``await next_part()`` gives the next part's
    headers (lower-case names) or None after the close delimiter; ``await read()`` gives the
    current part's body, piece by piece, then None.

    Pieces are views into the chunks read (no copy of the body): a chunk is searched for the
    delimiter where it lies, and only the few bytes that might start a delimiter at a chunk's
    end are carried over to the next one. Callers must not change the chunks they hand in.

    ``source``: the archive answer the chunks are read from (their only reader): a part's body
    may then skip ahead past what was read, as an :class:`~ncp.gateway.relay.ArchiveRange`
    (:meth:`PartBody.ahead`).
    """

    def __init__(
        self, chunks: AsyncIterator[Buffer], boundary: bytes, *, source: Upstream | None = None
    ) -> None:
        self._chunks = chunks
        self._source = source
        self._range: ArchiveRange | None = None  # taken by ahead(), moved before reading on
        self._dash = b"--" + boundary
        self._delimiter = b"\r\n" + self._dash
        self._data: bytes | bytearray = b""
        self._pos = 0  # what is left of the current chunk starts here
        self._state = "preamble"  # preamble, after-boundary, body, done
        self._eof = False

    def _left(self) -> int:
        return len(self._data) - self._pos

    async def _next_chunk(self) -> bytes | bytearray | None:
        if self._eof:
            return None
        if self._range is not None:
            if not self._range.done:
                raise MultipartError("a part's range was not moved before reading on")
            self._range = None
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._eof = True
            return None
        return bytes(chunk) if isinstance(chunk, memoryview) else chunk

    async def _more(self) -> bool:
        """Append the next chunk to what is left (copies the rest; only used for heads)."""
        chunk = await self._next_chunk()
        if chunk is None:
            return False
        self._data = chunk if self._left() <= 0 else self._data[self._pos :] + chunk
        self._pos = 0
        return True

    async def next_part(self) -> dict[str, str] | None:
        while self._state == "body":  # the caller skipped the rest of a part
            await self.read()
        if self._state == "done":
            return None
        if self._state == "preamble":
            while True:
                i = self._data.find(self._dash, self._pos)
                if i >= 0:
                    self._pos = i + len(self._dash)
                    break
                if self._left() > MAX_PART_HEADER or not await self._more():
                    raise MultipartError("no opening boundary")
        # After a boundary: '--' closes, otherwise optional whitespace, CRLF, headers, CRLF.
        while self._left() < 2:
            if not await self._more():
                raise MultipartError("body ends after a boundary")
        if self._data[self._pos : self._pos + 2] == b"--":
            self._state = "done"
            return None
        # The rest of the boundary line, then the header lines, then an empty line.
        while (end := self._data.find(b"\r\n\r\n", self._pos)) < 0:
            if self._left() > MAX_PART_HEADER or not await self._more():
                raise MultipartError("unterminated part headers")
        head = bytes(self._data[self._pos : end])
        self._pos = end + 4
        headers = part_headers(head)
        self._state = "body"
        return headers

    async def read(self) -> Buffer | None:
        """The next piece of the current part's body, or None at its end."""
        if self._state != "body":
            return None
        delimiter = self._delimiter
        keep = len(delimiter) - 1
        while True:
            j = self._data.find(delimiter, self._pos)
            if j >= 0:
                piece = memoryview(self._data)[self._pos : j]
                self._pos = j + len(delimiter)
                self._state = "after-boundary"
                # The last piece of the part (if any); the next call returns None.
                return piece if len(piece) else None
            safe = len(self._data) - keep
            if safe > self._pos:
                piece = memoryview(self._data)[self._pos : safe]
                self._pos = safe
                return piece
            # Only a possible start of a delimiter is left: look across into the next chunk.
            tail = bytes(self._data[self._pos :])
            chunk = await self._next_chunk()
            if chunk is None:
                raise MultipartError("body ends inside a part (no closing boundary)")
            if tail and len(chunk) >= keep:
                edge = tail + bytes(chunk[:keep])
                j = edge.find(delimiter)
                self._data, self._pos = chunk, 0
                if j >= 0:  # the delimiter straddles the two chunks
                    self._pos = j + len(delimiter) - len(tail)
                    self._state = "after-boundary"
                    return edge[:j] or None
                return tail  # no delimiter starts in it
            self._data, self._pos = (tail + chunk if tail else chunk), 0

    def body(self) -> PartBody:
        """The current part's body as an async iterator."""
        return PartBody(self)

    @property
    def spliceable(self) -> bool:
        return self._source is not None

    def ahead(self, count: int) -> tuple[memoryview, ArchiveRange] | None:
        """The current part's next ``count`` bytes taken without looking for its end: what
        was read of them (a view, maybe empty) and an :class:`~ncp.gateway.relay.ArchiveRange`
        for the rest, which must be moved before anything more is read; None when there is no
        rest, when what was read holds a delimiter (the part ends before), or the source cannot
        give a range. A delimiter inside the range (an archive writing its boundary inside a
        part, which RFC 2046 forbids) is not seen: the caller must know where the part ends
        (``ncp.gateway.parthead.pixel_end``) and check what follows the range."""
        if self._state != "body" or self._source is None or self._range is not None:
            return None
        held = len(self._data) - self._pos
        if count <= held or self._data.find(self._delimiter, self._pos) >= 0:
            return None
        taken = self._source.range(count - held)
        if taken is None:
            return None
        piece = memoryview(self._data)[self._pos :]
        self._data, self._pos, self._range = b"", 0, taken
        return piece, taken


class PartBody:
    """One part's body (:meth:`MultipartReader.body`): an async iterator of pieces, which can
    also skip ahead (:meth:`ahead`, the byte path's splice)."""

    def __init__(self, reader: MultipartReader) -> None:
        self._reader = reader
        self._ended = False

    def __aiter__(self) -> PartBody:
        return self

    async def __anext__(self) -> Buffer:
        piece = None if self._ended else await self._reader.read()
        if piece is None:
            self._ended = True  # never the next part's bytes
            raise StopAsyncIteration
        return piece

    @property
    def spliceable(self) -> bool:
        """Whether :meth:`ahead` can give a range at all (the reader knows its source)."""
        return self._reader.spliceable

    def ahead(self, count: int) -> tuple[memoryview, ArchiveRange] | None:
        """:meth:`MultipartReader.ahead` for this part."""
        return None if self._ended else self._reader.ahead(count)

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class PartHead:
    """What our answer says about one part."""

    content_type: str


class MultipartWriter:
    """Frames parts under a fresh random boundary (never one an archive chose)."""

    def __init__(self, part_type: str) -> None:
        self.boundary = secrets.token_hex(16)
        self.part_type = part_type
        self._started = False

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def open_part(self, head: PartHead) -> bytes:
        lead = b"\r\n" if self._started else b""
        self._started = True
        return lead + f"--{self.boundary}\r\nContent-Type: {head.content_type}\r\n\r\n".encode(
            "ascii"
        )

    def close(self) -> bytes:
        lead = b"\r\n" if self._started else b""
        return lead + f"--{self.boundary}--\r\n".encode("ascii")
