"""Country B's end-to-end pull against a bare WADO-RS download of the same study, in one run.

    python bench/pull_bench.py [--instances 1000] [--series 4] [--repeat 3] [--only a,b]

Starts Orthanc as A's archive (plain HTTP, and a second one over HTTPS holding the same study for
the TLS reference), generates a CT study (``--instances`` 512x512 16-bit images in ``--series``
series: 525 MB for 1000), and runs country A as an operator does: ``ncp index``, ``ncp serve``
(standard channel with mutual TLS, option A gateway over TLS) and ``ncp edge`` (option C) as
processes. Then, interleaved, the first round a dropped warm-up, medians of ``--repeat``:

- ``bare``: curl retrieving the whole study from Orthanc (WADO-RS, as stored) to a file on disk;
- ``bare_tls``: the same from the HTTPS Orthanc (the reference for the pulls, which cross TLS);
- ``bare_tls_synced``: ``bare_tls`` and the file flushed to disk (fsync) before the clock stops,
  as durable as what the folder store guarantees;
- ``gw_a_curl``: curl retrieving the study through A's gateway over TLS with the image token
  B's peer client gets (untimed), to a file: A's hop alone, without B;
- ``pull_a``: country B's pull in a process of its own (B's node from its config, its peer
  client over mutual TLS), timed from "go" to "stored": B signs the HP's pair, the patient's
  list of ImagingStudy manifests from A's standard channel, the image token
  (``$imaging-access``), WADO-RS through A's gateway, every instance verified against the
  manifest, stored in the folder store (each file flushed to disk and renamed into place),
  recorded and audited;
- ``pull_c``: the same through A's edge gateway (option C);
- ``stow_only``: the study's files sent to a third Orthanc (B's archive) by B's STOW-RS store as
  the pull sends them (batches of 32 instances, 8 a request, 4 requests at once), nothing else:
  what the archive's ingestion costs;
- ``pull_a_stow``: ``pull_a`` into that Orthanc through STOW-RS.

CPU: the machine has few cores, shared with other work, so wall times swing with the load. Each
variant's CPU time is taken per process: the client (curl's, from its rusage; B's process from
"go" to "stored", from its own), A's ``ncp serve`` (``gateway_a``), the edge and each Orthanc
(``/proc/PID/stat`` before and after). What a path costs per byte does not depend on who else
runs, so the pulls are compared with the references on wall time and on CPU time.

Memory: the resident growth of B's process from "go" to "stored" (VmRSS every 10 ms).
Prints one JSON object: seconds, MB/s, ratios to ``bare_tls``, ``bare``, ``bare_tls_synced`` and
``gw_a_curl``; CPU seconds by process, CPU ms per MB and CPU ratios (total, and the client's
alone: B against curl); RSS growth; the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for entry in (str(ROOT), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from byte_path_alternatives import (  # noqa: E402
    free_port,
    sampling,
    stop_processes,
    upload,
    wait_port,
)
from byte_path_alternatives import make_study as byte_path_study  # noqa: E402

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ISSUER = "1.2.40.0.10.1.4.3.1"
PATIENT_ID = "BENCH-1"  # byte_path_alternatives.make_study's
PATIENT_TAGS = {
    "IssuerOfPatientID": ISSUER,
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyTime": "101500",
}
VARIANTS = (
    "bare",
    "bare_tls",
    "bare_tls_synced",
    "gw_a_curl",
    "pull_a",
    "pull_c",
    "stow_only",
    "pull_a_stow",
)
REFERENCES = ("bare", "bare_tls", "bare_tls_synced", "stow_only")


# --- the study ---------------------------------------------------------------------------------


def make_study(
    folder: Path, instances: int, series: int, size: int = 512
) -> tuple[str, list[Path]]:
    """A CT study of ``instances`` 16-bit images in ``series`` series, for A's patient."""
    return byte_path_study(folder, instances, size, series=series, tags=PATIENT_TAGS)


# --- the nodes ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def setup_nodes(work: Path, archive_url: str, ports: dict[str, int]) -> dict[str, Path]:
    """Keys, trust lists and configs of A, A's edge and B (two B configs: folder, STOW-RS)."""
    from ncp.security import pki

    a_keys, b_keys = work / "a" / "keys", work / "b" / "keys"
    pki.init_keys_folder(a_keys, "AT")
    pki.init_keys_folder(b_keys, "BE")
    from cryptography.hazmat.primitives.asymmetric import ec

    from ncp.security.keystore import load_certificates, load_private_key

    ca_key = load_private_key(a_keys / pki.CA_KEY)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    authority = pki.Authority(load_certificates(a_keys / pki.CA_CERT)[0], ca_key)
    edge_key = pki.new_ec_key()
    edge_cert = pki.issue_server_certificate(authority, edge_key.public_key(), "AT")
    (work / "edge").mkdir(parents=True, exist_ok=True)
    pki.write_file(work / "edge" / "server.pem", pki.cert_pem(edge_cert))
    pki.write_private_key(work / "edge" / "server.key", edge_key)

    standard = f"https://localhost:{ports['standard']}/fhir"
    imaging = f"https://localhost:{ports['imaging']}/dicomweb"
    edge = f"https://localhost:{ports['edge']}/dicomweb"
    _write(
        work / "a" / "trust.toml",
        f'format = 1\n[peers.BE]\nstandard = "https://localhost:1/fhir"\n'
        f'tls_ca = "{b_keys / "ca.pem"}"\njwks_file = "{b_keys / "jwks.json"}"\n',
    )
    a = _write(
        work / "a" / "node.toml",
        f"""[node]
country = "AT"
patient_id_issuer = "{ISSUER}"
demo = true  # the bench's keys are the test PKI's (`ncp keys init`)
[urls]
standard = "{standard}"
imaging = "{imaging}"
edge = "{edge}"
[listen]
host = "127.0.0.1"
standard_port = {ports["standard"]}
imaging_port = {ports["imaging"]}
[database]
url = "sqlite:///index.db"
[archive]
kind = "dicomweb"
url = "{archive_url}"
[keys]
dir = "keys"
[trust]
list = "trust.toml"
""",
    )
    edge_cfg = _write(
        work / "edge" / "edge.toml",
        f"""[edge]
country = "AT"
demo = true
audience = "{edge}"
jwks = "{a_keys / "jwks.json"}"
[archive]
kind = "dicomweb"
url = "{archive_url}"
[tls]
certificate = "server.pem"
key = "server.key"
[listen]
host = "127.0.0.1"
port = {ports["edge"]}
[database]
url = "sqlite:///edge-audit.db"
""",
    )
    _write(
        work / "b" / "trust.toml",
        f'format = 1\n[peers.AT]\nstandard = "{standard}"\nimaging = "{imaging}"\n'
        f'tls_ca = "{a_keys / "ca.pem"}"\njwks_file = "{a_keys / "jwks.json"}"\n',
    )
    b_common = """[node]
country = "BE"
patient_id_issuer = "2.16.56.1.1.1"
demo = true
[database]
url = "sqlite:///{db}"
[archive]
kind = "folder"
path = "archive"
[keys]
dir = "keys"
[trust]
list = "trust.toml"
[consumer]
peers = ["AT"]
[retrieval]
poll_s = 0.2
{store}
[retrieval.cli_hp]
id = "BE-HP-BENCH"
name = "Dr. Bench"
organisation = "Bench hospital"
organisation_id = "urn:oid:2.16.56.1.1.1.9"
point_of_care = "Radiology"
"""
    b_folder = _write(
        work / "b" / "node.toml",
        b_common.format(db="node-b.db", store='store = { kind = "folder", path = "retrieved" }'),
    )
    b_stow = _write(
        work / "b" / "node-stow.toml",
        b_common.format(db="node-b-stow.db", store='store = { kind = "stowrs", url = "STOW" }'),
    )
    return {"a": a, "edge": edge_cfg, "b": b_folder, "b_stow": b_stow}


# --- B's side: one pull in a process of its own -------------------------------------------------


def b_pull(args: argparse.Namespace) -> None:
    """Child mode: load B's node, say "ready", wait for a line on stdin, pull, print JSON."""
    from ncp.config import load_settings
    from ncp.consumer.jobs import JobRequest, Requester
    from ncp.consumer.wiring import ClientWiring, StudyFilters, retrieval_env
    from ncp.consumer.worker import Retriever
    from ncp.node import Node
    from ncp.security.claims import PatientRef

    settings = load_settings(Path(args.config))
    node = Node.from_settings(settings)
    wiring = ClientWiring(node)  # B's peer client, as ncp pull uses it
    env = retrieval_env(node, wiring.access)
    hp = settings.retrieval.cli_hp
    assert hp is not None
    patient = PatientRef(f"urn:oid:{ISSUER}", PATIENT_ID)
    print("ready", flush=True)
    sys.stdin.readline()
    pauses = gc_pauses()
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    context = wiring.context("AT", hp, patient, purpose="TREAT", informed=True)
    studies = wiring.studies(context, StudyFilters())
    job = env.jobs.create(
        Requester(hp.id, hp.name, "cli"),
        context,
        JobRequest("AT", patient, tuple(studies), option=args.option),
    )
    t1 = time.perf_counter()
    status = Retriever(env).run_only(job.id)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    view = env.jobs.get(job.id)
    at = {event.status: event.at for event in view.history}
    print(
        json.dumps(
            {
                "status": str(status),
                "seconds": seconds,
                "bytes": view.bytes_done,
                "instances": view.instances_done,
                "reason": view.reason,
                "cpu_user_s": round(r1.ru_utime - r0.ru_utime, 3),
                "cpu_system_s": round(r1.ru_stime - r0.ru_stime, 3),
                # The cyclic garbage collector holds the GIL while it walks the heap.
                "gc_pauses": {"count": len(pauses), "s": round(sum(pauses), 3)},
                # Where the time went: signing and the list, then the job's own phases.
                "phases_s": {
                    "sign_and_list": round(t1 - t0, 3),
                    "downloading": round((at["verifying"] - at["downloading"]).total_seconds(), 3)
                    if "verifying" in at
                    else None,
                    "verifying": round((at["stored"] - at["verifying"]).total_seconds(), 3)
                    if "stored" in at
                    else None,
                },
            }
        ),
        flush=True,
    )
    env.close()
    wiring.close()
    node.close()


def gc_pauses() -> list[float]:
    """The cyclic garbage collector's pauses (seconds) from now on, appended as they end."""
    import gc

    pauses: list[float] = []
    began = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(watch)
    return pauses


def b_token(args: argparse.Namespace) -> None:
    """Child mode: an image access token for the study through B's peer client, as JSON
    (for ``gw_a_curl``: curl through A's gateway with the token a pull would use)."""
    from ncp.config import load_settings
    from ncp.consumer.wiring import ClientWiring, StudyFilters
    from ncp.node import Node
    from ncp.security.claims import PatientRef

    settings = load_settings(Path(args.config))
    node = Node.from_settings(settings)
    wiring = ClientWiring(node)
    hp = settings.retrieval.cli_hp
    assert hp is not None
    patient = PatientRef(f"urn:oid:{ISSUER}", PATIENT_ID)
    context = wiring.context("AT", hp, patient, purpose="TREAT", informed=True)
    studies = list(wiring.studies(context, StudyFilters()))
    grant = wiring.access("AT").imaging_access(context, studies, args.option, "normal")
    print(json.dumps({"token": grant.token, "base": grant.base_url, "studies": studies}))
    wiring.close()
    node.close()


# --- measuring ----------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """The CPU time the run's servers (A's gateway, the edge, the Orthancs) spend, by role,
    between two snapshots: on a machine shared with other work, wall time swings with the load;
    CPU time per byte says what each part of a path costs."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}

    def snapshot(self) -> dict[str, float]:
        out = {}
        for role, pid in self.pids.items():
            with contextlib.suppress(OSError):
                out[role] = cpu_seconds(pid)
        return out

    def since(self, before: dict[str, float]) -> dict[str, float]:
        now = self.snapshot()
        return {role: now[role] - before[role] for role in before if role in now}


def bare(
    url: str,
    target: Path,
    cafile: Path | None,
    *,
    synced: bool = False,
    token: str | None = None,
) -> tuple[float, int, float]:
    """curl's download to ``target``: seconds, bytes, and curl's CPU seconds (with the flush
    of the file, when ``synced``)."""
    cmd = ["curl", "-s", "-f", "-o", str(target), "-w", "%{size_download} %{time_total}"]
    cmd += ["-H", f"Accept: {ACCEPT}"]
    if token is not None:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if cafile is not None:
        cmd += ["--cacert", str(cafile)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"curl failed ({proc.returncode}) on {url}")
    size, seconds = out.split()
    took = float(seconds)
    cpu = usage.ru_utime + usage.ru_stime
    if synced:
        c0 = time.thread_time()
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        cpu += time.thread_time() - c0
        took = time.perf_counter() - t0
    target.unlink()
    return took, int(size), cpu


def stow_only(url: str, files: list[Path], staging: Path) -> tuple[float, float]:
    """B's STOW-RS store alone: copies of the study's files in batches of 32 (as the pull)."""
    from pydicom import dcmread

    from ncp.consumer.localstore import InstanceKey, StowStore, Verified

    staging.mkdir(parents=True, exist_ok=True)
    store = StowStore(url)
    items = []
    for i, path in enumerate(files):
        copy = staging / f"{i}.part"
        shutil.copyfile(path, copy)
        ds = dcmread(path, stop_before_pixels=True)
        key = InstanceKey(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        items.append(Verified(copy, key, path.stat().st_size))
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for start in range(0, len(items), 32):
        store.put(items[start : start + 32])
    took = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    store.close()
    return took, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def pull(config: Path, option: str, log: Path) -> tuple[dict[str, Any], float]:
    """One pull by B in a process of its own: its JSON summary, and its memory growth (MB)."""
    cmd = [sys.executable, str(BENCH / "pull_bench.py"), "b", "--config", str(config)]
    cmd += ["--option", option]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"B did not start: {line!r}; see {log}")
    with sampling([proc.pid]) as mem:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
    proc.wait(60)
    return result, mem["growth_kb"] / 1024


def token_for(config: Path, option: str) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "pull_bench.py"), "token", "--config", str(config)]
    done = subprocess.run(
        [*cmd, "--option", option], cwd=ROOT, capture_output=True, text=True, check=True
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def run(args: argparse.Namespace) -> None:
    from tests.support.orthanc import OrthancServer, OrthancUnavailable

    chosen = args.only.split(",") if args.only else VARIANTS
    wanted = [v for v in VARIANTS if v in chosen or v in REFERENCES]
    work = Path(tempfile.mkdtemp(prefix="ncp-pullbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[Any] = []
    unavailable: dict[str, str] = {}
    try:
        archive = OrthancServer.start()
        servers.append(archive)
        archive_tls = b_archive = None
        try:
            archive_tls = OrthancServer.start(tls=True)
            servers.append(archive_tls)
        except OrthancUnavailable as exc:
            unavailable["bare_tls"] = str(exc)[:600]
        if "pull_a_stow" in wanted or "stow_only" in wanted:
            b_archive = OrthancServer.start()
            servers.append(b_archive)
        t0 = time.monotonic()
        study, files = make_study(work / "study", args.instances, args.series)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        with ThreadPoolExecutor(2) as both:
            jobs = [both.submit(upload, archive.rest_url, files)]
            if archive_tls is not None:
                jobs.append(both.submit(_upload_tls, archive_tls, files))
            for job in jobs:
                job.result()
        ports = {"standard": free_port(), "imaging": free_port(), "edge": free_port()}
        configs = setup_nodes(work, archive.dicomweb_url, ports)
        if b_archive is not None:
            text = configs["b_stow"].read_text().replace("STOW", b_archive.dicomweb_url)
            configs["b_stow"].write_text(text)
        ncp = [sys.executable, "-m", "ncp"]
        subprocess.run(
            [*ncp, "index", "--config", str(configs["a"])],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        setup_s = time.monotonic() - t0
        for kind, config in (("serve", configs["a"]), ("edge", configs["edge"])):
            log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [*ncp, kind, "--config", str(config)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for port in ports.values():
            wait_port(port, timeout=120)
        meter = CpuMeter()
        meter.pids = {"gateway_a": procs[0].pid, "edge": procs[1].pid}
        meter.pids["orthanc"] = archive.process.pid
        if archive_tls is not None:
            meter.pids["orthanc_tls"] = archive_tls.process.pid
        if b_archive is not None:
            meter.pids["orthanc_b"] = b_archive.process.pid
        load_before = os.getloadavg()

        seconds: dict[str, list[float]] = {v: [] for v in wanted}
        cpu: dict[str, list[dict[str, float]]] = {v: [] for v in wanted}
        rss: dict[str, list[float]] = {v: [] for v in wanted if v not in REFERENCES}
        failures: dict[str, str] = {}
        phases: dict[str, list[dict[str, float]]] = {}
        gc_pauses_s: dict[str, list[float]] = {}
        for round_no in range(args.repeat + 1):
            for name in wanted:
                if name in unavailable or name in failures:
                    continue
                token = None
                if name == "gw_a_curl":  # untimed: the token a pull would use
                    token = token_for(configs["b"], "A")
                if name.startswith("pull_"):  # untimed: the last round's study goes
                    shutil.rmtree(work / "b" / "retrieved" / study, ignore_errors=True)
                    if name.endswith("_stow"):
                        assert b_archive is not None
                        b_archive.clear()
                if name == "stow_only":
                    assert b_archive is not None
                    b_archive.clear()
                before = meter.snapshot()
                if name == "bare":
                    url = f"{archive.dicomweb_url}/studies/{study}"
                    took, _, client = bare(url, work / "x", None)
                elif name in ("bare_tls", "bare_tls_synced"):
                    assert archive_tls is not None
                    url = f"{archive_tls.dicomweb_url}/studies/{study}"
                    synced = name.endswith("_synced")
                    took, _, client = bare(url, work / "x", archive_tls.ca_file, synced=synced)
                elif name == "gw_a_curl":
                    assert token is not None
                    url = f"{token['base']}/studies/{study}"
                    ca = work / "a" / "keys" / "ca.pem"
                    took, _, client = bare(url, work / "x", ca, token=token["token"])
                elif name == "stow_only":
                    assert b_archive is not None
                    took, client = stow_only(b_archive.dicomweb_url, files, work / "stow-staging")
                else:
                    config = configs["b_stow" if name.endswith("_stow") else "b"]
                    option = "C" if name == "pull_c" else "A"
                    result, grew = pull(config, option, work / f"{name}.log")
                    if result["status"] != "stored" or result["instances"] != len(files):
                        failures[name] = json.dumps(result)
                        continue
                    took = result["seconds"]
                    client = result["cpu_user_s"] + result["cpu_system_s"]
                    if round_no:
                        rss[name].append(grew)
                        phases.setdefault(name, []).append(result["phases_s"])
                        gc_pauses_s.setdefault(name, []).append(result["gc_pauses"]["s"])
                servers_cpu = meter.since(before)
                if round_no:
                    seconds[name].append(took)
                    used = {"client": client, **{k: v for k, v in servers_cpu.items() if v > 0}}
                    cpu[name].append(used)
        load_after = os.getloadavg()
        medians = {k: statistics.median(v) for k, v in seconds.items() if v}
        cpu_medians = {k: _median_roles(v) for k, v in cpu.items() if v}
        report: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_before": [round(x, 1) for x in load_before],
                "load_average_after": [round(x, 1) for x in load_after],
            },
            "study": {
                "instances": len(files),
                "series": args.series,
                "mb": round(size_mb, 1),
                "setup_s": round(setup_s, 1),
            },
            "repeat": args.repeat,
            "seconds": {k: round(v, 2) for k, v in medians.items()},
            "throughput_mb_s": {k: round(size_mb / v) for k, v in medians.items()},
        }
        pulls = {k: v for k, v in medians.items() if k.startswith("pull_") or k == "gw_a_curl"}
        for ref in ("bare", "bare_tls", "bare_tls_synced", "gw_a_curl"):
            if ref in medians:
                report[f"ratio_to_{ref}"] = {
                    k: round(v / medians[ref], 2) for k, v in pulls.items() if k != ref
                }
        if "stow_only" in medians and "pull_a_stow" in medians:
            report["pull_a_stow_to_stow_only"] = round(
                medians["pull_a_stow"] / medians["stow_only"], 2
            )
        # CPU: seconds by process (client: curl, or B's process from "go" to "stored"), their
        # total per MB, and the totals against the references'.
        report["cpu_s"] = {
            k: {r: round(x, 2) for r, x in v.items()} for k, v in cpu_medians.items()
        }
        report["cpu_ms_per_mb"] = {
            k: round(v["total"] * 1000 / size_mb, 2) for k, v in cpu_medians.items()
        }
        for ref in ("bare_tls", "bare_tls_synced", "gw_a_curl"):
            if ref in cpu_medians:
                total = cpu_medians[ref]["total"]
                client = cpu_medians[ref]["client"]
                report[f"cpu_ratio_to_{ref}"] = {
                    k: {
                        "total": round(v["total"] / total, 2),
                        "client": round(v["client"] / client, 2),
                    }
                    for k, v in cpu_medians.items()
                    if k != ref and (k.startswith("pull_") or k == "gw_a_curl")
                }
        report["rss_growth_mb_max"] = {k: round(max(v), 1) for k, v in rss.items() if v}
        report["pull_phases_s"] = phases
        report["b_gc_pauses_s"] = {k: round(max(v), 3) for k, v in gc_pauses_s.items()}
        if failures:
            report["failures"] = failures
        if unavailable:
            report["unavailable"] = unavailable
        print(json.dumps(report, indent=2))
    finally:
        stop_processes(procs)
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _median_roles(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per role, the median of the rounds' CPU seconds; ``total``: the median of their sums."""
    roles = {role for used in rounds for role in used}
    out = {role: statistics.median(used.get(role, 0.0) for used in rounds) for role in roles}
    out["total"] = statistics.median(sum(used.values()) for used in rounds)
    return out


def _upload_tls(server: Any, files: list[Path]) -> None:
    server.upload(files)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    child = sub.add_parser("b", help="(internal) B's side of one pull")
    child.add_argument("--config", required=True)
    child.add_argument("--option", choices=["A", "C"], default="A")
    tok = sub.add_parser("token", help="(internal) an image token through B's peer client")
    tok.add_argument("--config", required=True)
    tok.add_argument("--option", choices=["A", "C"], default="A")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variants (bare ones always)")
    args = parser.parse_args()
    if args.mode == "b":
        b_pull(args)
    elif args.mode == "token":
        b_token(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
