"""A folder archive behind the gateway: an in-memory catalogue of its instances, answering QIDO,
metadata and retrieves from the files themselves.

The catalogue is built by the same walk the indexer uses (:class:`ncp.dicom.folder.FolderSource`:
headers only, no pixel data, symbolic links refused) before the gateway serves (:meth:`warm`, run
by the app's startup: the first search must not pay for reading every header, which took 20 s
and more for the demo's 7,800 instances), and refreshed incrementally: a file whose size and
modification time are unchanged is not read again. A study asked for that is not in the
catalogue triggers a refresh the request waits for, at most every ``rescan_s`` seconds; a
catalogue older than a minute is refreshed in the background while requests are answered from
it. Files are opened only through ``FolderSource.path_of`` (no locator leaves the root) and
without following a link.

Retrieves send each file as its first bytes (read here, so the gateway checks its file meta
group) and a :class:`~ncp.gateway.relay.FileRegion` for the rest, sent from the same open file
by ``sendfile`` where the client's connection allows it (decision 0006). The open and the first
read are done on the event loop: a few microseconds from the page cache, cheaper than a thread
hop per instance.

A retrieve that asks for another syntax than an instance's stored one gets that instance
transcoded (``ncp.dicom.transcode``: to Explicit or Implicit VR Little Endian), one instance at a
time in a worker thread as the answer asks for it; the others keep the zero-copy path.

Frames and bulk data are not offered for a folder (its metadata carries bulk data inline).
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ncp.dicom.folder import FolderSource
from ncp.dicom.mapping import map_instance
from ncp.dicom.source import InstanceHeader, SourceEntry
from ncp.dicom.transcode import TranscodeError, can_transcode, syntax_name, transcode
from ncp.errors import UnreadableInstance
from ncp.gateway.dicomjson import SERIES_UID, SOP_UID, STUDY_UID, element
from ncp.gateway.errors import NotAcceptable, NotFound, StreamBroken
from ncp.gateway.parthead import HEAD_LIMIT
from ncp.gateway.relay import Chunk, FileRegion
from ncp.gateway.stream import DicomPart

_HEAD_BYTES = HEAD_LIMIT
"""Bytes of each file read before its region: all a part may need to name itself."""


def _tags(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The attributes QIDO-RS returns by default at each level (PS3.18), with the Issuer of
# Patient ID the gateway's patient check needs.
_STUDY_TAGS = _tags(
    "00080005 00080020 00080030 00080050 00080051 00080090 00080201 00081030 00100010 "
    "00100020 00100021 00100030 00100040 0020000D 00200010"
)
_SERIES_TAGS = _tags(
    "00080005 00080060 0008103E 00180015 0020000D 0020000E 00200011 00200060 00400244 00400245"
)
_INSTANCE_TAGS = _tags(
    "00080005 00080016 00080018 0020000D 0020000E 00200013 00280008 00280010 00280011 00280100"
)


@dataclass(frozen=True, slots=True)
class _Instance:
    study: str
    series: str
    sop: str
    locator: str
    fingerprint: str
    transfer_syntax: str
    header: dict[str, Any]


class FolderUpstream:
    """A tree of Part 10 files, as a gateway archive."""

    kind = "folder"
    archive_base: str | None = None

    def __init__(self, root: Path, *, chunk_bytes: int = 1 << 20, rescan_s: float = 5.0) -> None:
        self.source = FolderSource(root)
        self.chunk_bytes = chunk_bytes
        self.rescan_s = rescan_s
        self.max_age_s = max(rescan_s, 60.0)
        self._by_locator: dict[str, _Instance] = {}
        self._studies: dict[str, dict[str, dict[str, _Instance]]] = {}
        self._scanned_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def warm(self) -> None:
        """Build the catalogue now (the gateway's startup), so no request waits for it."""
        await self._refresh(None)

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()

    # -- the catalogue -------------------------------------------------------------------------

    def _scan(self) -> None:
        changed: list[SourceEntry] = []
        kept: dict[str, _Instance] = {}
        for entry in self.source.entries():
            if not isinstance(entry, SourceEntry):
                continue
            old = self._by_locator.get(entry.locator)
            if old is not None and old.fingerprint == entry.fingerprint:
                kept[entry.locator] = old
            else:
                changed.append(entry)
        for header in self.source.read_headers(changed):
            if isinstance(header, InstanceHeader):
                instance = _instance(header)
                if instance is not None:
                    kept[instance.locator] = instance
        studies: dict[str, dict[str, dict[str, _Instance]]] = {}
        for instance in sorted(kept.values(), key=lambda i: i.locator):
            series = studies.setdefault(instance.study, {}).setdefault(instance.series, {})
            series.setdefault(instance.sop, instance)  # a copy of an instance is served once
        self._by_locator = kept
        self._studies = studies

    def _age(self) -> float | None:
        return None if self._scanned_at is None else time.monotonic() - self._scanned_at

    async def _refresh(self, min_age: float | None) -> None:
        """Scan (in a thread) unless another scan ended less than ``min_age`` seconds ago."""
        async with self._lock:
            age = self._age()
            if age is None or min_age is None or age >= min_age:
                await anyio.to_thread.run_sync(self._scan)
                self._scanned_at = time.monotonic()

    async def _study(self, study: str) -> dict[str, dict[str, _Instance]]:
        age = self._age()
        if age is None or (study not in self._studies and age >= self.rescan_s):
            await self._refresh(self.rescan_s)  # a new study may have arrived: wait for it
        elif age >= self.max_age_s and (self._background is None or self._background.done()):
            # Old: refreshed behind the requests, which the current catalogue answers.
            self._background = asyncio.create_task(self._refresh(self.max_age_s))
        found = self._studies.get(study)
        if found is None:
            raise NotFound("no such study in the archive")
        return found

    def _select(
        self, tree: dict[str, dict[str, _Instance]], series: str | None, sop: str | None
    ) -> list[_Instance]:
        if series is None:
            return [i for s in tree.values() for i in s.values()]
        chosen = tree.get(series)
        if chosen is None:
            raise NotFound("no such series in the study")
        if sop is None:
            return list(chosen.values())
        if sop not in chosen:
            raise NotFound("no such instance in the series")
        return [chosen[sop]]

    # -- QIDO and metadata ---------------------------------------------------------------------

    async def study(self, study: str, fields: Iterable[str]) -> list[dict[str, Any]]:
        try:
            tree = await self._study(study)
        except NotFound:
            return []
        instances = self._select(tree, None, None)
        item = _pick(instances[0].header, _STUDY_TAGS | set(fields))
        modalities = sorted({m for i in instances for m in _texts(i.header, "00080060")})
        item["00080061"] = element("CS", *modalities)
        item["00201206"] = element("IS", len(tree))
        item["00201208"] = element("IS", len(instances))
        return [item]

    async def search(
        self, study: str, level: str, series: str | None, fields: Iterable[str]
    ) -> list[dict[str, Any]]:
        tree = await self._study(study)
        wanted = set(fields)
        if level == "series":
            out = []
            for members in tree.values():
                first = next(iter(members.values()))
                item = _pick(first.header, _SERIES_TAGS | wanted)
                item["00201209"] = element("IS", len(members))
                out.append(item)
            return out
        return [_pick(i.header, _INSTANCE_TAGS | wanted) for i in self._select(tree, series, None)]

    async def metadata(self, study: str, series: str | None, sop: str | None) -> list[Any]:
        tree = await self._study(study)
        return [dict(i.header) for i in self._select(tree, series, sop)]

    def stored_syntaxes(self, study: str, series: str | None, sop: str | None) -> set[str] | None:
        # NotFound for a series or instance not in the study (the retrieve would be 404).
        return {i.transfer_syntax for i in self._select(self._studies.get(study, {}), series, sop)}

    # -- retrieve ------------------------------------------------------------------------------

    async def retrieve(
        self, study: str, series: str | None, sop: str | None, accept_syntax: str
    ) -> AsyncIterator[DicomPart]:
        tree = await self._study(study)
        chosen = self._select(tree, series, sop)
        # Each instance as stored when that is what was asked for (zero copy), else
        # transcoded; all refused before anything is sent when one cannot be.
        recode = {i.locator for i in chosen if accept_syntax not in ("*", i.transfer_syntax)}
        for instance in chosen:
            if instance.locator in recode and not can_transcode(
                instance.transfer_syntax, accept_syntax
            ):
                raise NotAcceptable(
                    f"an instance is stored in {syntax_name(instance.transfer_syntax)}, which "
                    f"this archive cannot transcode to {syntax_name(accept_syntax)}; ask with "
                    "transfer-syntax=* (as stored)"
                )
        plan = [(self.source.path_of(i.locator), i.locator in recode) for i in chosen]
        chunk_bytes = self.chunk_bytes

        async def parts() -> AsyncIterator[DicomPart]:
            for path, transcoded in plan:
                if transcoded:
                    yield DicomPart(_transcoded_part(path, accept_syntax, chunk_bytes))
                else:
                    yield DicomPart(_file_part(path))

        return parts()

    async def raw(self, path: str, accept: str) -> tuple[str, AsyncIterator[Any]]:
        raise NotFound("frames and bulk data are not offered for this archive")


async def _file_part(path: Path) -> AsyncIterator[Chunk]:
    """One stored file: its first bytes, then the rest as a region of the same open file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StreamBroken(f"a stored file cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        try:
            size = os.fstat(fd).st_size
            head = bytearray()
            while len(head) < min(size, _HEAD_BYTES):
                data = fh.read(min(size, _HEAD_BYTES) - len(head))
                if not data:
                    raise StreamBroken("a stored file is shorter than its size")
                head += data
        except OSError as exc:
            raise StreamBroken(f"a stored file cannot be read ({exc.strerror})") from None
        yield bytes(head)
        if size > len(head):
            yield FileRegion(path, len(head), size - len(head), file=fh)


async def _transcoded_part(path: Path, syntax: str, chunk_bytes: int) -> AsyncIterator[Chunk]:
    """One stored file written in ``syntax`` (``ncp.dicom.transcode``), decoded in a worker
    thread only when the answer asks for this part: one instance in memory at a time."""
    try:
        data = await anyio.to_thread.run_sync(transcode, path, syntax)
    except TranscodeError as exc:
        raise StreamBroken(f"an instance could not be transcoded: {exc}") from None
    view = memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


def _instance(header: InstanceHeader) -> _Instance | None:
    """The catalogue's entry of one file, by the index's own mapping (the same identity, and
    the same instances refused: ``ncp.dicom.mapping.map_instance``); None when the index
    would not take it."""
    try:
        keys = map_instance(header)
    except UnreadableInstance:
        return None
    # A value pydicom cannot write as DICOM JSON (an IS of "1A") is left out alone, never the
    # whole header with it: the Patient ID must stay for the patient check (servable.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header_json = header.dataset.to_json_dict(suppress_invalid_tags=True)
    header_json[STUDY_UID] = element("UI", keys.study_uid)
    header_json[SERIES_UID] = element("UI", keys.series_uid)
    header_json[SOP_UID] = element("UI", keys.instance.sop_uid)
    return _Instance(
        keys.study_uid,
        keys.series_uid,
        keys.instance.sop_uid,
        header.entry.locator,
        header.entry.fingerprint,
        header.transfer_syntax_uid,
        header_json,
    )


def _pick(header: dict[str, Any], tags: set[str] | frozenset[str]) -> dict[str, Any]:
    if "all" in tags:
        return {k: v for k, v in header.items() if k < "7FE00000"}
    return {k: header[k] for k in sorted(tags) if k in header}


def _texts(header: dict[str, Any], tag: str) -> list[str]:
    element_ = header.get(tag)
    values = element_.get("Value") if isinstance(element_, dict) else None
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []
