"""Load test of the A/B pair: 50 concurrent list requests and 4 concurrent pulls for 60 s.

```sh
python bench/pair_load.py [--data DIR] [--duration 60] [--lists 50] [--pulls 4] [--reference 10]
```

Runs ``ncp demo`` (the pair on loopback: node A, A's edge gateway, node B with its portal and
retrieval workers) as a subprocess on the demo's data folder (``--data``, default
``bench-data/pair``, generated the first time) and drives it as country B does:

- **lists**: ``--lists`` concurrent clients, each asking A's standard channel for the whole
  metadata list (``GET /fhir/DocumentReference``, every entry in one page) of a patient, the
  demo's patients in turn, over mutual TLS with B's certificate, an HP assertion and a TRC that
  B's signer made for that patient (signed once per patient: what a portal session reuses);
  each request timed from sending to the last byte of the answer;
- **pulls**: ``--pulls`` retrieval jobs kept under way on node B (each one study of the patient
  with the most studies, options A and C in turn), run by node B's own workers; as each ends,
  its study is removed from B's store so that a later job fetches it again.

Reported: requests, errors, p50/p95/p99 of the lists (all, and split by list size), pulls
done, failed, MB/s, and the machine's load average before and after. The reference, measured in
the same run: the same list requests one at a time with nothing else running (``--reference``
seconds). The goal (issue 18): no errors, p95 of the list under 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from list_cpu import patients as indexed_patients  # from bench/ itself (sys.path[0])

from ncp.config import load_settings
from ncp.consumer.jobs import JobRequest, Requester, Status
from ncp.consumer.results import ListFilters
from ncp.consumer.wiring import ClientWiring, retrieval_env
from ncp.demo import READY_LINE
from ncp.node import Node
from ncp.security.claims import PatientRef

GOAL_P95_MS = 200.0
HP = Requester("BE-BENCH-HP", "Dr. Bench (load test)", "cli")


@dataclass
class Sample:
    ms: float
    status: int
    entries: int
    error: str = ""
    """What the client raised when there was no answer (status 0)."""


@dataclass
class PatientList:
    ref: PatientRef
    studies: int
    headers: dict[str, str]


@dataclass
class Pulls:
    done: int = 0
    failed: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    most_running: int = 0


def start_demo(data: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    argv = [sys.executable, "-m", "ncp", "demo", "--data", str(data), "--base-port", "0"]
    proc = subprocess.Popen(
        [*argv, "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    deadline = time.monotonic() + 900  # the first run generates the demo's data
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            continue
        if line is None:
            raise SystemExit("ncp demo stopped:\n" + "\n".join(seen[-30:]))
        seen.append(line)
        if line.startswith(READY_LINE):
            print(f"  {line}", flush=True)
            demo: dict[str, Any] = json.loads((data / "demo.json").read_text(encoding="utf-8"))
            return proc, demo
    proc.kill()
    raise SystemExit("ncp demo was not ready in 15 minutes")


def stop_demo(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def patients(demo: dict[str, Any]) -> list[tuple[PatientRef, int]]:
    """Every patient of A's index with its number of studies, most first."""
    a = load_settings(Path(demo["nodes"]["AT"]["config"]))
    system = demo["patient"]["system"]
    return [(PatientRef(system, pid), n) for pid, _issuer, n in indexed_patients(a.database.url)]


def list_context(demo: dict[str, Any]) -> ssl.SSLContext:
    peer = demo["test_peer"]
    context = ssl.create_default_context(cafile=peer["trust_anchor"])
    context.load_cert_chain(peer["client_certificate"], peer["client_key"])
    return context


async def list_load(
    url: str,
    lists: list[PatientList],
    context: ssl.SSLContext,
    *,
    clients: int,
    seconds: float,
) -> list[Sample]:
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        verify=context, timeout=60, limits=limits, trust_env=False
    ) as http:
        deadline = time.monotonic() + seconds

        async def one_client(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                patient = lists[i % len(lists)]
                i += 1
                started = time.perf_counter()
                try:
                    answer = await http.get(
                        url,
                        params={
                            "patient.identifier": f"{patient.ref.system}|{patient.ref.value}",
                            "_count": "1000",
                        },
                        headers=patient.headers,
                    )
                    body = answer.content
                    status = answer.status_code
                except httpx.HTTPError as exc:
                    body, status, error = b"", 0, f"{type(exc).__name__}: {exc}"
                else:
                    error = ""
                ms = (time.perf_counter() - started) * 1000
                samples.append(Sample(ms, status, patient.studies if body else 0, error))

        await asyncio.gather(*(one_client(n) for n in range(clients)))
    return samples


def pull_load(
    env: Any,
    context: Any,
    patient: PatientRef,
    studies: list[str],
    store: Path,
    *,
    concurrent: int,
    stop: threading.Event,
) -> Pulls:
    """Keep ``concurrent`` jobs under way on node B until ``stop``; count what they did."""
    pulls = Pulls()
    running: dict[str, tuple[str, float]] = {}
    turn = 0
    while not stop.is_set() or running:
        while not stop.is_set() and len(running) < concurrent:
            study = studies[turn % len(studies)]
            option = "A" if turn % 2 == 0 else "C"
            turn += 1
            job = env.jobs.create(HP, context, JobRequest("AT", patient, (study,), option=option))
            running[job.id] = (study, time.monotonic())
        pulls.most_running = max(
            pulls.most_running,
            sum(1 for j in running if env.jobs.get(j).status in ("downloading", "verifying")),
        )
        for job_id, (study, began) in list(running.items()):
            view = env.jobs.get(job_id)
            if not view.ended:
                continue
            del running[job_id]
            if view.status == Status.STORED:
                pulls.done += 1
                pulls.bytes += view.bytes_done
                pulls.seconds.append(time.monotonic() - began)
            else:
                pulls.failed.append(f"{view.status}: {view.reason}")
            shutil.rmtree(store / study, ignore_errors=True)  # fetched again next time
        time.sleep(0.1)
    return pulls


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p95": round(at(0.95), 1),
        "p99": round(at(0.99), 1),
        "max": round(ordered[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data/pair"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--lists", type=int, default=50, help="concurrent list clients")
    parser.add_argument("--pulls", type=int, default=4, help="concurrent pulls")
    parser.add_argument(
        "--reference", type=float, default=10.0, help="seconds of one-at-a-time lists first"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    cpus = os.cpu_count()
    print(f"pair load test: {args.lists} list clients, {args.pulls} pulls, {args.duration:.0f} s")
    print(f"machine: {cpus} CPUs, load average before start {os.getloadavg()}", flush=True)
    proc, demo = start_demo(args.data)
    node = wiring = env = None
    try:
        b = load_settings(Path(demo["nodes"]["BE"]["config"]))
        node = Node.from_settings(b)
        wiring = ClientWiring(node)
        env = retrieval_env(node, wiring.access)
        hp = b.retrieval.cli_hp
        assert hp is not None
        lists = []
        for ref, count in patients(demo):
            ctx = wiring.context("AT", hp, ref, purpose="TREAT", informed=True)
            headers = {
                "Authorization": f"Bearer {ctx.hp_assertion}",
                "NCP-Treatment-Relationship": ctx.trc,
                "Accept": "application/fhir+json",
            }
            lists.append(PatientList(ref, count, headers))
        url = demo["nodes"]["AT"]["urls"]["standard"] + "/DocumentReference"
        context = list_context(demo)
        print(f"patients: {[p.studies for p in lists]} studies each", flush=True)

        load_ref = os.getloadavg()
        reference = asyncio.run(list_load(url, lists, context, clients=1, seconds=args.reference))
        print(f"reference (one at a time, nothing else): {percentiles([s.ms for s in reference])}")

        top = lists[0]
        pull_context = wiring.context("AT", hp, top.ref, purpose="TREAT", informed=True)
        listed = wiring.client.metadata_list(pull_context, ListFilters())
        studies = [s.study_uid for s in listed.studies]
        store = Path(demo["nodes"]["BE"]["store"])
        stop = threading.Event()
        result: dict[str, Pulls] = {}

        def pull() -> None:
            result["pulls"] = pull_load(
                env, pull_context, top.ref, studies, store, concurrent=args.pulls, stop=stop
            )

        puller = threading.Thread(target=pull, daemon=True)
        load_before = os.getloadavg()
        began = time.monotonic()
        puller.start()
        samples = asyncio.run(
            list_load(url, lists, context, clients=args.lists, seconds=args.duration)
        )
        stop.set()
        puller.join(300)
        elapsed = time.monotonic() - began
        load_after = os.getloadavg()
        pulls = result.get("pulls", Pulls(failed=["the pull thread did not finish"]))
    finally:
        if env is not None:
            env.close()
        if wiring is not None:
            wiring.close()
        if node is not None:
            node.close()
        stop_demo(proc)

    statuses = Counter(s.status for s in samples)
    ok = [s.ms for s in samples if s.status == 200]
    small = [s.ms for s in samples if s.status == 200 and s.entries < 50]
    big = [s.ms for s in samples if s.status == 200 and s.entries >= 50]
    loaded = percentiles(ok)
    reference_p = percentiles([s.ms for s in reference if s.status == 200])
    errors = sum(n for status, n in statuses.items() if status != 200) + len(pulls.failed)
    mb = pulls.bytes / 1e6
    report = {
        "lists": {
            "clients": args.lists,
            "requests": len(samples),
            "per_second": round(len(samples) / args.duration, 1),
            "statuses": {str(k): v for k, v in statuses.items()},
            "errors": dict(Counter(s.error[:200] for s in samples if s.error)),
            "all_ms": loaded,
            "small_lists_ms": percentiles(small),
            "big_list_ms": percentiles(big),
            "reference_ms": reference_p,
            "p95_ratio_to_reference": round(loaded["p95"] / reference_p["p95"], 1)
            if loaded and reference_p
            else None,
        },
        "pulls": {
            "concurrent": args.pulls,
            "most_running_at_once": pulls.most_running,
            "done": pulls.done,
            "failed": pulls.failed[:10],
            "mb": round(mb, 1),
            "mb_per_s": round(mb / elapsed, 2) if elapsed else None,
            "seconds": percentiles(pulls.seconds),
        },
        "machine": {
            "cpus": cpus,
            "load_before_reference": load_ref,
            "load_at_start": load_before,
            "load_at_end": load_after,
        },
        "goal": {
            "no_errors": errors == 0,
            "p95_under_200_ms": bool(loaded) and loaded["p95"] < GOAL_P95_MS,
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    met = report["goal"]["no_errors"] and report["goal"]["p95_under_200_ms"]
    print("goal met" if met else "goal NOT met (see above; compare the machine's load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
