"""Indexing throughput against a bare pydicom header read of the same files, in the same run.

    python bench/index_bench.py [--patients 40] [--seed 7] [--repeat 3] [--work DIR]

Generates example data (about 10,000 instances for 40 patients), then times, each ``--repeat``
times with a warm page cache:

- *bare*: ``pydicom.dcmread(path, stop_before_pixels=True)`` over the list of files;
- *index*: a full ``ncp index`` run (walk, read, map, write) into a fresh SQLite database;
- *rerun*: ``ncp index`` again with nothing changed (the incremental path);
- *index with workers*: the full run with ``--workers`` reader processes (``ncp index``'s default).

Prints one JSON object. The goal is an index cost within 1.5x of the bare read:
``ratio_index_to_bare`` is that cost in one process (CPU work), and
``ratio_index_with_workers_to_bare`` the wall time an operator waits with the default workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from ncp.dicom.folder import FolderSource
from ncp.examples.generate import generate_examples
from ncp.provider.indexer import index_source
from ncp.store.db import make_engine, migrate, session_factory


def bare_read(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        pydicom.dcmread(path, stop_before_pixels=True)
    return time.perf_counter() - started


def full_index(archive: Path, db: Path, workers: int) -> tuple[float, float, int]:
    db.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    sessions = session_factory(engine)
    started = time.perf_counter()
    run = index_source(sessions, FolderSource(archive), workers=workers)
    first = time.perf_counter() - started
    started = time.perf_counter()
    again = index_source(sessions, FolderSource(archive))
    rerun = time.perf_counter() - started
    engine.dispose()
    assert again.added == again.updated == 0, "a rerun with nothing changed must read nothing"
    return first, rerun, run.added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--work", type=Path, help="keep generated data here (default: a temp dir)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="ncp-index-bench-"))
    try:
        data = work / "data"
        if not (data / "dicom").is_dir():
            started = time.perf_counter()
            generate_examples(data, patients=args.patients, seed=args.seed)
            print(f"generated in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        archive = data / "dicom"
        files = sorted(p for p in archive.rglob("*") if p.is_file())
        bare_read(files)  # warm the page cache for both contestants

        bare, index, rerun, parallel = [], [], [], []
        added = 0
        for _ in range(args.repeat):
            bare.append(bare_read(files))
            first, again, added = full_index(archive, work / "bench.db", 1)
            index.append(first)
            rerun.append(again)
            parallel.append(full_index(archive, work / "bench.db", args.workers)[0])
        b, i, r = statistics.median(bare), statistics.median(index), statistics.median(rerun)
        p = statistics.median(parallel)
        result = {
            "instances": added,
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "bare_read_s": round(b, 3),
            "index_s": round(i, 3),
            "rerun_s": round(r, 3),
            "bare_instances_per_s": round(len(files) / b),
            "index_instances_per_s": round(added / i),
            "ratio_index_to_bare": round(i / b, 2),
            "workers": args.workers,
            "index_with_workers_s": round(p, 3),
            "ratio_index_with_workers_to_bare": round(p / b, 2),
            "goal_ratio": 1.5,
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
        }
        print(json.dumps(result, indent=1))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
