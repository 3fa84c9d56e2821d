"""Time to ready and the first searches of a gateway before the demo's folder archive.

    python bench/first_search.py DEMO_DIR [--reference]   # DEMO_DIR: `ncp demo --setup-only`

Serves a gateway (plain HTTP, as the other benches) before DEMO_DIR/dicom, and reports how long
it took to start (the folder catalogue is built then), its CPU time, and how long the first
three QIDO searches over the 50 first studies of the patient with the most studies took. Before
the catalogue was built at startup, the first search paid for reading every header; then the
start did (decision 0014).

``--reference`` then times, in the same process on the same files, what the start did before:
reading every header with pydicom and converting it whole to DICOM JSON (wall and CPU), and
prints the ratio.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncp.config import FolderArchive
from ncp.gateway.server import imaging_server
from ncp.security.claims import PatientRef
from tests.gateway_support import (
    audit_db,
    bearer,
    free_port,
    gateway_app,
    local_base,
    token,
)


def previous_start(root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every header of ``root`` with pydicom and convert it whole
    to DICOM JSON: the folder catalogue's start before decision 0014."""
    from ncp.dicom.folder import FolderSource
    from ncp.dicom.source import InstanceHeader, SourceEntry

    source = FolderSource(root)
    wall, cpu = time.perf_counter(), time.process_time()
    entries = [e for e in source.entries() if isinstance(e, SourceEntry)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for header in source.read_headers(entries):
            if isinstance(header, InstanceHeader):
                header.dataset.to_json_dict(suppress_invalid_tags=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(demo: Path, reference: bool) -> None:
    db = sqlite3.connect(demo / "country-a" / "index.db")
    pid, issuer = db.execute(
        "select p.patient_id, p.issuer from patient p join study s on s.patient_pk = p.id "
        "group by p.id order by count(*) desc limit 1"
    ).fetchone()
    studies = tuple(
        row[0]
        for row in db.execute(
            "select s.study_uid from study s join patient p on s.patient_pk = p.id "
            "where p.patient_id = ? order by s.study_uid limit 50",
            (pid,),
        )
    )
    port = free_port()
    base = local_base(port, None)
    started, started_cpu = time.perf_counter(), time.process_time()
    archive = FolderArchive(path=demo / "dicom", patient_id_issuer=issuer)
    app = gateway_app(archive, base, audit_db(Path(tempfile.mkdtemp()) / "audit.db"))
    server = imaging_server(app, host="127.0.0.1", port=port, tls=None, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    ready = time.perf_counter() - started
    ready_cpu = time.process_time() - started_cpu
    try:
        signed = token(base, studies, patient=PatientRef(f"urn:oid:{issuer}", pid))
        times = []
        with httpx.Client(timeout=600) as http:
            for _ in range(3):
                t0 = time.perf_counter()
                r = http.get(f"{base}/studies", headers=bearer(signed))
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200 and len(r.json()) == len(studies), r.text[:200]
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(
            f"ready after {ready:.2f} s ({ready_cpu:.2f} s CPU); searches over {len(studies)} "
            "studies: "
            + ", ".join(f"{1000 * t:.0f} ms" for t in times)
            + f" (load {' '.join(load)})"
        )
    finally:
        server.should_exit = True
        thread.join(10)
    if reference:
        wall, cpu = previous_start(demo / "dicom")
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(
            f"reference, every header read and converted whole (the start before): {wall:.2f} s "
            f"({cpu:.2f} s CPU); ready / reference: {ready / wall:.3f} wall, "
            f"{ready_cpu / cpu:.3f} CPU (load {' '.join(load)})"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--reference" in sys.argv[2:])
