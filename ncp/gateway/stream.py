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
from io import BytesIO
from typing import Any

import anyio
from pydicom.filereader import _read_file_meta_info, read_preamble

from ncp.dicom.uids import is_uid
from ncp.gateway.errors import StreamBroken
from ncp.gateway.multipart import MultipartWriter, PartHead

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
Relay = Callable[[AsyncIterator[bytes], Send], Awaitable[int]]

_PREFIX_LIMIT = 64 * 1024
"""Bytes of a part held back to read its file meta group (a few hundred in practice)."""


async def relay(chunks: AsyncIterator[bytes], send: Send) -> int:
    """Send every chunk as an ASGI body message, then end the answer; returns the body bytes
    sent. The default mover; a failure of ``chunks`` propagates before the answer is ended.
    A mover may also return without ending the answer: :class:`StreamedAnswer` then ends it."""
    sent = 0
    async for chunk in chunks:
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return sent


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
    """One stored instance on its way: its body, streamed."""

    body: AsyncIterator[bytes]


def file_meta(prefix: bytes) -> tuple[str, str] | None:
    """``(sop_instance_uid, transfer_syntax_uid)`` from the start of a Part 10 object; None
    while ``prefix`` is too short to hold the whole file meta group. StreamBroken if it is not
    a Part 10 object."""
    if len(prefix) < 144:
        return None
    if prefix[128:132] != b"DICM" or prefix[132:136] != b"\x02\x00\x00\x00":
        raise StreamBroken("a part is not a DICOM Part 10 object with a file meta group")
    (group_length,) = struct.unpack("<I", prefix[140:144])
    end = 144 + group_length
    if end > _PREFIX_LIMIT:
        raise StreamBroken("a part's file meta group is implausibly long")
    if len(prefix) < end:
        return None
    fp = BytesIO(prefix[:end])
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises many kinds on a corrupt group
        raise StreamBroken(
            f"a part's file meta group is unreadable ({type(exc).__name__})"
        ) from None
    sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
    syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    if not is_uid(sop) or not is_uid(syntax):
        raise StreamBroken("a part's file meta names no valid SOP Instance or Transfer Syntax")
    return sop, syntax


async def dicom_answer(
    parts: AsyncIterator[DicomPart],
    expected: frozenset[str],
    writer: MultipartWriter,
    tally: Tally,
    *,
    flush_bytes: int = 1 << 20,
) -> AsyncIterator[bytes]:
    """Our multipart answer from the archive's parts: each must be one of the ``expected``
    instances (of the study asked for, as listed and checked on our side), once; all of them
    must come. Anything else aborts the transfer (StreamBroken) before the close delimiter.

    The archive's pieces (64 KiB from an HTTP archive) are gathered into pieces of up to
    ``flush_bytes``, and each part is flushed when it ends: fewer, larger writes (about twice
    the throughput from Orthanc on loopback), while a slow archive's complete instances still
    go out as soon as they are in."""
    seen: set[str] = set()
    pending = bytearray()
    async for part in parts:
        prefix = bytearray()
        facts = None
        body = part.body
        async for chunk in body:
            prefix.extend(chunk)
            facts = file_meta(bytes(prefix))
            if facts is not None:
                break
        if facts is None:
            raise StreamBroken("a part ended before its file meta group")
        sop, syntax = facts
        if sop not in expected:
            raise StreamBroken("the archive sent an instance that is not in the study asked for")
        if sop in seen:
            raise StreamBroken("the archive sent an instance twice")
        seen.add(sop)
        pending += writer.open_part(PartHead(f"application/dicom; transfer-syntax={syntax}"))
        pending += prefix
        size = len(prefix)
        async for chunk in body:
            size += len(chunk)
            pending += chunk
            if len(pending) >= flush_bytes:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)
            pending.clear()
        tally.instances += 1
        tally.dicom_bytes += size
        tally.sops.append(sop)
    if seen != expected:
        raise StreamBroken(
            f"the archive sent {len(seen)} of the {len(expected)} instances asked for"
        )
    yield writer.close()


class StreamedAnswer:
    """An ASGI answer that streams ``chunks`` through ``relay`` while watching for the client
    going away. ``on_end`` runs once with the tally, whatever happened (the audit record); when
    the relay ends the answer, ``on_end`` runs just before the last message goes out, so a
    client never holds a complete transfer whose audit record was not written (an exception
    from ``on_end`` there aborts the answer)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
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

        async def counted() -> AsyncIterator[bytes]:
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
