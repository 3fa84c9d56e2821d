"""The demo's services as child processes: which run, how the demo knows each answers, and the
supervisor that starts them (each in its own process group), watches them and stops them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from ncp.demo.configs import DemoError
from ncp.demo.layout import COUNTRY_A, COUNTRY_B, Layout, Ports
from ncp.security import pki

STOP_TIMEOUT_S = 15.0
STDERR_TAIL_LINES = 20

Command = Callable[[str, Path], list[str]]
"""The command line of a service: (``serve``, ``edge`` or ``orthanc``, its config) -> argv."""


def ncp_command(kind: str, config: Path) -> list[str]:
    """The real services: ``ncp serve|edge --config FILE`` with this interpreter; Orthanc."""
    if kind == "orthanc":
        from ncp.demo.orthanc import orthanc_binary

        return [orthanc_binary(), str(config)]
    return [sys.executable, "-m", "ncp", kind, "--config", str(config)]


@dataclass(frozen=True)
class Endpoint:
    """One URL a service answers on and how the demo knows it answers: GET ``url + path``
    (with the TLS identity ``client`` names) must answer ``expected``."""

    name: str
    """What the URL is for: ``standard``, ``dicomweb``, ``viewer``, ``portal``, ``ops``..."""
    url: str
    path: str
    expected: int
    client: str
    """``a``: A's CA trusted, B's client certificate (how B calls A); ``b``: B's CA trusted, A's
    client certificate (how A calls B); ``plain``: plain HTTP (operations listeners, Orthanc)."""


@dataclass
class Service:
    name: str
    role: str
    country: str
    kind: str
    config: Path
    endpoints: tuple[Endpoint, ...]
    process: subprocess.Popen[bytes] | None = None
    stderr_log: Path | None = None
    stdout_log: Path | None = None

    @property
    def urls(self) -> dict[str, str]:
        return {e.name: e.url for e in self.endpoints}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGTERM if the demo dies without stopping it (kill -9, a crash).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while starting."""


class NotReady(Exception):
    def __init__(self, service: Service, error: DemoError) -> None:
        super().__init__(str(error))
        self.service = service
        self.error = error


class ChildDied(Exception):
    def __init__(self, service: Service) -> None:
        super().__init__(service.name)
        self.service = service


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own group (start_new_session): its pgid is its pid, a group we made.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


class Supervisor:
    """Starts the services as child processes, each in its own process group, and stops them."""

    def __init__(
        self,
        logs: Path,
        command: Command,
        stop: threading.Event,
        clients: Mapping[str, ssl.SSLContext | bool],
    ) -> None:
        self.logs = logs
        self.command = command
        self.stop_requested = stop
        self.clients = clients
        self.services: list[Service] = []

    def start(self, service: Service) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        service.stdout_log = self.logs / f"{service.name}.stdout.log"
        service.stderr_log = self.logs / f"{service.name}.stderr.log"
        argv = self.command(service.kind, service.config)
        with service.stdout_log.open("wb") as out, service.stderr_log.open("wb") as err:
            service.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=service.config.parent,
                # Own group: a terminal's Ctrl-C reaches the demo only, which stops the children
                # in order; and stopping a child stops anything it started.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.services.append(service)

    def dead(self) -> Service | None:
        for service in self.services:
            if service.process is not None and service.process.poll() is not None:
                return service
        return None

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every child's group (newest first: B before A, Orthanc last), wait, then
        SIGKILL what is left."""
        running = [s for s in reversed(self.services) if s.process is not None]
        for service in running:
            assert service.process is not None
            _signal_group(service.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in running:
            assert service.process is not None
            try:
                service.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{service.name} did not stop in {timeout:.0f} s: killed", file=sys.stderr)
                _signal_group(service.process, signal.SIGKILL)
                service.process.wait()
            # The group may outlive its leader (a worker the child started): end it too.
            _signal_group(service.process, signal.SIGKILL)

    def wait_ready(self, service: Service, timeout: float, *, quiet: bool = False) -> None:
        for endpoint in service.endpoints:
            try:
                self._wait_endpoint(service, endpoint, timeout)
            except DemoError as exc:
                raise NotReady(service, exc) from exc
            if not quiet:
                print(f"ready: {service.name}.{endpoint.name} {endpoint.url}", flush=True)

    def _wait_endpoint(self, service: Service, endpoint: Endpoint, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        target = endpoint.url.rstrip("/") + endpoint.path
        verify = self.clients[endpoint.client]
        with httpx.Client(verify=verify, timeout=2.0, trust_env=False) as client:
            while True:
                if self.stop_requested.is_set():
                    raise Interrupted
                if service.process is not None and service.process.poll() is not None:
                    raise ChildDied(service)
                try:
                    answer = client.get(target)
                except httpx.TransportError:
                    answer = None
                if answer is not None:
                    if answer.status_code == endpoint.expected:
                        return
                    # The ops listener starts first and answers 503 until the node is ready.
                    if not (endpoint.name == "ops" and answer.status_code == 503):
                        raise DemoError(
                            f"{service.name}.{endpoint.name}: GET {target} answered "
                            f"{answer.status_code}, expected {endpoint.expected}"
                        )
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"{service.name}.{endpoint.name}: no answer at {target} in {timeout} s"
                    )
                self.stop_requested.wait(0.2)


def client_contexts(layout: Layout) -> dict[str, ssl.SSLContext | bool]:
    """How the demo (and any client) reaches each side: A's CA as the only anchor and B's client
    certificate (B calling A), B's CA and A's client certificate (A calling B), plain HTTP."""
    to_a = ssl.create_default_context(cafile=str(layout.keys_a / pki.CA_CERT))
    to_a.load_cert_chain(layout.keys_b / pki.CLIENT_CERT, layout.keys_b / pki.CLIENT_KEY)
    to_b = ssl.create_default_context(cafile=str(layout.keys_b / pki.CA_CERT))
    to_b.load_cert_chain(layout.keys_a / pki.CLIENT_CERT, layout.keys_a / pki.CLIENT_KEY)
    return {"a": to_a, "b": to_b, "plain": False}


def pair_services(layout: Layout, ports: Ports) -> list[Service]:
    """Node A, A's edge gateway and node B, with the endpoints that say each is ready. Each
    probe asks what costs nothing and leaves no record: a listener's static file, a
    CapabilityStatement, a gateway's 401 to a request without a token, ``/readyz``."""
    ops = Ports.ops_url
    return [
        Service(
            name="node-a",
            role=f"node of country {COUNTRY_A}: standard channel (FHIR, mutual TLS), DICOMweb "
            "gateway (option A), viewer (option B)",
            country=COUNTRY_A,
            kind="serve",
            config=layout.node_a_config,
            endpoints=(
                Endpoint("standard", ports.standard_url, "/metadata", 200, "a"),
                Endpoint("dicomweb", ports.imaging_url, "/studies", 401, "a"),
                Endpoint("viewer", ports.viewer_url, "/static/viewer.css", 200, "a"),
                Endpoint("ops", ops(ports.ops_a), "/readyz", 200, "plain"),
            ),
        ),
        Service(
            name="edge-a",
            role=f"edge gateway of country {COUNTRY_A} (option C), before A's archive",
            country=COUNTRY_A,
            kind="edge",
            config=layout.edge_config,
            endpoints=(
                Endpoint("dicomweb", ports.edge_url, "/studies", 401, "a"),
                Endpoint("ops", ops(ports.ops_edge), "/readyz", 200, "plain"),
            ),
        ),
        Service(
            name="node-b",
            role=f"node of country {COUNTRY_B}: its standard channel, the peer client, the "
            "retrieval workers and the HP portal",
            country=COUNTRY_B,
            kind="serve",
            config=layout.node_b_config,
            endpoints=(
                Endpoint("standard", ports.b_standard_url, "/metadata", 200, "b"),
                Endpoint("portal", ports.portal_url, "/static/portal.css", 200, "b"),
                Endpoint("ops", ops(ports.ops_b), "/readyz", 200, "plain"),
            ),
        ),
    ]


def tail(path: Path | None, lines: int = STDERR_TAIL_LINES) -> list[str]:
    if path is None or not path.exists():
        return []
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
