"""``ncp audit``: verify the hash chain, export AuditEvents, report volumes and turnaround.

- ``ncp audit verify --config F [--checkpoint FILE]...``: exit 0 when the chain is intact (and
  still holds what each checkpoint signed), 1 when it is broken (naming the first broken record:
  seq, time, step and why) or a checkpoint is refused, 2 when the database has no audit tables.
- ``ncp audit checkpoint --config F --out FILE|DIR|-``: verify the chain, then write its head
  signed with the node's signing key (:mod:`ncp.audit.checkpoint`); exit 1 on a broken chain.
- ``ncp audit export --config F [--since ISO] [--out DIR|-] [--format ndjson|bundle]``: FHIR
  AuditEvent resources, one per record, as NDJSON or a collection Bundle.
- ``ncp audit report --config F [--since ISO] [--until ISO] [--csv]``: per peer country, option,
  priority and step.

Each takes a node's config or an edge gateway's (``ncp edge --config``): the edge keeps an audit
chain of its own. The commands read the database and never migrate it (``ncp db upgrade`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session

from ncp.config import EdgeSettings, NodeSettings, load_edge_settings, load_settings
from ncp.security.keys import KeySet, PublicKey

if TYPE_CHECKING:
    from ncp.audit.chain import Anchor

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SHOWN_PROBLEMS = 20
CONFIG_HELP = "the node's TOML file, or the edge gateway's (ncp edge --config)"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit verify|export|report`` to the ``ncp`` command's sub-parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="the audit trail: verify its hash chain, sign checkpoints, export AuditEvents, report",
    )
    actions = parser.add_subparsers(metavar="ACTION", required=True)

    verify = actions.add_parser("verify", help="prove the hash chain intact, or name the break")
    verify.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    verify.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a checkpoint (ncp audit checkpoint) the chain must still hold; repeatable",
    )
    verify.add_argument(
        "--jwks",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="verify checkpoints with the keys of this JWKS instead of the node's keys folder "
        "(the edge's: its edge.jwks); repeatable",
    )
    verify.add_argument(
        "--keys", type=Path, metavar="DIR", help="the keys folder (default: the node's keys.dir)"
    )
    verify.set_defaults(handler=_cmd_verify)

    checkpoint = actions.add_parser(
        "checkpoint",
        help="verify the chain and write its head signed with the node's key, to keep elsewhere",
    )
    checkpoint.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    checkpoint.add_argument(
        "--out",
        required=True,
        help="a file (replaced), a folder (a new file named by country, seq and time), or - "
        "for standard output (to pipe to another machine)",
    )
    checkpoint.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the keys folder whose current signing key signs (default: the node's keys.dir; "
        "required with an edge gateway's config, which holds no signing key)",
    )
    checkpoint.set_defaults(handler=_cmd_checkpoint)

    export = actions.add_parser("export", help="write FHIR AuditEvent resources (IHE BALP)")
    export.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    export.add_argument("--since", type=_when, help="records written at or after (ISO 8601)")
    export.add_argument("--out", default="-", help="a folder, or - for standard output")
    export.add_argument(
        "--format",
        choices=["ndjson", "bundle"],
        default="ndjson",
        help="ndjson (one AuditEvent a line, default) or bundle (a collection Bundle)",
    )
    export.set_defaults(handler=_cmd_export)

    report = actions.add_parser(
        "report", help="volumes and turnaround per peer country, option, priority and step"
    )
    report.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    report.add_argument("--since", type=_when, help="records written at or after (ISO 8601)")
    report.add_argument("--until", type=_when, help="records written before (ISO 8601)")
    report.add_argument("--csv", action="store_true", help="CSV instead of a text table")
    report.set_defaults(handler=_cmd_report)
    return parser


def _when(text: str) -> datetime:
    """An ISO 8601 date or time as naive UTC (a time without offset is taken as UTC)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def load_any_settings(config: Path) -> NodeSettings | EdgeSettings:
    """A node's settings, or an edge gateway's: an edge's file has an ``[edge]`` section and no
    ``[node]``. Either is read by its own loader, so unknown keys are still refused."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return load_settings(config)  # which words the error, naming the file
    if "edge" in data and "node" not in data:
        return load_edge_settings(config)
    return load_settings(config)


def _open(config: Path | NodeSettings | EdgeSettings) -> Engine | None:
    from ncp.store.db import make_engine

    settings = load_any_settings(config) if isinstance(config, Path) else config
    engine = make_engine(settings.database.url)
    if not inspect(engine).has_table("audit_chain_head"):
        engine.dispose()
        print(
            "ncp: the database has no audit tables: run `ncp db upgrade --config ...` first",
            file=sys.stderr,
        )
        return None
    return engine


def _country(settings: NodeSettings | EdgeSettings) -> str:
    return settings.edge.country if isinstance(settings, EdgeSettings) else settings.node.country


def _verifying_keys(args: argparse.Namespace, settings: NodeSettings | EdgeSettings) -> KeySet:
    """The keys that may have signed this chain's checkpoints (see ``--jwks``, ``--keys``)."""
    from ncp.audit.checkpoint import CheckpointError, folder_keys
    from ncp.security.keystore import InvalidJwk, key_set_from_jwks

    country = _country(settings)
    files = list(args.jwks)
    if not files and isinstance(settings, EdgeSettings) and args.keys is None:
        files = [settings.edge.jwks]  # A's published keys, which the edge trusts for tokens
    if not files:
        keys_dir = args.keys or cast(NodeSettings, settings).keys.dir
        return folder_keys(keys_dir)
    keys: dict[str, PublicKey] = {}
    for path in files:
        try:
            found = key_set_from_jwks(country, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, InvalidJwk) as exc:
            raise CheckpointError(f"{path}: not a JWKS to verify checkpoints with: {exc}") from exc
        keys.update(found.keys)
    return KeySet(country, keys)


def _anchors(args: argparse.Namespace, settings: NodeSettings | EdgeSettings) -> list[Anchor]:
    from ncp.audit.checkpoint import read

    if not args.checkpoint:
        return []
    keys = _verifying_keys(args, settings)
    anchors = []
    for path in args.checkpoint:
        checkpoint = read(path.read_text(encoding="utf-8"), keys, _country(settings))
        anchors.append(checkpoint.anchor(str(path)))
    return anchors


def _cmd_verify(args: argparse.Namespace) -> int:
    from ncp.audit.chain import verify
    from ncp.audit.checkpoint import CheckpointError, CheckpointRefused

    settings = load_any_settings(args.config)
    missing = [str(p) for p in args.checkpoint if not p.is_file()]
    if missing:
        print(f"ncp: no such checkpoint file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        anchors = _anchors(args, settings)
    except CheckpointError as exc:
        print(f"ncp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointRefused as exc:
        # Fail closed: a checkpoint that does not verify may be the trace of an attack.
        print(f"audit checkpoint REFUSED: {exc}")
        return EXIT_FAILED
    engine = _open(settings)
    if engine is None:
        return EXIT_USAGE
    try:
        with Session(engine) as session:
            result = verify(session, anchors=anchors)
    finally:
        engine.dispose()
    if result.ok:
        print(
            f"audit chain intact: {result.count} records; head seq {result.head_seq} "
            f"hash {result.head_hash}"
        )
        for anchor in anchors:
            print(f"  holds {anchor.label}: seq {anchor.seq} hash {anchor.hash}")
        return EXIT_OK
    first = result.first_broken
    assert first is not None
    print(f"audit chain BROKEN: first broken record {first.describe()}")
    others = result.problems[1:SHOWN_PROBLEMS]
    for problem in others:
        print(f"  also {problem.describe()}")
    hidden = len(result.problems) - 1 - len(others) + result.more_problems
    if hidden:
        print(f"  ... and {hidden} more problems")
    print(f"({result.count} records read; chain head seq {result.head_seq})")
    return EXIT_FAILED


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from ncp.audit.chain import verify
    from ncp.audit.checkpoint import CheckpointError, of_result, sign, signing_key

    settings = load_any_settings(args.config)
    if isinstance(settings, EdgeSettings) and args.keys is None:
        print(
            "ncp: an edge gateway holds no signing key: give --keys with node A's keys folder",
            file=sys.stderr,
        )
        return EXIT_USAGE
    keys_dir = args.keys or cast(NodeSettings, settings).keys.dir
    try:
        key = signing_key(keys_dir, _country(settings))
    except CheckpointError as exc:
        print(f"ncp: no key to sign the checkpoint with: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = _open(settings)
    if engine is None:
        return EXIT_USAGE
    try:
        with Session(engine) as session:
            result = verify(session)
    finally:
        engine.dispose()
    if not result.ok:
        first = result.first_broken
        assert first is not None
        print(f"audit chain BROKEN, no checkpoint written: first broken record {first.describe()}")
        return EXIT_FAILED
    checkpoint = of_result(result, _country(settings))
    token = sign(checkpoint, key) + "\n"
    summary = (
        f"checkpoint of the audit chain: seq {checkpoint.seq} hash {checkpoint.hash} "
        f"signed by key {key.kid}"
    )
    if args.out == "-":
        sys.stdout.write(token)
        print(summary, file=sys.stderr)
        return EXIT_OK
    target = Path(args.out)
    if target.is_dir():
        stamp = checkpoint.issued.strftime("%Y%m%dT%H%M%SZ")
        target = target / f"audit-checkpoint-{checkpoint.country}-{checkpoint.seq}-{stamp}.jws"
    # Written aside and renamed: a reader never sees half a checkpoint.
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(token, encoding="ascii")
    partial.replace(target)
    print(f"{summary}, written to {target}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from ncp.audit.export import export_events

    engine = _open(args.config)
    if engine is None:
        return EXIT_USAGE
    try:
        with Session(engine) as session:
            events = export_events(session, since=args.since)
            if args.out == "-":
                count = _write(events, args.format, sys.stdout)
            else:
                folder = Path(args.out)
                folder.mkdir(parents=True, exist_ok=True)
                name = "AuditEvent.ndjson" if args.format == "ndjson" else "audit-bundle.json"
                target = folder / name
                with target.open("w", encoding="utf-8") as out:
                    count = _write(events, args.format, out)
                print(f"exported {count} AuditEvents to {target}")
    finally:
        engine.dispose()
    return EXIT_OK


def _write(events: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    from ncp.audit.export import collection, write_ndjson

    if fmt == "ndjson":
        return write_ndjson(events, out)
    bundle = collection(events, timestamp=datetime.now(UTC).replace(tzinfo=None))
    json.dump(bundle, out, ensure_ascii=False, indent=1)
    out.write("\n")
    return len(bundle["entry"])


def _cmd_report(args: argparse.Namespace) -> int:
    from ncp.audit.report import summarise, write_csv, write_text

    engine = _open(args.config)
    if engine is None:
        return EXIT_USAGE
    try:
        with Session(engine) as session:
            rows = summarise(session, since=args.since, until=args.until)
    finally:
        engine.dispose()
    if args.csv:
        write_csv(rows, sys.stdout)
    else:
        write_text(rows, sys.stdout)
    return EXIT_OK
