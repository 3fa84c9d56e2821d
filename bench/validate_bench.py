"""Validation throughput against a bare ``fhir.resources.R4B`` parse of the same bundles, and the
start-up of ``ncp validate`` against a bare parse in a fresh interpreter, in the same run.

    python bench/validate_bench.py [--bundles 1000] [--seed 1] [--repeat 3] [--profile URL]
                                   [--starts 10] [--no-startup]

Plans example report bundles in memory (as ``ncp examples generate`` does, without writing DICOM
files), then times, each ``--repeat`` times (medians):

- *parse*: ``Bundle.model_validate(bundle)`` (fhir.resources R4B) over every bundle;
- *validate*: ``Validator.validate(bundle)`` (structure, profiles, bindings, invariants, bundle
  and linkage rules) over every bundle, with a validator built beforehand (its one-off build and
  first validation are reported apart, as ``build_s``).

Both in wall time and in CPU time of this process: on a machine shared with other work the CPU
figures are the ones to trust. Goal: validation within 3x of parsing.

Then the start-up (``--starts`` runs of each, medians, CPU of the child process from
``wait4``): ``ncp validate FILE`` as the installed command runs it, for a small Patient and for
one report bundle, against ``python -c`` that imports fhir.resources and parses the same file
(the least a Python validator start can cost). Goal: one small file under 0.5 s.

Prints one JSON object (its keys are listed in bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER
from ncp.examples.plan import plan_run
from ncp.examples.reports import patient_identifier_system, plan_report, report_bundles
from ncp.validation.engine import Validator

SMALL_PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "urn:oid:1.2.40.0.10.1.4.3.1", "value": "PAT100"}],
    "name": [{"family": "Gruber", "given": ["Anna"]}],
    "gender": "female",
    "birthDate": "1980-05-17",
}

_BARE_PARSE = (
    "import json, sys\n"
    "from fhir.resources.R4B import get_fhir_model_class\n"
    "data = json.load(open(sys.argv[1], encoding='utf-8'))\n"
    "get_fhir_model_class(data['resourceType']).model_validate(data)\n"
)


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


def timed(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds, the medians of ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def run_once(argv: Sequence[str]) -> tuple[float, float]:
    """(wall, CPU user+system) seconds of one child process; it must exit 0."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err[-500:]}")
    if proc.stderr:
        proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def startup(starts: int, files: dict[str, Path]) -> dict[str, Any]:
    """Medians of ``starts`` runs of each command on each file, interleaved."""
    ncp = Path(sys.executable).with_name("ncp")
    command = [str(ncp)] if ncp.exists() else [sys.executable, "-m", "ncp"]
    out: dict[str, Any] = {"starts": starts, "command": " ".join([*command, "validate", "FILE"])}
    for name, path in files.items():
        runs: dict[str, list[tuple[float, float]]] = {"ncp": [], "bare": []}
        for _ in range(starts):
            runs["ncp"].append(run_once([*command, "validate", str(path)]))
            runs["bare"].append(run_once([sys.executable, "-c", _BARE_PARSE, str(path)]))
        ncp_wall = statistics.median(w for w, _ in runs["ncp"])
        ncp_cpu = statistics.median(c for _, c in runs["ncp"])
        bare_wall = statistics.median(w for w, _ in runs["bare"])
        bare_cpu = statistics.median(c for _, c in runs["bare"])
        out[name] = {
            "ncp_validate_wall_s": round(ncp_wall, 3),
            "ncp_validate_cpu_s": round(ncp_cpu, 3),
            "bare_parse_wall_s": round(bare_wall, 3),
            "bare_parse_cpu_s": round(bare_cpu, 3),
            "ratio_cpu": round(ncp_cpu / bare_cpu, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--bundles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="append", default=[], help="force a profile")
    parser.add_argument("--starts", type=int, default=10, help="runs of each start-up case")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up figures")
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

    parse_s, parse_cpu = timed(parse, args.repeat)
    validate_s, validate_cpu = timed(validate, args.repeat)
    coverage = validator.invariants.coverage()
    report: dict[str, Any] = {
        "bundles": len(bundles),
        "repeat": args.repeat,
        "profiles": args.profile,
        "parse_s": round(parse_s, 3),
        "validate_s": round(validate_s, 3),
        "parse_bundles_per_s": round(len(bundles) / parse_s, 1),
        "validate_bundles_per_s": round(len(bundles) / validate_s, 1),
        "ratio_validate_to_parse": round(validate_s / parse_s, 2),
        "parse_cpu_s": round(parse_cpu, 3),
        "validate_cpu_s": round(validate_cpu, 3),
        "ratio_validate_to_parse_cpu": round(validate_cpu / parse_cpu, 2),
        "build_s": round(build, 3),
        "bundles_with_errors": errors,
        "invariants": {k: len(v) for k, v in coverage.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.no_startup:
        with tempfile.TemporaryDirectory() as tmp:
            files = {"small_patient": Path(tmp) / "patient.json", "report": Path(tmp) / "b.json"}
            files["small_patient"].write_text(json.dumps(SMALL_PATIENT), encoding="utf-8")
            files["report"].write_text(json.dumps(bundles[0]), encoding="utf-8")
            report["startup"] = startup(args.starts, files)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
