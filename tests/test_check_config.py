"""``ncp check-config``: each thing it complains of, on a node folder as an operator deploys it
with one part spoiled, and the same checks stopping ``ncp serve`` before it starts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ncp.cli import main
from ncp.ops.checks import Problem, check_file
from ncp.security import pki
from ncp.security.keystore import KeysMeta, RetiredKey, load_private_key, read_meta, write_meta
from tests.ops_support import (
    HOST,
    A,
    B,
    NodeFolder,
    leaf,
    node_folder,
    production_ca,
    toml_text,
)


@pytest.fixture
def folder(tmp_path: Path) -> NodeFolder:
    return node_folder(tmp_path / "at")


def found(folder: NodeFolder) -> list[Problem]:
    return check_file(folder.write()).problems


def test_a_node_as_deployed_has_no_problem(
    folder: NodeFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert found(folder) == []
    assert main(["check-config", "--config", str(folder.config)]) == 0
    assert "no errors, 0 warning(s)" in capsys.readouterr().out


# -- each spoiled part, and the line that names it ------------------------------------------------


def _replace_server(folder: NodeFolder, **options: object) -> None:
    key = pki.new_ec_key()
    cert = leaf(folder.ca, key, A, **options)  # type: ignore[arg-type]
    pki.write_file(folder.keys / "server.pem", pki.cert_pem(cert))
    pki.write_private_key(folder.keys / "server.key", key)


def _replace_client(folder: NodeFolder, country: str = A, **options: object) -> None:
    key = pki.new_ec_key()
    cert = leaf(folder.ca, key, country, **options)  # type: ignore[arg-type]
    pki.write_file(folder.keys / "client.pem", pki.cert_pem(cert))
    pki.write_private_key(folder.keys / "client.key", key)


def _set(section: str, **values: object) -> Callable[[NodeFolder], None]:
    def change(folder: NodeFolder) -> None:
        folder.settings[section] = {**folder.settings.get(section, {}), **values}

    return change


def _peer(**values: object) -> Callable[[NodeFolder], None]:
    def change(folder: NodeFolder) -> None:
        folder.trust["peers"][B].update(values)

    return change


def _peer_ca(
    not_after: timedelta, name: str = "be-ca.pem", test: bool = False
) -> Callable[[NodeFolder], None]:
    def change(folder: NodeFolder) -> None:
        ca = pki.make_ca(B) if test else production_ca(B, not_after=datetime.now(UTC) + not_after)
        pki.write_file(folder.root / name, pki.cert_pem(ca.certificate))

    return change


def _test_pki(folder: NodeFolder) -> None:
    pki.init_keys_folder(folder.root / "test-keys", A, (HOST,))
    folder.settings["keys"] = {"dir": "test-keys"}


def _no_ca_pem(folder: NodeFolder) -> None:
    (folder.keys / "ca.pem").unlink()


def _ca_key(folder: NodeFolder) -> None:
    pki.write_private_key(folder.keys / "ca.key", folder.ca.private_key)


def _swap_key(folder: NodeFolder) -> None:
    pki.write_private_key(folder.keys / "server.key", pki.new_ec_key())


def _foreign_server(folder: NodeFolder) -> None:
    other = production_ca(A)
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(other, key.public_key(), A, (HOST,))
    pki.write_file(folder.keys / "server.pem", pki.cert_pem(cert))
    pki.write_private_key(folder.keys / "server.key", key)


def _same_tls_key(folder: NodeFolder) -> None:
    server_key = load_private_key(folder.keys / "server.key")
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    cert = pki.issue_client_certificate(folder.ca, server_key.public_key(), A)
    pki.write_file(folder.keys / "client.pem", pki.cert_pem(cert))
    pki.write_private_key(folder.keys / "client.key", server_key)


def _signing_is_tls(folder: NodeFolder) -> None:
    meta = read_meta(folder.keys)
    (folder.keys / "signing" / f"{meta.current}.key").write_bytes(
        (folder.keys / "server.key").read_bytes()
    )


def _no_signing(folder: NodeFolder) -> None:
    meta = read_meta(folder.keys)
    (folder.keys / "signing" / f"{meta.current}.key").unlink()


def _stale_jwks(folder: NodeFolder) -> None:
    (folder.keys / "jwks.json").write_text(json.dumps({"keys": []}))


def _retired_past(folder: NodeFolder) -> None:
    meta = read_meta(folder.keys)
    old = pki.new_ec_key()
    pki.write_file(folder.keys / "signing" / "old-1.pub", pki.public_pem(old.public_key()))
    past = datetime.now(UTC) - timedelta(days=2)
    write_meta(folder.keys, KeysMeta(meta.country, meta.current, (RetiredKey("old-1", past),)))


def _open_key(folder: NodeFolder) -> None:
    os.chmod(folder.keys / "client.key", 0o644)


def _leaf_as_ca(folder: NodeFolder) -> None:
    (folder.keys / "ca.pem").write_bytes((folder.keys / "client.pem").read_bytes())


def _meta_country(folder: NodeFolder) -> None:
    meta = read_meta(folder.keys)
    write_meta(folder.keys, KeysMeta("DE", meta.current, meta.retired))


def _trust_not_toml(folder: NodeFolder) -> None:
    folder.trust_text = "peers = ["


@dataclass(frozen=True)
class Case:
    spoil: Callable[[NodeFolder], None]
    level: str
    file: str
    """The end of the file named: ``node.toml``, ``keys/server.pem``..."""
    key: str
    says: str


_NOW = timedelta(days=0)
CASES: dict[str, Case] = {
    "unknown setting": Case(
        _set("node", colour="red"), "error", "node.toml", "node.colour", "unknown key"
    ),
    "plain standard channel": Case(
        _set("urls", standard="http://ncp.at.example/fhir"),
        "error",
        "node.toml",
        "urls.standard",
        "https://",
    ),
    "standard channel not set": Case(
        _set("urls", standard=""), "error", "node.toml", "urls.standard", "not set"
    ),
    "plain gateway": Case(
        _set("urls", imaging=f"http://{HOST}/dicomweb"),
        "error",
        "node.toml",
        "urls.imaging",
        "in clear",
    ),
    "ops listener on the network": Case(
        _set("listen", ops_port=9100, ops_host="0.0.0.0"),
        "warning",
        "node.toml",
        "listen.ops_host",
        "no authentication",
    ),
    "archive folder missing": Case(
        _set("archive", path="nowhere"), "error", "node.toml", "archive.path", "no such folder"
    ),
    "archive over plain HTTP": Case(
        lambda f: f.settings.update(
            archive={"kind": "dicomweb", "url": "http://pacs.at.example/dicom-web"}
        ),
        "warning",
        "node.toml",
        "archive.url",
        "in clear",
    ),
    "report folder missing": Case(
        _set("reports", kind="folder", path="no-reports"),
        "error",
        "node.toml",
        "reports.path",
        "no such folder",
    ),
    "asked peer not trusted": Case(
        _set("consumer", peers=["DE"]),
        "error",
        "node.toml",
        "consumer.peers",
        "DE is not on the trust list",
    ),
    "demo flag": Case(_set("node", demo=True), "warning", "node.toml", "node.demo", "never deploy"),
    "keys folder missing": Case(
        _set("keys", dir="no-keys"), "error", "node.toml", "keys.dir", "no such keys folder"
    ),
    "keys of another country": Case(
        _meta_country, "error", "keys/keys.toml", "country", "'DE', but the node is 'AT'"
    ),
    "no CA certificate": Case(_no_ca_pem, "warning", "keys/ca.pem", "-", "are not checked"),
    "a leaf as CA": Case(_leaf_as_ca, "error", "keys/ca.pem", "basicConstraints", "not a CA"),
    "CA key in the folder": Case(_ca_key, "error", "keys/ca.key", "-", "never holds its CA's key"),
    "test keys": Case(_test_pki, "error", "test-keys/server.pem", "issuer", "test PKI"),
    "expired server certificate": Case(
        lambda f: _replace_server(
            f,
            names=(HOST,),
            not_before=datetime.now(UTC) - timedelta(days=400),
            not_after=datetime.now(UTC) - timedelta(days=1),
        ),
        "error",
        "keys/server.pem",
        "notAfter",
        "expired on",
    ),
    "server certificate expiring": Case(
        lambda f: _replace_server(
            f, names=(HOST,), not_after=datetime.now(UTC) + timedelta(days=10)
        ),
        "warning",
        "keys/server.pem",
        "notAfter",
        "in 9 days",
    ),
    "server certificate not yet valid": Case(
        lambda f: _replace_server(
            f, names=(HOST,), not_before=datetime.now(UTC) + timedelta(days=2)
        ),
        "error",
        "keys/server.pem",
        "notBefore",
        "not valid before",
    ),
    "key not of its certificate": Case(
        _swap_key, "error", "keys/server.key", "-", "does not match the certificate"
    ),
    "server certificate for clients only": Case(
        lambda f: _replace_server(f, names=(HOST,), usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
        "error",
        "keys/server.pem",
        "extendedKeyUsage",
        "TLS server authentication (serverAuth)",
    ),
    "client certificate for servers only": Case(
        lambda f: _replace_client(f, usages=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        "error",
        "keys/client.pem",
        "extendedKeyUsage",
        "TLS client authentication (clientAuth)",
    ),
    "no digitalSignature": Case(
        lambda f: _replace_server(f, names=(HOST,), digital_signature=False),
        "error",
        "keys/server.pem",
        "keyUsage",
        "digitalSignature",
    ),
    "certificate of another CA": Case(
        _foreign_server, "error", "keys/server.pem", "chain", "does not chain to the node's CA"
    ),
    "host not in the certificate": Case(
        lambda f: _replace_server(f, names=("other.example",)),
        "error",
        "keys/server.pem",
        "subjectAltName",
        f"does not name {HOST}",
    ),
    "client certificate of another country": Case(
        lambda f: _replace_client(f, "DE", usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
        "error",
        "keys/client.pem",
        "subject.C",
        "'DE', but the node is 'AT'",
    ),
    "one key for two roles": Case(
        _same_tls_key, "error", "keys/client.key", "-", "same key as server.key"
    ),
    "signing key missing": Case(_no_signing, "error", ".key", "-", "no such file"),
    "signing with a TLS key": Case(
        _signing_is_tls, "error", ".key", "-", "signing needs its own key"
    ),
    "JWKS without the current key": Case(
        _stale_jwks, "error", "keys/jwks.json", "keys", "does not publish the current signing key"
    ),
    "retired key past its time": Case(
        _retired_past, "warning", "keys/keys.toml", "retired.old-1", "ncp keys prune"
    ),
    "private key readable by others": Case(
        _open_key, "warning", "keys/client.key", "-", "chmod 600"
    ),
    "trust list missing": Case(
        _set("trust", list="no-trust.toml"),
        "error",
        "node.toml",
        "trust.list",
        "no such trust list",
    ),
    "trust list not TOML": Case(_trust_not_toml, "error", "trust.toml", "-", "not valid TOML"),
    "peer over plain HTTP": Case(
        _peer(standard="http://ncp.be.example/fhir"),
        "error",
        "trust.toml",
        "peers.BE.standard",
        "https only",
    ),
    "peer CA expired": Case(
        _peer_ca(timedelta(days=-1)), "error", "trust.toml", "peers.BE.tls_ca", "expired on"
    ),
    "peer CA expiring": Case(
        _peer_ca(timedelta(days=5)),
        "warning",
        "trust.toml",
        "peers.BE.tls_ca",
        "ask the peer for its next CA",
    ),
    "peer CA of the test PKI": Case(
        _peer_ca(_NOW, test=True), "error", "trust.toml", "peers.BE.tls_ca", "test PKI"
    ),
    "own country as a peer": Case(
        lambda f: f.trust["peers"].update(AT=dict(f.trust["peers"][B])),
        "warning",
        "trust.toml",
        "peers.AT",
        "own country",
    ),
    "peer pinned only": Case(
        _peer(tls_ca=[], tls_fingerprint=["sha256:" + "ab" * 32]),
        "warning",
        "trust.toml",
        "peers.BE",
        "pinned by fingerprint only",
    ),
    "no usable peer": Case(
        lambda f: f.trust.update(peers={}), "error", "trust.toml", "peers", "no usable peer"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_problem_is_named_on_its_own_line(folder: NodeFolder, name: str) -> None:
    case = CASES[name]
    case.spoil(folder)
    problems = found(folder)
    matching = [
        p
        for p in problems
        if p.level == case.level
        and p.file.endswith(case.file)
        and p.key == case.key
        and case.says in p.message
    ]
    assert matching, (
        f"{name}: expected {case.level} {case.file} {case.key} ~{case.says!r}, got:\n"
        + "\n".join(p.line() for p in problems)
    )
    if case.level == "warning":
        assert not [p for p in problems if p.level == "error"], [p.line() for p in problems]


def test_unsafe_settings_are_accepted_in_the_demo_only(folder: NodeFolder) -> None:
    _test_pki(folder)
    _set("urls", imaging=f"http://{HOST}/dicomweb")(folder)
    unsafe = found(folder)
    assert {p.key for p in unsafe if p.level == "error"} >= {
        "issuer",
        "subject",
        "urls.imaging",
        "-",
    }
    folder.settings["node"]["demo"] = True
    in_demo = found(folder)
    assert [p for p in in_demo if p.level == "error"] == []
    assert {p.key for p in in_demo} == {"node.demo", "urls.imaging"}


def test_every_bad_peer_is_named_not_only_the_first(folder: NodeFolder) -> None:
    folder.trust["peers"]["DE"] = {
        "standard": "http://ncp.de.example/fhir",
        "tls_ca": "be-ca.pem",
        "jwks_file": "be-jwks.json",
    }
    folder.trust["peers"]["FR"] = {
        "standard": "https://ncp.fr.example/fhir",
        "jwks_file": "be-jwks.json",
    }
    problems = found(folder)
    keys = {p.key for p in problems if p.level == "error"}
    assert keys == {"peers.DE.standard", "peers.FR"}, [p.line() for p in problems]


# -- the command ----------------------------------------------------------------------------------


def test_exit_codes_and_lines(
    folder: NodeFolder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _swap_key(folder)
    _set("urls", standard="http://x.example/fhir")(folder)
    folder.write()
    assert main(["check-config", "--config", str(folder.config)]) == 1
    out = capsys.readouterr().out.splitlines()
    mismatch = f"does not match the certificate {folder.keys / 'server.pem'}"
    assert f"error: {folder.keys / 'server.key'}: -: {mismatch}" in out
    assert any(line.startswith("error: ") and ": urls.standard: " in line for line in out)
    assert out[-1].startswith("3 error(s)")  # and the host of the new URL is not in the certificate

    assert main(["check-config", "--config", str(folder.config), "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert {"level", "file", "key", "message"} == set(listed[0])

    assert main(["check-config", "--config", str(tmp_path / "none.toml")]) == 2
    other = tmp_path / "other.toml"
    other.write_text("[something]\nx = 1\n")
    assert main(["check-config", "--config", str(other)]) == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_ncp_serve_refuses_to_start_on_an_error(
    folder: NodeFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    _ca_key(folder)
    folder.write()
    assert main(["serve", "--config", str(folder.config)]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder.keys / 'ca.key'}" in err
    assert "ncp serve does not start with errors" in err
    assert not (folder.root / "node.db").exists()  # refused before opening anything


# -- the edge gateway -----------------------------------------------------------------------------


def _edge(
    folder: NodeFolder,
    *,
    audience: str = "https://edge.at.example/dicomweb",
    test: bool = False,
    demo: bool = False,
) -> Path:
    root = folder.root / "edge"
    root.mkdir(exist_ok=True)
    ca = pki.make_ca(A) if test else folder.ca
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(ca, key.public_key(), A, ("edge.at.example",))
    pki.write_file(root / "server.pem", pki.cert_pem(cert))
    pki.write_private_key(root / "server.key", key)
    config = root / "edge.toml"
    config.write_text(
        toml_text(
            {
                "edge": {
                    "country": A,
                    "audience": audience,
                    "jwks": "../keys/jwks.json",
                    "demo": demo,
                },
                "archive": {"kind": "folder", "path": "../archive"},
                "tls": {"certificate": "server.pem", "key": "server.key"},
            }
        )
    )
    return config


def test_an_edge_config_is_checked_too(
    folder: NodeFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_file(_edge(folder)).problems == []
    plain = check_file(_edge(folder, audience="http://edge.at.example/dicomweb")).problems
    assert [(p.key, p.level) for p in plain] == [("edge.audience", "error")]
    test_keys = check_file(_edge(folder, test=True)).problems
    assert [(p.key, p.level) for p in test_keys] == [("issuer", "error")]
    assert [p.level for p in check_file(_edge(folder, test=True, demo=True)).problems] == [
        "warning"
    ]
    (folder.keys / "jwks.json").write_text("{}")
    broken = check_file(_edge(folder)).problems
    assert [(p.file.endswith("jwks.json"), p.key) for p in broken] == [(True, "keys")]
    assert main(["check-config", "--config", str(folder.root / "edge" / "edge.toml")]) == 1


def test_a_later_part_adds_its_demo_only_check(folder: NodeFolder) -> None:
    from ncp.config import NodeSettings
    from ncp.ops import checks

    def demo_accounts(settings: NodeSettings, ctx: checks.Context, found: checks.Findings) -> None:
        if not ctx.demo:
            found.error(ctx.config, "portal.demo_accounts", "demo accounts outside the demo")

    checks.register_check(demo_accounts)
    try:
        assert [p.key for p in found(folder)] == ["portal.demo_accounts"]
        folder.settings["node"]["demo"] = True
        assert [p.key for p in found(folder)] == ["node.demo"]
    finally:
        checks._EXTRA_CHECKS.remove(demo_accounts)


# -- the demo's portal logins -----------------------------------------------------------------


def _portal_with_accounts(folder: NodeFolder, *, demo_accounts: bool) -> None:
    """``folder`` as a node B whose portal serves, its database holding one ordinary account
    and (with ``demo_accounts``) the demo's logins, made as ``ncp demo`` makes them."""
    from ncp.demo.accounts import ensure_demo_logins
    from ncp.portal.accounts import HpProfile, create_account
    from ncp.store.db import make_engine, migrate, session_factory

    folder.settings["portal"] = {"enabled": True, "url": f"https://{HOST}:9447"}
    engine = make_engine(f"sqlite:///{folder.root / 'node.db'}")
    try:
        migrate(engine)
        sessions = session_factory(engine)
        create_account(
            sessions,
            HpProfile(
                username="dr.real",
                name="Dr. Real",
                role_code="221",
                role_display="Medical doctors",
                organisation="UZ Leuven",
                organisation_id="urn:oid:2.16.56.1.1.1.1",
                point_of_care="Radiology",
                language="nl-BE",
            ),
            password="a long real password",
        )
        if demo_accounts:
            ensure_demo_logins(sessions, "demo")
    finally:
        engine.dispose()


def test_the_demo_logins_stop_a_portal_outside_the_demo(
    folder: NodeFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    _portal_with_accounts(folder, demo_accounts=True)
    [problem] = found(folder)
    assert (problem.level, problem.key) == ("error", "portal")
    assert "demo's portal accounts (anne, luc)" in problem.message
    assert main(["check-config", "--config", str(folder.config)]) == 1
    capsys.readouterr()
    # ncp serve runs the same checks and does not start.
    assert main(["serve", "--config", str(folder.config)]) == 2
    assert "demo's portal accounts (anne, luc)" in capsys.readouterr().err
    # In the demo they are what it is for: a warning says never to deploy it, nothing more.
    folder.settings["node"]["demo"] = True
    assert [(p.level, p.key) for p in found(folder)] == [("warning", "node.demo")]


def test_a_portal_without_the_demo_logins_passes(folder: NodeFolder) -> None:
    _portal_with_accounts(folder, demo_accounts=False)
    assert found(folder) == []
    # A database not made yet is not created by the check.
    folder.settings["database"] = {"url": "sqlite:///not-yet.db"}
    assert found(folder) == []
    assert not (folder.root / "not-yet.db").exists()
