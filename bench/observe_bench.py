"""What observing every request costs (``ncp.ops.observe.ObservedApp``: request id, latency
histogram by route template, one log line), against the same app unobserved, in the same run.

Both apps are served by uvicorn on loopback (plain HTTP: TLS would cost the same on both sides)
and asked by one keep-alive client, the requests interleaved in rounds so that a busy machine
slows both alike. Two routes: a small FastAPI route with a path parameter (as the standard
channel's), and a catch-all route whose path is reduced to its DICOMweb shape (as the gateways').

    python bench/observe_bench.py --requests 2000 --rounds 5

Prints the median time per request of each and the ratio observed/bare; the log line goes to a
handler that discards it after formatting it as JSON (what ``--log-format json`` does).
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import statistics
import threading
import time
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ncp.ops.logs import configure_logging
from ncp.ops.metrics import Metrics
from ncp.ops.observe import ObservedApp


def _app() -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/fhir/Bundle/{report_id}")
    def bundle(report_id: str) -> dict[str, str]:
        return {"resourceType": "Bundle", "id": report_id}

    async def dicomweb(request: Request) -> Response:
        return Response(b"[]", media_type="application/dicom+json")

    app.router.add_route("/dicomweb/{rest:path}", dicomweb, methods=["GET"])
    return app


def _serve(app: Any) -> tuple[uvicorn.Server, int]:
    with socket.socket() as probe:  # a free port; uvicorn binds it itself, with TCP_NODELAY
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, port


def _time(client: httpx.Client, url: str, count: int) -> float:
    started = time.perf_counter()
    for n in range(count):
        answer = client.get(url.format(n=n))
        assert answer.status_code == 200
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configure_logging("json", "info", stream=io.StringIO())  # formatted, then dropped
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    bare, bare_port = _serve(_app())
    observed, observed_port = _serve(ObservedApp(_app(), listener="bench", metrics=Metrics()))
    paths = {
        "FastAPI route": "/fhir/Bundle/r{n}",
        "catch-all, DICOMweb shape": "/dicomweb/studies/1.2.{n}/series/3.4/metadata",
    }
    try:
        with httpx.Client(timeout=10, trust_env=False) as client:
            for name, path in paths.items():
                times: dict[str, list[float]] = {"bare": [], "observed": []}
                for _ in range(args.rounds):
                    for label, port in (("bare", bare_port), ("observed", observed_port)):
                        url = f"http://127.0.0.1:{port}{path}"
                        times[label].append(_time(client, url, args.requests))
                b = statistics.median(times["bare"]) * 1e6
                o = statistics.median(times["observed"]) * 1e6
                print(
                    f"{name:28s} bare {b:7.1f} us/request  observed {o:7.1f} us/request  "
                    f"+{o - b:5.1f} us  ratio {o / b:.2f}"
                )
    finally:
        bare.should_exit = observed.should_exit = True


if __name__ == "__main__":
    main()
