"""The metadata list of a patient with 1,000 studies and 1,000 reports: the node against a live
QIDO-RS fan-out to the archive, measured in the same run.

    python bench/list_bench.py [--studies 1000] [--instances-per-series 1] [--repeat 30]

1. Generates one patient with ``--studies`` studies, every study reported (the generator reports
   about 85% of studies; here all of them, so 1,000 studies carry about 1,000 reports).
2. Starts a throwaway Orthanc with its DICOMweb plugin (``tests/support/orthanc.py``) and stores
   the first ``--instances-per-series`` instances of every series (0: all). The list's shape
   (studies, series) is complete either way; fewer instances only make Orthanc's answers
   cheaper, which favours the reference.
3. Makes node A's config with Orthanc as its DICOMweb archive, a test PKI for A and for a peer B
   (BE) on A's trust list, indexes the archive and loads the reports (validated, as ingest does).
4. Runs node A as ``ncp serve --config`` (mutual TLS) and, as B, signs one HP assertion and one
   TRC and keeps one connection alive. Times, ``--repeat`` times each, interleaved:

   - ``imagingstudy``: ``GET /fhir/ImagingStudy?patient.identifier=S|ID&_count=1000``
   - ``imagingstudy_revinclude``: the same with ``_revinclude=DocumentReference:related``
   - ``documentreference``: ``GET /fhir/DocumentReference?patient.identifier=S|ID&_count=1000``
   - ``qido_sequential``: the same question live: QIDO-RS ``/studies?PatientID=ID`` then
     ``/studies/{uid}/series`` for each study, one kept-alive connection (what a node without an
     index would do per list request);
   - ``qido_parallel``: the same fan-out on ``--fanout`` connections at once.

Each node request is timed until the last byte of the answer (the client's JSON parse is not
counted). The rendered list entries are dropped first, so the first request of each query is
the cold one (it renders and keeps them; reported apart); ``--memory-mib 0`` makes the node read
them from the database on every request (a restarted replica's case).

Prints one JSON object: p50/p95 (ms) of each, the sizes of the answers, and the ratios of the
reference's p50 to the node's. Goals (issue 6): the node's p95 under 100 ms, and at least 10x
faster than the live fan-out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import delete

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support.orthanc: the same throwaway Orthanc as the tests

from ncp.config import load_settings  # noqa: E402
from ncp.dicom.archive import open_archive  # noqa: E402
from ncp.examples import reports as example_reports  # noqa: E402
from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER, generate_examples  # noqa: E402
from ncp.fhir.datatypes import zone_of  # noqa: E402
from ncp.fhir.identifiers import patient_system  # noqa: E402
from ncp.provider.indexer import index_source  # noqa: E402
from ncp.provider.reports import load_folder  # noqa: E402
from ncp.security import pki  # noqa: E402
from ncp.security.claims import (  # noqa: E402
    HP_ASSERTION,
    ISCO_08_SYSTEM,
    TRC,
    Coding,
    HpAssertion,
    PatientRef,
    Trc,
)
from ncp.security.keystore import KeyStore  # noqa: E402
from ncp.security.tokens import issue, token_hash  # noqa: E402
from ncp.store.db import make_engine, migrate, session_factory  # noqa: E402
from ncp.store.models import ListEntry  # noqa: E402
from ncp.validation.engine import Validator  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.postgres import PostgresCluster  # noqa: E402

NODE = """\
[node]
country = "AT"
name = "NCPeH-AT (list bench)"
patient_id_issuer = "{issuer}"

[urls]
standard = "https://localhost:{port}/fhir"
imaging = "https://localhost:{imaging_port}/dicomweb"

[listen]
host = "127.0.0.1"
standard_port = {port}
imaging_port = {imaging_port}

[database]
url = "{database_url}"

[archive]
kind = "dicomweb"
url = "{archive}"

[reports]
kind = "store"

[keys]
dir = "keys"

[trust]
list = "trust.toml"

[lists]
memory_mib = {memory_mib}
"""

TRUST = """\
format = 1

[peers.BE]
standard = "https://localhost:9443/fhir"
tls_ca = "../be/ca.pem"
jwks_file = "../be/jwks.json"
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(_percentile(ms, 0.95), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
        "n": len(ms),
    }


def _select_instances(dicom: Path, per_series: int) -> list[Path]:
    chosen: list[Path] = []
    for series in sorted({p.parent for p in dicom.rglob("*.dcm")}):
        files = sorted(series.glob("*.dcm"))
        chosen.extend(files if per_series == 0 else files[:per_series])
    return chosen


def _upload(orthanc: OrthancServer, paths: list[Path], workers: int = 4) -> None:
    def one(batch: list[Path]) -> int:
        with httpx.Client(base_url=orthanc.rest_url, timeout=60.0) as client:
            for path in batch:
                r = client.post(
                    "/instances",
                    content=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                r.raise_for_status()
        return len(batch)

    batches = [paths[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        sum(pool.map(one, batches))


def b_pair(keys_b: Path, audience: str, patient: PatientRef) -> tuple[str, str]:
    """One HP assertion and one TRC, signed once by B's key for the whole run."""
    key = KeyStore.load(keys_b, country="BE").current_signing_key()
    now = datetime.now(UTC)
    hp = issue(
        HP_ASSERTION,
        HpAssertion(
            issuer="BE",
            audience=audience,
            subject="BE-HP-0042",
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            subject_name="Dr. Anne Peeters",
            subject_organization="UZ Leuven",
            subject_organization_id="urn:oid:2.16.56.1.1.1.1",
            subject_role=Coding(ISCO_08_SYSTEM, "221", "Medical doctors"),
            point_of_care="Radiology",
            preferred_language="nl-BE",
        ),
        key,
        now=now,
    )
    trc = issue(
        TRC,
        Trc(
            issuer="BE",
            audience=audience,
            subject="BE-HP-0042",
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            patient=patient,
            purpose_of_use="TREAT",
            informed=True,
            hp_assertion_hash=token_hash(hp),
        ),
        key,
        now=now,
    )
    return hp, trc


def _wait_metadata(client: httpx.Client, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ncp serve exited with {proc.returncode}")
        try:
            if client.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"ncp serve did not answer {url} in 60 s")


def _qido_fanout(client: httpx.Client, base: str, patient_id: str) -> tuple[int, int]:
    studies = client.get(f"{base}/studies", params={"PatientID": patient_id})
    studies.raise_for_status()
    uids = [s["0020000D"]["Value"][0] for s in studies.json()]
    series = 0
    for uid in uids:
        r = client.get(f"{base}/studies/{uid}/series")
        r.raise_for_status()
        series += len(r.json())
    return len(uids), series


def _qido_parallel(
    clients: list[httpx.Client], pool: ThreadPoolExecutor, base: str, patient_id: str
) -> tuple[int, int]:
    studies = clients[0].get(f"{base}/studies", params={"PatientID": patient_id})
    studies.raise_for_status()
    uids = [s["0020000D"]["Value"][0] for s in studies.json()]
    parts = [uids[i :: len(clients)] for i in range(len(clients))]

    def run(index: int) -> int:
        n = 0
        for uid in parts[index]:
            r = clients[index].get(f"{base}/studies/{uid}/series")
            r.raise_for_status()
            n += len(r.json())
        return n

    return len(uids), sum(pool.map(run, range(len(clients))))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--instances-per-series", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per query")
    parser.add_argument("--reference-repeat", type=int, default=5, help="timed QIDO fan-outs")
    parser.add_argument("--fanout", type=int, default=8, help="connections of qido_parallel")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="node A's database in a throwaway PostgreSQL cluster instead of SQLite",
    )
    parser.add_argument(
        "--memory-mib",
        type=int,
        default=128,
        help="[lists] memory_mib of the node (0: rendered entries read from the database)",
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --keep of an earlier run: keep its index and report store as they are",
    )
    args = parser.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C, so Orthanc and the node are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    work = args.keep or Path(tempfile.mkdtemp(prefix="ncp-list-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: dict[str, Any] = {}

    # 1. data: every study reported.
    example_reports.REPORTED_SHARE = 1.0
    data = work / "data"
    if not (data / "dicom").is_dir():
        t, s = _timed(
            lambda: generate_examples(
                data, patients=1, seed=args.seed, big_patient_studies=args.studies
            )
        )
        notes["generated"] = {
            "studies": s.studies,
            "series": s.series,
            "instances": s.instances,
            "reports": s.reports,
            "report_versions": s.report_versions,
            "seconds": round(t, 1),
        }
        print(f"generated {notes['generated']}", file=sys.stderr, flush=True)

    orthanc = OrthancServer.start()
    cluster = PostgresCluster.start() if args.postgres else None
    # PostgreSQL: a throwaway cluster (durability off, as in the tests), indexed afresh.
    database_url = (
        cluster.url(cluster.create_database()) if cluster is not None else "sqlite:///index.db"
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        files = _select_instances(data / "dicom", args.instances_per_series)
        t, _ = _timed(lambda: _upload(orthanc, files))
        notes["uploaded"] = {"instances": len(files), "seconds": round(t, 1)}
        print(f"uploaded {notes['uploaded']}", file=sys.stderr, flush=True)

        # 2. node A: config, keys, trust, index from Orthanc, reports.
        node_dir, keys_b = work / "at", work / "be"
        if not (keys_b / pki.KEYS_TOML).exists():
            pki.init_keys_folder(keys_b, "BE")
        if not (node_dir / "keys" / pki.KEYS_TOML).exists():
            pki.init_keys_folder(node_dir / "keys", "AT")
        port, imaging_port = _free_port(), _free_port()
        config = node_dir / "node.toml"
        config.write_text(
            NODE.format(
                issuer=DEFAULT_PATIENT_ID_ISSUER,
                port=port,
                imaging_port=imaging_port,
                archive=orthanc.dicomweb_url,
                memory_mib=args.memory_mib,
                database_url=database_url,
            ),
            encoding="utf-8",
        )
        (node_dir / "trust.toml").write_text(TRUST, encoding="utf-8")
        settings = load_settings(config)
        engine = make_engine(settings.database.url)
        migrate(engine)
        sessions = session_factory(engine)
        if not args.reuse or cluster is not None:
            t, run = _timed(
                lambda: index_source(
                    sessions, open_archive(settings.archive), zone=zone_of(settings.node.country)
                )
            )
            notes["indexed"] = {"added": run.added, "seconds": round(t, 1)}
            print(f"indexed {notes['indexed']}", file=sys.stderr, flush=True)
            t, loaded = _timed(
                lambda: load_folder(
                    sessions,
                    data / "reports",
                    validator=Validator.default(),
                    now=datetime.now(UTC),
                )
            )
            notes["reports_loaded"] = {
                "stored": loaded.stored,
                "failed": len(loaded.failed),
                "seconds": round(t, 1),
            }
            print(f"reports {notes['reports_loaded']}", file=sys.stderr, flush=True)
        manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
        engine.dispose()
        patient_id = _patient_id(manifest)

        # 3. the node, over mutual TLS as B.
        log = (work / "serve.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ncp", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        context = ssl.create_default_context(cafile=str(node_dir / "keys" / pki.CA_CERT))
        context.load_cert_chain(keys_b / pki.CLIENT_CERT, keys_b / pki.CLIENT_KEY)
        base = settings.urls.standard
        node = httpx.Client(verify=context, timeout=60.0)
        _wait_metadata(node, f"{base}/metadata", proc)
        system = patient_system(DEFAULT_PATIENT_ID_ISSUER)
        hp, trc = b_pair(keys_b, base, PatientRef(system, patient_id))
        node.headers.update({"Authorization": f"Bearer {hp}", "NCP-Treatment-Relationship": trc})
        who = f"{system}|{patient_id}"
        queries = {
            "imagingstudy": (f"{base}/ImagingStudy", {"patient.identifier": who, "_count": 1000}),
            "imagingstudy_revinclude": (
                f"{base}/ImagingStudy",
                {
                    "patient.identifier": who,
                    "_count": 1000,
                    "_revinclude": "DocumentReference:related",
                },
            ),
            "documentreference": (
                f"{base}/DocumentReference",
                {"patient.identifier": who, "_count": 1000},
            ),
        }
        sizes: dict[str, dict[str, int]] = {}

        def fetch(name: str) -> Callable[[], Any]:
            url, params = queries[name]

            def go() -> float:
                # Timed: the request until the last byte of the answer (httpx reads it whole);
                # the client's JSON parse is not the node's latency and comes after.
                t, r = _timed(lambda: node.get(url, params=params))
                if r.status_code != 200:
                    raise SystemExit(f"{name}: {r.status_code} {r.text[:500]}")
                body = r.json()
                sizes[name] = {
                    "entries": len(body.get("entry", [])),
                    "total": body.get("total", -1),
                    "bytes": len(r.content),
                }
                return t

            return go

        # Cold: no rendered entry kept (as after `ncp index` changed every study, or a change of
        # the node's URLs); the first request renders and keeps them.
        with make_engine(settings.database.url).begin() as connection:
            connection.execute(delete(ListEntry))
        cold = {name: round(fetch(name)() * 1000, 2) for name in queries}
        notes["first_request_ms_no_rendered_entries"] = cold
        print(f"cold {json.dumps(cold)}", file=sys.stderr, flush=True)
        timings: dict[str, list[float]] = {name: [] for name in queries}
        for _ in range(args.repeat):
            for name in queries:
                timings[name].append(fetch(name)())
        node_results = {name: _summary(v) for name, v in timings.items()}
        print(f"node {json.dumps(node_results)} {json.dumps(sizes)}", file=sys.stderr, flush=True)

        # 4. the reference: live QIDO-RS fan-out, same run.
        qido = httpx.Client(timeout=120.0)
        fan = [httpx.Client(timeout=120.0) for _ in range(args.fanout)]
        pool = ThreadPoolExecutor(args.fanout)
        ref: dict[str, list[float]] = {"qido_sequential": [], "qido_parallel": []}
        shape: dict[str, tuple[int, int]] = {}
        shape["qido_sequential"] = _qido_fanout(qido, orthanc.dicomweb_url, patient_id)  # warm
        for _ in range(args.reference_repeat):
            t, shape["qido_sequential"] = _timed(
                lambda: _qido_fanout(qido, orthanc.dicomweb_url, patient_id)
            )
            ref["qido_sequential"].append(t)
            t, shape["qido_parallel"] = _timed(
                lambda: _qido_parallel(fan, pool, orthanc.dicomweb_url, patient_id)
            )
            ref["qido_parallel"].append(t)
            print(f"reference round: {ref}", file=sys.stderr, flush=True)
        pool.shutdown()

        results = {name: _summary(v) for name, v in {**timings, **ref}.items()}
        ratios = {
            f"{r}/{n}": round(results[r]["p50_ms"] / results[n]["p50_ms"], 1)
            for r in ref
            for n in timings
        }
        print(
            json.dumps(
                {
                    "machine": {
                        "python": platform.python_version(),
                        "cpus": os.cpu_count(),
                        "load": os.getloadavg(),
                    },
                    "setup": notes,
                    "list_memory_mib": args.memory_mib,
                    "database": "postgresql" if cluster is not None else "sqlite",
                    "answers": sizes,
                    "reference_shape": {
                        k: {"studies": v[0], "series": v[1]} for k, v in shape.items()
                    },
                    "results": results,
                    "ratios_reference_p50_over_node_p50": ratios,
                },
                indent=1,
            )
        )
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        orthanc.stop()
        if cluster is not None:
            cluster.stop()


def _patient_id(manifest: dict[str, Any]) -> str:
    """The generated patient with the most studies (the only one here)."""
    patients = manifest.get("patients")
    if isinstance(patients, list) and patients:
        best = max(patients, key=lambda p: len(p.get("studies", [])))
        return str(best["id"])
    raise SystemExit("manifest.json: no patients")


if __name__ == "__main__":
    main()
