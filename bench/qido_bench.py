"""QIDO-RS latency the gateways add, against the same search direct to Orthanc, in one run.

    python bench/qido_bench.py [--studies 50] [--searches 200] [--only a,edge]

Starts one Orthanc and stores one patient's ``--studies`` studies in it (two series each: ten
instances and one). Both gateways run in their own process over HTTPS (``serve_gateway.py``:
option A's app and ``ncp edge``'s, under the imaging server that ``ncp serve`` and ``ncp edge``
run, ``ncp.gateway.server.imaging_server``). Each target has its own
kept-alive client; the searches are interleaved round by round (direct, A, edge), the first 10
rounds are a dropped warm-up, then p50 and p95 of ``--searches`` rounds:

- ``study``: ``/studies?StudyInstanceUID={s}`` (token naming 10 studies);
- ``all_1``, ``all_10``, ``all_50``: ``/studies`` with a token naming 1, 10 or 50 studies
  (direct: ``/studies?StudyInstanceUID={s1},{s2},...``, the same studies in one search);
- ``series``: ``/studies/{s}/series``;
- ``instances``: ``/studies/{s}/series/{r}/instances`` (ten instances).

A token is used for many searches (as B's retriever does for a study), re-signed every four
minutes. Each answer is checked (status, number of items) before it counts. Prints one JSON
object: p50/p95 in ms per search and target, the added ms (gateway p50 minus direct p50, and the
same for p95) and the ratio of the p50s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for entry in (str(ROOT), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

COUNTRY = "AT"
ISSUER_OID = "1.2.40.0.10.1.4.3.1"
PATIENT_SYSTEM = f"urn:oid:{ISSUER_OID}"
PATIENT_ID = "BENCH-QIDO-1"
UID_ROOT = "1.2.826.0.1.3680043.10.99"
WARMUP = 10
TOKEN_AGE_S = 240.0
SEARCHES = ("study", "all_1", "all_10", "all_50", "series", "instances")


# --- data and tokens -------------------------------------------------------------------------


def make_studies(folder: Path, count: int) -> list[tuple[str, str, list[Path]]]:
    """``count`` studies of one patient: (study UID, first series UID, files)."""
    from tests.support.dicom_factory import make_instance, write_instance

    out = []
    for s in range(1, count + 1):
        study = f"{UID_ROOT}.{s}"
        files = []
        for r, instances in ((1, 10), (2, 1)):
            series = f"{study}.{r}"
            for n in range(1, instances + 1):
                ds = make_instance(
                    patient_id=PATIENT_ID,
                    study_uid=study,
                    series_uid=series,
                    sop_uid=f"{series}.{n}",
                    IssuerOfPatientID=ISSUER_OID,
                    StudyDate=f"2024{1 + s % 12:02d}{1 + s % 28:02d}",
                    StudyDescription=f"bench study {s}",
                    SeriesNumber=r,
                    InstanceNumber=n,
                    pixels=False,
                )
                files.append(write_instance(folder / str(s) / f"{r}-{n}.dcm", ds))
        out.append((study, f"{study}.1", files))
    return out


class Tokens:
    """Image access tokens per (audience, studies), re-signed before they grow old."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self._made: dict[tuple[str, tuple[str, ...]], tuple[float, str]] = {}

    def get(self, audience: str, studies: tuple[str, ...]) -> str:
        from ncp.security.claims import IMAGE_ACCESS, ImageAccess, PatientRef
        from ncp.security.tokens import issue

        made = self._made.get((audience, studies))
        if made is not None and time.monotonic() - made[0] < TOKEN_AGE_S:
            return made[1]
        now = datetime.now(UTC)
        claims = ImageAccess(
            issuer=COUNTRY,
            audience=audience,
            subject="BE-HP-0042",
            issued_at=now,
            expires_at=now + timedelta(minutes=5),
            requesting_country="BE",
            patient=PatientRef(PATIENT_SYSTEM, PATIENT_ID),
            studies=studies,
            purpose_of_use="TREAT",
            priority="routine",
            option="A",
        )
        value = issue(IMAGE_ACCESS, claims, self.key, now=now)
        self._made[(audience, studies)] = (time.monotonic(), value)
        return value


# --- measuring -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def searches(
    studies: list[tuple[str, str, list[Path]]],
) -> dict[str, tuple[str, dict[str, str], tuple[str, ...], int]]:
    """name: (path, params, token studies, expected items); direct adds the UID list itself."""
    uids = [s[0] for s in studies]
    study, series = uids[0], studies[0][1]
    return {
        "study": ("/studies", {"StudyInstanceUID": study}, tuple(uids[:10]), 1),
        "all_1": ("/studies", {}, tuple(uids[:1]), 1),
        "all_10": ("/studies", {}, tuple(uids[:10]), min(10, len(uids))),
        "all_50": ("/studies", {}, tuple(uids[:50]), min(50, len(uids))),
        "series": (f"/studies/{study}/series", {}, tuple(uids[:10]), 2),
        "instances": (f"/studies/{study}/series/{series}/instances", {}, tuple(uids[:10]), 10),
    }


def timed(call: Callable[[], Any], expected: int, what: str) -> float:
    t0 = time.perf_counter()
    response = call()
    elapsed = (time.perf_counter() - t0) * 1000
    if response.status_code != 200 or len(response.json()) != expected:
        raise RuntimeError(
            f"{what}: HTTP {response.status_code}, {response.text[:200]!r} "
            f"(expected {expected} items)"
        )
    return elapsed


def _orthanc_class() -> Any:
    from tests.support.orthanc import OrthancServer

    class Orthanc(OrthancServer):
        """The test Orthanc with Orthanc's default 50 HTTP threads (the test template has 8): a
        kept-alive connection holds a thread, and three clients' pools would queue on 8."""

        def _config(self) -> dict[str, Any]:
            return {**super()._config(), "HttpThreadsCount": 50}

    return Orthanc


def run(args: argparse.Namespace) -> None:
    import httpx
    from byte_path_alternatives import free_port, make_tls, stop_processes, upload, wait_port
    from cryptography.hazmat.primitives.asymmetric import ec

    from ncp.security.keys import SigningKey
    from ncp.security.keystore import jwks_document

    orthanc_type = _orthanc_class()
    kinds = [k for k in ("a", "edge") if not args.only or k in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ncp-qidobench-"))
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[httpx.Client] = []
    orthanc = orthanc_type.start()
    try:
        studies = make_studies(work / "studies", args.studies)
        upload(orthanc.rest_url, [f for s in studies for f in s[2]])
        ca, cert, key = make_tls(work)
        signing = SigningKey("bench-qido-1", ec.generate_private_key(ec.SECP256R1()))
        jwks = work / "jwks.json"
        jwks.write_bytes(jwks_document([(signing.kid, signing.private_key.public_key())]))
        tokens = Tokens(signing)

        bases: dict[str, str | None] = {"direct": None}
        for kind in kinds:
            port = free_port()
            base = f"https://localhost:{port}/{'edge' if kind == 'edge' else 'dicomweb'}"
            cmd = [sys.executable, str(BENCH / "serve_gateway.py"), "--kind", kind]
            cmd += ["--port", str(port), "--public-base", base, "--jwks", str(jwks)]
            cmd += ["--db", str(work / f"audit-{kind}.db"), "--archive", orthanc.dicomweb_url]
            cmd += ["--cert", str(cert), "--key", str(key)]
            log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            try:
                wait_port(port, timeout=60)
            except RuntimeError:
                tail = (work / f"{kind}.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"gateway {kind} did not start: {tail}") from None
            bases[kind] = base

        direct = httpx.Client(base_url=orthanc.dicomweb_url, timeout=30)
        clients.append(direct)
        through: dict[str, httpx.Client] = {}
        for kind in kinds:
            through[kind] = httpx.Client(base_url=bases[kind] or "", timeout=30, verify=str(ca))
            clients.append(through[kind])

        plan = searches(studies)
        times: dict[str, dict[str, list[float]]] = {name: {t: [] for t in bases} for name in plan}
        for round_no in range(WARMUP + args.searches):
            for name, (path, params, covered, expected) in plan.items():
                direct_params = dict(params)
                if name.startswith("all_"):
                    direct_params["StudyInstanceUID"] = ",".join(covered)
                elapsed = {
                    "direct": timed(
                        lambda p=path, q=direct_params: direct.get(p, params=q),  # type: ignore[misc]
                        expected,
                        f"direct {name}",
                    )
                }
                for kind in kinds:
                    audience = bases[kind] or ""
                    headers = {"Authorization": f"Bearer {tokens.get(audience, covered)}"}
                    client = through[kind]
                    elapsed[kind] = timed(
                        lambda c=client, p=path, q=params, h=headers: c.get(  # type: ignore[misc]
                            p, params=q, headers=h
                        ),
                        expected,
                        f"{kind} {name}",
                    )
                if round_no >= WARMUP:
                    for target, ms in elapsed.items():
                        times[name][target].append(ms)

        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]},
            "studies": args.studies,
            "searches_each": args.searches,
            "results": {},
        }
        for name, by_target in times.items():
            d50 = statistics.median(by_target["direct"])
            d95 = percentile(by_target["direct"], 0.95)
            row: dict[str, Any] = {"direct": {"p50": round(d50, 2), "p95": round(d95, 2)}}
            for kind in kinds:
                p50 = statistics.median(by_target[kind])
                p95 = percentile(by_target[kind], 0.95)
                row[kind] = {
                    "p50": round(p50, 2),
                    "p95": round(p95, 2),
                    "added_p50": round(p50 - d50, 2),
                    "added_p95": round(p95 - d95, 2),
                    "ratio": round(p50 / d50, 2),
                }
            report["results"][name] = row
        print(json.dumps(report, indent=2))
    finally:
        for client in clients:
            client.close()
        stop_processes(procs)
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--only", default="", help="a, edge or a,edge (direct always)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
