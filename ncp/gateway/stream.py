"""The byte path: the one function that moves an answer's bytes to the client (:func:`relay`),
the ASGI answer that runs it, and the checks each DICOM part passes on its way.

``relay`` is deliberately the only place bytes are written, so a faster mover (zero-copy from a
folder, a C-speed proxy) can replace it without touching access control or audit: the gateway
takes a ``relay`` argument.

Back-pressure: ``send`` returns only when the server has room (uvicorn waits for the socket to
drain), and the next chunk is read from the archive only after that, so memory stays one chunk
per transfer whatever the study size and however slow the client. A client that goes away is
noticed through ``receive`` and the transfer is cancelled, which closes the archive stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from ncp.gateway.errors import StreamBroken
from ncp.gateway.multipart import Buffer, MultipartWriter, PartBody, PartHead
from ncp.gateway.parthead import (
    HEAD_LIMIT,
    AfterPixels,
    PartIds,
    dataset_ids,
    file_meta,
    meta_end,
    pixel_end,
)
from ncp.gateway.relay import ArchiveRange, Chunk, FileRegion, read_region, splice_wanted

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
Relay = Callable[[AsyncIterator[Chunk], Send], Awaitable[int]]


async def relay(chunks: AsyncIterator[Chunk], send: Send) -> int:
    """Send every chunk as an ASGI body message, then end the answer; returns the body bytes
    sent. The plain mover (any ASGI server); a failure of ``chunks`` propagates before the
    answer is ended. A mover may also return without ending the answer (the gateway's default,
    ``ncp.gateway.relay.relay``): :class:`StreamedAnswer` then ends it."""
    sent = 0
    async for chunk in chunks:
        if isinstance(chunk, FileRegion | ArchiveRange):
            pieces = (
                read_region(chunk, 1 << 20) if isinstance(chunk, FileRegion) else chunk.pieces()
            )
            async for data in pieces:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            sent += len(chunk)
        elif chunk:
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            sent += len(chunk)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return sent


class NotListed(StreamBroken):
    """The archive's parts and the list of the study's instances disagree (an instance not
    listed, or a listed one missing): the transfer is broken, and the list may be stale."""


@dataclass
class Tally:
    """What a transfer has sent so far, for its audit record."""

    instances: int = 0
    dicom_bytes: int = 0
    body_bytes: int = 0
    sops: list[str] = field(default_factory=list)
    disconnected: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DicomPart:
    """One stored instance on its way: its body, streamed. Its first
    :data:`~ncp.gateway.parthead.HEAD_LIMIT` bytes must name it (file meta group and, where
    checked, the data set's UIDs; all checked before anything of the part is sent); the rest
    may come as :class:`~ncp.gateway.relay.FileRegion` pieces (a folder archive: sendfile)."""

    body: AsyncIterator[Chunk]


@dataclass(frozen=True, slots=True)
class Expected:
    """What a retrieve may send: instances of ``study`` (of ``series``, the one ``sop``, when
    the path names them), each once, and all of them.

    Either ``listed``, the exact SOP Instance UIDs (option A's index): each part's file meta
    SOP must be one of them and all must come. Or ``counts``, the archive's instances per
    series (a series-level QIDO, taken before the transfer): each part's data set must name
    the study (series, instance) asked for and its file meta's SOP, and each series must bring
    exactly its count of distinct instances."""

    study: str
    series: str | None = None
    sop: str | None = None
    listed: frozenset[str] | None = None
    counts: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if (self.listed is None) == (self.counts is None):
            raise ValueError("a retrieve expects either a list of instances or series counts")

    @property
    def total(self) -> int:
        if self.listed is not None:
            return len(self.listed)
        return sum((self.counts or {}).values())


class Membership:
    """One transfer's check of its parts against :class:`Expected`.

    An instance is named by its data set's SOP Instance UID (0008,0018), as the index and a
    DICOMweb archive name it; a file meta group that names another (0002,0003) is tolerated
    (``ncp.gateway.servable``, the rule the index reports by). With the exact list, the file
    meta's UID is looked up first and the data set read only when it is not listed."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self.reads_data_set = expected.listed is None
        self.seen: set[str] = set()
        self.per_series: dict[str, int] = {}

    def needs_data_set(self, meta_sop: str) -> bool:
        """Whether a part whose file meta names ``meta_sop`` must give its data set's UIDs."""
        return self.reads_data_set or meta_sop not in (self.expected.listed or ())

    def admit(self, sop: str, ids: PartIds | None) -> str:
        """Let one part through (``sop`` from its file meta, ``ids`` from its data set when
        :meth:`needs_data_set`), or break the transfer; returns the instance's SOP Instance
        UID (the data set's when read)."""
        want = self.expected
        if ids is not None:
            sop = ids.sop
        if want.listed is not None:
            if sop not in want.listed or (ids is not None and ids.study != want.study):
                raise NotListed("the archive sent an instance that is not in the study asked for")
        else:
            if ids is None or ids.study != want.study:
                raise StreamBroken("the archive sent an instance of another study")
            if want.series is not None and ids.series != want.series:
                raise StreamBroken("the archive sent an instance of another series")
            if want.sop is not None and sop != want.sop:
                raise StreamBroken("the archive sent another instance than the one asked for")
        if sop in self.seen:
            raise StreamBroken("the archive sent an instance twice")
        self.seen.add(sop)
        if want.counts is not None:
            assert ids is not None
            count = self.per_series.get(ids.series, 0) + 1
            if count > want.counts.get(ids.series, 0):
                raise StreamBroken("the archive sent more instances of a series than it has")
            self.per_series[ids.series] = count
        return sop

    def finish(self) -> None:
        """All that was expected came, or the transfer breaks (before its close delimiter)."""
        want = self.expected
        if want.listed is not None:
            if self.seen != want.listed:
                raise NotListed(
                    f"the archive sent {len(self.seen)} of the {len(want.listed)} instances "
                    "asked for"
                )
            return
        assert want.counts is not None
        for series, count in want.counts.items():
            if self.per_series.get(series, 0) != count:
                raise StreamBroken(
                    f"the archive sent {self.per_series.get(series, 0)} of a series' {count} "
                    "instances"
                )


async def _part_head(
    body: AsyncIterator[Chunk], reads_data_set: Callable[[str], bool]
) -> tuple[list[Chunk], str, str, PartIds | None, Buffer]:
    """The chunks read to name a part, its SOP Instance UID and transfer syntax (file meta),
    its data set UIDs (when ``reads_data_set`` of the file meta's SOP says so) and its first
    bytes as far as they were looked at;
    StreamBroken when it does not name itself within HEAD_LIMIT bytes (a folder's file region
    must come after them). The first chunk is looked at in place; bytes are copied only when
    the head spans chunks, and only as many as needed."""
    held: list[Chunk] = []
    head: Buffer = b""
    need = 144
    async for chunk in body:
        if isinstance(chunk, FileRegion | ArchiveRange):
            break
        held.append(chunk)
        view = memoryview(chunk)
        offset = 0
        while offset < len(view) and len(head) < HEAD_LIMIT:
            if not len(head):
                head = view[:HEAD_LIMIT]
                offset = len(head)
            else:
                room = min(max(need - len(head), 4096), HEAD_LIMIT - len(head))
                piece = view[offset : offset + room]
                head = bytes(head) + piece
                offset += len(piece)
            if len(head) < need:
                continue
            facts = file_meta(head)
            if facts is None:
                need = meta_end(head)
                continue
            if not reads_data_set(facts[0]):
                return held, facts[0], facts[1], None, head
            ids = dataset_ids(head, meta_end(head), facts[1])
            if isinstance(ids, PartIds):
                return held, facts[0], facts[1], ids, head
            need = ids
    raise StreamBroken("a part ended or left its first bytes before it named its instance")


async def dicom_answer(
    parts: AsyncIterator[DicomPart],
    expected: Expected,
    writer: MultipartWriter,
    tally: Tally,
    *,
    flush_bytes: int = 1 << 20,
) -> AsyncIterator[Chunk]:
    """Our multipart answer from the archive's parts, each checked by :class:`Membership`
    before any of its bytes leave. Anything else aborts the transfer (StreamBroken) before the
    close delimiter.

    Large pieces (an archive's 1 MiB reads, file regions) are passed on as they are, without a
    copy; small ones (part heads, a slow archive's trickle) are gathered up to ``flush_bytes``.
    Each part is flushed when it ends, so a slow archive's complete instances go out at once.

    Where the mover splices (:func:`ncp.gateway.relay.splice_wanted`: plain TCP) and the part's
    head shows where its native pixel data ends (:func:`ncp.gateway.parthead.pixel_end`), the
    part's bytes up to there that were not read yet go as one
    :class:`~ncp.gateway.relay.ArchiveRange`, unseen: the part must then end right after it,
    or with whole elements (:class:`~ncp.gateway.parthead.AfterPixels`), else the transfer
    breaks; what a Pixel Data length that claims too much pulled into the range (the archive's
    next delimiter and part headers) has then reached the client inside the broken answer. Not
    caught: a delimiter inside the range (the archive writing its boundary inside a part's
    content, which RFC 2046 forbids)."""
    check = Membership(expected)
    pending = bytearray()
    small = max(flush_bytes // 16, 4096)
    first = True
    async for part in parts:
        body = part.body
        held, meta_sop, syntax, ids, head = await _part_head(body, check.needs_data_set)
        sop = check.admit(meta_sop, ids)
        pending += writer.open_part(PartHead(f"application/dicom; transfer-syntax={syntax}"))
        size = 0
        for chunk in held:
            for out in _pass(chunk, pending, small, flush_bytes):
                yield out
            size += len(chunk)
        after: AfterPixels | None = None
        if isinstance(body, PartBody) and body.spliceable:
            if first and pending:  # the answer's first bytes, read before the mover runs:
                yield bytes(pending)  # what splice_wanted() says counts from here on
                pending.clear()
            end = pixel_end(head, meta_end(head), syntax) if splice_wanted() else None
            taken = body.ahead(end - size) if end and end - size >= MIN_SPLICE_BYTES else None
            if taken is not None:  # what was gathered and read goes out with the range
                after = AfterPixels(syntax)
                view, spliced = taken
                spliced.prefix = bytes(pending) + view
                pending.clear()
                yield spliced
                size += len(view) + spliced.count
        first = False
        async for chunk in body:
            if after is not None and not isinstance(chunk, FileRegion | ArchiveRange):
                after.feed(chunk)
            for out in _pass(chunk, pending, small, flush_bytes):
                yield out
            size += len(chunk)
        if after is not None:
            after.end()
        if pending:
            yield bytes(pending)
            pending.clear()
        tally.instances += 1
        tally.dicom_bytes += size
        tally.sops.append(sop)
    check.finish()
    yield writer.close()


MIN_SPLICE_BYTES = 64 * 1024
"""A part's unread bytes up to its pixel data's end worth a splice (which first waits for the
client to take what was written before it)."""


def _pass(chunk: Chunk, pending: bytearray, small: int, flush_bytes: int) -> list[Chunk]:
    """What to send now of ``chunk``: large pieces as they are (after what was gathered), small
    ones gathered in ``pending`` up to ``flush_bytes``."""
    if isinstance(chunk, FileRegion | ArchiveRange) or len(chunk) >= small:
        if not pending:
            return [chunk] if len(chunk) else []
        out: list[Chunk] = [bytes(pending), chunk]
        pending.clear()
        return out
    pending += chunk
    if len(pending) < flush_bytes:
        return []
    out = [bytes(pending)]
    pending.clear()
    return out


class TransferCutShort(Exception):
    """A transfer that failed after its answer had started: the connection is dropped. Its
    text is the one log line the server writes of it (:class:`CutShortFilter`)."""

    def __init__(self, request_id: str, reason: str) -> None:
        text = "".join(c if c.isprintable() else " " for c in reason)[:300]
        super().__init__(f"transfer cut short (request {request_id}): {text}")
        self.request_id = request_id
        self.reason = reason


class CutShortFilter(logging.Filter):
    """Turns the server's "Exception in ASGI application" record of a
    :class:`TransferCutShort` into one warning line without traceback: a transfer cut short is
    an event of the archive or the network, not a fault of the program, and a traceback per
    broken transfer buries the faults that are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TransferCutShort):
            record.msg, record.args = "%s", (str(exc),)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_cut_short_filter(logger: logging.Logger | None = None) -> None:
    """Attach one :class:`CutShortFilter` to ``logger`` (uvicorn's error logger by default)."""
    target = logger or logging.getLogger("uvicorn.error")
    if not any(isinstance(f, CutShortFilter) for f in target.filters):
        target.addFilter(CutShortFilter())


class StreamedAnswer:
    """An ASGI answer that streams ``chunks`` through ``relay`` while watching for the client
    going away. ``on_end`` runs once with the tally, whatever happened (the audit record); when
    the relay ends the answer, ``on_end`` runs just before the last message goes out, so a
    client never holds a complete transfer whose audit record was not written (an exception
    from ``on_end`` there aborts the answer)."""

    def __init__(
        self,
        chunks: AsyncIterator[Chunk],
        *,
        content_type: str,
        relay: Relay,
        tally: Tally,
        on_end: Callable[[Tally], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.content_type = content_type
        self.relay = relay
        self.tally = tally
        self.on_end = on_end
        self.headers = headers or {}

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode("latin-1"))]
        headers += [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()
        ]
        tally = self.tally
        audited = False

        async def counted() -> AsyncIterator[Chunk]:
            async for chunk in self.chunks:
                tally.body_bytes += len(chunk)
                yield chunk

        async def end_after_audit(message: Message) -> None:
            # The relay ends the answer with an empty last message: the audit record is
            # written first, so a failure to write it aborts the answer instead.
            nonlocal audited
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                audited = True
                await self.on_end(tally)
            await send(message)

        failure: BaseException | None = None
        done = False
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            if not done:
                                tally.disconnected = True
                                group.cancel_scope.cancel()
                            return

                group.start_soon(watch)
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await self.relay(counted(), end_after_audit)
                    done = True
                    if not audited:  # a mover that leaves the last message to its caller
                        audited = True
                        await self.on_end(tally)
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception as exc:  # kept, raised below outside the task group
                    failure = exc
                    text = str(exc) if isinstance(exc, StreamBroken) else repr(exc)
                    tally.error = tally.error or text[:500]
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                if not audited:
                    audited = True
                    if not done and tally.error is None and not tally.disconnected:
                        # Cancelled from outside (the server's shutdown grace ran out): the
                        # transfer is broken, and audited so, not as a success.
                        tally.error = "transfer cancelled before its end: the server stopped"
                    await self.on_end(tally)
        if failure is not None:
            # Raised after the answer started: the server drops the connection without the
            # last chunk, so the client sees a broken body, never a complete shorter study.
            # The server logs it in one line (CutShortFilter): reason and request id; the
            # audit record holds the rest.
            reason = tally.error or type(failure).__name__
            raise TransferCutShort(self.headers.get("X-Request-ID", "-"), reason) from failure
