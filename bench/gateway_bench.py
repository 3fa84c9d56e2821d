"""The real imaging gateways against Orthanc direct, in one run.

    python bench/gateway_bench.py [--instances 1000] [--repeat 3] [--only a,b]

Starts one Orthanc, generates a CT study (1000 x 512x512 16-bit: 525 MB; see
``byte_path_alternatives.make_study``), stores it in Orthanc and as a folder, and signs an image
access token for it. Each gateway runs in its own process (``serve_gateway.py``: the server
that the node and ``ncp edge`` run), and curl retrieves the whole study (``Accept:
multipart/related; type="application/dicom"``, bearer token) through each, interleaved with
Orthanc direct; the first round is a dropped warm-up, then medians of ``--repeat``:

- ``direct``: Orthanc itself (plain HTTP, the reference);
- ``direct_tls``: a second Orthanc over HTTPS (``OrthancServer.start(tls=True)``, curl with its
  CA) holding the same study, the reference for the TLS variants: Orthanc cannot serve HTTP and
  HTTPS at once, and two Orthancs cannot share one SQLite index, so the study is uploaded to both;
- ``gw_a``: option A as ``ncp serve`` runs it: ``build_gateway_app`` with its default byte
  mover, the node's index for the study's instances (``ncp.gateway.studyindex.NodeIndex``, the
  study indexed from its files beforehand) and uvicorn ``http=RelayH11Protocol``
  (docs/decisions/0006-imaging-byte-path.md), plain HTTP; ``gw_a_tls``: the same over HTTPS
  (the imaging channel as deployed);
- ``gw_a_asgi``: ``gw_a`` under uvicorn's plain h11 protocol (the mover sends ASGI messages);
- ``gw_a_listing``: ``gw_a`` without the index (the study's instances listed by Orthanc);
- ``gw_a_nosplice``: ``gw_a`` with the mover's ``splice=False`` (part bodies read and written,
  not moved by ``os.splice``);
- ``edge_tls``: ``ncp edge``'s app (``build_edge_app``) over HTTPS as ``run_edge`` serves it
  (it has no index: it lists the study's instances at its archive);
- ``gw_a_folder`` (+ ``_tls``): option A over the folder archive (files sent by ``sendfile``).

Also: resident memory growth of each gateway process while streaming (VmRSS sampled every 10 ms),
and the latency a QIDO-RS search (``/studies?StudyInstanceUID=``) gains through the gateway
(token check, exact filtering, audit), p50 of 50 on a kept-alive connection.
Prints one JSON object: ``ratio_to_direct`` for every variant, and ``ratio_to_direct_tls`` for
the ``_tls`` ones (both references are always measured); alternatives that cannot be built are
reported with the reason.
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for entry in (str(ROOT), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from byte_path_alternatives import (  # noqa: E402
    curl_args,
    free_port,
    make_study,
    make_tls,
    qido_p50,
    sampling,
    stop_processes,
    upload,
    wait_port,
)

COUNTRY = "AT"
PATIENT_ID_ISSUER = "1.2.40.0.10.1.4.3.1"
"""As ``serve_gateway.py`` configures its archive: the study's Patient ID carries no issuer."""
PATIENT_SYSTEM = f"urn:oid:{PATIENT_ID_ISSUER}"
PATIENT_ID = "BENCH-1"
REFERENCES = ("direct", "direct_tls")
VARIANTS = (
    *REFERENCES,
    "gw_a",
    "gw_a_tls",
    "gw_a_asgi",
    "gw_a_listing",
    "gw_a_nosplice",
    "edge_tls",
    "gw_a_folder",
    "gw_a_folder_tls",
)


# --- measuring ---------------------------------------------------------------------------------


def index_study(database: Path, folder: Path) -> None:
    """The node's index of the study's files, as ``ncp index`` writes it."""
    from ncp.config import FolderArchive
    from ncp.dicom.archive import open_archive
    from ncp.provider.indexer import index_source
    from ncp.store.db import make_engine, migrate, session_factory

    engine = make_engine(f"sqlite:///{database}")
    migrate(engine)
    archive = FolderArchive(kind="folder", path=folder, patient_id_issuer=PATIENT_ID_ISSUER)
    index_source(session_factory(engine), open_archive(archive))
    engine.dispose()


def sign_token(key: Any, audience: str, study: str) -> str:
    from ncp.security.claims import IMAGE_ACCESS, ImageAccess, PatientRef
    from ncp.security.tokens import issue

    now = datetime.now(UTC)
    claims = ImageAccess(
        issuer=COUNTRY,
        audience=audience,
        subject="BE-HP-0042",
        issued_at=now,
        expires_at=now + timedelta(minutes=5),  # the most A allows
        requesting_country="BE",
        patient=PatientRef(PATIENT_SYSTEM, PATIENT_ID),
        studies=(study,),
        purpose_of_use="TREAT",
        priority="routine",
        option="A",
    )
    return issue(IMAGE_ACCESS, claims, key, now=now)


def upload_to(server: Any, paths: list[Path]) -> None:
    """``byte_path_alternatives.upload`` through the server's own client (it trusts its CA)."""

    def one(path: Path) -> None:
        r = server.http.post(
            "/instances", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        r.raise_for_status()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, paths))


def run(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from ncp.security.keys import SigningKey
    from ncp.security.keystore import jwks_document
    from tests.support.orthanc import OrthancServer, OrthancUnavailable

    chosen = args.only.split(",") if args.only else VARIANTS
    wanted = [v for v in VARIANTS if v in chosen or v in REFERENCES]
    work = Path(tempfile.mkdtemp(prefix="ncp-gwbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    unavailable: dict[str, str] = {}
    orthanc = OrthancServer.start()
    orthanc_tls: OrthancServer | None = None
    try:
        try:
            orthanc_tls = OrthancServer.start(tls=True)
        except OrthancUnavailable as e:
            unavailable["direct_tls"] = str(e)[:600]
        t0 = time.monotonic()
        study, files = make_study(work / "study", args.instances)
        with ThreadPoolExecutor(2) as both:
            done = [both.submit(upload, orthanc.rest_url, files)]
            if orthanc_tls is not None:
                done.append(both.submit(upload_to, orthanc_tls, files))
            for future in done:
                future.result()
        setup_s = time.monotonic() - t0
        index = work / "index.db"
        index_study(index, work / "study")
        ca, cert, key = make_tls(work)
        signing = SigningKey("bench-1", ec.generate_private_key(ec.SECP256R1()))
        jwks = work / "jwks.json"
        jwks.write_bytes(jwks_document([(signing.kid, signing.private_key.public_key())]))

        targets: dict[str, dict[str, Any]] = {
            "direct": {
                "url": f"{orthanc.dicomweb_url}/studies/{study}",
                "pids": [],
                "ca": None,
                "audience": None,
                "qido_base": orthanc.dicomweb_url,
            }
        }
        if orthanc_tls is not None:
            targets["direct_tls"] = {
                "url": f"{orthanc_tls.dicomweb_url}/studies/{study}",
                "pids": [],
                "ca": orthanc_tls.ca_file,
                "audience": None,
                "qido_base": orthanc_tls.dicomweb_url,
            }
        for name in wanted:
            if name in REFERENCES:
                continue
            tls = name.endswith("_tls")
            port = free_port()
            scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
            public_base = f"{scheme}://{host}:{port}/dicomweb"
            cmd = [sys.executable, str(BENCH / "serve_gateway.py"), "--port", str(port)]
            cmd += ["--kind", "edge" if name.startswith("edge") else "a"]
            cmd += ["--public-base", public_base, "--jwks", str(jwks)]
            cmd += ["--db", str(work / f"{name}.db")]
            if "folder" in name:
                cmd += ["--folder", str(work / "study")]
            else:
                cmd += ["--archive", orthanc.dicomweb_url]
            if name == "gw_a_asgi":
                cmd += ["--asgi"]
            if name == "gw_a_nosplice":
                cmd += ["--no-splice"]
            if name.startswith("gw_a") and name != "gw_a_listing":
                cmd += ["--index", str(index)]
            if tls:
                cmd += ["--cert", str(cert), "--key", str(key)]
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            try:
                wait_port(port, timeout=60)
            except RuntimeError:
                proc.kill()
                tail = (work / f"{name}.log").read_text(errors="replace")[-600:]
                unavailable[name] = f"did not start: {tail}"
                continue
            targets[name] = {
                "url": f"{public_base}/studies/{study}",
                "pids": [proc.pid],
                "ca": ca if tls else None,
                "audience": public_base,
                "qido_base": public_base,
            }

        results: dict[str, dict[str, list[float]]] = {k: {"mbs": [], "rss": []} for k in targets}
        failures: dict[str, str] = {}
        expected = 0
        for round_no in range(args.repeat + 1):
            for name, t in targets.items():
                # A fresh token each time: tokens live 5 minutes at most.
                headers = []
                if t["audience"]:
                    bearer = sign_token(signing, t["audience"], study)
                    headers = [f"Authorization: Bearer {bearer}"]
                cmd = curl_args(t["url"], t["ca"], headers)
                with sampling(t["pids"]) as mem:
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                size, seconds = ([*proc.stdout.split(), "0", "0"])[:2]
                expected = expected or int(size)
                # The gateways build their own multipart (another boundary): near the same size.
                if proc.returncode != 0 or abs(int(size) - expected) > 200_000:
                    failures[name] = (
                        f"curl exit {proc.returncode}, {size} bytes (direct {expected})"
                    )
                    continue
                if round_no:
                    results[name]["mbs"].append(int(size) / float(seconds) / 1e6)
                    results[name]["rss"].append(mem["growth_kb"] / 1024)
        measured = {k: r for k, r in results.items() if r["mbs"]}
        direct = statistics.median(measured["direct"]["mbs"])
        tls_ref = measured.get("direct_tls")
        direct_tls = statistics.median(tls_ref["mbs"]) if tls_ref else None
        report: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_at_end": round(os.getloadavg()[0], 1),
            },
            "study": {"instances": len(files), "setup_s": round(setup_s, 1)},
            "repeat": args.repeat,
            "throughput_mb_s": {k: round(statistics.median(r["mbs"])) for k, r in measured.items()},
            "ratio_to_direct": {
                k: round(statistics.median(r["mbs"]) / direct, 2) for k, r in measured.items()
            },
            "rss_growth_mb_max": {
                k: round(max(r["rss"]), 1) for k, r in measured.items() if k not in REFERENCES
            },
        }
        if direct_tls is not None:
            # The TLS variants against a reference that pays for TLS too (server and curl).
            report["ratio_to_direct_tls"] = {
                k: round(statistics.median(r["mbs"]) / direct_tls, 2)
                for k, r in measured.items()
                if k.endswith("_tls") and k != "direct_tls"
            }
        qido: dict[str, float] = {"direct": qido_p50(orthanc.dicomweb_url, study)}
        if orthanc_tls is not None:
            qido["direct_tls"] = qido_p50(
                orthanc_tls.dicomweb_url, study, verify=orthanc_tls.verify
            )
        for name in ("gw_a", "gw_a_tls", "edge_tls"):
            t = targets.get(name)
            if t is None:
                continue
            verify: Any = str(t["ca"]) if t["ca"] else True
            headers = {"Authorization": f"Bearer {sign_token(signing, t['audience'], study)}"}
            qido[name] = qido_p50(t["qido_base"], study, verify=verify, headers=headers)
        report["qido_p50_ms"] = {k: round(v, 2) for k, v in qido.items()}
        report["qido_added_ms"] = {
            k: round(v - qido["direct"], 2) for k, v in qido.items() if k != "direct"
        }
        if failures:
            report["failures"] = failures
        if unavailable:
            report["unavailable"] = unavailable
        print(json.dumps(report, indent=2))
    finally:
        stop_processes(procs)
        orthanc.stop()
        if orthanc_tls is not None:
            orthanc_tls.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", default="", help="comma-separated variants (direct, direct_tls always)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
