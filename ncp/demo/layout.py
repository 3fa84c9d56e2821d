"""Where one demo lives (its data folder) and which ports its services take."""

from __future__ import annotations

import socket
from dataclasses import dataclass, fields
from pathlib import Path

from ncp.errors import ConfigError
from ncp.examples.generate import DEFAULT_PATIENT_ID_ISSUER

COUNTRY_A = "AT"
ISSUER_A = DEFAULT_PATIENT_ID_ISSUER
COUNTRY_B = "BE"
ISSUER_B = "2.16.56.1.1.1"
HOST = "127.0.0.1"
"""Every service binds loopback only: the demo's keys are test keys."""
PUBLIC_HOST = "localhost"
"""The host in the URLs; the test server certificates name both."""
DEFAULT_BASE_PORT = 8443


class PortTaken(ConfigError):
    """A fixed port of the demo is in use by another process."""


@dataclass(frozen=True)
class Layout:
    """Where everything of one demo lives, under ``data``."""

    data: Path

    @property
    def dicom(self) -> Path:
        return self.data / "dicom"

    @property
    def reports(self) -> Path:
        return self.data / "reports"

    @property
    def node_a(self) -> Path:
        return self.data / "country-a"

    @property
    def node_a_config(self) -> Path:
        return self.node_a / "node.toml"

    @property
    def keys_a(self) -> Path:
        return self.node_a / "keys"

    @property
    def trust_a(self) -> Path:
        return self.node_a / "trust.toml"

    @property
    def node_b(self) -> Path:
        return self.data / "country-b"

    @property
    def keys_b(self) -> Path:
        return self.node_b / "keys"

    @property
    def node_b_config(self) -> Path:
        return self.node_b / "node.toml"

    @property
    def trust_b(self) -> Path:
        return self.node_b / "trust.toml"

    @property
    def hp_b(self) -> Path:
        """The HP identity ``ncp ask`` signs as (the same as ``[retrieval.cli_hp]``)."""
        return self.node_b / "hp.toml"

    @property
    def store_b(self) -> Path:
        return self.node_b / "retrieved"

    @property
    def edge(self) -> Path:
        return self.data / "edge"

    @property
    def edge_config(self) -> Path:
        return self.edge / "edge.toml"

    @property
    def edge_cert(self) -> Path:
        return self.edge / "tls" / "server.pem"

    @property
    def edge_key(self) -> Path:
        return self.edge / "tls" / "server.key"

    @property
    def orthanc(self) -> Path:
        """A's Orthanc with ``--archive orthanc``: its config, storage and index."""
        return self.data / "orthanc-a"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def demo_json(self) -> Path:
        return self.data / "demo.json"


@dataclass(frozen=True)
class Ports:
    """The demo's ports, in the order ``--base-port N`` gives them (N, N+1, ...)."""

    standard: int
    """A's standard channel."""
    imaging: int
    """A's option A gateway."""
    edge: int
    """A's edge gateway (option C)."""
    viewer: int
    """A's option B viewer."""
    portal: int
    """B's portal."""
    b_standard: int
    """B's standard channel."""
    ops_a: int
    ops_edge: int
    ops_b: int
    """The operations listeners (plain HTTP: /healthz, /readyz, /metrics)."""

    @classmethod
    def count(cls) -> int:
        return len(fields(cls))

    def url(self, port: int, path: str = "") -> str:
        return f"https://{PUBLIC_HOST}:{port}{path}"

    @property
    def standard_url(self) -> str:
        return self.url(self.standard, "/fhir")

    @property
    def imaging_url(self) -> str:
        return self.url(self.imaging, "/dicomweb")

    @property
    def edge_url(self) -> str:
        return self.url(self.edge, "/dicomweb")

    @property
    def viewer_url(self) -> str:
        return self.url(self.viewer, "/viewer")

    @property
    def portal_url(self) -> str:
        return self.url(self.portal)

    @property
    def b_standard_url(self) -> str:
        return self.url(self.b_standard, "/fhir")

    @staticmethod
    def ops_url(port: int) -> str:
        return f"http://{HOST}:{port}"


def choose_ports(base: int, host: str = HOST) -> Ports:
    """``base``, ``base+1``, ... each checked free; ``base`` 0: free ports."""
    n = Ports.count()
    if base == 0:
        # Hold every socket until the last is bound, so the kernel gives different ports.
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        try:
            for s in socks:
                s.bind((host, 0))
            numbers = [int(s.getsockname()[1]) for s in socks]
        finally:
            for s in socks:
                s.close()
        return Ports(*numbers)
    if not 1 <= base <= 65536 - n:
        raise PortTaken(f"--base-port {base}: must be 0 (free ports) or 1..{65536 - n}")
    for port in range(base, base + n):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As uvicorn binds: a port left in TIME_WAIT by the last demo is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise PortTaken(
                    f"port {port} on {host} is taken ({exc.strerror}); the demo uses "
                    f"{base}..{base + n - 1}: stop what holds it, or choose --base-port N "
                    "(or --base-port 0 for free ports)"
                ) from exc
    return fixed_ports(base)


def fixed_ports(base: int) -> Ports:
    """The ports of ``--base-port base``, unchecked (``--setup-only`` binds nothing)."""
    return Ports(*range(base, base + Ports.count()))
