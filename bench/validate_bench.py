"""Validation throughput against a bare ``fhir.resources.R4B`` parse of the same bundles, in the
same run.

    python bench/validate_bench.py [--bundles 1000] [--seed 1] [--repeat 3] [--profile URL]

Plans example report bundles in memory (as ``ncp examples generate`` does, without writing DICOM
files), then times, each ``--repeat`` times:

- *parse*: ``Bundle.model_validate(bundle)`` (fhir.resources R4B) over every bundle;
- *validate*: ``Validator.validate(bundle)`` (structure, profiles, bindings, invariants, bundle
  and linkage rules) over every bundle, with a validator built beforehand (its one-off build and
  first validation are reported apart, as ``build_s``).

Prints one JSON object: bundles/s for both and the ratio (goal: validation within 3x of parsing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER
from ncp.examples.plan import plan_run
from ncp.examples.reports import patient_identifier_system, plan_report, report_bundles
from ncp.validation.engine import Validator


def make_bundles(count: int, seed: int) -> list[dict[str, Any]]:
    run = plan_run(
        patients=2,
        seed=seed,
        big_patient_studies=count + count // 5,
        country="AT",
        issuer=DEFAULT_PATIENT_ID_ISSUER,
    )
    system = patient_identifier_system(DEFAULT_PATIENT_ID_ISSUER)
    bundles: list[dict[str, Any]] = []
    for patient in run.patients:
        for study in patient.studies:
            report = plan_report(patient, study, seed=seed, patient_id_system=system, language="en")
            if report is not None:
                bundles.extend(report_bundles(report))
            if len(bundles) >= count:
                return bundles[:count]
    return bundles


def timed(work: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--bundles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="append", default=[], help="force a profile")
    args = parser.parse_args()

    bundles = make_bundles(args.bundles, args.seed)
    started = time.perf_counter()
    validator = Validator.default()
    validator.validate(bundles[0], profiles=args.profile)
    build = time.perf_counter() - started

    def parse() -> None:
        for bundle in bundles:
            Bundle.model_validate(bundle)

    errors = 0

    def validate() -> None:
        nonlocal errors
        errors = 0
        for bundle in bundles:
            if any(i.is_error for i in validator.validate(bundle, profiles=args.profile)):
                errors += 1

    parse_s = timed(parse, args.repeat)
    validate_s = timed(validate, args.repeat)
    coverage = validator.invariants.coverage()
    print(
        json.dumps(
            {
                "bundles": len(bundles),
                "repeat": args.repeat,
                "profiles": args.profile,
                "parse_s": round(parse_s, 3),
                "validate_s": round(validate_s, 3),
                "parse_bundles_per_s": round(len(bundles) / parse_s, 1),
                "validate_bundles_per_s": round(len(bundles) / validate_s, 1),
                "ratio_validate_to_parse": round(validate_s / parse_s, 2),
                "build_s": round(build, 3),
                "bundles_with_errors": errors,
                "invariants": {k: len(v) for k, v in coverage.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
