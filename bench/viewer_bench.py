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

Also ``first_frames_per_s``: each variant's first pass over a series it has not rendered yet,
as a page opening it makes it (its list of images, then every frame): the launch before it has
read the study's headers (as Orthanc has them in its index) and prepared the series the study
opens on (a one-image localizer), not this one; and ``server_memory_mib``: each node
process's resident memory after the launch and its peak after all passes (``VmRSS``,
``VmHWM``), the decoded frames being bounded by ``viewer.frame_memory_mib``.

Then, in Chromium (Debian's, driven by Playwright), ``--launches`` launches from a link on
another site's page, each in a new browser context (``cold``: nothing cached) and then again in
the same context (``warm``: the page's script and style cached, as an HP's browser has them).
For each, from the page's own Performance API, in ms from the start of the navigation (the
launch request and its redirect included):

- ``painted``: the first image painted (Element Timing ``renderTime`` of the page's ``img``);
- ``shown``: the page's ``ncp-first-image`` mark, once its script has placed the image and
  drawn the overlays;
- ``requests``: the requests made before the first image arrived (launch, page, then each
  resource started before it), and the breakdown (launch, page, style, script, image).

``click_s`` is the old wall-clock measure (click to the image shown, as Playwright sees it).
Medians and worst; ``load_average`` before and after. Prints one JSON object.
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
from tests.support.viewer import (  # noqa: E402
    CT_LOCALIZER,
    CT_SERIES,
    CT_STUDY,
    ct_instance,
    ct_slices,
)

WINDOW = "40,400,linear"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def write_series(folder: Path, n: int) -> list[Path]:
    """The axial series (its paths returned) and, as series 1, a one-image localizer: the
    series a study opens on, which the launch prepares; the axial one it does not."""
    from tests.support.dicom_factory import write_instance

    volume = ct_slices(n, 512)
    paths = []
    for i, plane in enumerate(volume, start=1):
        path = folder / "PAT100" / f"ct-{i:04d}.dcm"
        write_instance(path, ct_instance(plane, number=i))
        paths.append(path)
    scout = ct_instance(
        ct_slices(1, 512, seed=3)[0], number=1, series=CT_LOCALIZER, SeriesNumber=1,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )  # fmt: skip
    write_instance(folder / "PAT100" / "ct-scout.dcm", scout)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_toml(
    settings: Any, *, archive: str, ports: dict[str, int], database: str, viewer: str = ""
) -> str:
    urls = {
        "standard": f"https://localhost:{ports['standard']}/fhir",
        "imaging": f"https://localhost:{ports['imaging']}/dicomweb",
        "viewer": f"https://localhost:{ports['viewer']}/viewer",
    }
    return f"""
[node]
demo = true  # the test PKI of the tests' support, which `ncp serve` refuses otherwise
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
[viewer]
{viewer}
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


def timed_pass(client: httpx.Client, urls: list[str], listing: str | None = None) -> float:
    """Frames per second over ``urls``, one request at a time; ``listing``: the series' list
    of images asked for first, as a page opening the series does (and counted in)."""
    started = time.perf_counter()
    if listing is not None:
        listed = client.get(listing, headers={"Accept": "application/dicom+json"})
        if listed.status_code != 200:
            raise RuntimeError(f"{listing}: {listed.status_code} {listed.text[:200]}")
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


PAGE_TIMING = """() => new Promise((resolve) => {
    const out = {};
    const nav = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource");
    const image = resources.find((e) => /(first-image|rendered)$/.test(new URL(e.name).pathname));
    const mark = performance.getEntriesByName("ncp-first-image")[0];
    const name = (e) => new URL(e.name).pathname.replace(/^.*\\/viewer\\//, "");
    out.shown = mark ? mark.startTime : null;
    out.launch = nav.redirectEnd ? nav.redirectEnd - nav.redirectStart : null;
    out.page = nav.responseEnd;
    out.cached = 0;
    for (const e of resources) {
        if (name(e) === "static/viewer.css") out.style = e.responseEnd;
        if (name(e) === "static/viewer.js") out.script = e.responseEnd;
        if (name(e).startsWith("static/") && e.transferSize === 0) out.cached += 1;
    }
    out.image = image ? image.responseEnd : null;
    const before = image ? resources.filter((e) => e.startTime < image.responseEnd) : resources;
    out.requests = 2 + before.length;  // the launch and the page: one navigation
    out.asked = before.map(name);
    new PerformanceObserver((list) => {
        const first = list.getEntries().find((e) => e.identifier === "first-image");
        out.painted = first ? first.renderTime || first.loadTime : null;
        resolve(out);
    }).observe({ type: "element", buffered: true });
    setTimeout(() => resolve(out), 2000);
})"""


def spki_pin(cert: Path) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium's
    ``--ignore-certificate-errors-spki-list`` takes it."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def first_image_times(peer: Peer, viewer: str, cert: Path, launches: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    clicks: dict[str, list[float]] = {"cold": [], "warm": []}
    # The node's certificate trusted by its key (not by ignoring errors: Chromium keeps
    # nothing in its cache from a site whose certificate it does not trust).
    trust = f"--ignore-certificate-errors-spki-list={spki_pin(cert)}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=[*CHROMIUM_ARGS, trust]
        )
        try:
            for _ in range(launches):
                context = browser.new_context()
                for kind in ("cold", "warm"):
                    page = context.new_page()
                    url = peer.launch_url(CT_STUDY, viewer)
                    page.set_content(f'<a id="open" href="{url}">open</a>')
                    started = time.perf_counter()
                    page.click("#open")
                    page.wait_for_selector("#image[data-pos='0']", state="attached", timeout=30_000)
                    clicks[kind].append(time.perf_counter() - started)
                    runs[kind].append(page.evaluate(PAGE_TIMING))
                    page.close()
                context.close()
        finally:
            browser.close()
    out: dict[str, Any] = {"launches": launches}
    for kind, measured in runs.items():
        # The first launch of the run warms the server's code paths: reported on its own.
        kept = measured[1:] or measured
        summary: dict[str, Any] = {}
        for key in ("painted", "shown", "launch", "page", "style", "script", "image"):
            values = [m[key] for m in kept if m.get(key) is not None]
            if values:
                summary[f"{key}_ms"] = {
                    "median": round(statistics.median(values)),
                    "worst": round(max(values)),
                }
        summary["requests_before_image"] = max(m["requests"] for m in kept)
        summary["static_files_from_cache"] = min(m["cached"] for m in kept)
        summary["asked_before_image"] = sorted({a for m in kept for a in m["asked"]})
        click = clicks[kind][1:] or clicks[kind]
        summary["click_s"] = {
            "median": round(statistics.median(click), 3),
            "worst": round(max(click), 3),
            "first_launch": round(clicks[kind][0], 3),
        }
        out[kind] = summary
    return out


def settle(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until a process uses less than a tenth of a core (what it started is done)."""

    def cpu_s() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    deadline = time.monotonic() + timeout_s
    before = cpu_s()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = cpu_s()
        if now - before < 0.03:
            return
        before = now


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process now and at its peak (Linux ``/proc``), MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--launches", type=int, default=7)
    parser.add_argument(
        "--read-ahead",
        type=int,
        default=None,
        help="viewer.read_ahead_frames of the nodes (default: the setting's default)",
    )
    args = parser.parse_args(argv)
    viewer_settings = "" if args.read_ahead is None else f"read_ahead_frames = {args.read_ahead}"
    work = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    os.chmod(work, 0o755)
    result: dict[str, Any] = {"slices": args.slices, "size": "512x512", "window": WINDOW}
    if args.read_ahead is not None:
        result["read_ahead_frames"] = args.read_ahead
    result["load_average"] = {"before": [round(x, 2) for x in os.getloadavg()]}
    try:
        paths: list[Path] = []

        def extra(folder: Path) -> None:
            paths.extend(write_series(folder, args.slices))

        # Build A's keys, trust list, archive and index the way the tests do, then serve the
        # node from its own process as `ncp serve` does.
        with running_node(work / "a", archive_extra=extra) as prep:
            settings = prep.node.settings
            server_cert = prep.node.keystore.server.cert_path
            peer_b = prep.b
            creds = prep.creds["BE"]
            ca = prep.ca_file
        assert creds is not None
        sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
        scout = paths[0].with_name("ct-scout.dcm")
        database = settings.database.url
        with OrthancServer.start(tls=True) as reference, OrthancServer.start() as archive:
            reference.upload([*paths, scout])
            archive.upload([*paths, scout])
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
                            settings,
                            archive=section,
                            ports=ports,
                            database=f"sqlite:///{copy}",
                            viewer=viewer_settings,
                        )
                    )
                    process = stack.enter_context(serve(config, ports["viewer"]))
                    viewer = f"https://localhost:{ports['viewer']}/viewer"
                    standard = f"https://localhost:{ports['standard']}/fhir"
                    peer = Peer(peer_b, creds, ca, standard)
                    variants[name] = {"peer": peer, "viewer": viewer, "pid": process.pid}
                for v in variants.values():
                    settle(v["pid"])  # both nodes started, idle
                # Each variant's first pass right after its launch, once what the launch
                # started in the background (its study's headers, first frames) is done, and
                # while the other node is idle.
                first: dict[str, float] = {}
                memory: dict[str, dict[str, Any]] = {}
                for name, v in variants.items():
                    client = viewer_client(ca, v["peer"].launch_url(CT_STUDY, v["viewer"]))
                    stack.callback(client.close)
                    settle(v["pid"])
                    memory[name] = {"after_launch": memory_mib(v["pid"])}
                    clients[name] = (client, frame_urls(v["viewer"], sops, orthanc=False))
                    listing = f"{v['viewer']}/studies/{CT_STUDY}/series/{CT_SERIES}/instances"
                    first[name] = round(timed_pass(*clients[name], listing=listing), 1)
                    settle(v["pid"])  # the read-ahead it left running, before the next
                orthanc_client = httpx.Client(verify=reference.verify, timeout=60)
                stack.callback(orthanc_client.close)
                clients["orthanc_tls"] = (
                    orthanc_client,
                    frame_urls(reference.dicomweb_url.rstrip("/"), sops, orthanc=True),
                )
                qido = f"{reference.dicomweb_url.rstrip('/')}/studies/{CT_STUDY}/series/{CT_SERIES}"
                first["orthanc_tls"] = round(
                    timed_pass(*clients["orthanc_tls"], listing=f"{qido}/instances"), 1
                )
                first["bare"] = round(bare_pass(paths), 1)
                rounds: dict[str, list[float]] = {name: [] for name in [*clients, "bare"]}
                for _ in range(args.repeat):
                    for name, (client, urls) in clients.items():
                        rounds[name].append(timed_pass(client, urls))
                    rounds["bare"].append(bare_pass(paths))
                fps = {name: round(statistics.median(v), 1) for name, v in rounds.items()}
                for name, v in variants.items():
                    memory[name]["after_passes"] = memory_mib(v["pid"])
                result["server_memory_mib"] = memory
                result["frames_per_s"] = fps
                result["first_frames_per_s"] = first
                result["ratio_to_orthanc"] = {
                    name: round(v / fps["orthanc_tls"], 2) for name, v in fps.items()
                }
                folder = variants["viewer_folder"]
                result["launch_to_first_image"] = first_image_times(
                    folder["peer"], folder["viewer"], server_cert, args.launches
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
