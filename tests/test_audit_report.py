"""The audit report: every figure equals a brute-force computation over the same events."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ncp.audit.chain import append
from ncp.audit.models import AccessOption, Action, Outcome, Priority
from ncp.audit.record import AuditEvent
from ncp.audit.report import COLUMNS, ReportRow, percentile, summarise, write_csv, write_text
from tests.audit_support import T0


def _brute_percentile(values: list[int], p: float) -> int | None:
    """The smallest value that at least p % of the values do not exceed."""
    for v in sorted(set(values)):
        if sum(x <= v for x in values) * 100 >= p * len(values):
            return v
    return None


@given(st.lists(st.integers(0, 10**6), max_size=60), st.sampled_from([1, 25, 50, 90, 95, 100]))
def test_percentile_is_nearest_rank(values: list[int], p: int) -> None:
    assert percentile(values, p) == _brute_percentile(values, p)


def test_percentile_examples() -> None:
    assert percentile([], 50) is None
    assert percentile([7], 95) == 7
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([1, 2, 3, 4], 50) == 2


events = st.builds(
    AuditEvent,
    action=st.sampled_from(list(Action)),
    side=st.sampled_from(["provider", "consumer", "gateway"]),
    request_id=st.sampled_from([f"req-{i}" for i in range(6)]),
    node_country=st.just("AT"),
    outcome=st.sampled_from(list(Outcome)),
    peer_country=st.none() | st.sampled_from(["BE", "FR"]),
    option=st.none() | st.sampled_from(list(AccessOption)),
    priority=st.none() | st.sampled_from(list(Priority)),
    num_instances=st.none() | st.integers(0, 5000),
    size_bytes=st.none() | st.integers(0, 2**40),
    duration_ms=st.none() | st.integers(0, 120_000),
)


def _brute_force(evs: list[AuditEvent]) -> list[tuple[Any, ...]]:
    keys = {(e.peer_country, e.option, e.priority, e.action) for e in evs}
    rows = []
    for key in keys:
        group = [e for e in evs if (e.peer_country, e.option, e.priority, e.action) == key]
        durations = [e.duration_ms for e in group if e.duration_ms is not None]
        rows.append(
            (
                key[0],
                None if key[1] is None else str(key[1]),
                None if key[2] is None else str(key[2]),
                str(key[3]),
                len(group),
                len({e.request_id for e in group}),
                *(sum(1 for e in group if e.outcome == o) for o in Outcome),
                sum(e.num_instances or 0 for e in group),
                sum(e.size_bytes or 0 for e in group),
                _brute_percentile(durations, 50),
                _brute_percentile(durations, 95),
            )
        )
    return sorted(rows, key=lambda r: tuple(str(v) for v in r[:4]))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(events, max_size=40))
def test_report_figures_equal_a_brute_force_computation(
    engine: Engine, evs: list[AuditEvent]
) -> None:
    # One transaction, rolled back at the end: every example starts from an empty chain.
    with Session(engine) as session:
        for i, event in enumerate(evs):
            append(session, event, now=T0 + timedelta(seconds=i))
        rows = summarise(session)
        session.rollback()
    got = sorted((r.values() for r in rows), key=lambda r: tuple(str(v) for v in r[:4]))
    assert got == _brute_force(evs)


def test_since_and_until_select_by_recorded_time(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        for i in range(10):
            append(
                session,
                AuditEvent(
                    action="list-query",
                    side="provider",
                    request_id=f"r{i}",
                    node_country="AT",
                    peer_country="BE",
                    duration_ms=i,
                ),
                now=T0 + timedelta(minutes=i),
            )
    with Session(engine) as session:
        rows = summarise(session, since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=7))
    assert [(r.records, r.p50_ms, r.p95_ms) for r in rows] == [(4, 4, 6)]


def _rows() -> list[ReportRow]:
    return [
        ReportRow(
            "BE",
            "A",
            "urgent",
            "image-retrieve",
            records=3,
            exchanges=2,
            outcomes={0: 2, 8: 1},
            instances=900,
            size_bytes=10**9,
            p50_ms=800,
            p95_ms=2100,
        ),
        ReportRow("FR", None, None, "list-query", records=1, exchanges=1, outcomes={4: 1}),
    ]


def test_csv_has_a_header_and_empty_cells_for_absent_values() -> None:
    out = io.StringIO()
    write_csv(_rows(), out)
    table = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(table[0]) == COLUMNS
    assert table[1] == [
        "BE",
        "A",
        "urgent",
        "image-retrieve",
        "3",
        "2",
        "2",
        "0",
        "1",
        "0",
        "900",
        "1000000000",
        "800",
        "2100",
    ]
    assert table[2][:4] == ["FR", "", "", "list-query"] and table[2][-2:] == ["", ""]


def test_text_table_with_totals() -> None:
    out = io.StringIO()
    write_text(_rows(), out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["peer", "opt", "priority", "step"]
    assert lines[2].split() == [
        "BE",
        "A",
        "urgent",
        "image-retrieve",
        "3",
        "2",
        "2",
        "0",
        "1",
        "0",
        "900",
        "1000000000",
        "800",
        "2100",
    ]
    assert lines[3].split()[:4] == ["FR", "-", "-", "list-query"]
    assert lines[-1].split() == ["all", "4", "2", "1", "1", "0", "900", "1000000000"]


def test_an_empty_period_says_so() -> None:
    out = io.StringIO()
    write_text([], out)
    assert out.getvalue() == "no audit records in the period\n"
