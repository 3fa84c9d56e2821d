"""The option B viewer against Orthanc's own rendered frames and a bare pydicom + Pillow render,
in one run.

    python bench/viewer_bench.py [--slices 100] [--repeat 3] [--launches 7]

Generates a 512x512 axial CT series (16-bit, ``ncp.examples.phantoms``), stores it in two
Orthancs (one over HTTPS, the reference; one plain, the archive of a node) and as a folder, and
runs node A as ``ncp serve`` runs it, in its own process, twice: over the folder archive (the
demo's default) and over the plain Orthanc. Each variant renders every frame of the series as
JPEG with the window 40/400 (PS3.18 ``window=40,400,linear``), one frame per request on a
kept-alive HTTPS connection, the variants interleaved, the first round dropped as a warm-up;
medians of ``--repeat`` rounds:

- ``orthanc_tls``: Orthanc's DICOMweb plugin, ``.../frames/1/rendered`` (the reference);
- ``viewer_folder``: the viewer over the folder archive, behind a launch session;
- ``viewer_orthanc``: the viewer over the plain Orthanc (frames fetched as stored, then
  rendered here);
- ``bare``: pydicom reads the file and decodes, NumPy windows, Pillow encodes JPEG; one thread,
  no HTTP (what any Python renderer costs at least).

Also ``first_frames_per_s``: each variant's first pass over a series it has not rendered yet
(no decoded frame in memory), and, in Chromium (Debian's, driven by Playwright), the time from
the click on a launch link to the first image shown, median and worst of ``--launches``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from tests.support.node import PeerSide, running_node  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.viewer import CT_SERIES, CT_STUDY, ct_instance, ct_slices  # noqa: E402

WINDOW = "40,400,linear"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def write_series(folder: Path, n: int) -> list[Path]:
    from tests.support.dicom_factory import write_instance

    volume = ct_slices(n, 512)
    paths = []
    for i, plane in enumerate(volume, start=1):
        path = folder / "PAT100" / f"ct-{i:04d}.dcm"
        write_instance(path, ct_instance(plane, number=i))
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_toml(settings: Any, *, archive: str, ports: dict[str, int], database: str) -> str:
    urls = {
        "standard": f"https://localhost:{ports['standard']}/fhir",
        "imaging": f"https://localhost:{ports['imaging']}/dicomweb",
        "viewer": f"https://localhost:{ports['viewer']}/viewer",
    }
    return f"""
[node]
country = "{settings.node.country}"
patient_id_issuer = "{settings.node.patient_id_issuer}"
[urls]
standard = "{urls["standard"]}"
imaging = "{urls["imaging"]}"
viewer = "{urls["viewer"]}"
[listen]
host = "127.0.0.1"
[database]
url = "{database}"
{archive}
[keys]
dir = "{settings.keys.dir}"
[trust]
list = "{settings.trust.list}"
"""


@contextlib.contextmanager
def serve(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    ncp = Path(sys.executable).with_name("ncp")
    process = subprocess.Popen(
        [str(ncp), "serve", "--config", str(config), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


class Peer:
    """Country B's side: asks node A for option B with B's keys and client certificate."""

    def __init__(self, b: PeerSide, creds: tuple[Path, Path], ca: Path, standard: str) -> None:
        self.b, self.creds, self.ca, self.standard = b, creds, ca, standard

    def launch_url(self, study: str, audience: str) -> str:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(*self.creds)
        b = PeerSide(self.b.country, self.b.keys_dir, self.b.signing_key, self.standard)
        headers = b.headers("PAT100")
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "study", "valueString": study},
                {"name": "option", "valueCode": "B"},
                {"name": "purpose", "valueCode": "TREAT"},
            ],
        }
        with httpx.Client(verify=context, timeout=30) as http:
            answer = http.post(f"{self.standard}/$imaging-access", json=body, headers=headers)
        answer.raise_for_status()
        return str(next(p["valueUrl"] for p in answer.json()["parameter"] if p["name"] == "viewer"))


def viewer_client(ca: Path, launch: str) -> httpx.Client:
    client = httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=60)
    answer = client.get(launch)
    assert answer.status_code == 303, answer.text
    return client


def frame_urls(base: str, sops: list[str], *, orthanc: bool) -> list[str]:
    series = f"{base}/studies/{CT_STUDY}/series/{CT_SERIES}/instances"
    query = f"window={WINDOW}" + ("" if orthanc else "&quality=90")
    return [f"{series}/{sop}/frames/1/rendered?{query}" for sop in sops]


def timed_pass(client: httpx.Client, urls: list[str]) -> float:
    started = time.perf_counter()
    for url in urls:
        answer = client.get(url, headers={"Accept": "image/jpeg"})
        if answer.status_code != 200 or not answer.content.startswith(b"\xff\xd8"):
            raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")
    return len(urls) / (time.perf_counter() - started)


def bare_pass(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        low, high = 40 - 200, 40 + 200
        grey = np.clip((hu - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
        Image.fromarray(grey).save(io.BytesIO(), "JPEG", quality=90)
    return len(paths) / (time.perf_counter() - started)


def first_image_times(peer: Peer, viewer: str, ca: Path, launches: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            for _ in range(launches):
                context = browser.new_context(ignore_https_errors=True)
                page = context.new_page()
                url = peer.launch_url(CT_STUDY, viewer)
                page.set_content(f'<a id="open" href="{url}">open</a>')
                started = time.perf_counter()
                page.click("#open")
                page.wait_for_selector("#image[data-pos='0']", state="attached", timeout=30_000)
                times.append(time.perf_counter() - started)
                context.close()
        finally:
            browser.close()
    return {
        "median_s": round(statistics.median(times[1:] or times), 3),
        "worst_s": round(max(times[1:] or times), 3),
        "first_launch_s": round(times[0], 3),
        "launches": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--launches", type=int, default=7)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    os.chmod(work, 0o755)
    result: dict[str, Any] = {"slices": args.slices, "size": "512x512", "window": WINDOW}
    try:
        paths: list[Path] = []

        def extra(folder: Path) -> None:
            paths.extend(write_series(folder, args.slices))

        # Build A's keys, trust list, archive and index the way the tests do, then serve the
        # node from its own process as `ncp serve` does.
        with running_node(work / "a", archive_extra=extra) as prep:
            settings = prep.node.settings
            peer_b = prep.b
            creds = prep.creds["BE"]
            ca = prep.ca_file
        assert creds is not None
        sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
        database = settings.database.url
        with OrthancServer.start(tls=True) as reference, OrthancServer.start() as archive:
            reference.upload(paths)
            archive.upload(paths)
            variants: dict[str, Any] = {}
            nodes = {
                "viewer_folder": f'[archive]\nkind = "folder"\npath = "{work / "a" / "archive"}"',
                "viewer_orthanc": f'[archive]\nkind = "dicomweb"\nurl = "{archive.dicomweb_url}"',
            }
            with contextlib.ExitStack() as stack:
                clients: dict[str, tuple[httpx.Client, list[str]]] = {}
                for name, section in nodes.items():
                    ports = {k: free_port() for k in ("standard", "imaging", "viewer")}
                    copy = work / f"{name}.db"
                    shutil.copy(database.removeprefix("sqlite:///"), copy)
                    config = work / f"{name}.toml"
                    config.write_text(
                        node_toml(
                            settings, archive=section, ports=ports, database=f"sqlite:///{copy}"
                        )
                    )
                    stack.enter_context(serve(config, ports["viewer"]))
                    viewer = f"https://localhost:{ports['viewer']}/viewer"
                    standard = f"https://localhost:{ports['standard']}/fhir"
                    peer = Peer(peer_b, creds, ca, standard)
                    client = viewer_client(ca, peer.launch_url(CT_STUDY, viewer))
                    stack.callback(client.close)
                    clients[name] = (client, frame_urls(viewer, sops, orthanc=False))
                    variants[name] = {"peer": peer, "viewer": viewer}
                orthanc_client = httpx.Client(verify=reference.verify, timeout=60)
                stack.callback(orthanc_client.close)
                clients["orthanc_tls"] = (
                    orthanc_client,
                    frame_urls(reference.dicomweb_url.rstrip("/"), sops, orthanc=True),
                )
                first = {name: round(timed_pass(c, urls), 1) for name, (c, urls) in clients.items()}
                first["bare"] = round(bare_pass(paths), 1)
                rounds: dict[str, list[float]] = {name: [] for name in [*clients, "bare"]}
                for _ in range(args.repeat):
                    for name, (client, urls) in clients.items():
                        rounds[name].append(timed_pass(client, urls))
                    rounds["bare"].append(bare_pass(paths))
                fps = {name: round(statistics.median(v), 1) for name, v in rounds.items()}
                result["frames_per_s"] = fps
                result["first_frames_per_s"] = first
                result["ratio_to_orthanc"] = {
                    name: round(v / fps["orthanc_tls"], 2) for name, v in fps.items()
                }
                folder = variants["viewer_folder"]
                result["launch_to_first_image"] = first_image_times(
                    folder["peer"], folder["viewer"], ca, args.launches
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
