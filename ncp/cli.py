"""The ``ncp`` command. Each sub-command is a function that takes parsed arguments and returns an
exit code, so tests call :func:`main` in-process exactly as the installed command runs.

Exit codes: 0 success, 1 the work failed (archive down, invalid input found), 2 usage or
configuration error.

Start-up is lazy: this module imports nothing heavy, each handler imports what it needs, and
the commands whose parsers live in their own modules (:data:`LAZY_COMMANDS`) are loaded only
when they are the command run. ``ncp --help`` and ``ncp validate`` thus never load the web
stack, the database or DICOM (tests/test_cli_startup.py); testers run ``ncp validate`` in CI
over thousands of files, one process each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncp import __version__
from ncp.errors import ArchiveError, ConfigError, NcpError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from ncp.config import NodeSettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "validate": (
        "ncp.validation.command",
        "validate FHIR resources (JSON or XML) against R4, the profiles and terminology",
    ),
    "audit": (
        "ncp.audit.command",
        "the audit trail: verify its hash chain, sign checkpoints, export AuditEvents, report",
    ),
    "keys": ("ncp.security.command", "a node's TLS and signing keys"),
    "edge": (
        "ncp.gateway.edge",
        "run the option C edge gateway in front of the national archive",
    ),
    "serve": (
        "ncp.serve",
        "run the node: the standard channel (FHIR, mutual TLS), the option A gateway, the "
        "option B viewer, the portal and the retrieval workers its config enables",
    ),
    "ask": (
        "ncp.consumer.command",
        "ask a trusted peer's standard channel as country B (for testers)",
    ),
    "pull": (
        "ncp.consumer.pull_command",
        "pull studies of a patient from a peer: verify, store, follow the job",
    ),
    "jobs": (
        "ncp.consumer.jobs_command",
        "country B's retrieval jobs: list, show, cancel, work, purge",
    ),
    "portal": ("ncp.portal.command", "the HP portal's local accounts"),
    "check-config": (
        "ncp.ops.checks",
        "check a node's or edge gateway's configuration, keys, certificates and trust list",
    ),
}
"""Commands whose parser is registered by their own module (``register(subparsers)``), and the
line ``ncp --help`` shows for each without loading the module (a test keeps them equal)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"ncp: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except ArchiveError as exc:
        print(f"ncp: archive error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except NcpError as exc:
        print(f"ncp: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _register_lazy(sub: Any, name: str, command: str | None) -> None:
    module, help_line = LAZY_COMMANDS[name]
    if name == command:
        importlib.import_module(module).register(sub)
    else:
        sub.add_parser(name, help=help_line)  # listed, not loaded: it is not the one run


def _parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ncp`` parser for ``argv``: of the :data:`LAZY_COMMANDS`, only the one ``argv``
    runs is loaded with its own arguments."""
    command = _command_of(argv or [])
    parser = argparse.ArgumentParser(
        prog="ncp", description="NCPeH imaging connector: one node of the cross-border exchange."
    )
    parser.add_argument("--version", action="version", version=f"ncp {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the A/B pair on generated data: node A, A's edge gateway, node B with its "
        "portal (Ctrl-C stops)",
    )
    demo.add_argument("--data", type=Path, default=Path("demo-data"), help="demo folder")
    demo.add_argument("--patients", type=int, default=8)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--big-patient-studies", type=int, default=300)
    demo.add_argument(
        "--base-port",
        type=int,
        default=8443,
        metavar="N",
        help="A's standard channel on N, its gateway N+1, the edge N+2, A's viewer N+3, B's "
        "portal N+4, B's standard channel N+5, the operations listeners N+6..N+8 (default "
        "8443); 0: free ports",
    )
    demo.add_argument(
        "--archive",
        choices=["folder", "orthanc"],
        default="folder",
        help="A's archive: the generated folder (default), or a local Orthanc holding it",
    )
    demo.add_argument(
        "--setup-only",
        action="store_true",
        help="prepare data, keys, configs, the index and the portal's demo logins, then exit "
        "without starting services",
    )
    demo.add_argument(
        "--no-browser",
        action="store_true",
        help="do not open the portal in a browser",
    )
    demo.add_argument(
        "--totp",
        metavar="USER",
        help="print the current TOTP code of the demo login USER and exit",
    )
    demo.set_defaults(handler=_cmd_demo)

    index = sub.add_parser("index", help="build or update the study index from the archive")
    index.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    index.add_argument("--json", action="store_true", help="print the run summary as JSON")
    index.add_argument("--batch-size", type=int, default=500)
    index.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes reading headers of a folder archive (default: cores, at most 4)",
    )
    index.set_defaults(handler=_cmd_index)

    studies = sub.add_parser("studies", help="list one patient's studies from the index")
    studies.add_argument("--config", type=Path, required=True)
    studies.add_argument("--patient", required=True, help="the patient identifier (exact)")
    studies.add_argument("--issuer", help="issuer of the identifier (default: the node's)")
    studies.add_argument("--limit", type=int, default=20)
    studies.set_defaults(handler=_cmd_studies)

    config = sub.add_parser("config", help="check a node's configuration")
    config.add_argument("file", type=Path)
    config.set_defaults(handler=_cmd_config)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(metavar="ACTION", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate the schema to the newest revision")
    upgrade.add_argument("--config", type=Path, required=True)
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    for name in LAZY_COMMANDS:
        _register_lazy(sub, name, command)

    examples = sub.add_parser("examples", help="example data")
    ex_sub = examples.add_subparsers(metavar="ACTION", required=True)
    gen = ex_sub.add_parser("generate", help="write generated DICOM studies and imaging reports")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--patients", type=int, default=10)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--big-patient-studies", type=int, default=300)
    gen.add_argument("--layout", choices=["tree", "media"], default="tree")
    gen.set_defaults(handler=_cmd_examples_generate)
    return parser


def _open_index(settings: NodeSettings) -> tuple[Engine, sessionmaker[Session]]:
    from ncp.store.db import make_engine, migrate, session_factory

    engine = make_engine(settings.database.url)
    migrate(engine)
    return engine, session_factory(engine)


def _renders(settings: NodeSettings) -> bool:
    """Whether list entries can be rendered: manifests need the node's public URLs."""
    return bool(settings.urls.standard and settings.urls.imaging)


def _cmd_index(args: argparse.Namespace) -> int:
    from ncp.config import FolderArchive, load_settings
    from ncp.dicom.archive import open_archive
    from ncp.fhir.datatypes import zone_of
    from ncp.provider.indexer import index_source
    from ncp.provider.list_entries import render_studies

    settings = load_settings(args.config)
    engine, sessions = _open_index(settings)
    source = open_archive(settings.archive)
    # Worker processes only for the folder source: a network source shares its connections.
    workers = args.workers if isinstance(settings.archive, FolderArchive) else 1
    started = time.perf_counter()
    zone = zone_of(settings.node.country)  # the archive's naive times: the sort's UTC
    run = index_source(
        sessions,
        source,
        batch_size=args.batch_size,
        workers=workers,
        zone=zone,
        patient_id_issuer=settings.archive.patient_id_issuer,
    )
    elapsed = time.perf_counter() - started
    # The changed studies' list entries, rendered now rather than by the next HP's list.
    rendered = render_studies(settings, sessions, run.touched) if _renders(settings) else 0
    engine.dispose()
    read = run.added + run.updated
    if args.json:
        summary = {
            "source": run.source,
            "listed": run.seen,
            "added": run.added,
            "updated": run.updated,
            "unchanged": run.unchanged,
            "removed": run.removed,
            "skipped": [{"locator": loc, "reason": why} for loc, why in run.skipped],
            "notes": [{"locator": loc, "note": note} for loc, note in run.notes],
            "unservable": [{"locator": loc, "reason": why} for loc, why in run.unservable],
            "patient_id_issuer": run.patient_id_issuer,
            "without_issuer": run.without_issuer,
            "seconds": round(elapsed, 3),
            "list_entries_rendered": rendered,
        }
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    rate = f", {read / elapsed:.0f} instances/s" if read and elapsed > 0 else ""
    print(
        f"indexed {run.source} source: {run.seen} listed, {run.added} added, "
        f"{run.updated} updated, {run.unchanged} unchanged, {run.removed} removed, "
        f"{len(run.skipped)} skipped "
        f"({elapsed:.1f} s{rate}); {rendered} list entries rendered"
    )
    for locator, reason in run.skipped[:50]:
        print(f"  skipped {locator}: {reason}")
    if len(run.skipped) > 50:
        print(f"  ... and {len(run.skipped) - 50} more skipped (use --json for all)")
    for locator, why in run.unservable[:50]:
        print(f"  not servable by the gateways {locator}: {why}")
    if len(run.unservable) > 50:
        print(f"  ... and {len(run.unservable) - 50} more not servable (use --json for all)")
    for locator, note in run.notes[:20]:
        print(f"  note {locator}: {note}")
    if run.without_issuer:
        print(f"  {_issuer_line(run.without_issuer, run.patient_id_issuer)}")
    return EXIT_OK


def _issuer_line(count: int, issuer: str) -> str:
    """What became of the instances read without Issuer of Patient ID."""
    if issuer:
        return (
            f"{count} instances carry no Issuer of Patient ID: their patients are under "
            f"the archive's {issuer!r} ([archive] patient_id_issuer)"
        )
    return (
        f"warning: {count} instances carry no Issuer of Patient ID and [archive] names no "
        "patient_id_issuer: no peer can name their patients (set it, then run ncp index again)"
    )


def _cmd_studies(args: argparse.Namespace) -> int:
    from ncp.config import load_settings
    from ncp.store.queries import patient_issuers, patient_studies

    settings = load_settings(args.config)
    engine, sessions = _open_index(settings)
    # Without --issuer: the node's own, then the archive's for IDs that carry none.
    configured = [settings.node.patient_id_issuer, settings.archive.patient_id_issuer]
    tried = (
        [args.issuer]
        if args.issuer is not None
        else [i for i in dict.fromkeys(configured) if i] or [""]
    )
    with sessions() as session:
        for issuer in tried:
            rows = patient_studies(session, args.patient, issuer)
            if rows:
                break
        elsewhere = [] if rows else patient_issuers(session, args.patient)
    engine.dispose()
    if not rows:
        shown = " or ".join(repr(i) for i in tried)
        print(f"no studies for patient {args.patient!r} (issuer {shown})")
        if elsewhere:
            print("  indexed under issuer " + ", ".join(repr(i) for i in elsewhere) + " (--issuer)")
        return EXIT_FAILED
    print(f"{len(rows)} studies, newest first:")
    for s in rows[: args.limit]:
        when = s.started.strftime("%Y-%m-%d") if s.started else "----------"
        print(
            f"  {when}  {s.modalities:<8} {s.body_parts:<12} {(s.description or '')[:40]:<40} "
            f"{s.num_series:>3} series {s.num_instances:>4} inst {s.size_bytes / 1e6:8.1f} MB  "
            f"acc {s.accession_number or '-'}"
        )
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from ncp.config import load_settings

    settings = load_settings(args.file)
    print(json.dumps(settings.model_dump(mode="json"), indent=1))
    return EXIT_OK


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from ncp.config import load_settings

    settings = load_settings(args.config)
    engine, _ = _open_index(settings)
    engine.dispose()
    print("database schema is at the newest revision")
    return EXIT_OK


def _cmd_examples_generate(args: argparse.Namespace) -> int:
    from ncp.examples.generate import generate_examples

    if args.patients < 1:
        print("ncp: --patients must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    summary = generate_examples(
        args.out,
        patients=args.patients,
        seed=args.seed,
        big_patient_studies=args.big_patient_studies,
        layout=args.layout,
    )
    elapsed = time.perf_counter() - started
    print(
        f"generated {summary.patients} patients, {summary.studies} studies, "
        f"{summary.series} series, {summary.instances} instances "
        f"({summary.bytes / 1e6:.1f} MB), {summary.reports} reports "
        f"in {summary.report_versions} versions (a report corrected or amended keeps each "
        f"version) into {args.out} ({elapsed:.1f} s)"
    )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ncp.demo import cmd_demo

    return cmd_demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
