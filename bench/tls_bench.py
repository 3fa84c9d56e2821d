"""TLS handshake cost of the standard channel on loopback, against plain TCP and server-only TLS.

    python bench/tls_bench.py [--connections 400] [--requests 2000] [--repeat 3]

Starts, in a separate process (so client and server do not share one interpreter lock), four
listeners serving the same small FastAPI app with uvicorn's h11 protocol:

- *tcp*: plain HTTP, no TLS;
- *tls*: HTTPS, server certificate only (the same handshake machinery, no client certificate);
- *mtls*: the standard channel exactly as a node serves it (``ncp.security.mtls``: required client
  certificate verified against the trust list, the peer looked up per request by ``tls_peer``);
- *mtls_uvicorn_ssl*: the same, but uvicorn runs the handshake itself (``ssl_context_factory``):
  the alternative weighed in ``docs/decisions/0004-mutual-tls-to-the-app.md``.

The client (this process, raw sockets, so the client library costs next to nothing) measures:

- ``handshake``: connect and complete the TLS handshake, then close (TCP: connect only);
- ``new_connection_request``: connect, handshake, one ``GET /ping``, read the answer, close
  (what a peer pays when it does not keep connections alive);
- ``keepalive_request``: ``GET /ping`` over one kept-alive connection;

each as wall time, client CPU and server CPU per operation (server CPU from ``/proc``, so the
figures stay meaningful on a loaded machine). Rounds are interleaved across the listeners and
the first is a dropped warm-up. Prints one JSON object with medians over ``--repeat`` rounds and
the ratios between listeners.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from ncp.security import mtls
from ncp.security.keystore import KeyStore
from ncp.security.pki import init_keys_folder
from ncp.security.trust import TrustList

KINDS = ("tcp", "tls", "mtls", "mtls_uvicorn_ssl")
REQUEST = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _make_pki(root: Path) -> None:
    init_keys_folder(root / "at", "AT")
    init_keys_folder(root / "be", "BE")
    (root / "trust.toml").write_text(
        "[peers.BE]\n"
        'standard = "https://localhost/fhir"\n'
        'tls_ca = "be/ca.pem"\n'
        'jwks_file = "be/jwks.json"\n'
    )


def _app(trust: TrustList | None) -> FastAPI:
    """``GET /ping``; with a trust list, only for a trusted peer (as the standard channel)."""
    app = FastAPI()
    if trust is not None:
        mtls.install(app, trust)

        @app.get("/ping")
        def ping_peer(peer: mtls.TlsPeer) -> dict[str, str]:
            return {"country": peer.country}

    else:

        @app.get("/ping")
        def ping() -> dict[str, str]:
            return {"country": "?"}

    return app


def _serve(root: str, ports: dict[str, int], ready: Any) -> None:
    """Server process: the three listeners, each in its own thread with its own event loop."""
    logging.disable(logging.WARNING)
    base = Path(root)
    keystore = KeyStore.load(base / "at")
    trust = TrustList.load(base / "trust.toml")

    def app(with_peer: bool) -> FastAPI:
        return _app(trust if with_peer else None)

    mutual = mtls.server_ssl_context(keystore, trust)
    server_only = mtls.server_ssl_context(keystore, trust)
    server_only.verify_mode = ssl.CERT_NONE  # the same context, minus the client certificate
    servers = {
        "tcp": uvicorn.Server(uvicorn.Config(app(False), http="h11", ws="none", log_level="error")),
        "tls": mtls.make_server(app(False), server_only, log_level="error"),
        "mtls": mtls.make_server(app(True), mutual, log_level="error"),
        # The option not taken (docs/decisions/0004): uvicorn runs the handshake itself; the
        # certificate still reaches the app through the same h11 subclass.
        "mtls_uvicorn_ssl": uvicorn.Server(
            uvicorn.Config(
                app(True),
                http=mtls._TlsH11Protocol,
                ws="none",
                log_level="error",
                ssl_context_factory=lambda config, default: mutual,
            )
        ),
    }
    for name, server in servers.items():
        server.config.access_log = False
        sock = mtls.bind(port=ports[name])  # IPPROTO_TCP: no Nagle stalls
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not all(s.started for s in servers.values()):
        time.sleep(0.01)
    ready.set()
    while True:
        time.sleep(3600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_response(sock: socket.socket | ssl.SSLSocket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)


def _server_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by the server process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cell(count: int, action: Callable[[], None], pid: int) -> dict[str, float | None]:
    """One timed run: wall time, client CPU and server CPU, each per operation, in ms."""
    server_before = _server_cpu(pid)
    client_before = time.process_time()
    started = time.perf_counter()
    for _ in range(count):
        action()
    wall = time.perf_counter() - started
    client = time.process_time() - client_before
    server_after = _server_cpu(pid)
    server = None if server_before is None or server_after is None else server_after - server_before
    return {
        "wall_ms": 1000 * wall / count,
        "client_cpu_ms": 1000 * client / count,
        "server_cpu_ms": None if server is None else 1000 * server / count,
    }


def _median(cells: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in cells[0]:
        values = [v for c in cells if (v := c[key]) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    wall = out["wall_ms"]
    out["per_s"] = round(1000 / wall, 1) if wall else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make_pki(root)
        ports = {name: _free_port() for name in KINDS}
        spawn = multiprocessing.get_context("spawn")
        ready = spawn.Event()
        server = spawn.Process(target=_serve, args=(str(root), ports, ready), daemon=True)
        server.start()
        try:
            if not ready.wait(60):
                print("server did not start", file=sys.stderr)
                return 1
            assert server.pid is not None
            result = _measure(root, ports, args, server.pid)
        finally:
            server.terminate()
            server.join(10)
    print(json.dumps(result, indent=2))
    return 0


def _measure(
    root: Path, ports: dict[str, int], args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    anchors = str(root / "at" / "ca.pem")
    server_only = ssl.create_default_context(cafile=anchors)
    mutual = ssl.create_default_context(cafile=anchors)
    mutual.load_cert_chain(root / "be" / "client.pem", root / "be" / "client.key")
    contexts: dict[str, ssl.SSLContext | None] = {
        "tcp": None,
        "tls": server_only,
        "mtls": mutual,
        "mtls_uvicorn_ssl": mutual,
    }
    kinds = KINDS
    metrics = ("handshake", "new_connection_request", "keepalive_request")

    def connect(kind: str) -> socket.socket | ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", ports[kind]))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = contexts[kind]
        return context.wrap_socket(sock, server_hostname="localhost") if context else sock

    def handshake(kind: str) -> Callable[[], None]:
        return lambda: connect(kind).close()

    def new_connection(kind: str) -> Callable[[], None]:
        def run() -> None:
            with connect(kind) as sock:
                sock.sendall(REQUEST)
                _read_response(sock)

        return run

    def keepalive(sock: socket.socket | ssl.SSLSocket) -> Callable[[], None]:
        def run() -> None:
            sock.sendall(REQUEST)
            _read_response(sock)

        return run

    cells: dict[tuple[str, str], list[dict[str, float | None]]] = {}
    # Interleaved (every kind in every round) so that load from elsewhere hits all kinds alike.
    for round_ in range(args.repeat + 1):  # round 0 warms up and is dropped
        for kind in kinds:
            kept = connect(kind)
            runs = {
                "handshake": (args.connections, handshake(kind)),
                "new_connection_request": (args.connections, new_connection(kind)),
                "keepalive_request": (args.requests, keepalive(kept)),
            }
            for metric, (count, action) in runs.items():
                cell = _cell(count if round_ else max(1, count // 10), action, pid)
                if round_:
                    cells.setdefault((kind, metric), []).append(cell)
            kept.close()
        print(f"round {round_} of {args.repeat} done", file=sys.stderr)

    out = {k: {m: _median(cells[(k, m)]) for m in metrics} for k in kinds}

    def ratio(a: str, b: str, metric: str, key: str = "wall_ms") -> float | None:
        x, y = out[a][metric][key], out[b][metric][key]
        return round(x / y, 2) if x is not None and y else None

    def per_request(a: str, b: str) -> float | None:
        x, y = out["mtls"][a]["wall_ms"], out["mtls"][b]["wall_ms"]
        return round(x / y, 2) if x is not None and y else None

    return {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "connections": args.connections,
        "requests": args.requests,
        "repeat": args.repeat,
        "results": out,
        "ratios": {
            "wall": {
                "mtls_vs_tls_handshake": ratio("mtls", "tls", "handshake"),
                "mtls_vs_tcp_connect": ratio("mtls", "tcp", "handshake"),
                "mtls_vs_tls_new_connection_request": ratio(
                    "mtls", "tls", "new_connection_request"
                ),
                "mtls_vs_tcp_new_connection_request": ratio(
                    "mtls", "tcp", "new_connection_request"
                ),
                "mtls_vs_tcp_keepalive_request": ratio("mtls", "tcp", "keepalive_request"),
                "mtls_vs_uvicorn_ssl_new_connection_request": ratio(
                    "mtls", "mtls_uvicorn_ssl", "new_connection_request"
                ),
                "mtls_new_connection_vs_keepalive_request": per_request(
                    "new_connection_request", "keepalive_request"
                ),
            },
            "server_cpu": {
                "mtls_vs_tls_handshake": ratio("mtls", "tls", "handshake", "server_cpu_ms"),
                "mtls_vs_tcp_new_connection_request": ratio(
                    "mtls", "tcp", "new_connection_request", "server_cpu_ms"
                ),
                "mtls_vs_tcp_keepalive_request": ratio(
                    "mtls", "tcp", "keepalive_request", "server_cpu_ms"
                ),
                "mtls_vs_uvicorn_ssl_new_connection_request": ratio(
                    "mtls", "mtls_uvicorn_ssl", "new_connection_request", "server_cpu_ms"
                ),
            },
        },
    }


if __name__ == "__main__":
    sys.exit(main())
