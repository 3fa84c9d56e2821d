"""``ncp check-config --config FILE``: everything wrong with a node's (or an edge gateway's)
configuration, keys, certificates and trust list, one line per problem, before it serves.

The loaders of the node stop at the first error (:class:`~ncp.security.keystore.KeyStore`,
:class:`~ncp.security.trust.TrustList`): an operator fixing a new node would meet its problems
one start at a time. Here every check runs and says what it found, as
``<level>: <file>: <key>: <what is wrong>``, where file is the config, a certificate, a key or
the trust list, and key the setting or the part of the file at fault. ``error`` stops
``ncp serve`` (it runs the same checks at start); ``warning`` is for the operator (a certificate
that expires within ``ops.certificate_warning_days``, a retired key past its time).

Unsafe settings are refused outside the demo (``node.demo``, written only by ``ncp demo``):
plain HTTP for a channel, certificates of the test PKI (``ncp keys init``, marked by its CA's
name: :func:`ncp.security.pki.is_test_issued`) and a CA private key in the keys folder, and
the demo's portal accounts in the database of a portal that serves (:mod:`ncp.ops.demo_guard`).
Demo-only conveniences of later parts check the same flag and add their complaint with
:func:`register_check`.

Exit codes: 0 no error (warnings may be printed), 1 errors found, 2 the file could not be read
as a node or edge configuration at all.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ncp.config import (
    ArchiveSection,
    DicomwebArchive,
    EdgeSettings,
    FolderArchive,
    NodeSettings,
    load_edge_settings,
    load_settings,
)
from ncp.errors import ConfigError, NcpError
from ncp.ops.demo_guard import check_demo_accounts
from ncp.security import pki
from ncp.security.keystore import (
    InvalidJwk,
    KeyStoreError,
    MissingKeyFile,
    key_set_from_jwks,
    load_certificates,
    load_private_key,
    load_signing_private_key,
    load_signing_public_key,
    read_meta,
    subject_country,
)
from ncp.security.trust import Peer, TrustList, TrustListError, issued_by

Level = Literal["error", "warning"]
EXIT_OK, EXIT_ERRORS, EXIT_UNREADABLE = 0, 1, 2
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


@dataclass(frozen=True, slots=True)
class Problem:
    level: Level
    file: str
    key: str
    message: str

    def line(self) -> str:
        return f"{self.level}: {self.file}: {self.key}: {self.message}"


@dataclass
class Findings:
    """What the checks found, in the order they found it."""

    problems: list[Problem] = field(default_factory=list)

    def error(self, file: object, key: str, message: str) -> None:
        self.problems.append(Problem("error", str(file), key, message))

    def warning(self, file: object, key: str, message: str) -> None:
        self.problems.append(Problem("warning", str(file), key, message))

    def from_message(self, text: str, level: Level = "error") -> None:
        """A loader's message ``FILE: KEY: WHY`` (one per line) as problems."""
        for row in text.splitlines():
            parts = row.split(": ", 2)
            if len(parts) == 3:
                self.problems.append(Problem(level, *parts))
            elif len(parts) == 2:
                self.problems.append(Problem(level, parts[0], "-", parts[1]))
            else:
                self.problems.append(Problem(level, "-", "-", row))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]


@dataclass(frozen=True)
class Context:
    """What every check needs to know besides its own section."""

    config: Path
    demo: bool
    now: datetime
    warn: timedelta


NodeCheck = Callable[[NodeSettings, Context, Findings], None]
_EXTRA_CHECKS: list[NodeCheck] = []


def register_check(check: NodeCheck) -> NodeCheck:
    """Add a check of a node's settings (a part that lands later: the portal's demo accounts
    refused outside the demo). Usable as a decorator."""
    _EXTRA_CHECKS.append(check)
    return check


# -- entry points ---------------------------------------------------------------------------------


def config_kind(path: Path) -> Literal["node", "edge"]:
    """Whether ``path`` is a node's or an edge gateway's config (``[edge]`` without
    ``[node]``); raises :class:`ConfigError` when it is neither or cannot be read."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if "node" in data:
        return "node"
    if "edge" in data:
        return "edge"
    raise ConfigError(f"{path}: neither a node ([node]) nor an edge gateway ([edge]) config")


def check_file(path: Path, *, now: datetime | None = None) -> Findings:
    """Check a node or edge config file and what it names. Raises :class:`ConfigError` only
    when the file is no config at all (exit 2); every other problem is a finding."""
    kind = config_kind(path)
    findings = Findings()
    try:
        settings: NodeSettings | EdgeSettings = (
            load_settings(path) if kind == "node" else load_edge_settings(path)
        )
    except ConfigError as exc:
        findings.from_message(str(exc))
        return findings
    if isinstance(settings, NodeSettings):
        check_node(settings, path, findings, now=now)
    else:
        check_edge(settings, path, findings, now=now)
    return findings


def check_node(
    settings: NodeSettings, config: Path, findings: Findings, *, now: datetime | None = None
) -> None:
    ctx = Context(
        config,
        settings.node.demo,
        now or datetime.now(UTC),
        timedelta(days=settings.ops.certificate_warning_days),
    )
    if ctx.demo:
        findings.warning(
            config, "node.demo", "true: test keys and plain HTTP are accepted; never deploy this"
        )
    _check_urls(settings, ctx, findings)
    _check_listen(settings.listen.ops_port, settings.listen.ops_host, "listen", ctx, findings)
    _check_archive(settings.archive, ctx, findings)
    if settings.reports.kind == "folder":
        if settings.reports.path is None:
            findings.error(config, "reports.path", "required when reports.kind = 'folder'")
        elif not settings.reports.path.is_dir():
            findings.error(config, "reports.path", f"{settings.reports.path}: no such folder")
    names = _hostnames(settings)
    _check_keys(settings.keys.dir, settings.node.country, names, ctx, findings)
    peers = _check_trust(settings.trust.list, settings.node.country, ctx, findings)
    if peers is not None:
        for country in settings.consumer.peers:
            if country not in peers:
                findings.error(
                    config,
                    "consumer.peers",
                    f"{country} is not on the trust list {settings.trust.list}: this node "
                    "would not know where it is or how to recognise it",
                )
    if settings.retrieval.enabled and not settings.consumer.peers:
        findings.warning(
            config,
            "retrieval.enabled",
            "the retrieval workers run, but [consumer] peers names no peer to pull from",
        )
    check_demo_accounts(settings, ctx, findings)
    for extra in _EXTRA_CHECKS:
        extra(settings, ctx, findings)


def check_edge(
    settings: EdgeSettings, config: Path, findings: Findings, *, now: datetime | None = None
) -> None:
    ctx = Context(
        config,
        settings.edge.demo,
        now or datetime.now(UTC),
        timedelta(days=settings.ops.certificate_warning_days),
    )
    if ctx.demo:
        findings.warning(config, "edge.demo", "true: test certificates are accepted")
    if urlsplit(settings.edge.audience).scheme != "https":
        findings.error(config, "edge.audience", "must be an https:// URL: the edge serves HTTPS")
    _check_listen(settings.listen.ops_port, settings.listen.ops_host, "listen", ctx, findings)
    _check_archive(settings.archive, ctx, findings)
    jwks = settings.edge.jwks
    try:
        document = json.loads(jwks.read_text(encoding="utf-8"))
        keys = key_set_from_jwks(settings.edge.country, document)
        if not keys.keys:
            findings.error(jwks, "keys", f"no signing key of {settings.edge.country}")
    except FileNotFoundError:
        findings.error(config, "edge.jwks", f"{jwks}: no such file")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        findings.error(jwks, "-", f"not a JWKS JSON file: {exc}")
    except InvalidJwk as exc:
        findings.error(jwks, "keys", str(exc))
    host = urlsplit(settings.edge.audience).hostname
    _check_tls_identity(
        settings.tls.certificate,
        settings.tls.key,
        ExtendedKeyUsageOID.SERVER_AUTH,
        "server",
        anchors=(),
        ctx=ctx,
        findings=findings,
        names=[host] if host else [],
    )


# -- settings -------------------------------------------------------------------------------------


def _check_urls(settings: NodeSettings, ctx: Context, findings: Findings) -> None:
    urls = settings.urls
    if not urls.standard:
        findings.error(
            ctx.config,
            "urls.standard",
            "not set: peers call the standard channel there and assertions name it",
        )
    elif urlsplit(urls.standard).scheme != "https":
        findings.error(
            ctx.config, "urls.standard", "must be an https:// URL: the standard channel is HTTPS"
        )
    for name in ("imaging", "edge", "viewer"):
        value = getattr(urls, name)
        if value and urlsplit(value).scheme != "https":
            why = "plain HTTP would carry access tokens and patient data in clear"
            if ctx.demo:
                findings.warning(ctx.config, f"urls.{name}", f"not https://: {why}")
            else:
                findings.error(ctx.config, f"urls.{name}", f"must be an https:// URL: {why}")


def _check_listen(port: int, host: str, section: str, ctx: Context, findings: Findings) -> None:
    if port and host not in _LOOPBACK:
        findings.warning(
            ctx.config,
            f"{section}.ops_host",
            f"{host}: the operations listener (/metrics, /readyz) has no authentication; "
            "keep its port off the public network",
        )


def _check_archive(archive: ArchiveSection, ctx: Context, findings: Findings) -> None:
    if isinstance(archive, FolderArchive):
        if not archive.path.is_dir():
            findings.error(ctx.config, "archive.path", f"{archive.path}: no such folder")
        return
    assert isinstance(archive, DicomwebArchive)
    parts = urlsplit(archive.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        findings.error(ctx.config, "archive.url", "must be an absolute http(s):// URL")
    elif parts.scheme == "http" and parts.hostname not in _LOOPBACK and not ctx.demo:
        findings.warning(
            ctx.config,
            "archive.url",
            f"plain HTTP to {parts.hostname}: images and patient data cross the network in "
            "clear; use https:// unless that network is the archive's own",
        )


def _hostnames(settings: NodeSettings) -> list[str]:
    """Hosts of the node's public URLs served with its server certificate."""
    hosts = []
    for url in (settings.urls.standard, settings.urls.imaging, settings.urls.viewer):
        host = urlsplit(url).hostname if url else None
        if host and host not in hosts:
            hosts.append(host)
    return hosts


# -- keys and certificates ------------------------------------------------------------------------


def _check_keys(
    directory: Path, country: str, names: Sequence[str], ctx: Context, findings: Findings
) -> None:
    if not directory.is_dir():
        findings.error(ctx.config, "keys.dir", f"{directory}: no such keys folder")
        return
    try:
        meta = read_meta(directory)
    except KeyStoreError as exc:
        findings.error(exc.path, "-", exc.reason)
        meta = None
    if meta is not None and meta.country != country:
        findings.error(
            directory / pki.KEYS_TOML,
            "country",
            f"{meta.country!r}, but the node is {country!r} (node.country)",
        )
    ca_path = directory / pki.CA_CERT
    anchors: list[x509.Certificate] = []
    try:
        anchors = load_certificates(ca_path)
    except MissingKeyFile:
        # Optional in production (docs/trust.md); without it the chains go unchecked.
        findings.warning(
            ca_path,
            "-",
            "no such file: the chains of server.pem and client.pem to the node's CA are not "
            "checked; keep the CA that peers put in their trust lists here",
        )
    except KeyStoreError as exc:
        findings.error(exc.path, "-", exc.reason)
    for ca in anchors:
        _check_ca(ca_path, ca, ctx, findings)
    if (directory / pki.CA_KEY).exists() and not ctx.demo:
        findings.error(
            directory / pki.CA_KEY,
            "-",
            "the CA's private key is in the keys folder: that is the test PKI's layout "
            "(`ncp keys init`); a production node never holds its CA's key",
        )
    spkis: dict[str, bytes] = {}
    for role, cert, key, usage in (
        ("server", pki.SERVER_CERT, pki.SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", pki.CLIENT_CERT, pki.CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        leaf, spki = _check_tls_identity(
            directory / cert,
            directory / key,
            usage,
            role,
            anchors=anchors,
            ctx=ctx,
            findings=findings,
            names=names if role == "server" else [],
        )
        if spki is not None:
            spkis[role] = spki
        if role == "client" and leaf is not None and subject_country(leaf) != country:
            findings.error(
                directory / cert,
                "subject.C",
                f"{subject_country(leaf)!r}, but the node is {country!r}: peers identify "
                "this node by the country of its client certificate",
            )
    if spkis.get("server") is not None and spkis.get("server") == spkis.get("client"):
        findings.error(
            directory / pki.CLIENT_KEY, "-", "the same key as server.key: use one key per role"
        )
    if meta is not None:
        _check_signing(directory, country, meta, spkis, ctx, findings)


def _check_ca(path: Path, ca: x509.Certificate, ctx: Context, findings: Findings) -> None:
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        findings.error(path, "basicConstraints", "not a CA certificate (CA:TRUE is required)")
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            findings.error(path, "keyUsage", "lacks keyCertSign: it cannot issue certificates")
    except x509.ExtensionNotFound:
        pass  # no KeyUsage: any use (RFC 5280 4.2.1.3)
    _check_validity(path, ca, ctx, findings)
    if pki.is_test_issued(ca) and not ctx.demo:
        findings.error(path, "subject", _TEST_PKI)


_TEST_PKI = (
    "a certificate of the test PKI (`ncp keys init`): test keys are refused outside the demo; "
    "put the certificates of your production PKI here"
)


def _check_validity(path: Path, cert: x509.Certificate, ctx: Context, findings: Findings) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if ctx.now < start:
        findings.error(path, "notBefore", f"not valid before {start:%Y-%m-%d %H:%M}Z")
    elif ctx.now > end:
        findings.error(path, "notAfter", f"expired on {end:%Y-%m-%d %H:%M}Z")
    elif end - ctx.now < ctx.warn:
        days = (end - ctx.now).days
        findings.warning(
            path, "notAfter", f"expires on {end:%Y-%m-%d %H:%M}Z, in {days} days: renew it"
        )


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_tls_identity(
    cert_path: Path,
    key_path: Path,
    usage: x509.ObjectIdentifier,
    role: str,
    *,
    anchors: Sequence[x509.Certificate],
    ctx: Context,
    findings: Findings,
    names: Sequence[str],
) -> tuple[x509.Certificate | None, bytes | None]:
    """A certificate file (leaf, then intermediates) and its key for TLS ``role``; returns the
    leaf and its public key (None for what could not be read)."""
    chain: list[x509.Certificate] = []
    try:
        chain = load_certificates(cert_path)
    except KeyStoreError as exc:
        findings.error(exc.path, "-", exc.reason)
    spki: bytes | None = None
    try:
        spki = _spki(load_private_key(key_path).public_key())
        if key_path.stat().st_mode & 0o077:
            findings.warning(key_path, "-", "readable by group or others: chmod 600")
    except KeyStoreError as exc:
        findings.error(exc.path, "-", exc.reason)
    if not chain:
        return None, spki
    leaf = chain[0]
    if spki is not None and spki != _spki(leaf.public_key()):
        findings.error(key_path, "-", f"does not match the certificate {cert_path}")
    try:
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not key_usage.digital_signature:
            findings.error(
                cert_path, "keyUsage", f"lacks digitalSignature, which TLS {role} auth needs"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if usage not in eku:
            findings.error(
                cert_path,
                "extendedKeyUsage",
                f"does not allow TLS {role} authentication ({_EKU_NAMES.get(usage, usage)})",
            )
    except x509.ExtensionNotFound:
        pass  # no EKU: any purpose (RFC 5280 4.2.1.12)
    _check_validity(cert_path, leaf, ctx, findings)
    for issued, issuer in itertools.pairwise(chain):
        if not issued_by(issued, issuer):
            findings.error(
                cert_path,
                "chain",
                f"{issued.subject.rfc4514_string()} is not issued by the next certificate "
                "of the file: list the leaf first, then its intermediates in order",
            )
        _check_validity(cert_path, issuer, ctx, findings)
    top = chain[-1]
    if anchors and not any(issued_by(top, ca) or top == ca for ca in anchors):
        findings.error(
            cert_path,
            "chain",
            f"does not chain to the node's CA (ca.pem): issued by {top.issuer.rfc4514_string()}",
        )
    if any(pki.is_test_issued(c) for c in chain) and not ctx.demo:
        findings.error(cert_path, "issuer", _TEST_PKI)
    for name in names:
        if not _names(leaf, name):
            findings.error(
                cert_path,
                "subjectAltName",
                f"does not name {name}, the host of the node's public URLs: peers' host name "
                "checks would fail",
            )
    return leaf, spki


def _names(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return address in san.get_values_for_type(x509.IPAddress)
    host = host.lower().rstrip(".")
    for pattern in san.get_values_for_type(x509.DNSName):
        pattern = pattern.lower().rstrip(".")
        if pattern == host:
            return True
        # RFC 6125: a wildcard stands for exactly one left-most label.
        wildcard = pattern.startswith("*.") and host.count(".") >= 2
        if wildcard and host.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _check_signing(
    directory: Path,
    country: str,
    meta: Any,
    spkis: dict[str, bytes],
    ctx: Context,
    findings: Findings,
) -> None:
    signing = directory / pki.SIGNING_DIR / f"{meta.current}.key"
    public: ec.EllipticCurvePublicKey | None = None
    try:
        public = load_signing_private_key(signing).public_key()
    except KeyStoreError as exc:
        findings.error(exc.path, "-", f"{exc.reason} (keys.toml names it as the current key)")
    if public is not None and _spki(public) in spkis.values():
        findings.error(signing, "-", "the same key as a TLS key: signing needs its own key")
    for old in meta.retired:
        if old.not_after < ctx.now:
            findings.warning(
                directory / pki.KEYS_TOML,
                f"retired.{old.kid}",
                f"published until {old.not_after:%Y-%m-%d %H:%M}Z, which has passed: "
                "run `ncp keys prune`",
            )
        pub = directory / pki.SIGNING_DIR / f"{old.kid}.pub"
        if pub.exists():
            try:
                load_signing_public_key(pub)
            except KeyStoreError as exc:
                findings.error(exc.path, "-", exc.reason)
    jwks_path = directory / pki.JWKS_JSON
    try:
        published = key_set_from_jwks(country, json.loads(jwks_path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        findings.error(jwks_path, "-", "no such file: peers verify this node's tokens with it")
        return
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        findings.error(jwks_path, "-", f"not JSON: {exc}")
        return
    except InvalidJwk as exc:
        findings.error(jwks_path, "keys", str(exc))
        return
    current = published.get(meta.current)
    if current is None:
        findings.error(
            jwks_path,
            "keys",
            f"does not publish the current signing key {meta.current!r}: peers and gateways "
            "would refuse every token signed now",
        )
    elif public is not None and _spki(current.public_key) != _spki(public):
        findings.error(
            jwks_path, f"keys.{meta.current}", "is not the public key of the current signing key"
        )


# -- the trust list -------------------------------------------------------------------------------


def _check_trust(
    path: Path, country: str, ctx: Context, findings: Findings
) -> dict[str, Peer] | None:
    """Each peer checked on its own, so one bad entry does not hide the others; returns the
    peers that parsed (None when the file could not be read)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        findings.error(ctx.config, "trust.list", f"{path}: no such trust list file")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        findings.error(path, "-", f"cannot read: {exc}")
        return None
    except tomllib.TOMLDecodeError as exc:
        findings.error(path, "-", f"not valid TOML: {exc}")
        return None
    top = {k: v for k, v in data.items() if k != "peers"}
    try:
        TrustList.from_mapping(top, base_dir=path.parent, source=str(path))
    except TrustListError as exc:
        findings.from_message(str(exc))
    table = data.get("peers", {})
    if not isinstance(table, dict):
        findings.error(path, "peers", "must be a table of peers by country code ([peers.BE])")
        return None
    peers: dict[str, Peer] = {}
    for code, entry in table.items():
        try:
            one = TrustList.from_mapping(
                {"peers": {code: entry}}, base_dir=path.parent, source=str(path)
            )
        except TrustListError as exc:
            findings.from_message(str(exc))
            continue
        peer = one.peer(code)
        peers[code] = peer
        where = f"peers.{code}"
        if code == country:
            findings.warning(path, where, "is this node's own country")
        for ca in peer.tls_ca:
            _check_peer_ca(path, f"{where}.tls_ca", ca, ctx, findings)
        if peer.tls_fingerprints and not peer.tls_ca:
            findings.warning(
                path,
                where,
                "pinned by fingerprint only: every renewal of its certificates needs a new "
                "trust list; prefer its CA (tls_ca) with the pins",
            )
    if not peers:
        findings.error(
            path, "peers", "no usable peer: the standard channel could trust no client certificate"
        )
    return peers


def _check_peer_ca(
    path: Path, key: str, ca: x509.Certificate, ctx: Context, findings: Findings
) -> None:
    start, end = ca.not_valid_before_utc, ca.not_valid_after_utc
    subject = ca.subject.rfc4514_string()
    if ctx.now < start:
        findings.error(path, key, f"{subject}: not valid before {start:%Y-%m-%d %H:%M}Z")
    elif ctx.now > end:
        findings.error(path, key, f"{subject}: expired on {end:%Y-%m-%d %H:%M}Z")
    elif end - ctx.now < ctx.warn:
        findings.warning(
            path, key, f"{subject}: expires on {end:%Y-%m-%d %H:%M}Z; ask the peer for its next CA"
        )
    if pki.is_test_issued(ca) and not ctx.demo:
        findings.error(path, key, f"{subject}: {_TEST_PKI}")


# -- the command ----------------------------------------------------------------------------------


def print_findings(findings: Findings, stream: Any = None) -> None:
    out = stream or sys.stdout
    for problem in findings.problems:
        print(problem.line(), file=out)


def register(subparsers: Any) -> None:
    """Add ``check-config`` to the ``ncp`` command."""
    parser = subparsers.add_parser(
        "check-config",
        help="check a node's or edge gateway's configuration, keys, certificates and trust list",
    )
    parser.add_argument("--config", type=Path, required=True, help="the node's or edge's TOML")
    parser.add_argument("--json", action="store_true", help="print the problems as JSON")
    parser.set_defaults(handler=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        findings = check_file(args.config)
    except ConfigError as exc:
        print(f"ncp: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except NcpError as exc:  # pragma: no cover - every loader error is a finding above
        print(f"ncp: error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    if args.json:
        print(json.dumps([vars_of(p) for p in findings.problems], indent=1))
    else:
        print_findings(findings)
        errors, warnings = len(findings.errors), len(findings.warnings)
        if errors:
            print(f"{errors} error(s), {warnings} warning(s): {args.config} is not fit to serve")
        else:
            print(f"{args.config}: no errors, {warnings} warning(s)")
    return EXIT_ERRORS if findings.errors else EXIT_OK


def vars_of(problem: Problem) -> dict[str, str]:
    return {
        "level": problem.level,
        "file": problem.file,
        "key": problem.key,
        "message": problem.message,
    }


def lines(problems: Iterable[Problem]) -> list[str]:
    return [p.line() for p in problems]
