"""Shared by the audit tests: a migrated database, sample events, and raw edits of the chain.

The schema is created through the migrations (``ncp.store.db.migrate``), as a node does it, so
the tests also prove that ``0002_audit`` creates what the models and the chain expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.orm import Session

from ncp.audit.chain import VerifyResult, append, verify
from ncp.audit.models import AuditChainHead, AuditRecord
from ncp.audit.record import AuditEvent

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456)

PATIENT_ID = "PAT-7781-SECRET"
"""A patient identifier that must never appear in a log."""


def sample_event(i: int = 0, **changes: Any) -> AuditEvent:
    """A fully populated provider-side event; ``changes`` override fields."""
    values: dict[str, Any] = {
        "action": "list-query",
        "side": "provider",
        "request_id": f"req-{i}",
        "node_country": "AT",
        "outcome": "success",
        "interaction": None,
        "actor_id": f"hp-{i}",
        "actor_name": "Dr. Anna Schmidt",
        "actor_role": "radiologist",
        "actor_organisation": "Hôpital Erasme",
        "actor_organisation_id": "1.2.3.4.5",
        "actor_point_of_care": "Emergency department",
        "actor_country": "BE",
        "peer_country": "BE",
        "patient_id": PATIENT_ID,
        "patient_issuer": "1.2.40.0.10.1.4.3.1",
        "purpose": "TREAT",
        "priority": "urgent",
        "option": "A",
        "studies": ["1.2.826.0.1.3680043.2.1143.1", "1.2.826.0.1.3680043.2.1143.2"],
        "num_instances": 420 + i,
        "size_bytes": 5 * 2**31 + i,
        "token_jti": f"jti-{i}",
        "duration_ms": 100 + i,
        "query": f"DocumentReference?patient.identifier=urn:oid:1.2.40|{PATIENT_ID}",
        "details": {"status": 200, "note": "Ünïcödé ✓", "nested": {"list": [1, 2.5, None]}},
    }
    values.update(changes)
    return AuditEvent(**values)


def sparse_event(i: int = 0, **changes: Any) -> AuditEvent:
    """An event with only the required fields (the optional ones NULL)."""
    values: dict[str, Any] = {
        "action": "hp-login",
        "side": "consumer",
        "request_id": f"req-sparse-{i}",
        "node_country": "BE",
    }
    values.update(changes)
    return AuditEvent(**values)


def fill(engine: Engine, events: list[AuditEvent], *, start: datetime = T0) -> None:
    """Append ``events`` one transaction each, one millisecond apart from ``start``."""
    for i, event in enumerate(events):
        with Session(engine) as session, session.begin():
            append(session, event, now=start + timedelta(milliseconds=i))


def mixed_events(n: int) -> list[AuditEvent]:
    return [sample_event(i) if i % 3 else sparse_event(i) for i in range(n)]


@contextmanager
def tampering(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that is rolled back at the end: edit the chain through it
    and verify with :func:`verify_on`, and the database is as before afterwards."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


def verify_on(connection: Connection) -> VerifyResult:
    with Session(bind=connection) as session:
        return verify(session)


def set_field(connection: Connection, seq: int, name: str, value: Any) -> None:
    connection.execute(update(AuditRecord).where(AuditRecord.seq == seq).values({name: value}))


def delete_record(connection: Connection, seq: int) -> None:
    connection.execute(delete(AuditRecord).where(AuditRecord.seq == seq))


def head(engine: Engine) -> tuple[int, str]:
    with Session(engine) as session:
        row = session.execute(select(AuditChainHead.seq, AuditChainHead.hash)).one()
        return int(row[0]), str(row[1])


def seqs(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return list(session.scalars(select(AuditRecord.seq).order_by(AuditRecord.seq)))
