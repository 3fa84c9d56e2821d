"""``ncp ask``: country B asks a peer's standard channel from the command line, for testers.

The same peer client as the portal and the retrieval jobs (:class:`ncp.consumer.peer.PeerClient`):
B's node config (its keys, trust list, ``[consumer] peers``, audit database), an HP identity from
a small TOML file (``--hp``), and one of ``match``, ``list``, ``report``, ``access``. Every request
is audited in B's chain as any other. ``--json`` prints the typed result as JSON.

Exit codes: 0 answered, 1 the peer refused or could not be reached (A's text is printed), 2 usage
or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ncp.config import load_settings
from ncp.consumer.assertions import HpIdentity, isco_role
from ncp.consumer.model import PeerAnswerInvalid, PeerContext, PeerRefused, PeerUnreachable
from ncp.consumer.peer import PeerClient
from ncp.consumer.results import ListFilters, PatientQuery
from ncp.errors import ConfigError
from ncp.security.claims import PatientRef

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_HP_KEYS = {
    "subject",
    "name",
    "role",
    "role_display",
    "organisation",
    "organisation_id",
    "point_of_care",
    "language",
    "authentication",
    "home_community_id",
}


def register(subparsers: Any) -> None:
    """Add ``ask`` to the ``ncp`` command's sub-commands."""
    ask = subparsers.add_parser(
        "ask",
        help="ask a trusted peer's standard channel as country B (for testers)",
        description="Sign an HP identity assertion (and a TRC) as this node and ask a peer.",
    )
    ask.add_argument("--config", type=Path, required=True, help="B's node TOML file")
    ask.add_argument("--peer", required=True, help="the country to ask, e.g. AT")
    ask.add_argument("--hp", type=Path, required=True, help="the HP identity (TOML)")
    ask.add_argument("--json", action="store_true", help="print the result as JSON")
    ask.add_argument("--xml", action="store_true", help="ask for FHIR XML instead of JSON")
    what = ask.add_subparsers(metavar="QUESTION", required=True)

    match = what.add_parser("match", help="identify a patient (Patient/$match)")
    match.add_argument("--identifier", help="A's identifier: SYSTEM|VALUE")
    match.add_argument("--family")
    match.add_argument("--given")
    match.add_argument("--birth-date", type=date.fromisoformat, metavar="YYYY-MM-DD")
    match.add_argument("--gender", choices=["male", "female", "other", "unknown"])
    match.set_defaults(question=_match)

    listing = what.add_parser("list", help="the patient's list of studies and reports")
    _patient_arguments(listing)
    listing.add_argument("--modality", action="append", default=[])
    listing.add_argument("--body-site", action="append", default=[])
    listing.add_argument("--study-type", action="append", default=[])
    listing.add_argument("--specialty", action="append", default=[])
    listing.add_argument("--from", dest="date_from", type=date.fromisoformat)
    listing.add_argument("--to", dest="date_to", type=date.fromisoformat)
    listing.add_argument("--text")
    listing.add_argument("--manifests", action="store_true", help="ImagingStudy manifests")
    listing.add_argument("--page-size", type=int, default=1000)
    listing.set_defaults(question=_list)

    report = what.add_parser("report", help="a report Bundle (or its history)")
    _patient_arguments(report)
    report.add_argument("report_id")
    report.add_argument("--version")
    report.add_argument("--history", action="store_true")
    report.set_defaults(question=_report)

    access = what.add_parser("access", help="$imaging-access: a token (A, C) or viewer URL (B)")
    _patient_arguments(access)
    access.add_argument("--study", action="append", required=True, metavar="UID")
    access.add_argument("--option", choices=["A", "B", "C"], default="A")
    access.add_argument("--priority", choices=["emergency", "normal", "batch"], default="normal")
    access.set_defaults(question=_access)
    ask.set_defaults(handler=cmd_ask)


def _patient_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", required=True, help="A's identifier: SYSTEM|VALUE")
    parser.add_argument("--purpose", default="TREAT", help="TREAT (default) or ETREAT")
    parser.add_argument(
        "--uninformed",
        action="store_true",
        help="the patient could not be informed (emergency treatment only)",
    )


def cmd_ask(args: argparse.Namespace) -> int:
    from ncp.node import Node  # the composition root, only when the command runs

    try:
        hp = read_hp(args.hp)
    except ConfigError as exc:
        print(f"ncp ask: {exc}", file=sys.stderr)
        return EXIT_USAGE
    node = Node.from_settings(load_settings(args.config))
    try:
        with PeerClient.from_node(node) as client:
            try:
                result = args.question(client, hp, args)
            except (PeerRefused, PeerUnreachable, PeerAnswerInvalid) as exc:
                print(f"ncp ask: {exc}", file=sys.stderr)
                return EXIT_FAILED
            except ValueError as exc:
                print(f"ncp ask: {exc}", file=sys.stderr)
                return EXIT_USAGE
    finally:
        node.close()
    if args.json:
        print(json.dumps(plain(result), indent=2, ensure_ascii=False))
    else:
        print(summary(result))
    return EXIT_OK


def read_hp(path: Path) -> HpIdentity:
    """The HP identity of ``ncp ask`` from a TOML file (keys: subject, name, role (ISCO-08),
    role_display, organisation, organisation_id, point_of_care, language, authentication)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(data) - _HP_KEYS
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key")
    missing = sorted(_HP_KEYS - {"role_display", "home_community_id"} - set(data))
    if missing:
        raise ConfigError(f"{path}: {missing[0]}: required")
    return HpIdentity(
        subject=data["subject"],
        name=data["name"],
        role=isco_role(str(data["role"]), data.get("role_display")),
        organisation=data["organisation"],
        organisation_id=data["organisation_id"],
        point_of_care=data["point_of_care"],
        language=data["language"],
        authentication=data["authentication"],
        home_community_id=data.get("home_community_id"),
    )


def _ref(text: str) -> PatientRef:
    system, sep, value = text.rpartition("|")
    if not sep or not system or not value:
        raise ValueError(f"{text!r}: a patient identifier is SYSTEM|VALUE")
    return PatientRef(system, value)


def _format(args: argparse.Namespace) -> Any:
    return "xml" if args.xml else "json"


def _context(client: PeerClient, hp: HpIdentity, args: argparse.Namespace) -> PeerContext:
    return client.context(
        args.peer,
        hp,
        _ref(args.patient),
        purpose=args.purpose,
        informed=not args.uninformed,
    )


def _match(client: PeerClient, hp: HpIdentity, args: argparse.Namespace) -> Any:
    query = PatientQuery(
        identifier=_ref(args.identifier) if args.identifier else None,
        family=args.family,
        given=args.given,
        birth_date=args.birth_date,
        gender=args.gender,
    )
    return client.match(args.peer, client.hp_assertion(args.peer, hp), query, fmt=_format(args))


def _list(client: PeerClient, hp: HpIdentity, args: argparse.Namespace) -> Any:
    filters = ListFilters(
        date_from=args.date_from,
        date_to=args.date_to,
        modalities=tuple(args.modality),
        body_sites=tuple(args.body_site),
        study_types=tuple(args.study_type),
        requesting_specialties=tuple(args.specialty),
        text=args.text,
    )
    context = _context(client, hp, args)
    if args.manifests:
        return client.imaging_studies(context, filters, page_size=args.page_size, fmt=_format(args))
    return client.metadata_list(context, filters, page_size=args.page_size, fmt=_format(args))


def _report(client: PeerClient, hp: HpIdentity, args: argparse.Namespace) -> Any:
    context = _context(client, hp, args)
    if args.history:
        return client.report_history(context, args.report_id, fmt=_format(args))
    return client.report(context, args.report_id, version=args.version, fmt=_format(args))


def _access(client: PeerClient, hp: HpIdentity, args: argparse.Namespace) -> Any:
    context = _context(client, hp, args)
    if args.option == "B":
        return client.viewer_launch(context, args.study, args.priority)
    return client.imaging_access(context, args.study, args.option, args.priority)


def plain(value: Any) -> Any:
    """A result as JSON values (dataclasses as objects, dates as ISO 8601; report Bundles
    left out: ``--json`` prints what B read, not A's document again)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "bundle"
        }
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def summary(result: Any) -> str:
    """A few readable lines of a result."""
    name = type(result).__name__
    if name == "MatchResult":
        lines = [f"match: {result.outcome}"]
        lines += [
            f"  {c.grade:9} {c.patient.system}|{c.patient.value}  {c.name or ''}  "
            f"{c.birth_date or ''}"
            for c in result.candidates
        ]
    elif name == "MetadataList":
        lines = [
            f"{len(result.studies)} studies, {len(result.reports)} reports ({result.pages} pages)"
        ]
        lines += [
            f"  study  {s.date.date() if s.date else '?':10}  {'/'.join(s.modalities):6} "
            f"{s.study_uid}  {s.title or ''}"
            for s in result.studies
        ]
        lines += [
            f"  report {r.date.date() if r.date else '?':10}  {r.doc_status or '':11} "
            f"{r.report_id}  {r.title or ''}"
            for r in result.reports
        ]
    elif name == "ManifestList":
        lines = [f"{len(result.manifests)} manifests ({result.pages} pages)"]
        lines += [
            f"  {m.study_uid}  {len(m.series)} series, {m.instance_count} instances, "
            f"{m.size or '?'} bytes"
            for m in result.manifests
        ]
    elif name == "ReportDocument":
        lines = [f"report {result.report_id} version {result.version}: {result.status}"]
        for section in result.sections:
            lines.append(f"  {section.title}:")
            lines += [f"    {p}" for p in section.paragraphs]
    elif name == "ReportHistory":
        lines = [f"report {result.report_id}: {len(result.versions)} versions, newest first"]
        lines += [f"  version {v.version}: {v.status}  {v.date or ''}" for v in result.versions]
    elif name == "ImageGrant":
        lines = [
            f"option {result.option}: {result.base_url} until {result.expires_at.isoformat()}",
            f"token {result.token}",
        ]
    else:
        lines = [f"open until {result.expires_at.isoformat()}: {result.url}"]
    if getattr(result, "quirks", ()):
        lines.append("tolerated: " + "; ".join(result.quirks))
    return "\n".join(lines)
