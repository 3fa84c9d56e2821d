"""``demo.json``: what a client (a test, a script, a conformance suite, a person) needs to drive
the running pair: every service with its role, URLs, process and logs; each node's config,
certificates, keys and trust list; the portal's demo logins; a ready-made identity of country B
for scripts that call A directly (``test_peer``); the patient with the most studies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ncp.config import NodeSettings
from ncp.demo.accounts import DemoLogin
from ncp.demo.configs import Configs
from ncp.demo.data import TopPatient
from ncp.demo.layout import COUNTRY_A, COUNTRY_B, Layout
from ncp.demo.services import Service
from ncp.fhir.identifiers import patient_system
from ncp.security import pki
from ncp.security.keystore import KeyStore

FORMAT = 2
"""2: node B runs (``nodes.BE``, ``portal``); service URLs are keyed by what they are for."""


def _node(settings: NodeSettings, config: Path, trust: Path, keys: Path) -> dict[str, Any]:
    return {
        "config": str(config),
        "urls": settings.urls.model_dump(),
        "database": settings.database.url,
        "keys": str(keys),
        "ca_certificate": str(keys / pki.CA_CERT),
        "server_certificate": str(keys / pki.SERVER_CERT),
        "server_key": str(keys / pki.SERVER_KEY),
        "client_certificate": str(keys / pki.CLIENT_CERT),
        "client_key": str(keys / pki.CLIENT_KEY),
        "jwks": str(keys / pki.JWKS_JSON),
        "trust_list": str(trust),
    }


def describe(
    layout: Layout,
    services: Sequence[Service],
    configs: Configs,
    top: TopPatient,
    logins: Sequence[DemoLogin],
) -> dict[str, Any]:
    b_keys = KeyStore.load(layout.keys_b, country=COUNTRY_B)
    signing = b_keys.current_signing_key()
    node_b = _node(configs.b, layout.node_b_config, layout.trust_b, layout.keys_b)
    node_b.update(
        {
            "portal": configs.b.portal.url,
            "store": str(layout.store_b),
            "hp": str(layout.hp_b),
        }
    )
    return {
        "format": FORMAT,
        "data": str(layout.data),
        "services": [
            {
                "name": s.name,
                "role": s.role,
                "country": s.country,
                "pid": s.process.pid if s.process else None,
                "config": str(s.config),
                "urls": s.urls,
                "logs": {"stdout": str(s.stdout_log), "stderr": str(s.stderr_log)},
            }
            for s in services
        ],
        "nodes": {
            COUNTRY_A: _node(configs.a, layout.node_a_config, layout.trust_a, layout.keys_a),
            COUNTRY_B: node_b,
        },
        "edge": {
            COUNTRY_A: {
                "config": str(layout.edge_config),
                "certificate": str(layout.edge_cert),
                "key": str(layout.edge_key),
                "jwks": str(layout.keys_a / pki.JWKS_JSON),
            }
        },
        "portal": {
            "url": configs.b.portal.url,
            "accounts": [login.to_json() for login in logins],
            "note": "demo logins: the password and the TOTP secret of each (`ncp demo --totp "
            "USER` prints the current code); refused by any portal outside the demo",
        },
        "test_peer": {
            "country": COUNTRY_B,
            "note": "country B's identity (node-b's keys): call A's standard channel with its "
            "client certificate, sign HP assertions and TRCs with its signing key "
            "(audience: A's standard URL)",
            "keys": str(layout.keys_b),
            "ca_certificate": str(layout.keys_b / pki.CA_CERT),
            "client_certificate": str(b_keys.client.cert_path),
            "client_key": str(b_keys.client.key_path),
            "signing_key": str(layout.keys_b / pki.SIGNING_DIR / f"{signing.kid}.key"),
            "signing_kid": signing.kid,
            "jwks": str(layout.keys_b / pki.JWKS_JSON),
            "audience": configs.a.urls.standard,
            "trust_anchor": str(layout.keys_a / pki.CA_CERT),
        },
        "patient": {
            "id": top.patient_id,
            "issuer": top.issuer,
            "system": patient_system(top.issuer),
            "studies": top.studies,
            "newest_study": top.newest,
            "family": top.family,
            "given": top.given,
            "birth_date": top.birth_date,
        },
    }
