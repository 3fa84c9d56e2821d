"""The hash chain of audit records: appending safely with several writers, and verifying.

Each record's ``hash`` is the SHA-256 of its canonical form (:func:`canonical`): a stable JSON
document of every column but ``hash`` itself, ``seq`` and ``prev_hash`` included. ``prev_hash``
is the hash of the record before (:data:`~ncp.audit.models.GENESIS_HASH` for the first), so
editing any field of any record breaks its own hash, and removing or reordering records breaks
the sequence or the links. The one-row chain head (:class:`~ncp.audit.models.AuditChainHead`)
names the newest record, so deleting the newest records is detected too: without it, a chain
cut short is still a valid chain.

Several writers (threads, or replicas sharing one PostgreSQL) append in turns: :func:`append`
first locks the chain head row, reads it, writes the record and moves the head, all in the
caller's transaction. Two writers can never both take the same ``seq`` (and should the lock ever
fail, ``seq`` is the primary key, so the second insert fails instead of forking the chain).

What the chain cannot show by itself: someone with write access to the database who cuts the
newest records and moves the head back, or rewrites records, recomputes every later hash and
moves the head. Signed checkpoints of the head kept outside the database
(:mod:`ncp.audit.checkpoint`, ``ncp audit checkpoint``) close that gap: :func:`verify` given
their :class:`Anchor` checks that the record each names is still there with the hash signed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, cast

from sqlalchemy import Table, Text, bindparam, func, insert, select, type_coerce, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from ncp.audit.models import CHAIN_HEAD_ID, GENESIS_HASH, AuditChainHead, AuditRecord
from ncp.errors import NcpError

CHAIN_FORMAT = "ncp-audit-chain/1"
"""Written into every canonical form: a future change of the form cannot collide with this one."""

HASHED_FIELDS: tuple[str, ...] = (
    "seq",
    "recorded",
    "request_id",
    "node_country",
    "side",
    "action",
    "outcome",
    "reason",
    "interaction",
    "actor_id",
    "actor_name",
    "actor_role",
    "actor_organisation",
    "actor_organisation_id",
    "actor_point_of_care",
    "actor_country",
    "peer_country",
    "patient_id",
    "patient_issuer",
    "purpose",
    "priority",
    "option",
    "studies",
    "num_instances",
    "size_bytes",
    "token_jti",
    "duration_ms",
    "query",
    "details",
    "prev_hash",
)
"""Every column of :class:`AuditRecord` but ``hash``, listed here rather than read from the
model so that a new column is a visible decision (a test checks the list stays complete)."""

ProblemKind = Literal[
    "edited", "deleted", "relinked", "truncated", "unanchored", "head-missing", "cut", "rewritten"
]


class ChainError(NcpError):
    """The chain cannot be appended to (its head row is missing: the schema was not migrated,
    or the row was deleted)."""


class Entry(Protocol):
    """What :func:`append` needs of an event: its column values (``ncp.audit.record.AuditEvent``
    is one). ``seq``, ``recorded``, ``prev_hash`` and ``hash`` are the chain's to set."""

    def columns(self) -> dict[str, Any]: ...


# -- canonical form -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        # Always with microseconds: isoformat() drops them when zero, and a stable form must not
        # depend on the value.
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(value, tuple):
        return list(value)
    return value


def canonical(values: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is computed over: sorted-key compact JSON in UTF-8 of
    :data:`HASHED_FIELDS` (plus the format name), times as ``YYYY-MM-DDTHH:MM:SS.ffffff`` UTC."""
    doc: dict[str, Any] = {"format": CHAIN_FORMAT}
    for name in HASHED_FIELDS:
        doc[name] = _plain(values[name])
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def values_of(record: AuditRecord) -> dict[str, Any]:
    """The hashed values of an ORM record (``hash`` included, for comparison)."""
    return {name: getattr(record, name) for name in (*HASHED_FIELDS, "hash")}


def record_hash(values: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of :func:`canonical`."""
    return hashlib.sha256(canonical(values)).hexdigest()


# -- append ---------------------------------------------------------------------------------


def utc_now() -> datetime:
    """Now, as the naive UTC the database keeps."""
    return datetime.now(UTC).replace(tzinfo=None)


# Built once, and Core rather than the ORM's unit of work: a record's write is on every
# request's path (a QIDO search waits for it), and this halves its cost.
_HEAD = cast(Table, AuditChainHead.__table__)
_TOUCH_HEAD = update(_HEAD).where(_HEAD.c.id == CHAIN_HEAD_ID).values(seq=_HEAD.c.seq)
_READ_HEAD = (
    select(_HEAD.c.seq, _HEAD.c.hash, _HEAD.c.recorded)
    .where(_HEAD.c.id == CHAIN_HEAD_ID)
    .with_for_update()
)
_MOVE_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == CHAIN_HEAD_ID)
    .values(seq=bindparam("to_seq"), hash=bindparam("to_hash"), recorded=bindparam("to_recorded"))
)
_INSERT_RECORD = insert(cast(Table, AuditRecord.__table__))


def _lock_head(session: Session) -> tuple[int, str, datetime | None] | None:
    """The head's (seq, hash, recorded), locked for this transaction."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite: a transaction that reads first and writes later cannot wait for another
        # writer (it fails with "database is locked" at once in WAL mode). Writing first makes
        # the driver open the transaction with this statement, which waits (busy timeout) for
        # the database write lock and then holds it: writers queue here.
        session.execute(_TOUCH_HEAD)
    # PostgreSQL: the row lock makes other writers wait here until this transaction ends, and
    # then read the head as this one left it (READ COMMITTED re-reads a locked row).
    row = session.execute(_READ_HEAD).one_or_none()
    return None if row is None else (row[0], row[1], row[2])


def append(session: Session, event: Entry, *, now: datetime | None = None) -> AuditRecord:
    """Add ``event`` as the next record of the chain, in the caller's transaction (commit it to
    release the chain for other writers; keep that transaction short). Returns the record as
    written (not attached to the session).

    Keep the audit write in a transaction of its own, as :class:`ncp.audit.record.Auditor`
    does: on SQLite the first statement must be the write that queues for the lock (see
    :func:`_lock_head`); on PostgreSQL the default READ COMMITTED isolation lets a waiting writer
    continue from the head as the previous one left it (REPEATABLE READ would fail instead).
    ``now`` (naive UTC) is for tests; ``recorded`` never goes back along the chain, even when
    the clocks of replicas disagree.
    """
    values = event.columns()
    head = _lock_head(session)
    if head is None:
        raise ChainError(
            "the audit chain head row is missing: run `ncp db upgrade`, or, if the database was "
            "migrated, the row was deleted and `ncp audit verify` will say so"
        )
    seq, prev_hash, last = head
    clock = now if now is not None else utc_now()
    recorded = clock if last is None or clock > last else last
    row = {**values, "seq": seq + 1, "recorded": recorded, "prev_hash": prev_hash}
    row["hash"] = record_hash(row)
    session.execute(_INSERT_RECORD, [row])
    session.execute(
        _MOVE_HEAD, {"to_seq": row["seq"], "to_hash": row["hash"], "to_recorded": recorded}
    )
    # A head the session loaded before is stale now: the next read must see this one.
    loaded = session.identity_map.get(identity_key(AuditChainHead, CHAIN_HEAD_ID))
    if loaded is not None:
        session.expire(loaded)
    return AuditRecord(**row)


# -- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One break in the chain, named by the sequence number where it is."""

    seq: int
    """The record concerned; for deleted records, the first one missing."""
    kind: ProblemKind
    detail: str
    recorded: datetime | None = None
    """When the named record was written, when it still exists."""
    action: str | None = None

    def describe(self) -> str:
        where = f"seq {self.seq}"
        if self.recorded is not None:
            where += f" (recorded {self.recorded.isoformat(sep=' ')} UTC, action {self.action})"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Anchor:
    """What a trusted copy of an earlier head says (a verified checkpoint): the record ``seq``
    had hash ``hash``, in the chain whose first record has hash ``first``."""

    seq: int
    hash: str
    first: str
    label: str
    """How problems name it, e.g. ``the checkpoint of 2026-12-01 10:00:00 UTC``."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    count: int
    """Records read."""
    head_seq: int | None
    head_hash: str | None
    problems: tuple[Problem, ...] = ()
    more_problems: int = 0
    """Problems found beyond those kept in :attr:`problems`."""
    checked_at: datetime = field(default_factory=utc_now)
    first_hash: str | None = None
    """The hash of record 1, which names the chain (None for an empty chain)."""
    head_recorded: datetime | None = None
    """When the newest record read was written."""
    anchors: tuple[Anchor, ...] = ()
    """The anchors checked (each either confirmed or named in :attr:`problems`)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_broken(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def verify(
    session: Session, *, max_problems: int = 100, anchors: Sequence[Anchor] = ()
) -> VerifyResult:
    """Check the whole chain; name every break (the first :data:`max_problems` of them).

    The head and the highest ``seq`` are read in one statement, so records appended while the
    check runs are neither blamed nor needed: the scan stops at the head read at the start.
    Each of ``anchors`` must still hold: its record present with the hash it names (else the
    chain was cut back or rewritten since), in a chain that starts with its ``first``.
    """
    head_seq_q = select(AuditChainHead.seq).where(AuditChainHead.id == CHAIN_HEAD_ID)
    head_hash_q = select(AuditChainHead.hash).where(AuditChainHead.id == CHAIN_HEAD_ID)
    max_seq_q = select(func.max(AuditRecord.seq))
    head_seq, head_hash, max_seq = session.execute(
        select(
            head_seq_q.scalar_subquery(), head_hash_q.scalar_subquery(), max_seq_q.scalar_subquery()
        )
    ).one()
    # SQLite keeps whatever is written into a column: a number made text is an edit to report,
    # not a value to compare.
    seq_text = max_seq is not None and not isinstance(max_seq, int)
    head_text = head_seq is not None and not isinstance(head_seq, int)
    if seq_text:
        max_seq = None
    if head_text:
        head_seq = None
    limit = head_seq if head_seq is not None else max_seq

    found = _Findings(max_problems)
    count, last = 0, None
    wanted = {1, *(a.seq for a in anchors)}
    seen: dict[int, str] = {}
    if limit is not None:
        # Values that do not parse (text written into a time or JSON column) must become a
        # finding, not a crash: read those columns raw and parse them here.
        raw = {"recorded", "studies", "details"}
        columns = [
            type_coerce(c, Text).label(c.name) if c.name in raw else c
            for c in AuditRecord.__table__.columns
        ]
        stmt = (
            select(*columns)
            .where(AuditRecord.seq <= limit)
            .order_by(AuditRecord.seq)
            .execution_options(yield_per=1000)
        )
        rows: Iterable[Mapping[Any, Any]] = session.execute(stmt).mappings()
        count, last = _scan(rows, found, wanted, seen)

    last_seq = last["seq"] if last is not None else 0
    if head_seq is None:
        found.add(
            Problem(
                last_seq + 1,
                "head-missing",
                "the chain head row was edited (its seq is not a number)"
                if head_text
                else "the chain head row is missing: the newest records may have gone with it",
            )
        )
    elif head_seq > last_seq:
        found.add(
            Problem(
                last_seq + 1,
                "truncated",
                f"records {_range(last_seq + 1, head_seq)} are missing at the end: the chain "
                f"head names seq {head_seq}, the newest record is seq {last_seq}",
            )
        )
    elif last is not None and head_hash != last["hash"]:
        found.add(
            Problem(
                last_seq,
                "relinked",
                "the newest record's hash differs from the chain head's: the record was "
                "rewritten with a recomputed hash, or the head was edited",
                _when(last),
                last["action"],
            )
        )
    if seq_text:
        found.add(Problem(last_seq + 1, "unanchored", "a record's seq is not a number: edited"))
    elif head_seq is not None and max_seq is not None and max_seq > head_seq:
        found.add(
            Problem(
                head_seq + 1,
                "unanchored",
                f"records after seq {head_seq} (up to {max_seq}) are not covered by the chain "
                "head: written outside the chain, or the head was set back",
            )
        )
    for anchor in anchors:
        _check_anchor(anchor, seen, last_seq, found)
    return VerifyResult(
        count=count,
        head_seq=head_seq,
        head_hash=head_hash,
        problems=tuple(sorted(found.kept, key=lambda p: p.seq)),
        more_problems=found.more,
        first_hash=seen.get(1),
        head_recorded=_when(last) if last is not None else None,
        anchors=tuple(anchors),
    )


def _check_anchor(anchor: Anchor, seen: Mapping[int, str], last_seq: int, found: _Findings) -> None:
    if anchor.seq <= 0:
        return  # the checkpoint of an empty chain: every chain extends it
    first = seen.get(1)
    if first is not None and first != anchor.first:
        found.add(
            Problem(
                1,
                "rewritten",
                f"the chain does not start as the one {anchor.label} was signed for (first "
                f"record hash {first[:16]}..., signed {anchor.first[:16]}...): a checkpoint of "
                "another chain, or the chain was rewritten from its first record",
            )
        )
    if anchor.seq > last_seq:
        found.add(
            Problem(
                anchor.seq,
                "cut",
                f"{anchor.label} names seq {anchor.seq}, but the chain ends at seq {last_seq}: "
                "the newest records were removed and the chain head moved back",
            )
        )
    elif anchor.seq in seen and seen[anchor.seq] != anchor.hash:
        found.add(
            Problem(
                anchor.seq,
                "rewritten",
                f"its hash {seen[anchor.seq][:16]}... is not the {anchor.hash[:16]}... "
                f"{anchor.label} signed: the chain up to here was rewritten with recomputed "
                "hashes",
            )
        )
    # A record missing at anchor.seq inside the chain is already named as deleted.


class _Findings:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.kept: list[Problem] = []
        self.more = 0

    def add(self, problem: Problem) -> None:
        if len(self.kept) < self.limit:
            self.kept.append(problem)
        else:
            self.more += 1


def _parsed(row: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The row with its raw columns parsed as the ORM would, or why one does not parse."""
    values = dict(row)
    try:
        recorded = values["recorded"]
        if isinstance(recorded, str):
            values["recorded"] = datetime.fromisoformat(recorded)
        for name in ("studies", "details"):
            if isinstance(values[name], str):
                values[name] = json.loads(values[name])
    except ValueError as exc:
        return values, f"a value does not parse ({exc}): the record was edited"
    if not isinstance(values["recorded"], datetime):
        return values, "its time is not a time: the record was edited"
    return values, None


def _range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first} to {last}"


def _when(row: Mapping[str, Any]) -> datetime | None:
    value = row["recorded"]
    return value if isinstance(value, datetime) else None


def _scan(
    rows: Iterable[Mapping[Any, Any]],
    found: _Findings,
    wanted: set[int],
    seen: dict[int, str],
) -> tuple[int, Mapping[str, Any] | None]:
    """Walk the records in ``seq`` order; return how many there were and the last one. The
    hashes of the records numbered in ``wanted`` are put into ``seen``."""
    expected, prev_hash = 1, GENESIS_HASH
    count = 0
    before: Mapping[str, Any] | None = None
    blamed: int | None = None  # the last record named: a broken record is named once
    for raw in rows:
        count += 1
        row, unreadable = _parsed(raw)
        seq = row["seq"]
        if seq in wanted:
            seen[seq] = row["hash"]
        if seq > expected:
            when = _when(row)
            found.add(
                Problem(
                    expected,
                    "deleted",
                    f"record(s) {_range(expected, seq - 1)} missing before seq {seq}"
                    + (f" (recorded {when.isoformat(sep=' ')} UTC)" if when else ""),
                )
            )
        if unreadable is not None:
            found.add(Problem(seq, "edited", unreadable, None, row["action"]))
        elif record_hash(row) != row["hash"]:
            found.add(
                Problem(
                    seq,
                    "edited",
                    "the record does not match its own hash: a field was changed",
                    _when(row),
                    row["action"],
                )
            )
        elif seq < expected:  # a first record numbered below 1, with a hash to match
            found.add(
                Problem(
                    seq,
                    "relinked",
                    "sequence numbers start at 1: the record was inserted outside the chain",
                    _when(row),
                    row["action"],
                )
            )
        elif (
            seq == expected
            and row["prev_hash"] != prev_hash
            and (before is None or blamed != before["seq"])
        ):
            if before is None:
                found.add(
                    Problem(
                        seq,
                        "relinked",
                        "the first record does not start the chain (its prev_hash is not the "
                        "genesis hash): earlier records were removed and the rest renumbered",
                        _when(row),
                        row["action"],
                    )
                )
            else:
                found.add(
                    Problem(
                        before["seq"],
                        "relinked",
                        f"its hash is not the prev_hash of seq {seq}: the record was rewritten "
                        "with a recomputed hash, or records were reordered or removed and "
                        "renumbered",
                        _when(before),
                        before["action"],
                    )
                )
        if found.kept and found.kept[-1].kind != "deleted":
            blamed = found.kept[-1].seq
        expected, prev_hash, before = seq + 1, row["hash"], row
    return count, before
