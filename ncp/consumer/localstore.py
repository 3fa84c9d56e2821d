"""B's local store of retrieved studies, behind one interface: a folder (the default) or B's own
archive through STOW-RS.

Only verified instances reach a store (``ncp.consumer.download`` verifies first); they arrive as
files in the staging folder, in batches (:meth:`LocalStore.put`), so that a store can make a
batch durable at once. A store also says which instances of a study it holds already
(:meth:`LocalStore.existing`): a job restarted after a crash skips them, and nothing is stored
twice. :meth:`LocalStore.remove_study` serves the retention purge.

The folder store writes atomically: each file is flushed to disk (fsync) and renamed into
``STUDY/SERIES/SOP.dcm``, then the folders that changed are flushed, so a file under its final
name is always whole, after a crash or a power loss too. Names are UIDs, checked before use
(digits and dots only: nothing can climb out of the store's folder).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from ncp.config import FolderStoreSection, StoreSection, StowStoreSection
from ncp.dicom.uids import is_uid
from ncp.errors import NcpError

_CHUNK = 1 << 20


class StoreError(NcpError):
    """The local store did not take an instance (full disk, archive refused or down)."""


@dataclass(frozen=True, slots=True)
class InstanceKey:
    study_uid: str
    series_uid: str
    sop_uid: str

    def __post_init__(self) -> None:
        for uid in (self.study_uid, self.series_uid, self.sop_uid):
            if not is_uid(uid):
                raise ValueError(f"not a DICOM UID: {uid[:80]!r}")


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified instance waiting in the staging folder to be stored."""

    path: Path
    key: InstanceKey
    size: int
    """Bytes as A sent them."""
    received_at: datetime | None = None
    """When its download ended (naive UTC), for the job's record."""


class LocalStore(Protocol):
    kind: str
    """``folder`` or ``stowrs``, as in the configuration."""
    write_back: bool
    """Whether staging files should go to disk as soon as they are written (the folder store
    renames them into place; an archive reads them back once and sends them on)."""

    def put(self, batch: Sequence[Verified]) -> None:
        """Store every instance of ``batch`` durably, or raise StoreError (then none of them
        counts as stored). The staging files are consumed either way."""
        ...

    def existing(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the study that the store holds."""
        ...

    def remove_study(self, study_uid: str) -> int:
        """Remove the study; returns how many instances were removed."""
        ...

    def close(self) -> None: ...


def open_store(settings: StoreSection) -> LocalStore:
    if isinstance(settings, FolderStoreSection):
        return FolderStore(settings.path)
    if isinstance(settings, StowStoreSection):
        return StowStore(
            settings.url,
            timeout_s=settings.timeout_s,
            batch_instances=settings.batch_instances,
            connections=settings.connections,
        )
    raise AssertionError(f"unknown store kind: {settings!r}")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- folder -----------------------------------------------------------------------------------


class FolderStore:
    kind = "folder"
    write_back = True

    FLUSHERS = 4
    """Files flushed at once: a disk (and the journal) takes parallel flushes together, one at a
    time it waits for each (measured: about half the time for a batch of 32 CT slices)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._flushers = ThreadPoolExecutor(self.FLUSHERS, thread_name_prefix="store-fsync")
        self._lock = threading.Lock()
        self._durable: set[Path] = set()
        """Study and series folders whose entry in their parent folder was flushed: the parent
        is not flushed again for each batch (one flush of the series folder per batch)."""

    def path_of(self, key: InstanceKey) -> Path:
        return self.root / key.study_uid / key.series_uid / f"{key.sop_uid}.dcm"

    def put(self, batch: Sequence[Verified]) -> None:
        try:
            # The staging files were written and closed without a flush (the download asked the
            # kernel to start writing them back): flushing here, off the download's threads,
            # lets the network go on while the disk catches up.
            list(self._flushers.map(_fsync_file, [item.path for item in batch]))
            series = {self.path_of(item.key).parent for item in batch}
            entries = set(series)  # folders that gain an entry here: flushed after the renames
            for folder in series:
                entries |= self._folder(folder)
            for item in batch:
                os.replace(item.path, self.path_of(item.key))
            list(self._flushers.map(_fsync_dir, entries))
            with self._lock:
                self._durable |= series | {folder.parent for folder in series}
        except OSError as exc:
            for item in batch:
                _discard(item.path)
            raise StoreError(f"the folder store could not write: {exc.strerror or exc}") from None

    def _folder(self, series: Path) -> set[Path]:
        """Make sure the series folder exists; the folders whose new entry (the study's, the
        series') must be flushed too: each one this store created, or has not yet seen flushed
        (after a start: once)."""
        flush: set[Path] = set()
        study = series.parent
        for folder, parent in ((study, self.root), (series, study)):
            try:
                folder.mkdir()
                created = True
            except FileExistsError:
                created = False
            except FileNotFoundError:  # the store's own folder is not there yet
                folder.mkdir(parents=True)
                created = True
            with self._lock:
                if created or folder not in self._durable:
                    self._durable.discard(folder)
                    flush.add(parent)
        return flush

    def existing(self, study_uid: str) -> set[str]:
        if not is_uid(study_uid):
            return set()
        folder = self.root / study_uid
        found: set[str] = set()
        if not folder.is_dir():
            return found
        for series in folder.iterdir():
            if series.is_dir() and is_uid(series.name):
                found.update(
                    f.name[:-4]
                    for f in series.iterdir()
                    if f.name.endswith(".dcm") and is_uid(f.name[:-4])
                )
        return found

    def files(self, study_uid: str) -> Iterator[Path]:
        """The stored files of a study (for viewers and tests)."""
        if is_uid(study_uid):
            yield from sorted((self.root / study_uid).glob("*/*.dcm"))

    def remove_study(self, study_uid: str) -> int:
        if not is_uid(study_uid):
            return 0
        folder = self.root / study_uid
        count = len(self.existing(study_uid))
        if folder.exists():
            # Renamed away first, so the study disappears at once even if the removal is slow.
            with self._lock:
                self._durable = {f for f in self._durable if folder not in (f, f.parent)}
            doomed = self.root / f".purge-{study_uid}-{secrets.token_hex(4)}"
            os.replace(folder, doomed)
            _fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)
        return count

    def close(self) -> None:
        self._flushers.shutdown(wait=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- STOW-RS ----------------------------------------------------------------------------------

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_SOP_INSTANCE = "00080018"


class StowStore:
    """B's own archive: ``POST {url}/studies`` (STOW-RS, PS3.18 10.5) with verified instances as
    ``multipart/related; type="application/dicom"``, streamed from the staging files; the
    answer must list every instance sent as stored. An archive that already holds an instance
    answers it as stored too (Orthanc: same SOP Instance UID, kept once)."""

    kind = "stowrs"
    write_back = False

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        batch_instances: int = 8,
        connections: int = 4,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.batch_instances = batch_instances
        self._client = client or httpx.Client(
            timeout=timeout_s,
            trust_env=False,
            limits=httpx.Limits(max_connections=connections),
        )
        # An archive stores requests side by side: a batch goes as several STOW-RS requests at
        # once (one at a time, Orthanc spent most of the time waiting on its own disk writes).
        self._senders = ThreadPoolExecutor(connections, thread_name_prefix="stow")

    def put(self, batch: Sequence[Verified]) -> None:
        size = self.batch_instances
        try:
            chunks = [batch[start : start + size] for start in range(0, len(batch), size)]
            list(self._senders.map(self._stow, chunks))
        finally:
            for item in batch:
                _discard(item.path)

    def _stow(self, batch: Sequence[Verified]) -> None:
        boundary = secrets.token_hex(16)

        def body() -> Iterator[bytes]:
            for item in batch:
                yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
                with open(item.path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        yield chunk
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode("ascii")

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            r = self._client.post(f"{self.url}/studies", content=body(), headers=headers)
        except httpx.HTTPError as exc:
            raise StoreError(f"B's archive did not answer STOW-RS: {type(exc).__name__}") from None
        if r.status_code not in (200, 202):
            raise StoreError(f"B's archive refused STOW-RS with {r.status_code}")
        try:
            answer = r.json()
        except ValueError:
            raise StoreError("B's archive answered STOW-RS with no DICOM JSON") from None
        stored = set(_sops(answer, _REFERENCED_SOP_SEQUENCE))
        failed = set(_sops(answer, _FAILED_SOP_SEQUENCE))
        sent = {item.key.sop_uid for item in batch}
        if failed or not sent <= stored:
            lost = sorted(failed or (sent - stored))
            raise StoreError(
                f"B's archive did not store {len(lost)} instance(s), e.g. {lost[0]}"
                if lost
                else "B's archive did not confirm the instances stored"
            )

    def existing(self, study_uid: str) -> set[str]:
        if not is_uid(study_uid):
            return set()
        found: set[str] = set()
        offset = 0
        while True:
            try:
                r = self._client.get(
                    f"{self.url}/studies/{study_uid}/instances",
                    params={"includefield": _SOP_INSTANCE, "offset": offset, "limit": 1000},
                    headers={"Accept": "application/dicom+json"},
                )
            except httpx.HTTPError as exc:
                raise StoreError(
                    f"B's archive did not answer QIDO-RS: {type(exc).__name__}"
                ) from None
            if r.status_code in (204, 404):
                return found
            if r.status_code != 200:
                raise StoreError(f"B's archive answered QIDO-RS with {r.status_code}")
            page = [v for v in (_value(item, _SOP_INSTANCE) for item in r.json()) if v]
            found.update(page)
            if len(page) < 1000:
                return found
            offset += len(page)

    def remove_study(self, study_uid: str) -> int:
        """DICOMweb has no removal every archive offers: Orthanc's REST API is used (its base
        is the DICOMweb base without ``/dicom-web``); another archive's own tools must purge."""
        count = len(self.existing(study_uid))
        if count == 0:
            return 0
        rest = self.url.removesuffix("/dicom-web")
        try:
            r = self._client.post(
                f"{rest}/tools/lookup", content=study_uid, headers={"Content-Type": "text/plain"}
            )
            r.raise_for_status()
            for hit in r.json():
                if hit.get("Type") == "Study":
                    self._client.delete(f"{rest}/studies/{hit['ID']}").raise_for_status()
        except (httpx.HTTPError, ValueError) as exc:
            raise StoreError(f"B's archive did not remove the study: {exc}") from None
        return count

    def close(self) -> None:
        self._senders.shutdown(wait=True)
        self._client.close()


def _value(item: Any, tag: str) -> str | None:
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def _sops(answer: Any, sequence: str) -> Iterator[str]:
    element = answer.get(sequence) if isinstance(answer, dict) else None
    items = element.get("Value") if isinstance(element, dict) else None
    for item in items or []:
        sop = _value(item, _REFERENCED_SOP_INSTANCE)
        if sop:
            yield sop
