"""Node A's CPU time per metadata list request, against a trivial authenticated read of the
same node in the same run.

    python bench/list_cpu.py [--data DIR] [--requests 400] [--clients 50]

1. Uses the demo's data folder (``--data``, made by ``ncp demo --setup-only`` the first time:
   8 patients, one with 300 studies, their reports; A's index in SQLite, the folder archive).
2. Runs node A alone as ``ncp serve`` of the demo's config (free ports, a copy of the config next
   to it) and, as country B (the demo's ``test_peer``: B's client certificate and signing key),
   signs one HP assertion and one TRC per patient (what a portal session reuses).
3. Measures the CPU time of A's processes (``/proc``: user + system of every process of its
   session) over ``--requests`` requests of each kind, after a warm-up round:

   - ``organization``: ``GET /fhir/Organization/{custodian}``: the reference, the same mutual
     TLS, HP assertion, TRC and audit record, no list (what every patient-level request costs);
   - ``list_1``: ``GET /fhir/DocumentReference?patient.identifier=...&_count=1000``, the demo's
     patients in turn, one request at a time (``pair_load.py``'s list);
   - ``list_n``: the same from ``--clients`` concurrent clients, each on its own connection;
   - ``organization_n``: the reference from ``--clients`` concurrent clients.

Prints one JSON object: per kind, CPU ms per request, wall p50/p95 ms, requests and statuses;
the list's CPU minus the reference's (what the list itself costs); the load average at start
and end. The machine is shared: CPU time per request is the figure to compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from list_bench import (
    b_pair,  # from bench/ itself (sys.path[0]): B's pair as A's list bench signs it
)
from sqlalchemy import func, select

from ncp.config import load_settings
from ncp.fhir.identifiers import patient_system
from ncp.fhir.manifest import Custodian
from ncp.security import pki
from ncp.security.claims import PatientRef
from ncp.store.db import make_engine, session_factory
from ncp.store.models import Patient, Study

TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_cpu(sid: int) -> float:
    """User + system seconds of every live process of session ``sid`` (``ncp serve`` and any
    child it starts)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:  # field 6 of stat: session id
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def node_config(data: Path) -> Path:
    """A copy of the demo's country A config on free ports, beside the original (its relative
    paths stay right)."""
    original = data / "country-a" / "node.toml"
    text = original.read_text(encoding="utf-8")
    ports: dict[str, str] = {}

    def repl(match: re.Match[str]) -> str:
        old = match.group(0)
        ports.setdefault(old, str(_free_port()))
        return ports[old]

    text = re.sub(r"(?<=:)\d{2,5}(?=/)|(?<=_port = )\d+", repl, text)
    copy = original.with_name("list-cpu.toml")
    copy.write_text(text, encoding="utf-8")
    return copy


def patients(database_url: str) -> list[tuple[str, str, int]]:
    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as session:
            rows = session.execute(
                select(Patient.patient_id, Patient.issuer, func.count(Study.id))
                .join(Study, Study.patient_pk == Patient.id)
                .group_by(Patient.id, Patient.patient_id, Patient.issuer)
                .order_by(func.count(Study.id).desc())
            ).all()
    finally:
        engine.dispose()
    return [(pid, issuer, int(n)) for pid, issuer, n in rows if issuer]


Request = tuple[str, dict[str, str], dict[str, str]]
"""url, query parameters, headers"""


async def drive(
    requests: list[Request], context: ssl.SSLContext, clients: int
) -> tuple[list[float], Counter[int]]:
    """Send ``requests`` from ``clients`` concurrent clients (one connection each); the wall
    time of each, until the last byte of its answer."""
    times: list[float] = []
    statuses: Counter[int] = Counter()
    todo = iter(requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(verify=context, timeout=120, limits=limits) as http:

        async def client() -> None:
            for url, params, headers in todo:
                started = time.perf_counter()
                try:
                    answer = await http.get(url, params=params, headers=headers)
                    statuses[answer.status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1
                times.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(clients)))
    return times, statuses


def settle(sid: int, *, most: float = 90.0) -> float:
    """Wait until the node is idle (its start-up work, such as the folder gateway's catalogue,
    is done): a second in which it used under 20 ms of CPU. Returns that second's CPU."""
    deadline = time.monotonic() + most
    while True:
        before = session_cpu(sid)
        time.sleep(1.0)
        used = session_cpu(sid) - before
        if used < 0.02 or time.monotonic() > deadline:
            return used


def measure(
    sid: int, requests: list[Request], context: ssl.SSLContext, clients: int
) -> dict[str, Any]:
    asyncio.run(drive(requests[: max(clients, 10)], context, clients))  # warm: connections
    before = session_cpu(sid)
    started = time.perf_counter()
    times, statuses = asyncio.run(drive(requests, context, clients))
    wall = time.perf_counter() - started
    cpu = session_cpu(sid) - before
    ordered = sorted(times)
    return {
        "requests": len(times),
        "statuses": {str(k): v for k, v in statuses.items()},
        "cpu_ms_per_request": round(cpu * 1000 / len(times), 2),
        "per_second": round(len(times) / wall, 1),
        "wall_p50_ms": round(statistics.median(ordered), 1),
        "wall_p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data/pair"))
    parser.add_argument("--requests", type=int, default=400, help="requests of each kind")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients of *_n")
    parser.add_argument("--no-concurrent", action="store_true", help="one at a time only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    data = args.data.resolve()
    if not (data / "country-a" / "node.toml").is_file():
        subprocess.run(
            [sys.executable, "-m", "ncp", "demo", "--setup-only", "--data", str(data)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    config = node_config(data)
    settings = load_settings(config)
    keys_b = data / "country-b" / "keys"
    base = settings.urls.standard
    load_start = os.getloadavg()
    log = (data / "list-cpu.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ncp", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        context = ssl.create_default_context(cafile=str(data / "country-a" / "keys" / pki.CA_CERT))
        context.load_cert_chain(keys_b / pki.CLIENT_CERT, keys_b / pki.CLIENT_KEY)
        with httpx.Client(verify=context, timeout=10) as probe:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"ncp serve exited with {proc.returncode}")
                try:
                    if probe.get(f"{base}/metadata").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("ncp serve did not answer in 120 s")
                time.sleep(0.3)
        lists: list[Request] = []
        reads: list[Request] = []
        custodian = Custodian.from_settings(settings).resource_id
        found = patients(settings.database.url)
        for pid, issuer, _n in found:
            system = patient_system(issuer)
            hp, trc = b_pair(keys_b, base, PatientRef(system, pid))
            headers = {
                "Authorization": f"Bearer {hp}",
                "NCP-Treatment-Relationship": trc,
                "Accept": "application/fhir+json",
            }
            query = {"patient.identifier": f"{system}|{pid}", "_count": "1000"}
            lists.append((f"{base}/DocumentReference", query, headers))
            reads.append((f"{base}/Organization/{custodian}", {}, headers))
        lists = [lists[i % len(lists)] for i in range(args.requests)]
        reads = [reads[i % len(reads)] for i in range(args.requests)]
        results: dict[str, Any] = {"idle_cpu_s_per_s": settle(proc.pid)}
        results["organization"] = measure(proc.pid, reads, context, 1)
        results["list_1"] = measure(proc.pid, lists, context, 1)
        if not args.no_concurrent:
            results["organization_n"] = measure(proc.pid, reads, context, args.clients)
            results["list_n"] = measure(proc.pid, lists, context, args.clients)
        for suffix in ("1", "n"):
            ref = results.get("organization" if suffix == "1" else "organization_n")
            got = results.get(f"list_{suffix}")
            if isinstance(ref, dict) and isinstance(got, dict):
                results[f"list_{suffix}_minus_reference_cpu_ms"] = round(
                    got["cpu_ms_per_request"] - ref["cpu_ms_per_request"], 2
                )
        report = {
            "patients_studies": [n for _p, _i, n in found],
            "clients": args.clients,
            "results": results,
            "machine": {
                "cpus": os.cpu_count(),
                "load_at_start": load_start,
                "load_at_end": os.getloadavg(),
            },
        }
        print(json.dumps(report, indent=1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        config.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
