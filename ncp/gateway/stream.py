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

import struct
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from ncp.dicom.uids import is_uid
from ncp.gateway.errors import StreamBroken
from ncp.gateway.multipart import MultipartWriter, PartHead
from ncp.gateway.relay import Chunk, FileRegion, read_region

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
Relay = Callable[[AsyncIterator[Chunk], Send], Awaitable[int]]

_PREFIX_LIMIT = 64 * 1024
"""Bytes of a part held back to read its file meta group (a few hundred in practice)."""


async def relay(chunks: AsyncIterator[Chunk], send: Send) -> int:
    """Send every chunk as an ASGI body message, then end the answer; returns the body bytes
    sent. The plain mover (any ASGI server); a failure of ``chunks`` propagates before the
    answer is ended. A mover may also return without ending the answer (the gateway's default,
    ``ncp.gateway.relay.relay``): :class:`StreamedAnswer` then ends it."""
    sent = 0
    async for chunk in chunks:
        if isinstance(chunk, FileRegion):
            async for data in read_region(chunk, 1 << 20):
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
    """One stored instance on its way: its body, streamed. The first bytes must hold the file
    meta group (checked before anything of the part is sent); the rest may come as
    :class:`~ncp.gateway.relay.FileRegion` pieces (a folder archive: sent by ``sendfile``)."""

    body: AsyncIterator[Chunk]


def file_meta(prefix: bytes) -> tuple[str, str] | None:
    """``(sop_instance_uid, transfer_syntax_uid)`` from the start of a Part 10 object; None
    while ``prefix`` is too short to hold the whole file meta group. StreamBroken if it is not
    a Part 10 object.

    Parsed here (group 0002 is always Explicit VR Little Endian, PS3.10 7.1): pydicom's reader
    took about a millisecond per instance, more than moving a CT slice's bytes."""
    if len(prefix) < 144:
        return None
    if prefix[128:132] != b"DICM" or prefix[132:136] != b"\x02\x00\x00\x00":
        raise StreamBroken("a part is not a DICOM Part 10 object with a file meta group")
    if prefix[136:138] != b"UL":
        raise StreamBroken("a part's file meta group length is not UL")
    (group_length,) = struct.unpack_from("<I", prefix, 140)
    end = 144 + group_length
    if end > _PREFIX_LIMIT:
        raise StreamBroken("a part's file meta group is implausibly long")
    if len(prefix) < end:
        return None
    values: dict[int, bytes] = {}
    pos = 144
    while pos < end:
        if pos + 8 > end:
            raise StreamBroken("a part's file meta group is unreadable (truncated element)")
        group, elem = struct.unpack_from("<HH", prefix, pos)
        vr = prefix[pos + 4 : pos + 6]
        if group != 2 or not vr.isalpha() or not vr.isupper():
            raise StreamBroken("a part's file meta group is unreadable (bad element)")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise StreamBroken("a part's file meta group is unreadable (truncated element)")
            (length,) = struct.unpack_from("<I", prefix, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", prefix, pos + 6)
            pos += 8
        if pos + length > end:
            raise StreamBroken("a part's file meta group is unreadable (element too long)")
        values[elem] = bytes(prefix[pos : pos + length])
        pos += length
    sop = _uid_text(values.get(0x0003, b""))
    syntax = _uid_text(values.get(0x0010, b""))
    if not is_uid(sop) or not is_uid(syntax):
        raise StreamBroken("a part's file meta names no valid SOP Instance or Transfer Syntax")
    return sop, syntax


def _meta_end(probe: bytes | bytearray) -> int:
    """How many bytes of a part hold its file meta group, as far as ``probe`` tells."""
    if len(probe) < 144:
        return 144
    return min(144 + int.from_bytes(probe[140:144], "little"), _PREFIX_LIMIT)


# Explicit VR Little Endian: these VRs have 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def _uid_text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\x00 ")


async def dicom_answer(
    parts: AsyncIterator[DicomPart],
    expected: frozenset[str],
    writer: MultipartWriter,
    tally: Tally,
    *,
    flush_bytes: int = 1 << 20,
) -> AsyncIterator[Chunk]:
    """Our multipart answer from the archive's parts: each must be one of the ``expected``
    instances (of the study asked for, as listed and checked on our side), once; all of them
    must come. Anything else aborts the transfer (StreamBroken) before the close delimiter.

    Large pieces (an archive's 1 MiB reads, file regions) are passed on as they are, without a
    copy; small ones (part heads, a slow archive's trickle) are gathered up to ``flush_bytes``.
    Each part is flushed when it ends, so a slow archive's complete instances go out at once."""
    seen: set[str] = set()
    pending = bytearray()
    small = max(flush_bytes // 16, 4096)
    async for part in parts:
        body = part.body
        probe = bytearray()
        held: list[Chunk] = []
        facts = None
        async for chunk in body:
            if isinstance(chunk, FileRegion):
                break  # the file meta group must come before: refused below
            held.append(chunk)
            offset = 0
            while facts is None:
                # Only the bytes the group needs: 144, then up to its announced end.
                take = chunk[offset : offset + _meta_end(probe) - len(probe)]
                if not len(take):
                    break
                probe += take
                offset += len(take)
                facts = file_meta(bytes(probe))
            if facts is not None:
                break
        if facts is None:
            raise StreamBroken("a part ended before its file meta group")
        sop, syntax = facts
        if sop not in expected:
            raise NotListed("the archive sent an instance that is not in the study asked for")
        if sop in seen:
            raise StreamBroken("the archive sent an instance twice")
        seen.add(sop)
        pending += writer.open_part(PartHead(f"application/dicom; transfer-syntax={syntax}"))
        size = 0
        async for chunk in _chain(held, body):
            if isinstance(chunk, FileRegion) or len(chunk) >= small:
                if pending:
                    yield bytes(pending)
                    pending.clear()
                yield chunk
            else:
                pending += chunk
                if len(pending) >= flush_bytes:
                    yield bytes(pending)
                    pending.clear()
            size += len(chunk)
        if pending:
            yield bytes(pending)
            pending.clear()
        tally.instances += 1
        tally.dicom_bytes += size
        tally.sops.append(sop)
    if seen != expected:
        raise NotListed(f"the archive sent {len(seen)} of the {len(expected)} instances asked for")
    yield writer.close()


async def _chain(held: list[Chunk], rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    for chunk in held:
        yield chunk
    async for chunk in rest:
        yield chunk


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
        try:
            async with anyio.create_task_group() as group:
                done = False

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
                    await self.on_end(tally)
        if failure is not None:
            # Raised after the answer started: the server drops the connection without the
            # last chunk, so the client sees a broken body, never a complete shorter study.
            raise failure
