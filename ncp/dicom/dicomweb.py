"""Any DICOMweb server (PS3.18) as an archive source: Orthanc, dcm4chee, a cloud archive.

Listing is QIDO-RS (``/studies``, then ``/studies/{study}/instances``, both paged); headers come
from WADO-RS study metadata (``application/dicom+json``), one request per study, never following
a ``BulkDataURI``. The index built from a DICOMweb source must be identical to the index of a
folder holding the same files, so the storage facts a folder gets from the file (size of the Part
10 object, transfer syntax from its file meta) are read from the stored objects themselves: each
instance is retrieved *as stored* (``transfer-syntax=*``, no transcoding), streamed, and only
counted; the first bytes of each part are parsed for the file meta. The bodies are never kept.

Nothing the archive answers is trusted blindly: every UID that goes into a URL is 1-64 digits and
dots with no empty component (:data:`UID_PATTERN`; locators handed in by a caller and UIDs the
archive itself lists alike), every
metadata item must name the study it was asked for and a SOP Instance UID, every retrieved part
must be a Part 10 object of the instance asked for. What fails those checks becomes a
:class:`~ncp.dicom.source.SkippedEntry` with a reason; an archive that cannot be reached, times out
or answers an HTTP error or a body that is not what was asked for raises
:class:`~ncp.errors.ArchiveError`, whose message names the archive and the step that failed.

Locators are ``{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}``; the fingerprint is empty
because an instance is immutable under its SOP Instance UID.

The archive must not cap QIDO-RS results below :attr:`DicomwebSource.page_size`: Orthanc with
``LimitFindResults``/``LimitFindInstances`` set truncates silently (N+1 results, no Warning header)
and its ``offset`` cannot reach past the cap. A short instance listing is caught (the study's
NumberOfStudyRelatedInstances) and completed from the study metadata; a short study listing
cannot be detected.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from functools import partial
from io import BytesIO
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from ncp.dicom.source import InstanceHeader, SkippedEntry, SourceEntry
from ncp.dicom.uids import UID_PATTERN
from ncp.errors import ArchiveError, ConfigError, UnreadableInstance

_TAG_SOP_INSTANCE = "00080018"
_TAG_STUDY = "0020000D"
_TAG_SERIES = "0020000E"
_TAG_STUDY_INSTANCES = "00201208"
_FIRST_PIXEL_TAG = 0x7FE00008
"""Float Pixel Data; Double Float Pixel Data and Pixel Data follow. Everything from here on is left
out, as ``dcmread(stop_before_pixels=True)`` leaves it out of a folder read."""

_ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_META_PREFIX_LIMIT = 64 * 1024
"""Bytes kept of each retrieved part to read its file meta; the rest is only counted."""
_MAX_PART_HEADER = 16 * 1024
_MAX_PAGES = 100_000

RetrieveMode = Literal["auto", "series", "instance"]

T = TypeVar("T")


def parse_locator(locator: str) -> tuple[str, str, str]:
    """``(study, series, sop)`` UIDs of a locator, or :class:`UnreadableInstance` when the locator
    is not exactly three UIDs of digits and dots. No locator that fails this reaches a URL."""
    parts = locator.split("/")
    if len(parts) != 3 or not all(UID_PATTERN.fullmatch(p) for p in parts):
        raise UnreadableInstance(
            locator[:200], "not a DICOMweb locator (study/series/instance UIDs of digits and dots)"
        )
    return parts[0], parts[1], parts[2]


def _display_url(url: str) -> str:
    """The archive URL as messages show it: without user info (a password in the URL)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(slots=True)
class _Part:
    """One part of a multipart answer: its Content-Type, its exact size and its first bytes."""

    content_type: str
    size: int
    prefix: bytes


@dataclass(frozen=True, slots=True)
class _Stored:
    """What a retrieved stored object tells: its size, transfer syntax and SOP class."""

    size: int
    transfer_syntax_uid: str
    sop_class_uid: str | None


@dataclass(slots=True)
class _Wanted:
    """An instance the caller asked for, with what the archive has told about it so far."""

    entries: list[SourceEntry]
    series: str
    dataset: Dataset | None = None
    problem: str | None = None


class DicomwebSource:
    """Instances held by a DICOMweb server (PS3.18), read through QIDO-RS and WADO-RS."""

    name = "dicomweb"

    page_size = 1000
    """QIDO-RS page size (``limit``); pages are requested until a short one."""
    retrieve_mode: RetrieveMode = "auto"
    """How sizes are read: one WADO-RS retrieve per series, per instance, or ``auto`` (see
    :meth:`_read_sizes`)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"DICOMweb archive URL must be http(s)://host[:port]/path: {url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"DICOMweb archive URL must have no query or fragment: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"DICOMweb archive URL must not carry credentials ({_display_url(url)}): pass "
                "them as headers"
            )
        if not timeout_s > 0:
            raise ConfigError(f"DICOMweb archive timeout must be positive: {timeout_s!r}")
        self.url = url.rstrip("/")
        self.display_url = _display_url(self.url)
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._netloc = parts.netloc
        self._last_metadata: tuple[str, frozenset[str], list[Any]] | None = None
        self._connect()

    def _connect(self) -> None:
        self._pid = os.getpid()
        # QIDO-RS and study metadata through dicomweb-client. No retries inside a request: a
        # failing archive fails the index run at once with ArchiveError, and the next run resumes.
        self._client = DICOMwebClient(self.url, headers=self._headers, timeout=self.timeout_s)
        self._client.set_http_retry_params(retry=False)
        # dicomweb-client sends "Host: <host>" without the port; RFC 9110 wants the port when it
        # is not the default (virtual hosts and reverse proxies route on it).
        self._client.host = self._netloc
        # A redirect is never followed (it could take our headers to another host): the
        # configured URL must be the archive's own.
        self._client._session.max_redirects = 0
        # Retrieves for sizes through httpx, streamed: dicomweb-client would load whole parts.
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.timeout_s),
            headers={**self._headers, "Accept-Encoding": "identity"},
            follow_redirects=False,
        )

    def _own_connections(self) -> None:
        """In a forked child (the indexer's worker processes) open new connections: the ones
        inherited from the parent would carry two conversations on one socket. The inherited
        clients are dropped, not closed, so the parent's connections stay intact."""
        if os.getpid() != self._pid:
            self._connect()
            self._last_metadata = None

    def close(self) -> None:
        self._http.close()
        self._client._session.close()

    def __enter__(self) -> DicomwebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DicomwebSource({self.display_url!r})"

    # -- listing ---------------------------------------------------------------------------

    def entries(self) -> Iterator[SourceEntry | SkippedEntry]:
        """Every instance, sorted by locator: all studies are listed first (QIDO-RS, paged),
        then each study's instances."""
        self._own_connections()
        self._last_metadata = None  # metadata read from here on is newer than the listing
        studies: dict[str, int | None] = {}
        for item in self._paged("listing studies (QIDO-RS /studies)", self._search_studies):
            uid = _json_uid(item, _TAG_STUDY)
            if isinstance(uid, _Bad):
                yield SkippedEntry(SourceEntry(uid.shown, ""), f"study listed by QIDO-RS: {uid}")
            else:
                studies[uid] = _json_count(item, _TAG_STUDY_INSTANCES)
        # Sorting by "uid/" makes the whole sequence sorted by locator ("1.2.3.1/…" < "1.2.3/…").
        for study in sorted(studies, key=lambda u: u + "/"):
            yield from self._study_entries(study, studies[study])

    def _search_studies(self, offset: int, limit: int) -> Any:
        return self._client.search_for_studies(
            offset=offset, limit=limit, fields=["StudyInstanceUID", "NumberOfStudyRelatedInstances"]
        )

    def _study_entries(
        self, study: str, expected: int | None
    ) -> Iterator[SourceEntry | SkippedEntry]:
        """The instances of one study, sorted. ``expected`` is the study's instance count as the
        archive gave it in the study list: a listing that comes up short (a server-side result
        cap that QIDO-RS paging cannot get past, like Orthanc's ``LimitFindInstances``) is
        completed from the study metadata, and reported when even that is short."""

        def search(offset: int, limit: int) -> Any:
            return self._client.search_for_instances(
                study_instance_uid=study,
                offset=offset,
                limit=limit,
                fields=["SeriesInstanceUID", "SOPInstanceUID"],
            )

        found: set[str] = set()
        skipped: dict[str, SkippedEntry] = {}

        def take(item: Any, source: str) -> None:
            sop = _json_uid(item, _TAG_SOP_INSTANCE)
            series = _json_uid(item, _TAG_SERIES)
            other = _json_uid_optional(item, _TAG_STUDY)
            shown = f"{study}/{_shown(series)}/{_shown(sop)}"
            if isinstance(sop, _Bad) or isinstance(series, _Bad):
                bad = sop if isinstance(sop, _Bad) else series
                skipped.setdefault(shown, SkippedEntry(SourceEntry(shown, ""), f"{source}: {bad}"))
            elif other is not None and other != study:
                reason = f"{source} for study {study} names study {_shown(other)}"
                skipped.setdefault(shown, SkippedEntry(SourceEntry(shown, ""), reason))
            else:
                found.add(shown)

        try:
            for item in self._paged(f"listing the instances of study {study} (QIDO-RS)", search):
                take(item, "QIDO-RS answer")
            if expected is not None and len(found) < expected:
                action = f"listing the instances of study {study} from its metadata (WADO-RS)"
                for item in self._study_metadata(study, action, None):
                    take(item, "WADO-RS metadata")
        except _NotFound:
            return  # deleted since the study list was read: nothing to list
        results: list[SourceEntry | SkippedEntry] = [SourceEntry(loc, "") for loc in found]
        results.extend(skipped.values())
        if expected is not None and len(found) < expected:
            results.append(
                SkippedEntry(
                    SourceEntry(study, ""),
                    f"the archive counts {expected} instances in this study but lists only "
                    f"{len(found)}",
                )
            )
        yield from sorted(results, key=_locator)

    def _paged(self, action: str, search: Callable[[int, int], Any]) -> Iterator[dict[str, Any]]:
        """Items of a paged QIDO-RS search: pages of ``page_size`` until a short page. An
        archive that ignores ``offset`` (the same full page again) is refused."""
        offset = 0
        previous: list[Any] | None = None
        for _ in range(_MAX_PAGES):
            page = self._call(action, partial(search, offset, self.page_size))
            if not isinstance(page, list):
                raise ArchiveError(
                    f"DICOMweb archive {self.display_url}: {action}: the answer is not a JSON "
                    "array of data sets"
                )
            if page and page == previous:
                raise ArchiveError(
                    f"DICOMweb archive {self.display_url}: {action}: the archive ignores the "
                    "QIDO-RS offset parameter (same page twice)"
                )
            for item in page:
                if isinstance(item, dict):
                    yield item
                else:
                    yield {}  # counted as an item without UIDs by the caller
            if len(page) < self.page_size:
                return
            offset += len(page)
            previous = page
        raise ArchiveError(f"DICOMweb archive {self.display_url}: {action}: too many pages")

    # -- reading ---------------------------------------------------------------------------

    def read_headers(
        self, entries: Iterable[SourceEntry]
    ) -> Iterator[InstanceHeader | SkippedEntry]:
        """Headers of the given entries: one metadata request per study, and the stored objects
        retrieved (streamed, counted) for their size and transfer syntax."""
        self._own_connections()
        by_study: dict[str, dict[str, _Wanted]] = defaultdict(dict)
        for entry in entries:
            try:
                study, series, sop = parse_locator(entry.locator)
            except UnreadableInstance as exc:
                yield SkippedEntry(entry, exc.reason)
                continue
            wanted = by_study[study].get(sop)
            if wanted is None:
                by_study[study][sop] = _Wanted([entry], series)
            elif wanted.series == series:
                wanted.entries.append(entry)
            else:
                yield SkippedEntry(
                    entry, f"instance {sop} is also asked for in series {wanted.series}"
                )
        for study in sorted(by_study):
            yield from self._read_study(study, by_study[study])

    def _read_study(
        self, study: str, wanted: dict[str, _Wanted]
    ) -> Iterator[InstanceHeader | SkippedEntry]:
        action = f"reading the metadata of study {study} (WADO-RS)"
        try:
            items = self._study_metadata(study, action, wanted.keys())
        except _NotFound:
            for gone in wanted.values():
                for entry in gone.entries:
                    yield SkippedEntry(entry, "study no longer in the archive")
            return

        # Which instance each metadata item describes; items that cannot be placed are counted.
        malformed: list[str] = []
        series_counts: dict[str, int] = defaultdict(int)
        for item in items:
            sop = _json_uid(item, _TAG_SOP_INSTANCE)
            item_study = _json_uid(item, _TAG_STUDY)
            series = _json_uid(item, _TAG_SERIES)
            if isinstance(sop, _Bad):
                malformed.append(f"an item with {sop}")
                continue
            if isinstance(item_study, _Bad) or item_study != study:
                malformed.append(f"instance {sop} for another study ({_shown(item_study)})")
                if sop in wanted:
                    wanted[sop].problem = (
                        f"the archive's metadata for study {study} describes this instance with "
                        f"Study Instance UID {_shown(item_study)}"
                    )
                continue
            if isinstance(series, _Bad):
                malformed.append(f"instance {sop} with {series}")
                if sop in wanted:
                    wanted[sop].problem = f"the archive's metadata for this instance: {series}"
                continue
            series_counts[series] += 1
            w = wanted.get(sop)
            if w is None or w.problem is not None:
                continue
            if w.dataset is not None:
                w.problem = "the archive's metadata lists this instance twice"
                w.dataset = None
                continue
            if series != w.series:
                w.problem = f"the archive holds this instance in series {series}"
                continue
            try:
                w.dataset = _dataset_from_json(item)
            except Exception as exc:  # malformed DICOM JSON: pydicom raises many kinds
                w.problem = f"malformed DICOM JSON metadata: {type(exc).__name__}: {exc}"[:300]

        absent = "not in the archive's metadata for its study"
        if malformed:
            absent += f" ({len(malformed)} malformed item(s) there, e.g. {malformed[0]})"
        ready = {sop: w for sop, w in wanted.items() if w.dataset is not None}
        stored = self._read_sizes(study, ready, series_counts)
        for sop, w in sorted(wanted.items()):
            if w.dataset is None:
                reason = w.problem or absent
                for entry in w.entries:
                    yield SkippedEntry(entry, reason)
                continue
            facts = stored.get(sop)
            if isinstance(facts, str) or facts is None:
                reason = facts or "not returned when the archive was asked for the stored object"
                for entry in w.entries:
                    yield SkippedEntry(entry, reason)
                continue
            meta_class = w.dataset.get("SOPClassUID")
            if facts.sop_class_uid and meta_class and str(meta_class) != facts.sop_class_uid:
                for entry in w.entries:
                    yield SkippedEntry(
                        entry,
                        f"the stored object's SOP class {facts.sop_class_uid} differs from the "
                        f"metadata's {str(meta_class)[:64]}",
                    )
                continue
            for entry in w.entries:
                # Each header gets its own copy: a consumer may change a data set it was given.
                ds = w.dataset if entry is w.entries[0] else _copy(w.dataset)
                yield InstanceHeader(
                    entry=entry,
                    dataset=ds,
                    size_bytes=facts.size,
                    transfer_syntax_uid=facts.transfer_syntax_uid,
                )

    def _study_metadata(self, study: str, action: str, sops: Iterable[str] | None) -> list[Any]:
        """The study's metadata items (a JSON array). The last study read is kept: the indexer
        reads a large study in several batches, and each would otherwise fetch the whole study
        metadata again. The kept answer is used only when it holds every instance asked for
        (``sops``; None always asks the archive), and is dropped when a new listing starts, so
        it is never older than the listing the entries come from."""
        last = self._last_metadata
        if sops is not None and last is not None and last[0] == study and last[1].issuperset(sops):
            return last[2]
        self._last_metadata = None
        items = self._call(action, partial(self._client.retrieve_study_metadata, study))
        if not isinstance(items, list):
            raise ArchiveError(
                f"DICOMweb archive {self.display_url}: {action}: the answer is not a JSON array"
            )
        held = frozenset(
            u for u in (_json_uid(i, _TAG_SOP_INSTANCE) for i in items) if isinstance(u, str)
        )
        self._last_metadata = (study, held, items)
        return items

    # -- sizes and transfer syntaxes from the stored objects ---------------------------------

    def _read_sizes(
        self, study: str, ready: dict[str, _Wanted], series_counts: dict[str, int]
    ) -> dict[str, _Stored | str]:
        """Size and transfer syntax of each instance in ``ready``, read from the stored object.

        One request per series or one per instance? Measured on Orthanc 1.10.1 + DICOMweb 1.7,
        loopback, 2 cores, median of 3 (sizes only, metadata excluded):

        ==========================  =====================  =====================
        instances                   one request/series     one request/instance
        ==========================  =====================  =====================
        400 x 1.9 KB, 4 series      1908 inst/s            273 inst/s
        100 x 525 KB, 2 series      601 inst/s (316 MB/s)  207 inst/s (109 MB/s)
        ==========================  =====================  =====================

        A request costs about 3.5 ms whatever its size, so the series retrieve (parts told apart
        by the MediaStorageSOPInstanceUID of their own file meta) wins 3x to 7x. It carries the
        instances not asked for too, which costs their bytes: for large instances it still wins
        while about a third of the series is wanted. So a series is retrieved whole when more
        than a third of its instances (by the metadata's count) are wanted, the common case of a
        first run or a new study, and instance by instance otherwise, so that indexing a few
        instances added to a big series never pulls the whole series.
        """
        result: dict[str, _Stored | str] = {}
        by_series: dict[str, set[str]] = defaultdict(set)
        for sop, w in ready.items():
            by_series[w.series].add(sop)
        for series in sorted(by_series):
            sops = by_series[series]
            mode = self.retrieve_mode
            if mode == "auto":
                mode = "series" if 3 * len(sops) > series_counts.get(series, 0) else "instance"
            base = f"{self.url}/studies/{study}/series/{series}"
            if mode == "series":
                result.update(self._retrieve(base, f"series {series} of study {study}", sops))
            else:
                for sop in sorted(sops):
                    result.update(
                        self._retrieve(f"{base}/instances/{sop}", f"instance {sop}", {sop})
                    )
        return result

    def _retrieve(self, url: str, what: str, sops: set[str]) -> dict[str, _Stored | str]:
        """Retrieve ``url`` as stored, streamed; the parts found for the instances in ``sops``."""
        action = f"retrieving {what} as stored (WADO-RS)"
        found: dict[str, _Stored | str] = {}
        try:
            with self._http.stream("GET", url, headers={"Accept": _ACCEPT_AS_STORED}) as response:
                if response.status_code == 404:
                    return {sop: "no longer in the archive" for sop in sops}
                if response.status_code == 406:
                    raise ArchiveError(
                        f"DICOMweb archive {self.display_url}: {action}: the archive cannot "
                        "return instances as stored (transfer-syntax=*), so their size and "
                        "transfer syntax cannot be known"
                    )
                if response.status_code != 200:
                    raise ArchiveError(
                        f"DICOMweb archive {self.display_url}: {action} failed: HTTP "
                        f"{response.status_code} {response.reason_phrase}"
                    )
                ctype = _content_type(response.headers.get("content-type", ""))
                boundary = ctype.get_param("boundary")
                if ctype.get_content_type() != "multipart/related" or not isinstance(boundary, str):
                    raise ArchiveError(
                        f"DICOMweb archive {self.display_url}: {action}: the answer is not "
                        f"multipart/related with a boundary but {ctype.get_content_type()!r}"
                    )
                for part in _iter_parts(response.iter_bytes(), boundary.encode("latin-1")):
                    sop, facts = _stored_facts(part)
                    if sop is None:
                        if len(sops) == 1:  # the one instance asked for: say what is wrong
                            found.setdefault(next(iter(sops)), str(facts))
                        continue
                    if sop not in sops:
                        continue  # another instance of the series, not asked for
                    if sop in found:
                        found[sop] = "the archive returned this instance twice"
                    else:
                        found[sop] = facts
        except ArchiveError:
            raise
        except _MultipartError as exc:
            raise ArchiveError(
                f"DICOMweb archive {self.display_url}: {action}: malformed multipart answer: {exc}"
            ) from None
        except httpx.TimeoutException:
            raise ArchiveError(
                f"DICOMweb archive {self.display_url}: {action}: timed out after "
                f"{self.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ArchiveError(
                f"DICOMweb archive {self.display_url}: {action} failed: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from None
        return found

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        """Run one dicomweb-client request; any failure becomes an ArchiveError naming the
        archive and the step (404 becomes :class:`_NotFound` for the caller to decide)."""
        prefix = f"DICOMweb archive {self.display_url}: {action}"
        try:
            return fn()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 404:
                raise _NotFound from None
            reason = exc.response.reason if exc.response is not None else ""
            raise ArchiveError(f"{prefix} failed: HTTP {status} {reason}".rstrip()) from None
        except requests.TooManyRedirects:
            raise ArchiveError(
                f"{prefix}: the archive redirected elsewhere (not followed)"
            ) from None
        except requests.Timeout:
            raise ArchiveError(f"{prefix}: timed out after {self.timeout_s:g} s") from None
        except requests.ConnectionError as exc:
            raise ArchiveError(
                f"{prefix} failed: cannot connect ({_connection_reason(exc)})"
            ) from None
        except (requests.RequestException, ValueError, TypeError) as exc:
            # ValueError covers a body that is not JSON (requests' JSONDecodeError).
            raise ArchiveError(
                f"{prefix}: the answer is not valid DICOM JSON ({type(exc).__name__})"
            ) from None


class _NotFound(Exception):
    """The archive answered 404 (a study deleted since it was listed)."""


class _MultipartError(Exception):
    """A multipart body that does not follow RFC 2046."""


class _Bad:
    """A UID that is missing or malformed in an archive's answer, and how to show it."""

    def __init__(self, problem: str, shown: str) -> None:
        self.problem = problem
        self.shown = shown

    def __str__(self) -> str:
        return self.problem


_KEYWORDS = {_TAG_SOP_INSTANCE: "SOPInstanceUID", _TAG_STUDY: "StudyInstanceUID",
             _TAG_SERIES: "SeriesInstanceUID"}  # fmt: skip


def _json_uid(item: Any, tag: str) -> str | _Bad:
    """The single UID value of ``tag`` in a DICOM JSON item, or a :class:`_Bad` saying why not."""
    found = _json_uid_optional(item, tag)
    return _Bad(f"no {_KEYWORDS[tag]}", "?") if found is None else found


def _json_uid_optional(item: Any, tag: str) -> str | _Bad | None:
    """Like :func:`_json_uid`, but None when the element is absent."""
    keyword = _KEYWORDS[tag]
    element = item.get(tag) if isinstance(item, dict) else None
    if element is None:
        return None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
        return _Bad(f"malformed {keyword}", "?")
    value = values[0].strip("\x00 ")
    if not UID_PATTERN.fullmatch(value):
        return _Bad(f"{keyword} is not a valid UID: {value[:80]!r}", repr(value[:64]))
    return value


def _json_count(item: dict[str, Any], tag: str) -> int | None:
    """A non-negative count (IS, as a JSON number or string) or None when absent or malformed."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or len(values) != 1:
        return None
    value = values[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _shown(value: str | _Bad | None) -> str:
    return value.shown if isinstance(value, _Bad) else str(value)


def _locator(e: SourceEntry | SkippedEntry) -> str:
    return e.entry.locator if isinstance(e, SkippedEntry) else e.locator


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    """BulkDataURI values are never followed (they name the archive's own address)."""
    return None


# pydicom inspects the handler's signature for every data element (40 % of from_json's time):
# a precomputed signature makes that a lookup.
_no_bulk_data.__signature__ = inspect.signature(_no_bulk_data)  # type: ignore[attr-defined]


def _dataset_from_json(item: dict[str, Any]) -> Dataset:
    """The data set of a metadata item as a folder read gives it: without the file meta group
    and without Pixel Data and what follows it; bulk data left empty."""
    kept = {
        tag: value
        for tag, value in item.items()
        if isinstance(tag, str)
        and len(tag) == 8
        and not tag.startswith("0002")
        and int(tag, 16) < _FIRST_PIXEL_TAG
    }
    return Dataset.from_json(kept, bulk_data_uri_handler=_no_bulk_data)


def _copy(ds: Dataset) -> Dataset:
    return copy.deepcopy(ds)


def _content_type(value: str) -> Message:
    msg = Message()
    msg["content-type"] = value
    return msg


def _stored_facts(part: _Part) -> tuple[str | None, _Stored | str]:
    """``(sop, facts)`` from one retrieved part; ``(None, reason)`` when the part is not a Part 10
    object with a usable file meta."""
    ctype = _content_type(part.content_type)
    if part.content_type and ctype.get_content_type() != "application/dicom":
        return None, f"the archive returned {ctype.get_content_type()!r}, not application/dicom"
    try:
        meta = _file_meta(part.prefix, part.size)
    except Exception as exc:  # not Part 10, or a corrupt meta group: pydicom raises many kinds
        return None, f"the stored object has no readable file meta ({type(exc).__name__})"
    sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
    syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    if not syntax:
        # Fall back on the part's own Content-Type parameter (PS3.18 8.7.3.5.2).
        param = ctype.get_param("transfer-syntax")
        syntax = param.strip() if isinstance(param, str) else ""
    if not UID_PATTERN.fullmatch(sop):
        return None, "the stored object's file meta has no valid MediaStorageSOPInstanceUID"
    if not UID_PATTERN.fullmatch(syntax):
        return sop, "no Transfer Syntax UID in the stored object's file meta"
    sop = _dataset_sop(part.prefix, syntax) or sop
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip("\x00 ") or None
    return sop, _Stored(size=part.size, transfer_syntax_uid=syntax, sop_class_uid=sop_class)


def _dataset_sop(prefix: bytes, syntax: str) -> str | None:
    """The SOP Instance UID the stored object's data set gives (the instance is that one,
    whatever its file meta says: ``ncp.gateway.servable``), None when its first bytes do not
    tell (the file meta's then stands)."""
    from ncp.gateway.errors import StreamBroken
    from ncp.gateway.parthead import PartIds, dataset_ids, meta_end

    try:
        ids = dataset_ids(prefix, meta_end(prefix), syntax)
    except StreamBroken:
        return None
    return ids.sop if isinstance(ids, PartIds) else None


def _file_meta(prefix: bytes, size: int) -> FileMetaDataset:
    """The file meta group of a Part 10 object from its first bytes."""
    fp = BytesIO(prefix)
    read_preamble(fp, False)  # InvalidDicomError without the 'DICM' prefix
    meta = _read_file_meta_info(fp)
    if fp.tell() >= len(prefix) and size > len(prefix):
        raise ValueError(f"file meta longer than {_META_PREFIX_LIMIT} bytes")
    return meta


def _iter_parts(chunks: Iterable[bytes], boundary: bytes) -> Iterator[_Part]:
    """The parts of a multipart body (RFC 2046), streamed: each part's size is counted and only
    its first :data:`_META_PREFIX_LIMIT` bytes are kept."""
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    keep = len(delimiter) - 1  # bytes that may be the start of a delimiter split across chunks
    buf = bytearray()
    it = iter(chunks)
    state = "preamble"
    ctype = ""
    size = 0
    prefix = bytearray()

    def more() -> bool:
        chunk = next(it, None)
        if chunk is None:
            return False
        buf.extend(chunk)
        return True

    while True:
        if state == "preamble":
            # The first boundary may open the body or follow a preamble and CRLF.
            i = buf.find(dash)
            if i < 0 or len(buf) < i + len(dash) + 2:
                if len(buf) > _MAX_PART_HEADER:
                    raise _MultipartError("no opening boundary")
                if not more():
                    raise _MultipartError("no opening boundary")
                continue
            del buf[: i + len(dash)]
            state = "after-boundary"
        elif state == "after-boundary":
            if len(buf) < 2 and more():
                continue
            if buf[:2] == b"--":
                return  # close delimiter: epilogue ignored
            j = buf.find(b"\r\n")
            if j < 0:
                if len(buf) > _MAX_PART_HEADER or not more():
                    raise _MultipartError("unterminated boundary line")
                continue
            if buf[:j].strip(b" \t"):
                raise _MultipartError("garbage after a boundary")
            del buf[: j + 2]
            state = "headers"
        elif state == "headers":
            if buf[:2] == b"\r\n":
                head = b""
                del buf[:2]
            else:
                j = buf.find(b"\r\n\r\n")
                if j < 0:
                    if len(buf) > _MAX_PART_HEADER or not more():
                        raise _MultipartError("unterminated part headers")
                    continue
                head = bytes(buf[:j])
                del buf[: j + 4]
            ctype = ""
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-type":
                    ctype = value.strip()
            size = 0
            prefix = bytearray()
            state = "body"
        else:  # body
            j = buf.find(delimiter)
            end = j if j >= 0 else max(0, len(buf) - keep)
            if len(prefix) < _META_PREFIX_LIMIT:
                prefix.extend(buf[: min(end, _META_PREFIX_LIMIT - len(prefix))])
            size += end
            del buf[:end]
            if j >= 0:
                del buf[: len(delimiter)]
                yield _Part(ctype, size, bytes(prefix))
                state = "after-boundary"
            elif not more():
                raise _MultipartError("body ends inside a part (no closing boundary)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host",
                  "Temporary failure in name resolution", "Connection reset"):  # fmt: skip
        if known in text:
            return known.lower()
    return type(exc).__name__
