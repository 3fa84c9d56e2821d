"""Volumes and turnaround times from the audit trail, per peer country, option and priority.

One row per (peer country, option, priority, step): how many records and exchanges, how many
ended in each outcome, the instances and bytes moved, and the median and 95th percentile of the
steps' durations (nearest-rank: the smallest duration at least p % of the steps did not exceed).
Written as a text table or CSV.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.audit.models import Action, AuditRecord, Outcome

COLUMNS = (
    "peer_country",
    "option",
    "priority",
    "action",
    "records",
    "exchanges",
    "success",
    "minor_failure",
    "serious_failure",
    "major_failure",
    "instances",
    "bytes",
    "p50_ms",
    "p95_ms",
)


def percentile(values: Sequence[int], p: float) -> int | None:
    """Nearest-rank percentile of ``values`` (None when empty): the value at rank
    ceil(p/100 * n) of the sorted values, rank 1 at least."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class ReportRow:
    peer_country: str | None
    option: str | None
    priority: str | None
    action: str
    records: int = 0
    exchanges: int = 0
    outcomes: dict[int, int] = field(default_factory=dict)
    instances: int = 0
    size_bytes: int = 0
    p50_ms: int | None = None
    p95_ms: int | None = None

    def values(self) -> tuple[object, ...]:
        """The row in the order of :data:`COLUMNS` (absent values as None)."""
        return (
            self.peer_country,
            self.option,
            self.priority,
            self.action,
            self.records,
            self.exchanges,
            *(self.outcomes.get(o.value, 0) for o in Outcome),
            self.instances,
            self.size_bytes,
            self.p50_ms,
            self.p95_ms,
        )


_ACTION_ORDER = {a.value: i for i, a in enumerate(Action)}


def _sort_key(row: ReportRow) -> tuple[str, str, str, int, str]:
    return (
        row.peer_country or "",
        row.option or "",
        row.priority or "",
        _ACTION_ORDER.get(row.action, len(_ACTION_ORDER)),
        row.action,
    )


def summarise(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> list[ReportRow]:
    """The report rows of the records written in [since, until) (naive UTC; open when None)."""
    r = AuditRecord
    stmt = select(
        r.peer_country,
        r.option,
        r.priority,
        r.action,
        r.request_id,
        r.outcome,
        r.num_instances,
        r.size_bytes,
        r.duration_ms,
    ).execution_options(yield_per=5000)
    if since is not None:
        stmt = stmt.where(r.recorded >= since)
    if until is not None:
        stmt = stmt.where(r.recorded < until)

    rows: dict[tuple[str | None, str | None, str | None, str], ReportRow] = {}
    exchanges: dict[tuple[str | None, str | None, str | None, str], set[str]] = {}
    durations: dict[tuple[str | None, str | None, str | None, str], list[int]] = {}
    for peer, option, priority, action, request_id, outcome, inst, size, ms in session.execute(
        stmt
    ):
        key = (peer, option, priority, action)
        row = rows.get(key)
        if row is None:
            row = rows[key] = ReportRow(peer, option, priority, action)
            exchanges[key], durations[key] = set(), []
        row.records += 1
        row.outcomes[outcome] = row.outcomes.get(outcome, 0) + 1
        row.instances += inst or 0
        row.size_bytes += size or 0
        exchanges[key].add(request_id)
        if ms is not None:
            durations[key].append(ms)
    for key, row in rows.items():
        row.exchanges = len(exchanges[key])
        row.p50_ms = percentile(durations[key], 50)
        row.p95_ms = percentile(durations[key], 95)
    return sorted(rows.values(), key=_sort_key)


def write_csv(rows: Iterable[ReportRow], out: TextIO) -> None:
    """CSV with a header of :data:`COLUMNS`; absent values are empty cells."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row.values()])


_HEADINGS = (
    "peer",
    "opt",
    "priority",
    "step",
    "records",
    "exch",
    "ok",
    "minor",
    "serious",
    "major",
    "instances",
    "bytes",
    "p50 ms",
    "p95 ms",
)


def write_text(rows: Sequence[ReportRow], out: TextIO) -> None:
    """An aligned table with a totals line (``-`` for absent values)."""
    if not rows:
        out.write("no audit records in the period\n")
        return
    table = [[("-" if v is None else str(v)) for v in row.values()] for row in rows]
    # Exchanges are not summed: one exchange has several steps, so it is in several rows.
    totals = ["all", "", "", ""]
    for i in range(4, 12):
        summed = sum(v for row in rows if isinstance(v := row.values()[i], int))
        totals.append("" if COLUMNS[i] == "exchanges" else str(summed))
    totals += ["", ""]
    widths = [
        max(len(h), *(len(line[i]) for line in [*table, totals])) for i, h in enumerate(_HEADINGS)
    ]

    def line(cells: Sequence[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:4], widths[:4], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[4:], widths[4:], strict=True)]
        return "  ".join(left + right).rstrip() + "\n"

    out.write(line(_HEADINGS))
    out.write(line(["-" * w for w in widths]))
    for cells in table:
        out.write(line(cells))
    out.write(line(["-" * w for w in widths]))
    out.write(line(totals))
