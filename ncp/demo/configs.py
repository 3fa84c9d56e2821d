"""The demo's configuration: example data and test PKIs made once, the configs and trust lists
of node A, A's edge gateway and node B written at every start (the ports may change), each read
back as the services will read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from ncp.config import EdgeSettings, NodeSettings, load_edge_settings, load_settings
from ncp.demo.layout import COUNTRY_A, COUNTRY_B, HOST, ISSUER_A, ISSUER_B, Layout, Ports
from ncp.errors import NcpError
from ncp.examples.generate import generate_examples
from ncp.fhir.identifiers import patient_system
from ncp.security import pki
from ncp.security.keystore import load_certificates, load_private_key


class DemoError(NcpError):
    """A service of the demo could not be prepared, started, or did not become ready."""


@dataclass(frozen=True)
class Archive:
    """A's archive in the demo: the generated folder, or a local Orthanc (``--archive orthanc``)
    holding the same files."""

    kind: str = "folder"
    dicomweb: str = ""
    """Orthanc's DICOMweb base (``kind`` orthanc)."""

    def section(self) -> str:
        if self.kind == "orthanc":
            return f'kind = "dicomweb"\nurl = "{self.dicomweb}"'
        return 'kind = "folder"\npath = "../dicom"'

    @property
    def database(self) -> str:
        # Another index for another archive: each keeps its own catalogue and audit trail.
        return "index-orthanc.db" if self.kind == "orthanc" else "index.db"


@dataclass(frozen=True)
class Configs:
    a: NodeSettings
    b: NodeSettings
    edge: EdgeSettings


_NODE_A = """\
# Country A of the demo, written by `ncp demo` at every start (the ports may change): edits here
# are lost. Paths are relative to this file.
[node]
country = "{country}"
name = "NCPeH-{country} imaging (demo)"
patient_id_issuer = "{issuer}"
# Test keys and test peers: only `ncp demo` writes this (ncp check-config refuses them otherwise).
demo = true

[urls]
standard = "{standard}"
imaging = "{imaging}"
edge = "{edge}"
viewer = "{viewer}"

[listen]
host = "{host}"
standard_port = {standard_port}
imaging_port = {imaging_port}
viewer_port = {viewer_port}
ops_port = {ops_port}

[database]
url = "sqlite:///{database}"

[archive]
{archive}
# Assigning authority of Patient IDs that carry no Issuer of Patient ID (the edge says the same).
patient_id_issuer = "{issuer}"

[reports]
kind = "folder"
path = "../reports"

[keys]
dir = "keys"

[trust]
list = "trust.toml"
"""

_TRUST_A = """\
# Country A's trust list in the demo, written by `ncp demo` (format: docs/trust.md).
format = 1

# Country B's node of the demo: its standard channel, the CA of its TLS certificates and its
# signing keys (HP assertions and TRCs).
[peers.{peer}]
standard = "{standard}"
tls_ca = "../country-b/keys/ca.pem"
jwks_file = "../country-b/keys/jwks.json"
"""

_EDGE = """\
# Country A's edge gateway (option C) in the demo, written by `ncp demo` at every start.
[edge]
country = "{country}"
audience = "{audience}"
jwks = "../country-a/keys/jwks.json"
name = "edge gateway {country} (demo)"
demo = true

[archive]
{archive}
# As node A's [archive]: the same patient check for IDs without Issuer of Patient ID.
patient_id_issuer = "{issuer}"

[tls]
certificate = "tls/server.pem"
key = "tls/server.key"

[listen]
host = "{host}"
port = {port}
ops_port = {ops_port}

[database]
url = "sqlite:///edge-audit.db"
"""

_NODE_B = """\
# Country B of the demo, written by `ncp demo` at every start (the ports may change): edits here
# are lost. `ncp serve` runs its standard channel, its portal and its retrieval workers;
# `ncp pull` / `ncp ask --config` this file act from the command line.
[node]
country = "{country}"
name = "NCPeH-{country} imaging (demo)"
patient_id_issuer = "{issuer}"
# Test keys, test peers and the demo's portal logins: only `ncp demo` writes this.
demo = true

[urls]
standard = "{standard}"

[listen]
host = "{host}"
standard_port = {standard_port}
portal_port = {portal_port}
ops_port = {ops_port}

[database]
url = "sqlite:///node-b.db"

[archive]
kind = "folder"
path = "archive"

[keys]
dir = "keys"

[trust]
list = "trust.toml"

[consumer]
peers = ["{peer}"]

[portal]
enabled = true
url = "{portal}"
# The HP types A's patient number as the demo prints it; the portal adds A's identifier system.
identifier_systems = {{ {peer} = "{peer_system}" }}

[retrieval]
enabled = true               # the workers run in `ncp serve`
normal_workers = 4           # four pulls at once (bench/pair_load.py drives four)
retention_days = 7

[retrieval.store]
kind = "folder"
path = "retrieved"

# The health professional `ncp pull` acts for (a command line has no login; a demo identity).
[retrieval.cli_hp]
{hp}
"""

_HP = """\
id = "BE-DEMO-HP-1"
name = "Dr. Demo Peeters"
organisation = "Demo hospital {country} (demo)"
organisation_id = "urn:ncp:demo:organisation"
point_of_care = "Emergency department (demo)"
locale = "en-BE"
"""

_ASK_HP = """\
# The health professional `ncp ask --hp` signs as in the demo (the same as [retrieval.cli_hp]).
subject = "BE-DEMO-HP-1"
name = "Dr. Demo Peeters"
role = "221"
role_display = "Medical doctors"
organisation = "Demo hospital {country} (demo)"
organisation_id = "urn:ncp:demo:organisation"
point_of_care = "Emergency department (demo)"
language = "en-BE"
authentication = "urn:ncp:acr:operator-configured"
"""

_TRUST_B = """\
# Country B's trust list in the demo, written by `ncp demo` (format: docs/trust.md).
format = 1

[peers.{peer}]
standard = "{standard}"
imaging = "{imaging}"
viewer = "{viewer}"
tls_ca = "../country-a/keys/ca.pem"
jwks_file = "../country-a/keys/jwks.json"
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _edge_certificate(layout: Layout) -> None:
    """The edge gateway's own server certificate from A's test CA: it never holds A's node keys."""
    if layout.edge_cert.exists() and layout.edge_key.exists():
        return
    ca_key = load_private_key(layout.keys_a / pki.CA_KEY)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DemoError(f"{layout.keys_a / pki.CA_KEY}: the test CA key must be EC")
    ca = pki.Authority(load_certificates(layout.keys_a / pki.CA_CERT)[0], ca_key)
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(ca, key.public_key(), COUNTRY_A)
    layout.edge_cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.write_file(layout.edge_cert, pki.cert_pem(cert))
    pki.write_private_key(layout.edge_key, key)


def generate_once(layout: Layout, *, patients: int, seed: int, big: int) -> None:
    """Example data and the two test PKIs, made the first time only."""
    if not layout.dicom.is_dir():
        print(f"generating example data for country {COUNTRY_A} into {layout.data} ...", flush=True)
        s = generate_examples(
            layout.data,
            patients=patients,
            seed=seed,
            big_patient_studies=big,
            country=COUNTRY_A,
            patient_id_issuer=ISSUER_A,
        )
        print(
            f"  {s.patients} patients, {s.studies} studies, {s.instances} instances, "
            f"{s.reports} reports in {s.report_versions} versions (a report corrected or "
            "amended keeps each version)"
        )
    for keys, country in ((layout.keys_a, COUNTRY_A), (layout.keys_b, COUNTRY_B)):
        if not (keys / pki.KEYS_TOML).exists():
            pki.init_keys_folder(keys, country)
            print(f"test PKI for {country} in {keys}")
    _edge_certificate(layout)


def write_configs(layout: Layout, ports: Ports, archive: Archive) -> Configs:
    """Every config and trust list of the pair, for these ports; read back as the services will
    (a config a service would refuse fails here, named)."""
    _write(layout.trust_a, _TRUST_A.format(peer=COUNTRY_B, standard=ports.b_standard_url))
    _write(
        layout.node_a_config,
        _NODE_A.format(
            country=COUNTRY_A,
            issuer=ISSUER_A,
            standard=ports.standard_url,
            imaging=ports.imaging_url,
            edge=ports.edge_url,
            viewer=ports.viewer_url,
            host=HOST,
            standard_port=ports.standard,
            imaging_port=ports.imaging,
            viewer_port=ports.viewer,
            ops_port=ports.ops_a,
            database=archive.database,
            archive=archive.section(),
        ),
    )
    _write(
        layout.edge_config,
        _EDGE.format(
            country=COUNTRY_A,
            audience=ports.edge_url,
            host=HOST,
            port=ports.edge,
            ops_port=ports.ops_edge,
            issuer=ISSUER_A,
            archive=archive.section(),
        ),
    )
    _write(
        layout.trust_b,
        _TRUST_B.format(
            peer=COUNTRY_A,
            standard=ports.standard_url,
            imaging=ports.imaging_url,
            viewer=ports.viewer_url,
        ),
    )
    _write(
        layout.node_b_config,
        _NODE_B.format(
            country=COUNTRY_B,
            issuer=ISSUER_B,
            peer=COUNTRY_A,
            peer_system=patient_system(ISSUER_A),
            standard=ports.b_standard_url,
            host=HOST,
            standard_port=ports.b_standard,
            portal_port=ports.portal,
            ops_port=ports.ops_b,
            portal=ports.portal_url,
            hp=_HP.format(country=COUNTRY_B),
        ),
    )
    _write(layout.hp_b, _ASK_HP.format(country=COUNTRY_B))
    (layout.node_b / "archive").mkdir(parents=True, exist_ok=True)
    return Configs(
        a=load_settings(layout.node_a_config),
        b=load_settings(layout.node_b_config),
        edge=load_edge_settings(layout.edge_config),
    )
