"""Builds and updates the study index from an archive source, incrementally and idempotently.

One run:

1. lists every entry of the source and compares fingerprints with what the last run recorded;
2. removes what disappeared (before adding, so that a file moved within the archive is re-added
   under its new locator instead of being refused as a duplicate of itself);
3. reads the headers of new and changed entries in batches, one transaction per batch, so an
   interrupted run keeps what it committed and the next run resumes;
4. recomputes the denormalised counts, sizes, modalities and body parts of the studies it touched,
   and their start in UTC (``started_utc``) when the run is given the archive's zone; then fills
   that UTC start in every study that lacks it for this zone (rows indexed before it existed).

Patient, study and series attributes come from the instance with the smallest SOP Instance UID
seen so far (``header_sop_uid``), so the same instances give the same index whatever order the
source lists them in: a folder and an archive holding the same files index identically.

A Patient ID without Issuer of Patient ID takes the source's configured assigning authority
(``[archive] patient_id_issuer``, :func:`ncp.dicom.mapping.patient_issuer`). The fingerprint
kept for each entry records the authority it was read under, so a run under another one reads
every entry again (re-attaching its studies to the patient under the new issuer) and drops the
patients left without studies.
"""

from __future__ import annotations

import multiprocessing
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from itertools import islice
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from ncp.dicom.folder import FolderSource
from ncp.dicom.mapping import IndexRecord, InstanceKeys, map_instance, map_levels
from ncp.dicom.source import ArchiveSource, InstanceHeader, SkippedEntry, SourceEntry
from ncp.dicom.transcode import can_transcode, syntax_name
from ncp.errors import UnreadableInstance
from ncp.fhir.datatypes import utc_of, zone_name
from ncp.gateway.parthead import HEAD_LIMIT
from ncp.gateway.servable import part_problem
from ncp.gateway.wado import EXPLICIT_VR_LITTLE_ENDIAN
from ncp.store.models import (
    EntryKind,
    Instance,
    ListEntry,
    Patient,
    Series,
    SourceObject,
    Study,
    name_key,
)

_CHUNK = 500  # bound on IN (...) lists: SQLite allows 32766 parameters, stay far below


@dataclass
class IndexRun:
    """What one run did. ``skipped`` and ``notes`` list (locator, reason) pairs."""

    source: str
    seen: int = 0
    unchanged: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    studies_touched: int = 0
    touched: frozenset[int] = frozenset()
    """Row ids of the studies the run changed (some may be gone): their list entries are stale."""
    patient_id_issuer: str = ""
    """The source's assigning authority for Patient IDs without issuer, as the run applied it."""
    unservable: list[tuple[str, str]] = field(default_factory=list)
    """(locator, reason) of the instances indexed in this run that the gateways would refuse
    (``ncp.gateway.servable``; checked for a folder archive, whose files the index reads)."""
    without_issuer: int = 0
    """Instances read in this run whose header carries no Issuer of Patient ID (they took
    ``patient_id_issuer``; with none configured their patients cannot be named by a peer)."""


@dataclass(frozen=True, slots=True)
class _Known:
    fingerprint: str
    sop_uid: str | None
    skipped: bool


def index_source(
    sessions: sessionmaker[Session],
    source: ArchiveSource,
    *,
    batch_size: int = 500,
    workers: int = 1,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC).replace(tzinfo=None),
    zone: tzinfo | None = None,
    patient_id_issuer: str = "",
) -> IndexRun:
    """Bring the index up to date with ``source``. Safe to run again at any time.

    ``patient_id_issuer``: the source's assigning authority of Patient IDs that carry no Issuer
    of Patient ID (``[archive] patient_id_issuer``; see the module doc).

    ``zone`` is the zone of the archive's naive dates and times (the custodian's,
    :func:`ncp.fhir.datatypes.zone_of`): with it, each study gets its start in UTC. Without it,
    the studies the run touches lose theirs (``started_utc``/``utc_zone`` NULL), and the search
    computes it itself: never a stale value.

    With ``workers`` > 1, headers are read and mapped in that many forked processes while this
    one writes to the database; the source must then be usable from a forked child (the folder
    source is; a source holding open network connections is not).
    """
    run = IndexRun(source=source.name, patient_id_issuer=patient_id_issuer)
    with sessions() as session:
        known = _load_known(session, source.name)

    # What an entry was read under is part of its fingerprint: another assigning authority
    # makes every entry changed (none keeps the source's own fingerprint, so an index built
    # before the setting existed is not read again for nothing).
    mark = f";issuer={patient_id_issuer}" if patient_id_issuer else ""
    listed: list[SourceEntry] = []
    listed_skips: list[SkippedEntry] = []
    for item in source.entries():
        if isinstance(item, SkippedEntry):
            listed_skips.append(item)
        else:
            listed.append(SourceEntry(item.locator, item.fingerprint + mark) if mark else item)
    run.seen = len(listed)

    readable = {e.locator for e in listed}
    skipped_now = {s.entry.locator for s in listed_skips}
    # An instance is gone when its locator is no longer listed as readable (a DICOMDIR may still
    # name it, as a skipped entry); a skipped record is gone when nothing names it any more.
    gone = [
        loc
        for loc, k in known.items()
        if loc not in readable and (not k.skipped or loc not in skipped_now)
    ]
    touched: set[int] = set()
    removed_sops: set[str] = set()
    with sessions.begin() as session:
        marked: set[int] = set()
        run.removed, removed_sops = _remove(session, source.name, gone, marked)
        _record_skips(session, source.name, listed_skips, clock())
        _forget_instants(session, marked)
        touched |= marked
    run.skipped.extend((s.entry.locator, s.reason) for s in listed_skips)

    todo: list[SourceEntry] = []
    for entry in listed:
        prior = known.get(entry.locator)
        if prior is None or prior.fingerprint != entry.fingerprint:
            todo.append(entry)
        elif prior.skipped and prior.sop_uid in removed_sops:
            todo.append(entry)  # it duplicated an instance that is gone now: index it
        else:
            run.unchanged += 1

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    moved_from: set[int] = set()  # patients whose studies went to another patient row
    for results in _mapped_batches(source, batches, workers, patient_id_issuer):
        with sessions.begin() as session:
            marked = set()
            _apply_batch(session, source.name, results, known, run, marked, clock(), moved_from)
            _forget_instants(session, marked)
            touched |= marked

    with sessions.begin() as session:
        _recompute(session, touched, zone)
        _drop_orphans(session, moved_from)
    if zone is not None:
        fill_study_instants(sessions, zone)
    run.studies_touched = len(touched)
    run.touched = frozenset(touched)
    return run


def _load_known(session: Session, source: str) -> dict[str, _Known]:
    rows = session.execute(
        select(
            SourceObject.locator,
            SourceObject.fingerprint,
            SourceObject.sop_uid,
            SourceObject.skipped_reason,
        ).where(SourceObject.source == source)
    )
    return {loc: _Known(fp, sop, reason is not None) for loc, fp, sop, reason in rows}


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _remove(
    session: Session, source: str, locators: list[str], touched: set[int]
) -> tuple[int, set[str]]:
    removed = 0
    sops: set[str] = set()
    for chunk in _chunks(locators):
        rows = session.execute(
            select(Instance.sop_uid, Series.study_pk)
            .join(Series, Series.id == Instance.series_pk)
            .where(Instance.source == source, Instance.locator.in_(chunk))
        ).all()
        sops.update(sop for sop, _ in rows)
        touched.update(study for _, study in rows)
        removed += len(rows)
        session.execute(
            delete(Instance).where(Instance.source == source, Instance.locator.in_(chunk))
        )
    _forget(session, source, locators)
    return removed, sops


def _forget(session: Session, source: str, locators: Sequence[str]) -> None:
    """Drop what the last runs recorded of these locators."""
    for chunk in _chunks(locators):
        session.execute(
            delete(SourceObject).where(
                SourceObject.source == source, SourceObject.locator.in_(chunk)
            )
        )


def _remember(
    session: Session,
    source: str,
    seen: Sequence[tuple[SourceEntry, str | None, str | None]],
    now: datetime,
) -> None:
    """Record (entry, SOP Instance UID, skip reason) for each entry, replacing earlier rows."""
    if not seen:
        return
    _forget(session, source, [entry.locator for entry, _, _ in seen])
    session.execute(
        insert(SourceObject),
        [
            {
                "source": source,
                "locator": entry.locator,
                "fingerprint": entry.fingerprint,
                "sop_uid": sop,
                "skipped_reason": reason,
                "seen_at": now,
            }
            for entry, sop, reason in seen
        ],
    )


def _record_skips(
    session: Session,
    source: str,
    skips: Sequence[SkippedEntry],
    now: datetime,
    sop_uids: dict[str, str] | None = None,
) -> None:
    found = sop_uids or {}
    _remember(
        session, source, [(s.entry, found.get(s.entry.locator), s.reason) for s in skips], now
    )


@dataclass(frozen=True, slots=True)
class _Mapped:
    entry: SourceEntry
    keys: InstanceKeys
    levels: IndexRecord | None
    """Patient, study and series values, for the instances that speak for a level."""
    unservable: str | None = None
    """Why the gateways would refuse the stored object, when they would."""


def _read_and_map(
    source: ArchiveSource, batch: Sequence[SourceEntry], issuer: str = ""
) -> list[_Mapped | SkippedEntry]:
    """Read and map one batch. Every instance gets its keys; only the instance with the smallest
    SOP Instance UID of each patient, study and series in the batch gets the (costly) level
    values: no other instance's values could be used (see the module docstring)."""
    out: list[_Mapped | SkippedEntry] = []
    read: list[tuple[InstanceHeader, InstanceKeys]] = []
    for result in source.read_headers(batch):
        if isinstance(result, SkippedEntry):
            out.append(result)
            continue
        try:
            read.append((result, map_instance(result, issuer)))
        except UnreadableInstance as exc:
            out.append(SkippedEntry(result.entry, exc.reason))
    all_keys = [keys for _, keys in read]
    speakers = {
        best.instance.sop_uid
        for level in (_patient_of, _study_of, _series_of)
        for best in _representatives(all_keys, level).values()
    }
    for header, keys in read:
        levels = map_levels(header, keys) if keys.instance.sop_uid in speakers else None
        out.append(
            _Mapped(
                header.entry,
                keys,
                levels,
                _serving_problem(source, header.entry, header.transfer_syntax_uid),
            )
        )
    return out


def _serving_problem(source: ArchiveSource, entry: SourceEntry, syntax: str) -> str | None:
    """Why the gateways would refuse this stored object (their own rule, run on its first
    bytes), for a source whose files the index can read; None otherwise."""
    if not isinstance(source, FolderSource):
        return None
    try:
        head = source.read_head(entry.locator, HEAD_LIMIT)
    except (OSError, UnreadableInstance) as exc:
        return f"its first bytes cannot be read again ({exc})"
    problem = part_problem(head)
    if problem is None and not can_transcode(syntax, EXPLICIT_VR_LITTLE_ENDIAN):
        # Served as stored; the default representation (what dicomweb-client asks for) 406.
        return (
            f"stored in {syntax_name(syntax)}, which this node cannot decode: served as stored "
            "only (transfer-syntax=*), not in the default Explicit VR Little Endian"
        )
    return problem


def _patient_of(keys: InstanceKeys) -> object:
    return keys.patient_key


def _study_of(keys: InstanceKeys) -> object:
    return keys.study_uid


def _series_of(keys: InstanceKeys) -> object:
    return keys.series_uid


_worker_source: ArchiveSource | None = None
_worker_issuer = ""


def _init_worker(source: ArchiveSource, issuer: str) -> None:
    global _worker_source, _worker_issuer
    _worker_source, _worker_issuer = source, issuer


def _worker_batch(batch: Sequence[SourceEntry]) -> list[_Mapped | SkippedEntry]:
    assert _worker_source is not None
    return _read_and_map(_worker_source, batch, _worker_issuer)


def _mapped_batches(
    source: ArchiveSource, batches: list[list[SourceEntry]], workers: int, issuer: str = ""
) -> Iterator[list[_Mapped | SkippedEntry]]:
    """Mapped batches in order; with workers, at most two batches a worker are in flight, so
    memory stays bounded however large the archive is."""
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield _read_and_map(source, batch, issuer)
        return
    # fork: the source reaches the children without being pickled.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(source, issuer)
    ) as pool:
        pending: deque[Future[list[_Mapped | SkippedEntry]]] = deque()
        queue = iter(batches)
        for batch in islice(queue, workers * 2):
            pending.append(pool.submit(_worker_batch, batch))
        while pending:
            done = pending.popleft().result()
            following = next(queue, None)
            if following is not None:
                pending.append(pool.submit(_worker_batch, following))
            yield done


def _apply_batch(
    session: Session,
    source: str,
    results: Sequence[_Mapped | SkippedEntry],
    known: dict[str, _Known],
    run: IndexRun,
    touched: set[int],
    now: datetime,
    moved_from: set[int] | None = None,
) -> None:
    skips: list[SkippedEntry] = []
    dup_sops: dict[str, str] = {}
    records: dict[str, tuple[SourceEntry, InstanceKeys]] = {}
    # Level values of every speaker, duplicates included: a duplicate carries the same SOP
    # Instance UID as the instance it duplicates, so by the smallest-UID rule its header speaks.
    speakers: list[IndexRecord] = []
    problems: dict[str, str] = {}
    for result in sorted(results, key=_locator_of):
        if isinstance(result, SkippedEntry):
            skips.append(result)
            continue
        if result.levels is not None:
            speakers.append(result.levels)
        keys = result.keys
        sop = keys.instance.sop_uid
        if sop in records:
            skips.append(SkippedEntry(result.entry, f"duplicate of {records[sop][0].locator}"))
            dup_sops[result.entry.locator] = sop
            continue
        records[sop] = (result.entry, keys)
        run.without_issuer += not keys.issuer_given
        if result.unservable is not None:
            problems[result.entry.locator] = result.unservable
        notes = result.levels.notes if result.levels is not None else keys.notes
        run.notes.extend((result.entry.locator, note) for note in notes)

    # An entry that used to be an instance and is now unreadable takes its instance with it.
    was_instance = [
        s.entry.locator for s in skips if (k := known.get(s.entry.locator)) and not k.skipped
    ]
    if was_instance:
        count, _ = _remove(session, source, was_instance, touched)
        run.removed += count

    existing = _existing_instances(session, list(records))
    for sop, (entry, _) in list(records.items()):
        holder = existing.get(sop)
        if holder is not None and holder != (source, entry.locator):
            skips.append(SkippedEntry(entry, f"duplicate of {holder[0]}:{holder[1]}"))
            dup_sops[entry.locator] = sop
            del records[sop]

    _record_skips(session, source, skips, now, dup_sops)
    run.skipped.extend((s.entry.locator, s.reason) for s in skips)
    run.unservable.extend(
        (entry.locator, problems[entry.locator])
        for entry, _ in records.values()
        if entry.locator in problems
    )
    if not records:
        return

    patient_pks = _upsert_patients(session, speakers)
    study_pks = _upsert_studies(session, speakers, patient_pks, moved_from)
    series_pks = _upsert_series(session, speakers, study_pks)
    touched.update(study_pks.values())

    replaced = [sop for sop in records if sop in existing]
    for chunk in _chunks(replaced):
        old = session.execute(
            select(Series.study_pk)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Instance.sop_uid.in_(chunk))
        ).scalars()
        touched.update(old)
        session.execute(delete(Instance).where(Instance.sop_uid.in_(chunk)))
    run.updated += len(replaced)
    run.added += len(records) - len(replaced)

    session.execute(
        insert(Instance),
        [
            {
                "sop_uid": keys.instance.sop_uid,
                "series_pk": series_pks[keys.series_uid],
                "sop_class_uid": keys.instance.sop_class_uid,
                "transfer_syntax_uid": keys.instance.transfer_syntax_uid,
                "instance_number": keys.instance.instance_number,
                "number_of_frames": keys.instance.number_of_frames,
                "size_bytes": keys.instance.size_bytes,
                **_title_columns(keys.instance.document_title),
                "source": source,
                "locator": entry.locator,
            }
            for entry, keys in records.values()
        ],
    )
    _remember(
        session,
        source,
        [(entry, keys.instance.sop_uid, None) for entry, keys in records.values()],
        now,
    )


def _locator_of(result: _Mapped | SkippedEntry) -> str:
    return result.entry.locator


def _existing_instances(session: Session, sops: list[str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for chunk in _chunks(sops):
        for sop, src, loc in session.execute(
            select(Instance.sop_uid, Instance.source, Instance.locator).where(
                Instance.sop_uid.in_(chunk)
            )
        ):
            found[sop] = (src, loc)
    return found


_Row = TypeVar("_Row", IndexRecord, InstanceKeys)


def _representatives(rows: Iterable[_Row], key: Callable[[_Row], Any]) -> dict[Any, _Row]:
    """Per key, the row with the smallest SOP Instance UID: its header speaks for the level."""
    best: dict[Any, _Row] = {}
    for rec in rows:
        k = key(rec)
        if k not in best or rec.instance.sop_uid < best[k].instance.sop_uid:
            best[k] = rec
    return best


def _upsert_patients(session: Session, rows: list[IndexRecord]) -> dict[tuple[str, ...], int]:
    reps = _representatives(rows, lambda r: (r.patient.patient_id, r.patient.issuer or ""))
    levels: _Levels = {
        key: (
            rec.instance.sop_uid,
            {
                "family_name": rec.patient.family_name,
                "family_key": name_key(rec.patient.family_name),
                "given_name": rec.patient.given_name,
                "birth_date": rec.patient.birth_date,
                "sex": rec.patient.sex,
            },
        )
        for key, rec in reps.items()
    }
    return _upsert(session, Patient, ("patient_id", "issuer"), levels)


def _upsert_studies(
    session: Session,
    rows: list[IndexRecord],
    patient_pks: dict[tuple[str, ...], int],
    moved_from: set[int] | None = None,
) -> dict[str, int]:
    reps = _representatives(rows, lambda r: r.study.study_uid)
    if moved_from is not None:  # the patients these studies had: some may be left without any
        for chunk in _chunks(list(reps)):
            moved_from.update(
                session.scalars(select(Study.patient_pk).where(Study.study_uid.in_(chunk)))
            )
    levels: _Levels = {}
    for uid, rec in reps.items():
        s = rec.study
        proc, req = s.procedure_code, s.requesting_service_code
        levels[(uid,)] = (
            rec.instance.sop_uid,
            {
                "patient_pk": patient_pks[(rec.patient.patient_id, rec.patient.issuer or "")],
                "accession_number": s.accession_number,
                "accession_issuer": s.accession_issuer,
                "study_id": s.study_id,
                "started": s.started,
                "description": s.description,
                "procedure_scheme": proc.scheme if proc else None,
                "procedure_code": proc.value if proc else None,
                "procedure_meaning": proc.meaning if proc else None,
                "requesting_service": s.requesting_service,
                "requesting_scheme": req.scheme if req else None,
                "requesting_code": req.value if req else None,
                "requesting_meaning": req.meaning if req else None,
                "referring_physician": s.referring_physician,
                "referring_organization": s.referring_organization,
                "institution_name": s.institution_name,
            },
        )
    return {key[0]: pk for key, pk in _upsert(session, Study, ("study_uid",), levels).items()}


def _upsert_series(
    session: Session, rows: list[IndexRecord], study_pks: dict[str, int]
) -> dict[str, int]:
    reps = _representatives(rows, lambda r: r.series.series_uid)
    levels: _Levels = {
        (uid,): (
            rec.instance.sop_uid,
            {
                "study_pk": study_pks[rec.study.study_uid],
                "number": rec.series.number,
                "modality": rec.series.modality,
                "description": rec.series.description,
                "body_part": rec.series.body_part,
                "laterality": rec.series.laterality,
                "started": rec.series.started,
            },
        )
        for uid, rec in reps.items()
    }
    return {key[0]: pk for key, pk in _upsert(session, Series, ("series_uid",), levels).items()}


_Level = type[Patient] | type[Study] | type[Series]
_Levels = dict[tuple[str, ...], tuple[str, dict[str, Any]]]


def _table(model: _Level) -> Table:
    return cast(Table, model.__table__)


def _upsert(
    session: Session,
    model: _Level,
    key_columns: tuple[str, ...],
    levels: _Levels,
) -> dict[tuple[str, ...], int]:
    """Insert the new rows and update those whose header instance sorts first, in bulk.

    ``levels`` maps each key to (SOP Instance UID of its header, column values). An existing row
    is overwritten only by a header whose SOP Instance UID is not larger than the one it has.
    """
    current = _current(session, model, key_columns, list(levels))
    stale = [
        {"row_pk": current[key][0], "header_sop_uid": sop, **values}
        for key, (sop, values) in levels.items()
        if key in current and sop <= current[key][1]
    ]
    new_keys = [k for k in levels if k not in current]
    if new_keys:
        session.execute(
            insert(model),
            [
                {
                    **dict(zip(key_columns, key, strict=True)),
                    **levels[key][1],
                    "header_sop_uid": levels[key][0],
                }
                for key in new_keys
            ],
        )
        current.update(_current(session, model, key_columns, new_keys))
    if stale:
        table = _table(model)
        columns = [c for c in stale[0] if c != "row_pk"]
        # executemany UPDATE: bind names must differ from column names, hence the prefix.
        stmt = (
            update(table)
            .where(table.c.id == bindparam("row_pk"))
            .values({c: bindparam(f"v_{c}") for c in columns})
        )
        session.execute(
            stmt,
            [{"row_pk": row["row_pk"], **{f"v_{c}": row[c] for c in columns}} for row in stale],
        )
    return {key: current[key][0] for key in levels}


def _current(
    session: Session, model: _Level, key_columns: tuple[str, ...], keys: list[tuple[str, ...]]
) -> dict[tuple[str, ...], tuple[int, str]]:
    cols = [getattr(model, c) for c in key_columns]
    found: dict[tuple[str, ...], tuple[int, str]] = {}
    for chunk in _chunks(keys):
        where = cols[0].in_([k[0] for k in chunk]) if len(cols) == 1 else tuple_(*cols).in_(chunk)
        for pk, sop, *key in session.execute(
            select(model.id, model.header_sop_uid, *cols).where(where)
        ):
            found[tuple(key)] = (pk, sop)
    return found


def _drop_orphans(session: Session, patient_pks: set[int]) -> None:
    """Remove those of ``patient_pks`` that have no study left (their studies went to another
    patient row: the same Patient ID under another issuer)."""
    for chunk in _chunks(sorted(patient_pks)):
        session.execute(
            delete(Patient).where(
                Patient.id.in_(chunk),
                ~select(Study.id).where(Study.patient_pk == Patient.id).exists(),
            )
        )


def _forget_instants(session: Session, study_pks: set[int]) -> None:
    """Unset the UTC start of studies a batch changed, in the batch's transaction: until the
    run's last step computes it again, the search computes it (an interrupted run leaves no
    stale value behind)."""
    for chunk in _chunks(sorted(study_pks)):
        session.execute(
            update(_table(Study))
            .where(_table(Study).c.id.in_(chunk))
            .values(started_utc=None, utc_zone=None)
        )


def _instant(
    started: datetime | None, first_series: datetime | None, zone: tzinfo | None
) -> datetime | None:
    """``started_utc`` of a study: the start its entries show (Study Date/Time, else its
    earliest series start, as :func:`ncp.fhir.manifest.study_started`) in UTC."""
    local = started if started is not None else first_series
    return None if local is None or zone is None else utc_of(local, zone)


def fill_study_instants(
    sessions: sessionmaker[Session], zone: tzinfo, *, batch_size: int = 2000
) -> int:
    """Give every study whose ``started_utc`` was not computed in ``zone`` (indexed before
    revision 0005, without a zone, or in another zone) its start in UTC; returns how many.
    One transaction per batch; safe to run at any time (the indexer runs it at each end)."""
    name = zone_name(zone)
    first_series = (
        select(func.min(Series.started)).where(Series.study_pk == Study.id).scalar_subquery()
    )
    done, last = 0, 0
    while True:
        with sessions.begin() as session:
            rows = session.execute(
                select(Study.id, Study.started, first_series)
                .where(Study.id > last, func.coalesce(Study.utc_zone, "") != name)
                .order_by(Study.id)
                .limit(batch_size)
            ).all()
            if not rows:
                return done
            session.execute(
                update(_table(Study))
                .where(_table(Study).c.id == bindparam("pk"))
                .values(started_utc=bindparam("utc"), utc_zone=bindparam("zone")),
                [
                    {"pk": pk, "utc": _instant(started, first, zone), "zone": name}
                    for pk, started, first in rows
                ],
            )
        done += len(rows)
        last = rows[-1][0]


def _recompute(session: Session, study_pks: set[int], zone: tzinfo | None = None) -> None:
    """Counts, sizes, modalities and body parts of the touched studies, their start in UTC (in
    ``zone``; NULL without one), and a new revision for each (their rendered list entries are
    stale now); drop what is empty. Every change to a
    study ends here, after the batches that made it, so a list entry rendered from a mix of old
    and new rows carries the old revision and is rendered again."""
    for chunk in _chunks(sorted(study_pks)):
        series_rows = session.execute(
            select(
                Series.id,
                Series.study_pk,
                Series.modality,
                Series.body_part,
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.size_bytes), 0),
                Series.started,
            )
            .outerjoin(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_(chunk))
            .group_by(Series.id, Series.study_pk, Series.modality, Series.body_part, Series.started)
        ).all()
        empty_series = [sid for sid, _, _, _, n, _, _ in series_rows if n == 0]
        series_updates = [
            {"pk": sid, "n": n, "size": size} for sid, _, _, _, n, size, _ in series_rows if n > 0
        ]
        if series_updates:
            session.execute(
                update(_table(Series))
                .where(_table(Series).c.id == bindparam("pk"))
                .values(num_instances=bindparam("n"), size_bytes=bindparam("size")),
                series_updates,
            )
        for part in _chunks(empty_series):
            session.execute(delete(Series).where(Series.id.in_(part)))

        per_study: dict[int, dict[str, Any]] = {
            pk: {"pk": pk, "ns": 0, "n": 0, "size": 0, "mods": set(), "parts": set()}
            for pk in chunk
        }
        study_started: dict[int, datetime | None] = {
            pk: started
            for pk, started in session.execute(
                select(Study.id, Study.started).where(Study.id.in_(chunk))
            )
        }
        for _, study_pk, modality, body_part, n, size, series_started in series_rows:
            if n == 0:
                continue
            agg = per_study[study_pk]
            if series_started is not None:
                first = agg.get("first")
                agg["first"] = series_started if first is None else min(first, series_started)
            agg["ns"] += 1
            agg["n"] += n
            agg["size"] += size
            if modality:
                agg["mods"].add(modality)
            if body_part:
                agg["parts"].add(body_part)
        empty_studies = [pk for pk, agg in per_study.items() if agg["n"] == 0]
        study_updates = [
            {
                "pk": pk,
                "rev": secrets.token_hex(8),
                "ns": agg["ns"],
                "n": agg["n"],
                "size": agg["size"],
                "mods": "\\".join(sorted(agg["mods"])),
                "parts": "\\".join(sorted(agg["parts"])),
                "utc": _instant(study_started.get(pk), agg.get("first"), zone),
                "zone": None if zone is None else zone_name(zone),
            }
            for pk, agg in per_study.items()
            if agg["n"] > 0
        ]
        if study_updates:
            session.execute(
                update(_table(Study))
                .where(_table(Study).c.id == bindparam("pk"))
                .values(
                    num_series=bindparam("ns"),
                    num_instances=bindparam("n"),
                    size_bytes=bindparam("size"),
                    modalities=bindparam("mods"),
                    body_parts=bindparam("parts"),
                    revision=bindparam("rev"),
                    started_utc=bindparam("utc"),
                    utc_zone=bindparam("zone"),
                ),
                study_updates,
            )
        if empty_studies:
            patients = (
                session.execute(select(Study.patient_pk).where(Study.id.in_(empty_studies)))
                .scalars()
                .all()
            )
            session.execute(delete(Study).where(Study.id.in_(empty_studies)))
            session.execute(
                delete(ListEntry).where(
                    ListEntry.kind.in_((EntryKind.MANIFEST, EntryKind.STUDY)),
                    ListEntry.subject_pk.in_(empty_studies),
                )
            )
            orphans = (
                session.execute(
                    select(Patient.id).where(
                        Patient.id.in_(set(patients)),
                        ~select(Study.id).where(Study.patient_pk == Patient.id).exists(),
                    )
                )
                .scalars()
                .all()
            )
            if orphans:
                session.execute(delete(Patient).where(Patient.id.in_(orphans)))


def _title_columns(title: tuple[str | None, str | None, str | None] | None) -> dict[str, Any]:
    scheme, code, meaning = title or (None, None, None)
    return {"title_scheme": scheme, "title_code": code, "title_meaning": meaning}
