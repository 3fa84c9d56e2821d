"""Byte path of the imaging channel: the alternatives, against Orthanc direct, in one run.

    python bench/byte_path_alternatives.py [--instances 1000] [--repeat 3] [--only a,b]

Starts one Orthanc (``tests/support/orthanc.py``), generates a CT study with pydicom + NumPy
(1000 instances of 512x512 16-bit: 525 MB), stores it in Orthanc and as a folder of files, then
retrieves it with curl (``-o /dev/null``, Accept ``multipart/related; type="application/dicom"``)
through each alternative, each in its own process so its resident memory can be sampled
(``/proc/PID/status`` VmRSS every 10 ms; for nginx its worker):

- ``direct``: Orthanc itself (the reference, plain HTTP);
- ``naive``: FastAPI + an httpx streaming proxy (``StreamingResponse(aiter_raw())``), uvicorn;
- ``relay``: FastAPI + ``ncp.gateway.relay`` (raw archive socket, pieces of 1 MiB), uvicorn;
- ``raw_splice``: a threaded raw relay outside ASGI: ``os.splice`` archive -> pipe -> client
  between chunk headers (plain TCP only; the ceiling of a Python process that moves no bytes);
- ``nginx_accel``: nginx in front; Python (uvicorn) decides and answers ``X-Accel-Redirect``
  to an internal location that proxies to Orthanc;
- ``nginx_authreq``: nginx ``auth_request`` to Python, then ``proxy_pass`` to Orthanc;
- ``folder_sendfile``: the study as files, the multipart built from ``os.sendfile`` of each file
  between small boundary writes (no Orthanc; the node's default archive is a folder);

and the ``_tls`` variants of the fast ones with TLS on the client side (the imaging channel is
HTTPS; the archive side stays plain HTTP on loopback). Rounds interleave the alternatives; the
first round is a dropped warm-up. QIDO: ``/studies?StudyInstanceUID=`` through the Python path
(FastAPI + httpx, kept-alive client) against Orthanc direct, p50 of 50.

Prints one JSON object: MB/s medians, ratios to direct, RSS growth, QIDO added latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ncp.gateway.relay import (
    Chunk,
    FileRegion,
    RelayH11Protocol,
    RelayResponse,
    open_upstream,
    relay,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ACCEPT = 'multipart/related; type="application/dicom"'
PLAIN = (
    "direct",
    "naive",
    "relay",
    "relay_fast",
    "raw_splice",
    "nginx_accel",
    "nginx_authreq",
    "folder_sendfile",
    "folder_relay",
)
TLS = (
    "naive_tls",
    "relay_tls",
    "relay_fast_tls",
    "raw_tls",
    "nginx_accel_tls",
    "folder_sendfile_tls",
    "folder_relay_tls",
)


# --- the study --------------------------------------------------------------------------------


def make_study(
    folder: Path,
    instances: int,
    size: int = 512,
    *,
    series: int = 1,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, list[Path]]:
    """A CT study of ``instances`` 16-bit ``size``x``size`` images written under ``folder``,
    dealt round ``series`` series; ``tags``: more attributes every instance carries (a
    bench's patient details)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    study = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    base = np.random.default_rng(7).integers(0, 4096, size=(size, size), dtype=np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(instances):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uids[i % series]
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH-1", "Bench^Patient", "CT"
        ds.StudyDate = "20240102"
        ds.SeriesNumber, ds.InstanceNumber = i % series + 1, i // series + 1
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.roll(base, i).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        path = folder / f"{i:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return study, paths


def upload(rest_url: str, paths: list[Path]) -> None:
    import httpx

    with httpx.Client(base_url=rest_url, timeout=60) as client:

        def one(path: Path) -> None:
            r = client.post(
                "/instances",
                content=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            r.raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, paths))


# --- TLS material -----------------------------------------------------------------------------


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost; returns (ca, cert, key) PEM paths."""
    from ncp.security import pki

    ca = pki.make_ca("AT")
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(ca, key.public_key(), "AT")
    paths = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    paths[0].write_bytes(pki.cert_pem(ca.certificate))
    paths[1].write_bytes(pki.cert_pem(cert))
    paths[2].write_bytes(pki.private_pem(key))
    return paths


# --- servers (run as `python byte_path_alternatives.py serve KIND ...`) ------------------------


def _fastapi_app(kind: str, upstream: str, port_decider: int | None = None) -> Any:
    """naive / relay gateway app; ``accel``: the decider behind nginx."""
    app = FastAPI()
    client = httpx.AsyncClient(timeout=60)

    @app.get("/dicom-web/studies")
    async def qido(request: Request) -> Response:
        r = await client.get(f"{upstream}/studies", params=dict(request.query_params))
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    @app.get("/dicom-web/studies/{uid}")
    async def wado(uid: str) -> Response:
        url = f"{upstream}/studies/{uid}"
        if kind == "naive":
            req = client.build_request("GET", url, headers={"Accept": ACCEPT})
            r = await client.send(req, stream=True)
            return StreamingResponse(
                r.aiter_raw(), r.status_code, media_type=r.headers.get("content-type")
            )
        if kind == "accel":
            return Response(headers={"X-Accel-Redirect": f"/_archive/studies/{uid}"})
        up = await open_upstream(url, headers={"Accept": ACCEPT}, timeout=30)
        return RelayResponse(up)

    @app.get("/_auth")
    async def auth(request: Request) -> Response:
        # auth_request: the original URI arrives in a header; a real gateway checks the token here.
        return Response(status_code=204 if request.headers.get("x-original-uri") else 403)

    return app


def _folder_app(files: list[Path]) -> Any:
    """The study from files through ``ncp.gateway.relay.relay``: part heads as bytes, each
    file as a FileRegion (sendfile on plain TCP under RelayH11Protocol)."""
    boundary = b"ncp-bench-boundary-7f3a"
    sizes = [p.stat().st_size for p in files]

    async def chunks() -> AsyncIterator[Chunk]:
        for path, size in zip(files, sizes, strict=True):
            yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
            yield FileRegion(path, 0, size)
            yield b"\r\n"
        yield b"--" + boundary + b"--\r\n"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ctype = b'multipart/related; type="application/dicom"; boundary=' + boundary
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
        )
        await relay(chunks(), send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _serve_uvicorn(app: Any, port: int, tls: tuple[str, str] | None, http: Any = "h11") -> None:
    import uvicorn

    kwargs: dict[str, Any] = {}
    if tls:
        kwargs = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]}
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http=http,
        loop="asyncio",
        **kwargs,
    )


def _read_request(conn: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            raise ConnectionError("client closed")
        data += piece
    return data.split(b" ", 2)[1].decode()


def _raw_relay(conn: socket.socket, upstream: str, use_splice: bool) -> None:
    """One transfer: ask Orthanc, answer chunked; body via splice (plain) or a big buffer."""
    from urllib.parse import urlsplit

    path = _read_request(conn)
    uid = path.rsplit("/", 1)[1]
    u = urlsplit(upstream)
    up = socket.create_connection((u.hostname, u.port))
    up.sendall(
        f"GET {u.path}/studies/{uid} HTTP/1.1\r\nHost: {u.netloc}\r\nAccept: {ACCEPT}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += up.recv(65536)
    head, first = head.split(b"\r\n\r\n", 1)
    ctype = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    if first:
        conn.sendall(b"%x\r\n%s\r\n" % (len(first), first))
    if use_splice:
        rd, wr = os.pipe()
        fcntl_setpipe = 1031  # F_SETPIPE_SZ
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(wr, fcntl_setpipe, 1 << 20)
        try:
            while True:
                n = os.splice(up.fileno(), wr, 1 << 20)
                if n == 0:
                    break
                conn.sendall(b"%x\r\n" % n)
                left = n
                while left:
                    left -= os.splice(rd, conn.fileno(), left)
                conn.sendall(b"\r\n")
        finally:
            os.close(rd)
            os.close(wr)
    else:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = up.recv_into(view)
            if n == 0:
                break
            conn.sendall(b"%x\r\n" % n)
            conn.sendall(view[:n])
            conn.sendall(b"\r\n")
    conn.sendall(b"0\r\n\r\n")
    up.close()


def _folder_send(conn: socket.socket, files: list[Path], tls: bool) -> None:
    """The study as multipart/related from files: boundary writes between file sends."""
    _read_request(conn)
    boundary = b"ncp-bench-boundary-7f3a"
    sizes = [p.stat().st_size for p in files]
    part_head = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
    total = sum(len(part_head) + len(b"Content-Length: %d\r\n\r\n" % s) + s + 2 for s in sizes)
    total += len(boundary) + 6
    conn.sendall(
        b'HTTP/1.1 200 OK\r\nContent-Type: multipart/related; type="application/dicom"; '
        b"boundary=" + boundary + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % total
    )
    for path, size in zip(files, sizes, strict=True):
        conn.sendall(part_head + b"Content-Length: %d\r\n\r\n" % size)
        with open(path, "rb") as f:
            if tls:
                conn.sendall(f.read())
            else:
                sent = 0
                while sent < size:
                    sent += os.sendfile(conn.fileno(), f.fileno(), sent, size - sent)
        conn.sendall(b"\r\n")
    conn.sendall(b"--" + boundary + b"--\r\n")


def _serve_threaded(port: int, handler: Any, tls: tuple[str, str] | None) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[0], tls[1])

    def run(conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError, StopIteration):
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(conn)
        conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def serve(args: argparse.Namespace) -> None:
    tls = (args.cert, args.key) if args.cert else None
    kind = args.kind
    if kind in ("naive", "relay", "accel"):
        _serve_uvicorn(_fastapi_app(kind, args.upstream), args.port, tls)
    elif kind == "relay_fast":  # the relay with its own uvicorn protocol (RawBody extension)
        app = _fastapi_app("relay", args.upstream)
        _serve_uvicorn(app, args.port, tls, http=RelayH11Protocol)
    elif kind in ("raw_splice", "raw"):
        _serve_threaded(
            args.port, lambda c: _raw_relay(c, args.upstream, kind == "raw_splice"), tls
        )
    elif kind == "folder_relay":
        files = sorted(Path(args.folder).glob("*.dcm"))
        _serve_uvicorn(_folder_app(files), args.port, tls, http=RelayH11Protocol)
    elif kind == "folder":
        files = sorted(Path(args.folder).glob("*.dcm"))
        _serve_threaded(args.port, lambda c: _folder_send(c, files, tls is not None), tls)
    else:
        raise SystemExit(f"unknown kind {kind}")


# --- nginx ------------------------------------------------------------------------------------

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    proxy_http_version 1.1;
    proxy_buffering on;
    proxy_buffer_size 64k;
    proxy_buffers 8 256k;
    proxy_busy_buffers_size 512k;
    proxy_max_temp_file_size 0;
    upstream decider {{ server 127.0.0.1:{decider}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port} {ssl};
        {ssl_conf}
        location /accel/ {{
            proxy_set_header Connection "";
            proxy_pass http://decider/;
        }}
        location /_archive/ {{
            internal;
            proxy_set_header Accept $http_accept;
            proxy_pass {orthanc}/dicom-web/;
        }}
        location /authreq/ {{
            auth_request /_auth;
            proxy_pass {orthanc}/;
        }}
        location = /_auth {{
            internal;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_pass http://decider/_auth;
        }}
    }}
}}
"""


def start_nginx(
    tmp: Path, port: int, decider: int, orthanc: str, tls: tuple[str, str] | None
) -> subprocess.Popen[bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    ssl_conf = ""
    if tls:
        ssl_conf = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
    conf = NGINX_CONF.format(
        tmp=tmp,
        port=port,
        decider=decider,
        orthanc=orthanc,
        ssl="ssl" if tls else "",
        ssl_conf=ssl_conf,
    )
    (tmp / "nginx.conf").write_text(conf)
    binary = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") or "nginx"
    return subprocess.Popen(
        [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- measuring --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop a bench's servers: every one told to terminate first (they stop together), then
    each waited for up to 10 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def curl_args(url: str, cafile: Path | None = None, headers: list[str] | None = None) -> list[str]:
    """curl retrieving ``url`` to /dev/null, printing ``size_download time_total``."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
    for header in [f"Accept: {ACCEPT}", *(headers or [])]:
        cmd += ["-H", header]
    if cafile is not None:
        cmd += ["--cacert", str(cafile)]
    return [*cmd, url]


def curl(url: str, cafile: Path | None = None) -> tuple[int, float, int]:
    proc = subprocess.run(curl_args(url, cafile), capture_output=True, text=True)
    size, seconds = ([*proc.stdout.split(), "0", "0"])[:2]
    return int(size), float(seconds), proc.returncode


@contextlib.contextmanager
def sampling(pids: list[int]) -> Iterator[dict[str, int]]:
    """Peak VmRSS growth (kB) of ``pids`` while the block runs, sampled every 10 ms."""
    base = {p: rss_kb(p) for p in pids}
    peak = dict(base)
    result: dict[str, int] = {"growth_kb": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for p in pids:
                peak[p] = max(peak[p], rss_kb(p))
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["growth_kb"] = max((peak[p] - base[p] for p in pids), default=0)


def qido_p50(
    base: str,
    study: str,
    n: int = 50,
    verify: Any = True,
    headers: dict[str, str] | None = None,
) -> float:
    """p50 (ms) of ``GET base/studies?StudyInstanceUID=study`` on a kept-alive connection."""
    times = []
    with httpx.Client(timeout=30, verify=verify, headers=headers) as client:
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = client.get(f"{base}/studies", params={"StudyInstanceUID": study})
            r.raise_for_status()
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("kind")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--upstream", default="")
    s.add_argument("--folder", default="")
    s.add_argument("--cert", default="")
    s.add_argument("--key", default="")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated alternatives")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    from tests.support.orthanc import OrthancServer

    wanted = [k for k in (*PLAIN, *TLS) if not args.only or k in args.only.split(",")]
    if "direct" not in wanted:
        wanted.insert(0, "direct")
    work = Path(tempfile.mkdtemp(prefix="ncp-bytepath-"))
    procs: list[subprocess.Popen[bytes]] = []
    orthanc = OrthancServer.start()
    try:
        t0 = time.monotonic()
        study, files = make_study(work / "study", args.instances)
        upload(orthanc.rest_url, files)
        study_bytes = sum(p.stat().st_size for p in files)
        setup_s = time.monotonic() - t0
        ca, cert, key = make_tls(work)
        me = [sys.executable, str(Path(__file__).resolve()), "serve"]

        def spawn(kind: str, tls: bool, **extra: str) -> tuple[int, int]:
            port = free_port()
            cmd = [*me, kind, "--port", str(port), "--upstream", orthanc.dicomweb_url]
            for k, v in extra.items():
                cmd += [f"--{k}", v]
            if tls:
                cmd += ["--cert", str(cert), "--key", str(key)]
            p = subprocess.Popen(cmd, cwd=ROOT)
            procs.append(p)
            wait_port(port)
            return port, p.pid

        targets: dict[str, tuple[str, list[int], Path | None]] = {}
        path = f"/dicom-web/studies/{study}"
        targets["direct"] = (f"{orthanc.dicomweb_url}/studies/{study}", [], None)
        for name, kind, tls in (
            ("naive", "naive", False),
            ("relay", "relay", False),
            ("relay_fast", "relay_fast", False),
            ("relay_fast_tls", "relay_fast", True),
            ("raw_splice", "raw_splice", False),
            ("naive_tls", "naive", True),
            ("relay_tls", "relay", True),
            ("raw_tls", "raw", True),
        ):
            if name in wanted:
                port, pid = spawn(kind, tls)
                scheme = "https" if tls else "http"
                host = "localhost" if tls else "127.0.0.1"
                targets[name] = (f"{scheme}://{host}:{port}{path}", [pid], ca if tls else None)
        for name, kind, tls in (
            ("folder_sendfile", "folder", False),
            ("folder_sendfile_tls", "folder", True),
            ("folder_relay", "folder_relay", False),
            ("folder_relay_tls", "folder_relay", True),
        ):
            if name in wanted:
                port, pid = spawn(kind, tls, folder=str(work / "study"))
                scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
                targets[name] = (f"{scheme}://{host}:{port}{path}", [pid], ca if tls else None)
        unavailable: dict[str, str] = {}
        if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
            for k in [k for k in wanted if k.startswith("nginx")]:
                wanted.remove(k)
                unavailable[k] = "nginx is not installed (apt-get install nginx-light)"
        if any(k.startswith("nginx") for k in wanted):
            decider, decider_pid = spawn("accel", False)
            for tls in (False, True):
                suffix = "_tls" if tls else ""
                if not any(k.startswith("nginx") and k.endswith(suffix) for k in wanted):
                    continue
                port = free_port()
                nginx = start_nginx(
                    work / f"nginx{suffix}",
                    port,
                    decider,
                    orthanc.rest_url,
                    (str(cert), str(key)) if tls else None,
                )
                procs.append(nginx)
                wait_port(port)
                workers = children(nginx.pid)
                scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
                base = f"{scheme}://{host}:{port}"
                cafile = ca if tls else None
                if f"nginx_accel{suffix}" in wanted:
                    targets[f"nginx_accel{suffix}"] = (
                        f"{base}/accel{path}",
                        [*workers, decider_pid],
                        cafile,
                    )
                if f"nginx_authreq{suffix}" in wanted:
                    targets[f"nginx_authreq{suffix}"] = (
                        f"{base}/authreq{path}",
                        [*workers, decider_pid],
                        cafile,
                    )

        results: dict[str, dict[str, list[float]]] = {k: {"mbs": [], "rss": []} for k in targets}
        failures: dict[str, str] = {}
        expected = 0
        for round_no in range(args.repeat + 1):
            for name, (url, pids, cafile) in targets.items():
                with sampling(pids) as mem:
                    size, seconds, code = curl(url, cafile)
                expected = expected or size  # "direct" runs first: Orthanc's own answer
                # The folder builds its own multipart (other boundary): same files, near size.
                if code != 0 or abs(size - expected) > (200_000 if "folder" in name else 0):
                    failures[name] = f"curl exit {code}, {size} bytes, direct sent {expected}"
                if round_no == 0:
                    continue  # warm-up
                results[name]["mbs"].append(size / seconds / 1e6)
                results[name]["rss"].append(mem["growth_kb"] / 1024)
        direct = statistics.median(results["direct"]["mbs"])
        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "study": {
                "instances": len(files),
                "file_bytes": study_bytes,
                "setup_s": round(setup_s, 1),
            },
            "repeat": args.repeat,
            "throughput_mb_s": {},
            "ratio_to_direct": {},
            "rss_growth_mb_max": {},
        }
        for name, r in results.items():
            mbs = statistics.median(r["mbs"])
            report["throughput_mb_s"][name] = round(mbs)
            report["ratio_to_direct"][name] = round(mbs / direct, 2)
            if name != "direct":
                report["rss_growth_mb_max"][name] = round(max(r["rss"]), 1)
        if failures:
            report["failures"] = failures
        if unavailable:
            report["unavailable"] = unavailable
        if "relay" in targets:
            direct_ms = qido_p50(orthanc.dicomweb_url, study)
            relay_base = targets["relay"][0].rsplit("/studies/", 1)[0]
            via_ms = qido_p50(relay_base, study)
            report["qido_p50_ms"] = {
                "direct": round(direct_ms, 2),
                "python_gateway_path": round(via_ms, 2),
                "added": round(via_ms - direct_ms, 2),
            }
        print(json.dumps(report, indent=2))
    finally:
        stop_processes(procs)
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
