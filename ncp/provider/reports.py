"""The report store: imaging report Bundles from the national systems, every version kept.

Ingest validates a bundle against the imaging report profile, reads the list's values out of it
(:mod:`ncp.provider.report_fields`) and stores it in the caller's session, so that the list
(index) and the documents change in one transaction: the caller commits, or rolls back after an
error.

How versions link: the report is its Composition.identifier (the report id is derived from it,
:func:`ncp.fhir.identifiers.report_resource_id`); the version number is the Composition's
``Composition.version`` (R5 cross-version extension); Bundle.identifier names one version's
document, and a later version's ``relatesTo`` (replaces) names the document it replaces. The
highest version stored is the latest; older ones stay readable. The same version again with the
same content changes nothing; with other content it is a :class:`VersionConflict`. A lower
version arriving late is stored as not latest, and the versions naming it as replaced get linked
to it then.

Concurrency: the report row is inserted with ON CONFLICT DO NOTHING (two replicas creating the
same report: the second waits for the first, then finds its row) and then locked (SELECT ... FOR
UPDATE on PostgreSQL; on SQLite the insert already holds the database's single write lock), so
two versions ingested at once never both become latest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from ncp.errors import NcpError
from ncp.fhir import canonical
from ncp.fhir.identifiers import report_resource_id
from ncp.fhir.io import FhirReadError, read_path, read_resource
from ncp.provider.report_fields import FieldError, ReportFields, report_fields, version_of
from ncp.store.models import Report, ReportVersion
from ncp.validation.engine import Validator
from ncp.validation.issues import BUSINESS_RULE, Issue, has_errors, to_operation_outcome

REPORT_BUNDLE_PROFILE = canonical.structure_definition("ncp-imaging-report-bundle")
CONFLICT = "conflict"  # FHIR issue type for a clash with what is stored
_SERVED_META = ("versionId", "lastUpdated")


# --- errors ----------------------------------------------------------------------------------


class ReportError(NcpError):
    """A report the store refuses; ``outcome`` is the OperationOutcome to answer with."""

    issue_code = BUSINESS_RULE

    def __init__(self, diagnostics: str, *, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(diagnostics)
        self.outcome: dict[str, Any] = outcome or to_operation_outcome(
            [Issue("error", self.issue_code, "Bundle", diagnostics, "report-store")]
        )


class InvalidReport(ReportError):
    """The bundle is not a valid imaging report (profile errors, or values the store needs are
    missing); nothing is stored."""


class VersionConflict(ReportError):
    """The version clashes with a stored one: same number with other content, a document
    identifier used by another version, or a replaces link that does not point back in time."""

    issue_code = CONFLICT


class PatientConflict(ReportError):
    """The version names another patient than the stored versions of the report."""

    issue_code = CONFLICT


class ReportFolderError(NcpError):
    """The folder of report bundles to load does not exist."""


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestResult:
    report_id: str
    version: int
    created: bool
    """False when this very version was stored already (idempotent re-ingest)."""
    latest: bool
    """Whether this version is the report's latest once stored."""
    row: ReportVersion


@dataclass(frozen=True, slots=True)
class LoadFailure:
    path: str
    """Relative to the folder loaded, with forward slashes."""
    reason: str


@dataclass(slots=True)
class LoadSummary:
    stored: int = 0
    """Report versions stored (a report corrected or amended has several)."""
    unchanged: int = 0
    """Versions that were stored already."""
    failed: list[LoadFailure] = field(default_factory=list)
    reports: set[str] = field(default_factory=set)
    """The reports (business identifiers) whose versions were loaded or found stored."""

    @property
    def ok(self) -> bool:
        return not self.failed


# --- ingest ----------------------------------------------------------------------------------


def ingest_bundle(
    session: Session,
    bundle: dict[str, Any],
    *,
    validator: Validator,
    now: datetime,
    validator_lock: AbstractContextManager[Any] | None = None,
    time_budget_s: float | None = None,
) -> IngestResult:
    """Validate and store one version of a report, in the caller's transaction (flushed, not
    committed). ``now`` (aware, UTC) becomes the version's lastUpdated. ``validator_lock``
    guards a validator shared between threads; ``time_budget_s`` bounds the validation
    (:class:`ncp.validation.engine.OverBudget` beyond).

    Raises :class:`InvalidReport` (before touching the database), :class:`VersionConflict` or
    :class:`PatientConflict`; after any error the caller rolls back its transaction.
    """
    fields = check_bundle(
        bundle, validator=validator, validator_lock=validator_lock, time_budget_s=time_budget_s
    )
    content = canonical_content(bundle)
    data = content.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    report_id = report_resource_id(fields.identifier_system, fields.identifier_value)

    report = _locked_report(session, report_id, fields)
    if (report.patient_id, report.patient_issuer) != (fields.patient_value, fields.patient_issuer):
        raise PatientConflict("this report is stored for another patient")
    versions = {
        row.version: row
        for row in session.scalars(
            select(ReportVersion)
            .where(ReportVersion.report_id == report_id)
            .execution_options(populate_existing=True)
        )
    }
    same = versions.get(fields.version)
    if same is not None:
        if same.sha256 == digest and same.content == content:
            return IngestResult(report_id, same.version, False, same.latest, same)
        raise VersionConflict(
            f"version {fields.version} of this report is stored with other content; "
            "a change needs a new version"
        )
    replaces_version = _check_links(fields, versions)

    latest = fields.version > report.latest_version
    if latest:
        for row in versions.values():
            row.latest = False
        report.latest_version = fields.version
    for row in versions.values():  # versions that named this one as replaced, before it came
        if (row.replaces_system, row.replaces_value) == (fields.bundle_system, fields.bundle_value):
            row.replaces_version = fields.version
    row = _version_row(fields, report_id, content, len(data), digest, _naive_utc(now))
    row.latest = latest
    row.replaces_version = replaces_version
    session.add(row)
    session.flush()
    return IngestResult(report_id, fields.version, True, latest, row)


def check_bundle(
    bundle: dict[str, Any],
    *,
    validator: Validator,
    validator_lock: AbstractContextManager[Any] | None = None,
    time_budget_s: float | None = None,
) -> ReportFields:
    """The column values of a valid report bundle; raises :class:`InvalidReport`. Touches no
    database (the ingest endpoint may check before it opens a transaction)."""
    with validator_lock or nullcontext():
        # The budget's clock starts once this validation has the validator.
        deadline = time.monotonic() + time_budget_s if time_budget_s else None
        issues = validator.validate(bundle, profiles=[REPORT_BUNDLE_PROFILE], deadline=deadline)
    if has_errors(issues):
        errors = [i for i in issues if i.is_error]
        raise InvalidReport(
            f"the bundle is not a valid imaging report: {len(errors)} error(s), first at "
            f"{errors[0].expression or 'Bundle'}: {errors[0].diagnostics}",
            outcome=to_operation_outcome(issues),
        )
    try:
        fields = report_fields(bundle, validator.definitions)
    except FieldError as exc:
        raise InvalidReport(
            str(exc),
            outcome=to_operation_outcome(
                [Issue("error", BUSINESS_RULE, exc.expression, exc.diagnostics, "report-store")]
            ),
        ) from None
    if fields.replaces is not None and fields.replaces == (
        fields.bundle_system,
        fields.bundle_value,
    ):
        raise InvalidReport("a version cannot replace its own document")
    if fields.replaces is not None and fields.version == 1:
        raise InvalidReport("version 1 of a report replaces nothing, yet relatesTo says so")
    return fields


def _check_links(fields: ReportFields, versions: dict[int, ReportVersion]) -> int | None:
    """The stored version this one replaces (None if not stored yet); raises
    :class:`VersionConflict` when the links would not point from newer to older."""
    own = (fields.bundle_system, fields.bundle_value)
    for row in versions.values():
        if (row.bundle_system, row.bundle_value) == own:
            raise VersionConflict(
                f"the document identifier of version {fields.version} is already version "
                f"{row.version}'s"
            )
        named_by = (row.replaces_system, row.replaces_value)
        if (
            named_by == (fields.bundle_system, fields.bundle_value)
            and row.version <= fields.version
        ):
            raise VersionConflict(
                f"stored version {row.version} replaces this document, so it must be older"
            )
    if fields.replaces is None:
        return None
    for row in versions.values():
        if (row.bundle_system, row.bundle_value) == fields.replaces:
            if row.version >= fields.version:
                raise VersionConflict(
                    f"version {fields.version} replaces version {row.version}, which is not older"
                )
            return row.version
    return None  # a lower version not received yet: linked when it arrives


def _locked_report(session: Session, report_id: str, fields: ReportFields) -> Report:
    """The report's row, created if new, locked until the caller's transaction ends."""
    values = {
        "id": report_id,
        "identifier_system": fields.identifier_system,
        "identifier_value": fields.identifier_value,
        "patient_id": fields.patient_value,
        "patient_issuer": fields.patient_issuer,
        "latest_version": 0,
    }
    # The node runs on PostgreSQL or SQLite, both of which have ON CONFLICT DO NOTHING.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(pg_insert(Report).values(**values).on_conflict_do_nothing())
    else:
        session.execute(sqlite_insert(Report).values(**values).on_conflict_do_nothing())
    query = (
        select(Report)
        .where(Report.id == report_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    report = session.scalars(query).one()
    if (report.identifier_system, report.identifier_value) != (
        fields.identifier_system,
        fields.identifier_value,
    ):  # two identifiers with one derived id: never expected, never merged
        raise VersionConflict("another report already has this report's id")
    return report


def _version_row(
    fields: ReportFields, report_id: str, content: str, size: int, digest: str, received: datetime
) -> ReportVersion:
    replaces_system, replaces_value = fields.replaces or (None, None)
    return ReportVersion(
        report_id=report_id,
        version=fields.version,
        bundle_system=fields.bundle_system,
        bundle_value=fields.bundle_value,
        status=fields.status,
        title=fields.title,
        date=fields.date,
        language=fields.language,
        author=fields.author,
        custodian_name=fields.custodian_name,
        custodian_system=fields.custodian_system,
        custodian_value=fields.custodian_value,
        study_uid=fields.study_uid,
        accession_number=fields.accession_number,
        accession_issuer=fields.accession_issuer,
        modalities="\\".join(fields.modalities),
        body_parts="\\".join(fields.body_parts),
        procedure_code=fields.procedure_code,
        requesting_code=fields.requesting_code,
        replaces_system=replaces_system,
        replaces_value=replaces_value,
        content=content,
        size_bytes=size,
        sha256=digest,
        received_at=received,
    )


def canonical_content(bundle: dict[str, Any]) -> str:
    """The bundle as stored: JSON with sorted keys and no whitespace, without what the node sets
    when serving (``id``, ``meta.versionId``, ``meta.lastUpdated``)."""
    stored = {k: v for k, v in bundle.items() if k != "id"}
    meta = {k: v for k, v in (stored.pop("meta", None) or {}).items() if k not in _SERVED_META}
    if meta:
        stored["meta"] = meta
    return json.dumps(stored, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment  # taken as UTC already
    return moment.astimezone(UTC).replace(tzinfo=None)


# --- reads -----------------------------------------------------------------------------------


def latest(session: Session, report_id: str) -> ReportVersion | None:
    """The latest version of a report, or None for an unknown report."""
    query = select(ReportVersion).where(
        ReportVersion.report_id == report_id, ReportVersion.latest.is_(True)
    )
    return session.scalars(query).first()


def version(session: Session, report_id: str, number: int) -> ReportVersion | None:
    """One version of a report, or None."""
    query = select(ReportVersion).where(
        ReportVersion.report_id == report_id, ReportVersion.version == number
    )
    return session.scalars(query).first()


def history(session: Session, report_id: str) -> list[ReportVersion]:
    """Every stored version of a report, newest first (empty for an unknown report)."""
    query = (
        select(ReportVersion)
        .where(ReportVersion.report_id == report_id)
        .order_by(ReportVersion.version.desc())
    )
    return list(session.scalars(query))


def as_served(row: ReportVersion) -> dict[str, Any]:
    """The Bundle as the node serves it: id = the report id, meta.versionId = the version,
    meta.lastUpdated = when this version was received; the sender's profile claims kept."""
    body: dict[str, Any] = json.loads(row.content)
    meta = {"versionId": str(row.version), "lastUpdated": instant(row.received_at)}
    meta.update(body.pop("meta", None) or {})
    return {"resourceType": body.pop("resourceType"), "id": row.report_id, "meta": meta, **body}


def instant(moment: datetime) -> str:
    """A stored (naive UTC) moment as a FHIR instant ending in Z."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.isoformat().replace("+00:00", "Z")


# --- the demo source: a folder of bundles ----------------------------------------------------


def load_folder(
    sessions: sessionmaker[Session],
    folder: Path,
    *,
    validator: Validator,
    now: datetime | Callable[[], datetime],
    validator_lock: AbstractContextManager[Any] | None = None,
) -> LoadSummary:
    """Ingest every ``*.json`` and ``*.xml`` under ``folder``, lower versions first, each file in
    its own transaction: a bad file is reported (path and reason) and the others go on.
    Loading the same folder again stores nothing new."""
    summary = LoadSummary()
    clock = now if callable(now) else (lambda: now)
    ordered: list[tuple[int, str, Path]] = []
    for path in _bundle_files(folder):
        name = path.relative_to(folder).as_posix()
        try:
            claimed = version_of(read_resource(read_path(path)))
        except (FhirReadError, OSError) as exc:
            summary.failed.append(LoadFailure(name, _reason(exc)))
            continue
        ordered.append((claimed or 0, name, path))
    for _, name, path in sorted(ordered):
        try:
            bundle = read_resource(read_path(path))
            with sessions() as session, session.begin():
                result = ingest_bundle(
                    session,
                    bundle,
                    validator=validator,
                    now=clock(),
                    validator_lock=validator_lock,
                )
        except (FhirReadError, OSError, ReportError) as exc:
            summary.failed.append(LoadFailure(name, _reason(exc)))
            continue
        summary.reports.add(result.report_id)
        if result.created:
            summary.stored += 1
        else:
            summary.unchanged += 1
    summary.failed.sort(key=lambda f: f.path)
    return summary


def _bundle_files(folder: Path) -> Sequence[Path]:
    if not folder.is_dir():
        raise ReportFolderError(f"no report folder at {folder.name!r}")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".xml")
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"cannot read the file: {exc.strerror or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"
