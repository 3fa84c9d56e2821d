"""Country B's peer client reading a long list, against a bare HTTPS GET of the same pages, in
the same run.

    python bench/peer_client_bench.py [--studies 1000] [--repeat 15]

1. Writes one-instance studies for patient PAT100 beside the two of the test dataset of
   ``tests/support/node.py`` (``--studies`` in all: at most 1,000, one page) and starts that node
   A (mutual TLS, index built from the folder).
2. Builds country B's node beside it (``tests/support/country_b.py``: B's keys, a trust list naming
   A, SQLite for B's audit chain) and signs one HP assertion and one TRC.
3. Times, ``--repeat`` times each, interleaved, one page of up to 1,000 entries:

   - ``bare_documentreference``: ``GET /fhir/DocumentReference?patient.identifier=...&_count=1000``
     with httpx over a kept-alive mutual TLS connection, the body parsed with ``json.loads``;
   - ``client_documentreference``: ``PeerClient.metadata_list`` of the same list: the same request,
     then A's answer read into typed results (every entry checked: patient, UIDs) and B's audit
     record written;
   - the same pair for ``ImagingStudy`` (manifests with series and instances).

Prints one JSON object: p50/p95 wall time (ms) of each and the p50 CPU time of B's thread
(node A serves from other threads of the same process), and the ratios client/bare of both. What
the ratios show is the cost of B's reading and audit beyond the transfer and JSON parse: it adds
to the time the portal needs to show a list after the HP asks. On a loaded machine the CPU ratio
is the steadier figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test node and B's test node

from ncp.consumer.peer import PeerClient  # noqa: E402
from ncp.consumer.queries import patient_parameter  # noqa: E402
from tests.support.country_b import HP, b_node  # noqa: E402
from tests.support.dicom_factory import make_instance, write_instance  # noqa: E402
from tests.support.node import ISSUER, PATIENTS, A, running_node  # noqa: E402


def write_studies(archive: Path, count: int) -> None:
    patient = PATIENTS["PAT100"]
    for n in range(count):
        study = f"1.2.826.0.1.3680043.10.544.{n + 1}"
        series = f"{study}.1"
        ds = make_instance(
            patient_id=patient.patient_id,
            study_uid=study,
            series_uid=series,
            sop_uid=f"{series}.1",
            pixels=False,
            PatientName=f"{patient.family}^{patient.given}",
            PatientBirthDate="19800517",
            PatientSex="F",
            IssuerOfPatientID=ISSUER,
            Modality=("CT", "MR", "CR", "US")[n % 4],
            StudyDate=f"{2000 + n % 25}{1 + n % 12:02d}{1 + n % 28:02d}",
            AccessionNumber=f"B{n}",
            StudyDescription=f"Study {n}",
        )
        write_instance(archive / "PAT100" / f"bench-{n}.dcm", ds)


def timed(run: Callable[[], Any]) -> tuple[float, float]:
    """Wall time, and CPU time of this thread only (node A runs in other threads of this
    process: this is B's own work, which other load on the machine does not inflate)."""
    # The collector runs before, not during: otherwise one case pays for another's garbage.
    gc.collect()
    gc.disable()
    try:
        started, cpu = time.perf_counter(), time.thread_time()
        run()
        return (time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000
    finally:
        gc.enable()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not 2 < args.studies <= 1000:
            parser.error("--studies: 3 to 1000 (one page of the list)")
        write_studies(root / "a" / "archive", args.studies - 2)
        with running_node(root / "a") as node_a:
            b = b_node(root / "b", node_a)
            client = PeerClient.from_node(b)
            hp = client.hp_assertion(A, HP)
            context = client.confirm(A, hp, PATIENTS["PAT100"].ref, purpose="TREAT", informed=True)
            tls = ssl.create_default_context(cafile=node_a.ca_file)
            tls.load_cert_chain(node_a.b.keys_dir / "client.pem", node_a.b.keys_dir / "client.key")
            bare = httpx.Client(verify=tls, timeout=60, trust_env=False)
            headers = {
                "Authorization": f"Bearer {context.hp_assertion}",
                "NCP-Treatment-Relationship": context.trc,
                "Accept": "application/fhir+json",
            }
            params = [patient_parameter(context.patient), ("_count", "1000")]
            entries: dict[str, int] = {}

            def bare_get(rtype: str) -> None:
                answer = bare.get(f"{node_a.url}/{rtype}", params=params, headers=headers)
                answer.raise_for_status()
                entries[rtype] = len(json.loads(answer.content).get("entry", []))

            cases: dict[str, Callable[[], Any]] = {
                "bare_documentreference": lambda: bare_get("DocumentReference"),
                "client_documentreference": lambda: client.metadata_list(context),
                "bare_imagingstudy": lambda: bare_get("ImagingStudy"),
                "client_imagingstudy": lambda: client.imaging_studies(context),
            }
            for run in cases.values():  # warm: A renders and keeps its list entries
                run()
            samples: dict[str, list[float]] = {name: [] for name in cases}
            cpu: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.repeat):
                for name, run in cases.items():
                    wall, used = timed(run)
                    samples[name].append(wall)
                    cpu[name].append(used)
            listed = client.metadata_list(context)
            bare.close()
            client.close()
            b.close()
    result: dict[str, Any] = {
        "studies": args.studies,
        "entries": {**entries, "typed_studies": len(listed.studies)},
        "repeat": args.repeat,
        "machine": f"{platform.machine()} {platform.python_version()}",
        **{
            name: {**summary(values), "b_cpu_p50_ms": round(statistics.median(cpu[name]), 2)}
            for name, values in samples.items()
        },
    }
    for kind in ("documentreference", "imagingstudy"):
        client_case, bare_case = result[f"client_{kind}"], result[f"bare_{kind}"]
        result[f"ratio_{kind}"] = round(client_case["p50_ms"] / bare_case["p50_ms"], 2)
        result[f"cpu_ratio_{kind}"] = round(
            client_case["b_cpu_p50_ms"] / bare_case["b_cpu_p50_ms"], 2
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
