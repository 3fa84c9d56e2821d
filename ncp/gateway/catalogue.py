"""A folder archive behind the gateway: an in-memory catalogue of its instances, answering QIDO,
metadata and retrieves from the files themselves.

The catalogue lists the files as the indexer does (:class:`ncp.dicom.folder.FolderSource`:
symbolic links refused) and holds, of each instance, its identity, its transfer syntax and the
few attributes QIDO-RS answers with (:mod:`ncp.gateway.folderjson`: read from the file's first
bytes, converted once per distinct value). It is built before the gateway serves (:meth:`warm`,
run by the app's startup: about a second for the demo's 7,800 instances, where reading and
converting every whole header took 20 s and more), and refreshed incrementally: a file whose
size and modification time are unchanged is not read again. A study asked for that is not in
the catalogue triggers a refresh the request waits for, at most every ``rescan_s`` seconds; a
catalogue older than a minute is refreshed in the background while requests are answered from
it. Files are opened only through ``FolderSource.path_of`` (no locator leaves the root) and
without following a link.

An instance's whole header is read and converted when WADO-RS metadata (or a search for an
attribute the catalogue does not hold, or ``includefield=all``) asks for it, in a worker
thread, and kept in a bounded cache (``metadata_cache`` instances).

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
import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ncp.dicom.folder import FolderSource
from ncp.dicom.mapping import InstanceKeys, map_instance
from ncp.dicom.source import InstanceHeader, SourceEntry
from ncp.dicom.transcode import TranscodeError, can_transcode, syntax_name, transcode
from ncp.errors import UnreadableInstance
from ncp.gateway.dicomjson import SERIES_UID, SOP_UID, STUDY_UID, element
from ncp.gateway.errors import NotAcceptable, NotFound, StreamBroken
from ncp.gateway.folderjson import (
    INSTANCE_TAGS,
    QIDO_TAGS,
    SERIES_TAGS,
    STUDY_TAGS,
    qido_json,
    read_qido_header,
    whole_json,
)
from ncp.gateway.parthead import HEAD_LIMIT
from ncp.gateway.relay import Chunk, FileRegion
from ncp.gateway.stream import DicomPart

log = logging.getLogger(__name__)

_HEAD_BYTES = HEAD_LIMIT
"""Bytes of each file read before its region: all a part may need to name itself."""
_MODALITY = "00080060"
# What each level computes itself (replacing any the header holds).
_STUDY_COUNTS = frozenset({"00080061", "00201206", "00201208"})
_SERIES_COUNTS = frozenset({"00201209"})


@dataclass(frozen=True, slots=True)
class _Instance:
    study: str
    series: str
    sop: str
    locator: str
    fingerprint: str
    transfer_syntax: str
    qido: dict[str, Any]
    """Its :data:`~ncp.gateway.folderjson.QIDO_TAGS` as DICOM JSON, the UIDs as mapped."""


class FolderUpstream:
    """A tree of Part 10 files, as a gateway archive."""

    kind = "folder"
    archive_base: str | None = None

    def __init__(
        self,
        root: Path,
        *,
        chunk_bytes: int = 1 << 20,
        rescan_s: float = 5.0,
        metadata_cache: int = 2048,
    ) -> None:
        self.source = FolderSource(root)
        self.chunk_bytes = chunk_bytes
        self.rescan_s = rescan_s
        self.max_age_s = max(rescan_s, 60.0)
        self.metadata_cache = metadata_cache
        self._wholes: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._wholes_lock = threading.Lock()
        self._by_locator: dict[str, _Instance] = {}
        self._left_out: dict[str, str] = {}
        """Files that are no instance the index would take, by fingerprint: not read again."""
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
        left: dict[str, str] = {}
        for entry in self.source.entries():
            if not isinstance(entry, SourceEntry):
                continue
            old = self._by_locator.get(entry.locator)
            if old is not None and old.fingerprint == entry.fingerprint:
                kept[entry.locator] = old
            elif self._left_out.get(entry.locator) == entry.fingerprint:
                left[entry.locator] = entry.fingerprint  # not an instance, unchanged
            else:
                changed.append(entry)
        for entry in changed:
            header = read_qido_header(self.source, entry)
            instance = _instance(header) if isinstance(header, InstanceHeader) else None
            if instance is None:
                left[entry.locator] = entry.fingerprint
            else:
                kept[instance.locator] = instance
        studies: dict[str, dict[str, dict[str, _Instance]]] = {}
        for instance in sorted(kept.values(), key=lambda i: i.locator):
            series = studies.setdefault(instance.study, {}).setdefault(instance.series, {})
            series.setdefault(instance.sop, instance)  # a copy of an instance is served once
        self._by_locator = kept
        self._left_out = left
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
        tags = STUDY_TAGS | set(fields)
        (header,) = await self._headers(instances[:1], tags - _STUDY_COUNTS)
        item = _pick(header, tags)
        modalities = sorted({m for i in instances for m in _texts(i.qido, _MODALITY)})
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
            tags = SERIES_TAGS | wanted
            firsts = [next(iter(members.values())) for members in tree.values()]
            headers = await self._headers(firsts, tags - _SERIES_COUNTS)
            out = []
            for members, header in zip(tree.values(), headers, strict=True):
                item = _pick(header, tags)
                item["00201209"] = element("IS", len(members))
                out.append(item)
            return out
        tags = INSTANCE_TAGS | wanted
        chosen = self._select(tree, series, None)
        return [_pick(header, tags) for header in await self._headers(chosen, tags)]

    async def metadata(self, study: str, series: str | None, sop: str | None) -> list[Any]:
        tree = await self._study(study)
        wholes = await anyio.to_thread.run_sync(self._whole_many, self._select(tree, series, sop))
        return [_copied(whole) for whole in wholes if whole is not None]

    async def _headers(
        self, instances: list[_Instance], tags: set[str] | frozenset[str]
    ) -> list[dict[str, Any]]:
        """What answers for ``tags`` of each instance: its catalogue entry when that holds them
        all, else its whole header (read now; the entry when the file cannot be)."""
        if "all" not in tags and tags <= QIDO_TAGS:
            return [i.qido for i in instances]
        wholes = await anyio.to_thread.run_sync(self._whole_many, instances)
        return [i.qido if w is None else w for i, w in zip(instances, wholes, strict=True)]

    def _whole_many(self, instances: list[_Instance]) -> list[dict[str, Any] | None]:
        return [self._whole(i) for i in instances]

    def _whole(self, instance: _Instance) -> dict[str, Any] | None:
        """The instance's whole header as DICOM JSON (cached); None when its file is gone,
        unreadable or holds another instance now (the next refresh catches up)."""
        key = (instance.locator, instance.fingerprint)
        with self._wholes_lock:
            cached = self._wholes.get(key)
            if cached is not None:
                self._wholes.move_to_end(key)
                return cached
        entry = SourceEntry(instance.locator, instance.fingerprint)
        header = next(iter(self.source.read_headers([entry])))
        keys = _keys(header) if isinstance(header, InstanceHeader) else None
        if keys is None or (keys.study_uid, keys.series_uid, keys.instance.sop_uid) != (
            instance.study,
            instance.series,
            instance.sop,
        ):
            log.warning(
                "folder archive: %s changed or became unreadable since it was listed: its "
                "header is left out",
                instance.locator,
            )
            return None
        assert isinstance(header, InstanceHeader)
        whole = _with_uids(whole_json(header), keys)
        with self._wholes_lock:
            self._wholes[key] = whole
            while len(self._wholes) > self.metadata_cache:
                self._wholes.popitem(last=False)
        return whole

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


def _keys(header: InstanceHeader) -> InstanceKeys | None:
    """The index's own mapping (the same identity, and the same instances refused:
    ``ncp.dicom.mapping.map_instance``); None when the index would not take the instance."""
    try:
        return map_instance(header)
    except UnreadableInstance:
        return None


def _instance(header: InstanceHeader) -> _Instance | None:
    """The catalogue's entry of one file; None when the index would not take it."""
    keys = _keys(header)
    if keys is None:
        return None
    # A value pydicom cannot write as DICOM JSON (an IS of "1A") is left out alone, never the
    # whole header with it: the Patient ID must stay for the patient check (servable.py).
    return _Instance(
        keys.study_uid,
        keys.series_uid,
        keys.instance.sop_uid,
        header.entry.locator,
        header.entry.fingerprint,
        header.transfer_syntax_uid,
        _with_uids(qido_json(header), keys),
    )


def _with_uids(header_json: dict[str, Any], keys: InstanceKeys) -> dict[str, Any]:
    """The UIDs as the index reads them (a UID encoded UN, padding: ncp.gateway.servable)."""
    header_json[STUDY_UID] = element("UI", keys.study_uid)
    header_json[SERIES_UID] = element("UI", keys.series_uid)
    header_json[SOP_UID] = element("UI", keys.instance.sop_uid)
    return header_json


def _pick(header: dict[str, Any], tags: set[str] | frozenset[str]) -> dict[str, Any]:
    if "all" in tags:
        return _copied({k: v for k, v in header.items() if k < "7FE00000"})
    return _copied({k: header[k] for k in sorted(tags) if k in header})


def _copied(item: dict[str, Any]) -> dict[str, Any]:
    """A copy the gateway may change: its URL rewriting edits UR elements and sequence items
    in place, and the catalogue's values are shared (by instances with equal values too)."""
    return {
        k: copy.deepcopy(v) if isinstance(v, dict) and v.get("vr") in ("SQ", "UR") else v
        for k, v in item.items()
    }


def _texts(header: dict[str, Any], tag: str) -> list[str]:
    element_ = header.get(tag)
    values = element_.get("Value") if isinstance(element_, dict) else None
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []
