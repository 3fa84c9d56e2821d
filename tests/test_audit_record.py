"""The audit API capabilities call (``AuditEvent``, ``Auditor``) and the guard that keeps patient
data out of application logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from ncp.audit.chain import verify
from ncp.audit.models import (
    AccessOption,
    Action,
    AuditRecord,
    Outcome,
    Priority,
    Purpose,
    Side,
)
from ncp.audit.record import (
    MASK,
    AuditError,
    Auditor,
    InvalidAuditEvent,
    PatientDataFilter,
    PatientSafeFormatter,
    install_log_filter,
    mask_patient_data,
)
from ncp.store.db import make_engine, session_factory
from tests.audit_support import PATIENT_ID, sample_event, sparse_event

# -- AuditEvent ----------------------------------------------------------------------------------


def test_enum_fields_accept_the_enum_or_its_value_and_normalise_once() -> None:
    event = sample_event(
        action="report-read", side=Side.CONSUMER, outcome=8, purpose="EMERGENCY", option="c"
    )
    assert event.action is Action.REPORT_READ and event.side is Side.CONSUMER
    assert event.outcome is Outcome.SERIOUS_FAILURE
    assert event.purpose is Purpose.ETREAT  # the eHDSI name of the purpose of use
    assert event.option is AccessOption.C and event.priority is Priority.URGENT
    assert sample_event(outcome="minor-failure").outcome is Outcome.MINOR_FAILURE
    assert sample_event(outcome="12").outcome is Outcome.MAJOR_FAILURE
    assert sample_event(purpose="TREATMENT").purpose is Purpose.TREAT


def test_columns_are_plain_values() -> None:
    columns = sample_event(2).columns()
    assert columns["action"] == "list-query" and type(columns["action"]) is str
    assert columns["outcome"] == 0 and type(columns["outcome"]) is int
    assert columns["studies"] == list(sample_event(2).studies)
    assert json.loads(json.dumps(columns["details"])) == columns["details"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"action": "peek"}, "action"),
        ({"side": "middle"}, "side"),
        ({"outcome": 3}, "outcome"),
        ({"outcome": "fine"}, "outcome"),
        ({"purpose": "RESEARCH"}, "purpose"),
        ({"priority": "whenever"}, "priority"),
        ({"option": "D"}, "option"),
        ({"interaction": "peek"}, "interaction"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"peer_country": "BEL"}, "peer_country"),
        ({"node_country": "at"}, "node_country"),
        ({"patient_id": None}, "patient_issuer"),
        ({"studies": "1.2.3"}, "studies"),
        ({"studies": ["1.2.3", "1..2"]}, "studies"),
        ({"num_instances": -1}, "num_instances"),
        ({"size_bytes": 2**63}, "size_bytes"),
        ({"duration_ms": 1.5}, "duration_ms"),
        ({"duration_ms": True}, "duration_ms"),
        ({"details": {"x": float("nan")}}, "JSON"),
        ({"details": {1: "x"}}, "keys"),
        ({"details": {"x": object()}}, "JSON"),
    ],
)
def test_invalid_events_are_refused_when_built(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidAuditEvent, match=message):
        sample_event(**changes)


@pytest.mark.parametrize(
    ("changes", "stored"),
    [
        ({"reason": "a\x00b"}, {"reason": "a\\x00b"}),
        ({"actor_name": "Dr \ud800"}, {"actor_name": "Dr \\ud800"}),
        ({"actor_name": "x" * 300}, {"actor_name": "x" * 255 + "…"}),
        ({"query": "\udfff" * 3}, {"query": "\\udfff" * 3}),
        (
            {"details": {"k\x00": ["\ud800", {"v": "\x00"}]}},
            {"details": {"k\\x00": ["\\ud800", {"v": "\\x00"}]}},
        ),
    ],
)
def test_hostile_text_is_stored_escaped_never_refused(
    engine: Engine, changes: dict[str, Any], stored: dict[str, Any]
) -> None:
    # Issue 13: a NUL or a lone surrogate from a peer made the record fail, so the request
    # was answered 500 and left no record at all.
    event = sample_event(**changes)
    record = Auditor(session_factory(engine), country="AT").record(event)
    for name, value in stored.items():
        assert getattr(event, name) == value
        assert getattr(record, name) == value
    with Session(engine) as session:
        assert verify(session).ok


def test_an_invalid_event_is_an_audit_error_and_a_value_error() -> None:
    with pytest.raises(AuditError) as raised:
        sample_event(action="peek")
    assert isinstance(raised.value, ValueError)


def test_repr_leaves_patient_data_out() -> None:
    shown = repr(sample_event())
    assert PATIENT_ID not in shown and "1.2.40.0.10.1.4.3.1" not in shown
    assert "req-0" in shown and "list-query" in shown


# -- Auditor -------------------------------------------------------------------------------------


def test_auditor_records_with_the_node_country(engine: Engine) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    record = auditor.record(sample_event(1, node_country=None))
    assert (record.seq, record.node_country, record.patient_id) == (1, "AT", PATIENT_ID)
    other = auditor.record(sparse_event(2))  # names its own node country
    assert (other.seq, other.node_country) == (2, "BE")
    with Session(engine) as session:
        assert verify(session).ok


def test_auditor_returns_a_usable_record_whatever_the_sessionmaker(engine: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    auditor = Auditor(sessionmaker(engine), country="AT")  # expire_on_commit=True
    record = auditor.record(sparse_event(1))
    assert record.seq == 1 and record.action == "hp-login"


def test_auditor_refuses_a_bad_country() -> None:
    with pytest.raises(ValueError):
        Auditor(session_factory(make_engine("sqlite://")), country="Austria")


def _no_patient_data(*texts: str) -> None:
    for t in texts:
        assert PATIENT_ID not in t, t


def test_a_failed_write_raises_audit_error_without_patient_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # never migrated
    auditor = Auditor(session_factory(engine), country="AT")
    with caplog.at_level(logging.DEBUG), pytest.raises(AuditError) as raised:
        auditor.record(sample_event(1))
    engine.dispose()
    error = raised.value
    assert "list-query" in str(error) and "req-1" in str(error)
    assert error.cause is not None  # kept for debugging...
    assert error.__cause__ is None and error.__suppress_context__  # ...but not printed
    _no_patient_data(str(error), caplog.text)
    assert "audit record not written" in caplog.text


def test_a_missing_chain_head_fails_closed(engine: Engine) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    auditor.record(sparse_event(1))
    with Session(engine) as session, session.begin():
        session.execute(text("DELETE FROM audit_chain_head"))
    with pytest.raises(AuditError, match="ChainError"):
        auditor.record(sparse_event(2))
    with Session(engine) as session:
        assert session.scalars(select(AuditRecord.seq)).all() == [1]


def test_a_failure_during_the_write_leaves_the_chain_as_it_was(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    auditor.record(sparse_event(1))

    def broken_flush(self: Session, objects: Any = None) -> None:
        raise RuntimeError(f"disk full while writing {PATIENT_ID}")

    monkeypatch.setattr(Session, "flush", broken_flush)
    with pytest.raises(AuditError) as raised:
        auditor.record(sample_event(2))
    _no_patient_data(str(raised.value))
    monkeypatch.undo()
    with Session(engine) as session:
        result = verify(session)
    assert result.ok and result.count == 1 and result.head_seq == 1


# -- Auditor.step --------------------------------------------------------------------------------


def test_step_records_duration_and_what_was_learnt(engine: Engine) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    with auditor.step(sparse_event(1, action="image-retrieve", side="gateway")) as step:
        step.update(studies=["1.2.3"], num_instances=3, size_bytes=300)
    with Session(engine) as session:
        record = session.scalars(select(AuditRecord)).one()
    assert record.studies == ["1.2.3"] and record.size_bytes == 300
    assert record.outcome == 0 and record.duration_ms is not None and record.duration_ms >= 0


def test_step_records_a_handled_failure(engine: Engine) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    with auditor.step(sparse_event(1, action="patient-identify", side="provider")) as step:
        step.fail(Outcome.MINOR_FAILURE, "no match")
    with Session(engine) as session:
        record = session.scalars(select(AuditRecord)).one()
    assert (record.outcome, record.reason) == (4, "no match")


def test_step_records_an_exception_and_reraises_it(engine: Engine) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    with (
        pytest.raises(KeyError),
        auditor.step(sparse_event(1, action="report-read", side="provider")),
    ):
        raise KeyError("report 7")
    with Session(engine) as session:
        record = session.scalars(select(AuditRecord)).one()
    assert record.outcome == 12 and record.reason is not None and "KeyError" in record.reason


def test_step_fails_closed_when_the_record_cannot_be_written(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    auditor = Auditor(session_factory(engine), country="AT")
    answered = False
    with pytest.raises(AuditError):
        with auditor.step(sparse_event(1)):
            pass
        answered = True  # pragma: no cover - must not be reached
    engine.dispose()
    assert not answered


# -- no patient data in logs ---------------------------------------------------------------------


def _logger(*, formatter: logging.Formatter | None = None) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or logging.Formatter("%(message)s %(__dict__)s"))
    logger = logging.getLogger(f"ncp.test.audit.{id(stream)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_filter_masks_extra_fields_mapping_args_and_logged_dicts() -> None:
    logger, stream = _logger(formatter=logging.Formatter("%(message)s|%(patient_id)s"))
    install_log_filter(logger)
    logger.info(
        "identify %(request)s for %(patient_id)s",
        {"request": "r-1", "patient_id": PATIENT_ID},
        extra={"patient_id": PATIENT_ID},
    )
    logger.info(
        {"patientID": PATIENT_ID, "nested": {"birth_date": "1970-01-01"}}, extra={"patient_id": "x"}
    )
    logger.info("event %s", sample_event(), extra={"patient_id": "x"})
    logger.info(
        "args %s %s",
        {"query": f"Patient?identifier={PATIENT_ID}"},
        [{"Patient_Id": PATIENT_ID}],
        extra={"patient_id": "x"},
    )
    out = stream.getvalue()
    _no_patient_data(out)
    assert "1970-01-01" not in out
    assert out.count(MASK) >= 6 and "r-1" in out


def test_safe_formatter_masks_without_a_filter() -> None:
    logger, stream = _logger(formatter=PatientSafeFormatter("%(message)s %(patient_issuer)s"))
    logger.warning("%(patient_id)s", {"patient_id": PATIENT_ID}, extra={"patient_issuer": "1.2"})
    assert stream.getvalue().strip() == f"{MASK} {MASK}"


def test_install_log_filter_adds_one_filter_per_handler() -> None:
    logger, _ = _logger()
    install_log_filter(logger)
    install_log_filter(logger)
    assert sum(isinstance(f, PatientDataFilter) for f in logger.handlers[0].filters) == 1


def test_filter_leaves_other_records_alone() -> None:
    record = logging.makeLogRecord({"msg": "indexed %d studies", "args": (3,)})
    assert PatientDataFilter().filter(record)
    assert record.getMessage() == "indexed 3 studies"


@given(
    st.recursive(
        st.text(max_size=5) | st.integers(),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["patient_id", "PatientName", "a", "query"]), inner)
        ),
        max_leaves=8,
    )
)
def test_masking_removes_every_patient_key_at_any_depth(value: Any) -> None:
    def keys(v: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(v, dict):
            for k, item in v.items():
                yield k, item
                yield from keys(item)
        elif isinstance(v, list):
            for item in v:
                yield from keys(item)

    for key, item in keys(mask_patient_data(value)):
        if key.lower() in {"patient_id", "patientname", "query"}:
            assert item == MASK


def test_audit_modules_never_log_patient_data(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    auditor = Auditor(session_factory(engine), country="AT")
    with caplog.at_level(logging.DEBUG, logger="ncp"):
        auditor.record(sample_event(1))
        with pytest.raises(KeyError), auditor.step(sample_event(2)):
            raise KeyError(PATIENT_ID)
    _no_patient_data(caplog.text)
