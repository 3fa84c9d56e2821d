"""Time to ready and the first searches of a gateway before the demo's folder archive.

    python bench/first_search.py DEMO_DIR      # DEMO_DIR: made by `ncp demo --setup-only`

Serves a gateway (plain HTTP, as the other benches) before DEMO_DIR/dicom, and reports how long
it took to start (the folder catalogue is built then) and how long the first three QIDO
searches over the 50 first studies of the patient with the most studies took. Before the
catalogue was built at startup, the first search paid for reading every header.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import threading
import time
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


def main(demo: Path) -> None:
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
    started = time.perf_counter()
    archive = FolderArchive(path=demo / "dicom", patient_id_issuer=issuer)
    app = gateway_app(archive, base, audit_db(Path(tempfile.mkdtemp()) / "audit.db"))
    server = imaging_server(app, host="127.0.0.1", port=port, tls=None, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    ready = time.perf_counter() - started
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
            f"ready after {ready:.2f} s; searches over {len(studies)} studies: "
            + ", ".join(f"{1000 * t:.0f} ms" for t in times)
            + f" (load {' '.join(load)})"
        )
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
