"""``ncp validate PATH...``: validate FHIR resources (JSON or XML) for people and for CI.

Inputs are files, folders (every ``*.json`` and ``*.xml`` below them, in sorted order) or ``-``
for standard input; the format of each is detected from its first byte. Output formats:

- ``text``: one line per issue, ``path: severity code @expression: diagnostics``, then a summary;
- ``json``: one OperationOutcome per input (an array, or the object alone for one input), each
  naming its input in an extension;
- ``junit``: JUnit XML, one test case per input, a ``failure`` when the input has an error.

``--profile URL`` may be given several times: each resource is checked against every profile of
its type among them (as against the profiles it claims), each profile applying to the resources
of its type, nested ones included.

``--workers N`` validates the inputs in N processes (for folders of many files); the report is
the same, in the same input order, as with one. Standard input is read by the main process.

``--ig eu-imaging`` / ``--ig mado`` check each resource against the profiles of that
implementation guide too (:mod:`ncp.validation.guides`).

Exit codes: 0 every input valid (warnings allowed), 1 an input is invalid or unreadable, 2 a usage
error (a path that does not exist, an unknown ``--profile``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

from lxml import etree

from ncp.fhir import canonical
from ncp.fhir.io import DEFAULT_MAX_BYTES, FhirReadError, read_limited, read_path, read_resource
from ncp.validation.engine import UnknownProfile, Validator
from ncp.validation.guides import GUIDES, guide_profiles
from ncp.validation.issues import Issue, has_errors, to_operation_outcome

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
SOURCE_EXTENSION = canonical.structure_definition("validated-source")
"""Names the validated input (file path, or ``-``) in each OperationOutcome of ``--format json``."""

Format = Literal["text", "json", "junit"]


@dataclass(frozen=True, slots=True)
class Result:
    source: str
    resource_type: str
    issues: list[Issue]

    @property
    def valid(self) -> bool:
        return not has_errors(self.issues)


def _inputs(paths: Sequence[str]) -> Iterator[str]:
    for raw in paths:
        if raw == "-":
            yield raw
            continue
        path = Path(raw)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".xml")]
            yield from (str(p) for p in sorted(found))
        else:
            yield raw


def _validate_one(
    source: str, stdin: BinaryIO, validator: Validator, profiles: Sequence[str], max_bytes: int
) -> Result:
    try:
        data = read_limited(stdin, max_bytes) if source == "-" else read_path(source, max_bytes)
        resource = read_resource(data, max_bytes=max_bytes)
    except FhirReadError as exc:
        return Result(source, "", [exc.issue])
    except OSError as exc:
        issue = Issue("fatal", "exception", "", f"cannot read {source}: {exc.strerror}", "read")
        return Result(source, "", [issue])
    rtype = resource.get("resourceType")
    issues = validator.validate(resource, profiles=profiles)
    return Result(source, rtype if isinstance(rtype, str) else "", issues)


def _validate_file(source: str, profiles: Sequence[str], max_bytes: int) -> Result:
    """One file with the default validator: the work of a worker process (built once each)."""
    return _validate_one(source, io.BytesIO(), Validator.default(), profiles, max_bytes)


def _pool_context() -> Any:
    import multiprocessing
    import threading

    # fork shares the validator the main process has built already (it checked the profiles),
    # so workers start at once; forking a process that runs threads is unsafe, spawn then.
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _validate_all(
    sources: list[str],
    stdin: BinaryIO,
    validator: Validator,
    profiles: Sequence[str],
    max_bytes: int,
    workers: int,
) -> list[Result] | None:
    """The result of each source, in order; None when a worker process died."""
    if workers <= 1 or len(sources) < 2:
        return [_validate_one(s, stdin, validator, profiles, max_bytes) for s in sources]
    # Imported here: a single process (the common case in CI) never pays for them.
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    files = [s for s in sources if s != "-"]
    # Each worker takes several files at a time: fewer round trips than one by one.
    chunk = max(1, min(64, len(files) // (workers * 4)))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    try:
        with pool:
            done = iter(
                pool.map(
                    _validate_file,
                    files,
                    itertools.repeat(list(profiles)),
                    itertools.repeat(max_bytes),
                    chunksize=chunk,
                )
            )
            # In input order; standard input is read here, in the process that has it.
            return [
                _validate_one(s, stdin, validator, profiles, max_bytes) if s == "-" else next(done)
                for s in sources
            ]
    except BrokenProcessPool:
        return None


def run_validate(
    paths: Sequence[str],
    *,
    fmt: Format,
    profiles: Sequence[str] = (),
    stdin: BinaryIO,
    stdout: TextIO,
    max_bytes: int = DEFAULT_MAX_BYTES,
    validator: Validator | None = None,
    workers: int = 1,
    guides: Sequence[str] = (),
) -> int:
    """Validate every input and write the report; returns the exit code. ``workers`` > 1 runs
    the default validator in that many processes (a ``validator`` given is used for standard
    input only then)."""
    if not paths:
        print("ncp validate: give at least one PATH (or - for standard input)", file=sys.stderr)
        return EXIT_USAGE
    missing = [p for p in paths if p != "-" and not Path(p).exists()]
    if missing:
        print(f"ncp validate: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if fmt not in ("text", "json", "junit"):
        print(f"ncp validate: unknown format {fmt!r}", file=sys.stderr)
        return EXIT_USAGE
    if workers < 1:
        print(f"ncp validate: --workers must be 1 or more, not {workers}", file=sys.stderr)
        return EXIT_USAGE
    validator = validator or Validator.default()
    unknown = [g for g in guides if g not in GUIDES]
    if unknown:
        print(f"ncp validate: unknown guide {', '.join(unknown)}", file=sys.stderr)
        return EXIT_USAGE
    profiles = list(dict.fromkeys([*profiles, *guide_profiles(list(guides))]))
    for url in profiles:
        try:
            validator.check_profile(url)
        except UnknownProfile:
            print(f"ncp validate: unknown profile {url!r}", file=sys.stderr)
            return EXIT_USAGE
    sources = list(_inputs(paths))
    results = _validate_all(sources, stdin, validator, profiles, max_bytes, workers)
    if results is None:
        print("ncp validate: a worker process died; nothing is reported", file=sys.stderr)
        return EXIT_INVALID
    if fmt == "text":
        _write_text(results, stdout)
    elif fmt == "json":
        _write_json(results, stdout)
    else:
        _write_junit(results, stdout)
    return EXIT_OK if all(r.valid for r in results) else EXIT_INVALID


# --- output formats ------------------------------------------------------------------------------


def _write_text(results: list[Result], out: TextIO) -> None:
    counts = {"fatal": 0, "error": 0, "warning": 0, "information": 0}
    for result in results:
        for issue in result.issues:
            counts[issue.severity] += 1
            where = f"@{issue.expression}" if issue.expression else "@-"
            out.write(
                f"{result.source}: {issue.severity} {issue.code} {where}: {issue.diagnostics}\n"
            )
    invalid = sum(1 for r in results if not r.valid)
    out.write(
        f"{len(results)} checked, {len(results) - invalid} valid, {invalid} invalid: "
        f"{counts['fatal'] + counts['error']} errors, {counts['warning']} warnings, "
        f"{counts['information']} information\n"
    )


def outcome_of(result: Result) -> dict[str, Any]:
    outcome = to_operation_outcome(result.issues)
    return {
        "resourceType": "OperationOutcome",
        "extension": [{"url": SOURCE_EXTENSION, "valueString": result.source}],
        "issue": outcome["issue"],
    }


def _write_json(results: list[Result], out: TextIO) -> None:
    outcomes = [outcome_of(r) for r in results]
    body: Any = outcomes[0] if len(outcomes) == 1 else outcomes
    out.write(json.dumps(body, ensure_ascii=False, indent=1))
    out.write("\n")


def _line(issue: Issue) -> str:
    return f"{issue.severity} {issue.code} @{issue.expression or '-'}: {issue.diagnostics}"


def _write_junit(results: list[Result], out: TextIO) -> None:
    failures = sum(1 for r in results if not r.valid)
    suites = etree.Element("testsuites", name="ncp validate")
    suite = etree.SubElement(
        suites,
        "testsuite",
        name="ncp validate",
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    for result in results:
        case = etree.SubElement(
            suite,
            "testcase",
            name=result.source,
            classname=f"fhir.{result.resource_type or 'unreadable'}",
        )
        errors = [i for i in result.issues if i.is_error]
        if errors:
            failure = etree.SubElement(
                case,
                "failure",
                message=_line(errors[0])[:500],
                type=errors[0].code,
            )
            failure.text = "\n".join(_line(i) for i in errors)
        others = [i for i in result.issues if not i.is_error]
        if others:
            etree.SubElement(case, "system-out").text = "\n".join(_line(i) for i in others)
    text = etree.tostring(suites, encoding="unicode", pretty_print=True)
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    out.write(text)


# --- the sub-command ------------------------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``validate`` to the ``ncp`` command's sub-parsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "validate",
        help="validate FHIR resources (JSON or XML) against R4, the profiles and terminology",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="file, folder (recursive) or - for stdin"
    )
    parser.add_argument(
        "--format",
        choices=["text", "json", "junit"],
        default="text",
        help="text (default), json (OperationOutcome) or junit (JUnit XML)",
    )
    parser.add_argument(
        "--profile",
        metavar="URL",
        action="append",
        default=[],
        help="a profile every resource of its type must conform to; repeat for several",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="validate in N processes (for folders of many files); the report is the same",
    )
    parser.add_argument(
        "--ig",
        action="append",
        default=[],
        choices=sorted(GUIDES),
        help="also check against an implementation guide's profiles (repeatable)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"refuse inputs larger than this (default {DEFAULT_MAX_BYTES})",
    )
    parser.set_defaults(handler=_handler)
    return parser


def _handler(args: argparse.Namespace) -> int:
    return run_validate(
        args.paths,
        fmt=args.format,
        profiles=args.profile,
        stdin=sys.stdin.buffer,
        stdout=sys.stdout,
        max_bytes=args.max_bytes,
        workers=args.workers,
        guides=args.ig,
    )
