"""The audit API every capability calls, and the guard that keeps patient data out of logs.

A step builds an :class:`AuditEvent` and hands it to :meth:`Auditor.record`, which writes it as
the next record of the hash chain in a short transaction of its own. When the write fails the
caller gets an :class:`AuditError` and must fail closed: a step that cannot be audited must not
answer (eHDSI: audit was the main source of defects in OpenNCP; a lost record is one of them).
:meth:`Auditor.step` does the timing and the failure outcome for a block of code.

Patient identifiers and queries (which may name a patient) are kept in the audit table and
nowhere else: an event's ``repr`` leaves them out, and :class:`PatientDataFilter` masks them in
log records that carry them by key (``extra={...}``, mapping arguments, logged dicts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from ncp.audit.chain import append
from ncp.audit.models import (
    AccessOption,
    Action,
    AuditRecord,
    Outcome,
    Priority,
    Purpose,
    Side,
)
from ncp.dicom.uids import is_uid
from ncp.errors import NcpError
from ncp.fhir.identifiers import issuer_of

if TYPE_CHECKING:
    from ncp.security.claims import HpAssertion, PatientRef

log = logging.getLogger(__name__)

_COUNTRY = re.compile(r"[A-Z]{2}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
_MAX_INT = 2**63 - 1

INTERACTIONS = frozenset(
    {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history",
        "history-instance",
        "history-type",
        "history-system",
        "create",
        "search",
        "search-type",
        "search-system",
        "capabilities",
        "transaction",
        "batch",
        "operation",
    }
)
"""FHIR R4 restful-interaction codes (http://hl7.org/fhir/restful-interaction)."""

_PURPOSE_ALIASES = {"TREATMENT": Purpose.TREAT, "EMERGENCY": Purpose.ETREAT}
"""The eHDSI names of the purposes of use, accepted for the v3 codes."""


class AuditError(NcpError):
    """An audit record could not be written. The step it describes must fail: never answer a
    request whose audit record is lost.

    The message names the step and the request, never the patient; the database error is kept
    in :attr:`cause` rather than chained, because its text quotes the SQL parameters (patient
    identifiers) and a chained exception is printed with every logged traceback.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class InvalidAuditEvent(AuditError, ValueError):
    """An :class:`AuditEvent` was built with a value the audit table cannot hold as given."""


def _limits() -> dict[str, int]:
    out: dict[str, int] = {}
    for column in AuditRecord.__table__.columns:
        length = getattr(column.type, "length", None)
        if isinstance(length, int):
            out[column.name] = length
    return out


_LENGTHS = _limits()


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One step, as a capability reports it. Enum fields accept the enum or its value and are
    normalised once, here; every value is checked so that the database write cannot fail on it
    (and so that both engines store exactly what was hashed).

    ``seq``, ``recorded`` and the hashes are the chain's to set; ``node_country`` is filled in
    by :class:`Auditor` when left out.
    """

    action: Action | str
    side: Side | str
    request_id: str
    """The correlation id of the whole exchange (the same on both sides)."""
    outcome: Outcome | int | str = Outcome.SUCCESS
    reason: str | None = None
    interaction: str | None = None
    """FHIR restful-interaction code, when not the step's usual one (e.g. history-instance)."""
    node_country: str | None = None

    actor_id: str | None = None
    actor_name: str | None = None
    actor_role: str | None = None
    actor_organisation: str | None = None
    actor_organisation_id: str | None = None
    actor_point_of_care: str | None = None
    actor_country: str | None = None
    peer_country: str | None = None

    patient_id: str | None = dataclasses.field(default=None, repr=False)
    patient_issuer: str | None = dataclasses.field(default=None, repr=False)

    purpose: Purpose | str | None = None
    priority: Priority | str | None = None
    option: AccessOption | str | None = None
    studies: Sequence[str] = ()
    num_instances: int | None = None
    size_bytes: int | None = None
    token_jti: str | None = None
    duration_ms: int | None = None
    query: str | None = dataclasses.field(default=None, repr=False)
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("action", _member(Action, self.action, "action"))
        put("side", _member(Side, self.side, "side"))
        try:
            put("outcome", Outcome.parse(self.outcome))
        except ValueError as exc:
            raise InvalidAuditEvent(f"outcome: {exc}") from None
        if self.purpose is not None:
            alias = _PURPOSE_ALIASES.get(str(self.purpose).upper())
            put("purpose", alias or _member(Purpose, self.purpose, "purpose"))
        if self.priority is not None:
            put("priority", _member(Priority, self.priority, "priority"))
        if self.option is not None:
            put("option", _member(AccessOption, str(self.option).upper(), "option"))
        if self.interaction is not None and self.interaction not in INTERACTIONS:
            raise InvalidAuditEvent(f"interaction {self.interaction!r} is not a FHIR interaction")
        if not self.request_id:
            raise InvalidAuditEvent("request_id (the exchange's correlation id) is required")
        for name in ("node_country", "actor_country", "peer_country"):
            value = getattr(self, name)
            if value is not None and not _COUNTRY.fullmatch(value):
                raise InvalidAuditEvent(f"{name} must be an ISO 3166-1 alpha-2 code, got {value!r}")
        if self.patient_issuer is not None and self.patient_id is None:
            raise InvalidAuditEvent("patient_issuer without patient_id")
        if isinstance(self.studies, str):
            raise InvalidAuditEvent("studies is a list of Study Instance UIDs, not one string")
        put("studies", tuple(self.studies))
        for uid in self.studies:
            if not isinstance(uid, str) or not is_uid(uid):
                raise InvalidAuditEvent(f"studies: {uid!r} is not a DICOM UID")
        for name in ("num_instances", "size_bytes", "duration_ms"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT
            ):
                raise InvalidAuditEvent(f"{name} must be a whole number >= 0, got {value!r}")
        if len(self.request_id) > _LENGTHS["request_id"]:
            raise InvalidAuditEvent(f"request_id is longer than {_LENGTHS['request_id']}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                put(f.name, storable_text(value, _LENGTHS.get(f.name)))
        put("details", _json_object(self.details))

    def columns(self) -> dict[str, Any]:
        """The column values of the record (:class:`ncp.audit.chain.Entry`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("action", "side", "purpose", "priority", "option"):
            if out[name] is not None:
                out[name] = str(out[name])
        out["outcome"] = int(out["outcome"])
        out["studies"] = list(out["studies"])
        out["details"] = dict(out["details"])
        if out["node_country"] is None:
            raise InvalidAuditEvent("node_country is required (Auditor fills it in)")
        return out


def request_id_of(headers: Mapping[str, str]) -> str:
    """The correlation id of a request to the gateway or the viewer: the caller's
    ``X-Request-ID`` when it is a plausible id (so B's records and A's share it), else a new
    one."""
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else new_request_id()


def new_request_id() -> str:
    return str(uuid.uuid4())


def printable(text: str) -> str:
    """A path or query as sent, as a record's details keep it: printable ASCII, the rest
    ``?``, at most 1000 characters."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text[:1000])


def hp_fields(hp: HpAssertion) -> dict[str, Any]:
    """The actor fields of a step a health professional's assertion authorises: the same on
    both sides of the standard channel (A verifying it, B having signed it)."""
    return {
        "actor_id": hp.subject,
        "actor_name": hp.subject_name,
        "actor_role": hp.subject_role.code,
        "actor_organisation": hp.subject_organization,
        "actor_organisation_id": hp.subject_organization_id,
        "actor_point_of_care": hp.point_of_care,
        "actor_country": hp.issuer,
    }


def patient_fields(patient: PatientRef) -> dict[str, str]:
    """The patient fields of a step that names a patient by A's identifier: its value, and its
    system as the index keeps issuers (:func:`ncp.fhir.identifiers.issuer_of`)."""
    return {"patient_id": patient.value, "patient_issuer": issuer_of(patient.system)}


def _member(enum_type: Any, value: Any, name: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)
        raise InvalidAuditEvent(f"{name} {value!r} is not one of: {allowed}") from None


def storable_text(value: str, limit: int | None = None) -> str:
    """``value`` as the audit table can hold it on every engine, whatever a caller sent: a NUL
    (PostgreSQL text holds none) written ``\\x00``, a lone surrogate (not Unicode, so not UTF-8)
    written ``\\udXXX``, text beyond the column's ``limit`` cut with a final ``…``. Total, so that
    hostile text can never keep a step from being recorded; and deterministic, so that both
    engines store what was hashed."""
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "…"
    return value


def _json_object(details: Mapping[str, Any]) -> dict[str, Any]:
    """``details`` as the database will give it back (plain JSON types, string keys)."""
    if not isinstance(details, Mapping):
        raise InvalidAuditEvent("details must be a mapping")

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, str):
            return storable_text(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidAuditEvent(f"{where}: {value} has no JSON form")
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidAuditEvent(f"{where}: keys must be strings, got {key!r}")
                out[storable_text(key)] = clean(item, f"{where}.{key}")
            return out
        if isinstance(value, list | tuple):
            return [clean(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if value is not None and not isinstance(value, bool | int | float):
            raise InvalidAuditEvent(f"{where}: {type(value).__name__} has no JSON form")
        return value

    plain: dict[str, Any] = json.loads(json.dumps(clean(details, "details")))
    return plain


# -- the auditor ----------------------------------------------------------------------------


class Auditor:
    """Writes audit records of one node. Thread-safe: each record gets its own session."""

    def __init__(self, sessions: sessionmaker[Session], *, country: str) -> None:
        if not _COUNTRY.fullmatch(country):
            raise ValueError(f"country must be an ISO 3166-1 alpha-2 code, got {country!r}")
        self._sessions = sessions
        self.country = country
        self.observers: list[Callable[[AuditEvent], None]] = []
        """Called with each event once its record is committed (the node's metrics count
        steps here). An observer's failure is logged and never reaches the caller."""

    def record(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` to the chain and commit. Raises :class:`AuditError` if that fails;
        the record is then not written and the caller must not answer the request."""
        if event.node_country is None:
            event = dataclasses.replace(event, node_country=self.country)
        try:
            with self._sessions.begin() as session:
                # The caller gets the record as written, whatever the sessionmaker's setting.
                session.expire_on_commit = False
                written = append(session, event)
        except Exception as exc:
            # Only names and ids here: the database error quotes the patient identifiers.
            log.error(
                "audit record not written: %s %s of request %s (%s)",
                event.side,
                event.action,
                event.request_id,
                type(exc).__name__,
            )
            raise AuditError(
                f"the audit record of {event.side} {event.action} (request {event.request_id}) "
                f"could not be written: {type(exc).__name__}",
                exc,
            ) from None
        for observe in self.observers:
            try:
                observe(event)
            except Exception:
                log.exception("audit observer failed on %s %s", event.side, event.action)
        return written

    @contextmanager
    def step(self, event: AuditEvent) -> Iterator[StepRecorder]:
        """Time a block of code and record it when it ends.

        Update the event as the step learns more (``step.update(studies=..., size_bytes=...)``)
        and mark a handled failure with ``step.fail(outcome, reason)``. An exception leaving the
        block is recorded as a major failure with its type and message, then re-raised; if the
        record cannot be written, :class:`AuditError` is raised instead (fail closed).
        """
        recorder = StepRecorder(event)
        started = time.monotonic()
        try:
            yield recorder
        except BaseException as exc:
            if recorder.event.outcome == Outcome.SUCCESS:
                recorder.fail(Outcome.MAJOR_FAILURE, f"{type(exc).__name__}: {exc}"[:2000])
            self.record(recorder.finished(started))
            raise
        self.record(recorder.finished(started))


class StepRecorder:
    """The event of a step under way (see :meth:`Auditor.step`)."""

    def __init__(self, event: AuditEvent) -> None:
        self.event = event

    def update(self, **changes: Any) -> None:
        self.event = dataclasses.replace(self.event, **changes)

    def fail(self, outcome: Outcome | int | str, reason: str) -> None:
        self.update(outcome=outcome, reason=reason)

    def finished(self, started: float) -> AuditEvent:
        if self.event.duration_ms is not None:
            return self.event
        elapsed = round((time.monotonic() - started) * 1000)
        return dataclasses.replace(self.event, duration_ms=elapsed)


# -- keeping patient data out of logs -----------------------------------------------------------

PATIENT_KEYS = frozenset(
    {
        "patient",
        "patient_id",
        "patient_issuer",
        "patient_identifier",
        "patient_name",
        "patientid",
        "patientname",
        "patient_birth_date",
        "birth_date",
        "birthdate",
        "family_name",
        "given_name",
        "name_of_patient",
        "query",
        "search",
    }
)
"""Keys whose values are patient data, compared without case (``patientID`` is ``patientid``).
``query`` is here because a search names its patient."""

MASK = "[patient data removed]"


def mask_patient_data(value: Any, keys: frozenset[str] = PATIENT_KEYS) -> Any:
    """``value`` with the values of patient keys masked, in nested mappings and lists;
    audit events and records are shown without their patient fields."""
    if isinstance(value, AuditEvent):
        return repr(value)  # the dataclass repr leaves the patient fields out
    if isinstance(value, AuditRecord):
        return f"AuditRecord(seq={value.seq}, action={value.action}, side={value.side})"
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and k.lower() in keys else mask_patient_data(v, keys)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(mask_patient_data(v, keys) for v in value)
    return value


_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})))


class PatientDataFilter(logging.Filter):
    """Masks patient data in every log record it sees: ``extra`` fields, mapping or sequence
    arguments, a logged mapping, and audit events or records passed as arguments.

    What it cannot see is a bare identifier formatted into the message by position
    (``log.info("patient %s", pid)``): never write that; log the request id instead.
    Attach it to handlers (:func:`install_log_filter`), where it sees every record.
    """

    def __init__(self, keys: Iterable[str] = PATIENT_KEYS) -> None:
        super().__init__()
        self.keys = frozenset(k.lower() for k in keys)

    def filter(self, record: logging.LogRecord) -> bool:
        for name in list(vars(record)):
            if name not in _STANDARD_ATTRS and name.lower() in self.keys:
                setattr(record, name, MASK)
        if isinstance(record.msg, Mapping | AuditEvent | AuditRecord):
            record.msg = mask_patient_data(record.msg, self.keys)
        if isinstance(record.args, Mapping):
            record.args = mask_patient_data(record.args, self.keys)
        elif isinstance(record.args, tuple):
            record.args = tuple(mask_patient_data(a, self.keys) for a in record.args)
        return True


class PatientSafeFormatter(logging.Formatter):
    """A formatter that applies :class:`PatientDataFilter` first, for handlers whose filters
    the application does not control."""

    def __init__(self, *args: Any, keys: Iterable[str] = PATIENT_KEYS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._filter = PatientDataFilter(keys)

    def format(self, record: logging.LogRecord) -> str:
        self._filter.filter(record)
        return super().format(record)


def install_log_filter(logger: logging.Logger | None = None) -> PatientDataFilter:
    """Attach one :class:`PatientDataFilter` to every handler of ``logger`` (the root logger
    by default) that has none yet; returns the filter."""
    target = logger if logger is not None else logging.getLogger()
    guard = PatientDataFilter()
    for handler in target.handlers:
        if not any(isinstance(f, PatientDataFilter) for f in handler.filters):
            handler.addFilter(guard)
    return guard
