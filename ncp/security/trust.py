"""The trust list: every peer node this node exchanges with, and how to recognise it.

One TOML file (``trust.list`` in the node's settings; format in ``docs/trust.md``). For each peer:
its country code, its base URLs, what its mutual TLS must present (the CA that issues its
certificates, and/or pinned SHA-256 certificate fingerprints) and its signing keys (a JWKS inline,
in a file, or fetched from the peer over mutual TLS).

A certificate identifies a peer only when all of these hold: it chains directly to one of the
peer's CAs (or, for a peer pinned by fingerprint only, its fingerprint is pinned), it matches a
pinned fingerprint if the peer pins any, it is within its validity, and its subject C is the
peer's country code. A CA trusted for one country therefore cannot vouch for another country.

Fetched JWKS are cached; an unknown ``kid`` triggers a refresh, at most once per
``refresh_interval`` seconds per peer, so a flood of tokens with invented kids cannot make this
node hammer a peer (or be made to look like it does).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from ncp.errors import NcpError
from ncp.security.keys import KeySet
from ncp.security.keystore import InvalidJwk, key_set_from_jwks, subject_country

log = logging.getLogger(__name__)

_COUNTRY = re.compile(r"^[A-Z]{2}$")
_FINGERPRINT = re.compile(r"^(?:sha256:)?((?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2})$")
_PEER_KEYS = {
    "standard",
    "imaging",
    "viewer",
    "tls_ca",
    "tls_fingerprint",
    "jwks",
    "jwks_file",
    "jwks_url",
}

DEFAULT_REFRESH_INTERVAL = 30.0
DEFAULT_CACHE_TTL = 3600.0
_MATCH_CACHE_SIZE = 1024


class TrustListError(NcpError):
    """The trust list file is missing or malformed; the message names the file and the key."""


class UnknownPeer(NcpError):
    """A country that is not on the trust list."""


class PeerNotTrusted(NcpError):
    """A certificate that identifies no peer on the trust list; the message says why."""


class JwksUnavailable(NcpError):
    """A peer's signing keys could not be fetched and none are cached."""


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer node as the trust list names it."""

    country: str
    standard: str
    """FHIR base of the peer's standard channel."""
    imaging: str = ""
    """DICOMweb base of the peer's imaging gateway (empty if it has none)."""
    viewer: str = ""
    """Base of the peer's viewer (empty if it has none)."""
    tls_ca: tuple[x509.Certificate, ...] = ()
    """CAs that issue the peer's TLS certificates (directly: list intermediates here)."""
    tls_fingerprints: frozenset[bytes] = frozenset()
    """SHA-256 digests of the peer's pinned certificates (client and server)."""
    jwks_url: str | None = None
    """Where the peer publishes its JWKS, if its keys are not in the trust list itself."""


class JwksFetcher(Protocol):
    """Fetches a peer's JWKS document (``ncp.security.mtls.MutualTlsJwksFetcher`` does so over
    mutual TLS), trusting ``anchors`` for the peer's server certificate. Raises
    :class:`JwksUnavailable` when it cannot."""

    def __call__(self, peer: Peer, anchors: Sequence[x509.Certificate]) -> Mapping[str, Any]: ...


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def format_fingerprint(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (names and signature; the handshake did path validation)."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(slots=True)
class _Cached:
    key_set: KeySet
    fetched_at: float


class TrustList:
    """The parsed trust list. Build it with :meth:`load` (or :meth:`from_mapping` in tests)."""

    def __init__(
        self,
        peers: Mapping[str, Peer],
        *,
        inline_keys: Mapping[str, KeySet],
        shared_ca: Iterable[x509.Certificate] = (),
        source: str = "<trust list>",
        fetcher: JwksFetcher | None = None,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._peers = dict(peers)
        self._inline = dict(inline_keys)
        self._shared_ca = tuple(shared_ca)
        self.fetcher = fetcher
        self.refresh_interval = refresh_interval
        self.cache_ttl = cache_ttl
        self._monotonic = monotonic
        self._cache: dict[str, _Cached] = {}
        self._attempted: dict[str, float] = {}
        self._matched: dict[bytes, Peer] = {}
        # One lock per peer: a slow peer's fetch never holds up verification for another.
        self._locks = {country: threading.Lock() for country in self._peers}

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, **options: Any) -> TrustList:
        """Read the trust list file; relative paths in it are relative to its folder.

        ``options`` go to the constructor (``fetcher``, ``refresh_interval``, ``cache_ttl``).
        """
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise TrustListError(f"{path}: no such trust list file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustListError(f"{path}: cannot read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise TrustListError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_mapping(data, base_dir=path.parent, source=str(path), **options)

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: Path,
        source: str = "<trust list>",
        **options: Any,
    ) -> TrustList:
        parser = _Parser(base_dir, source)
        peers, inline, shared = parser.parse(data)
        return cls(peers, inline_keys=inline, shared_ca=shared, source=source, **options)

    # --- looking up ------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def peer(self, country: str) -> Peer:
        try:
            return self._peers[country]
        except KeyError:
            raise UnknownPeer(f"{country!r} is not on the trust list ({self.source})") from None

    def ca_certificates(self) -> list[x509.Certificate]:
        """Every CA a peer's TLS certificate may chain to: the handshake's trust anchors."""
        seen: dict[bytes, x509.Certificate] = {}
        for cert in (*self._shared_ca, *(ca for p in self._peers.values() for ca in p.tls_ca)):
            seen.setdefault(fingerprint(cert), cert)
        return list(seen.values())

    def ca_bundle_pem(self) -> str:
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for c in self.ca_certificates()
        )

    def match_certificate(self, cert: x509.Certificate, now: datetime | None = None) -> Peer:
        """The peer ``cert`` identifies, or :class:`PeerNotTrusted` saying why there is none."""
        now = now or datetime.now(UTC)
        digest = fingerprint(cert)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            described = f"{cert.subject.rfc4514_string()} ({format_fingerprint(digest)})"
            raise PeerNotTrusted(f"certificate {described} is outside its validity")
        # The digest covers the whole certificate, so a certificate matched once matches again:
        # skip the signature check (most of the cost) on every later request of a connection.
        known = self._matched.get(digest)
        if known is not None:
            return known
        peer = self._match(cert, digest)
        if len(self._matched) >= _MATCH_CACHE_SIZE:
            self._matched.clear()
        self._matched[digest] = peer
        return peer

    def _match(self, cert: x509.Certificate, digest: bytes) -> Peer:
        described = f"{cert.subject.rfc4514_string()} ({format_fingerprint(digest)})"
        candidates: list[Peer] = []
        pin_misses: list[str] = []
        for peer in self._peers.values():
            by_ca = any(issued_by(cert, ca) for ca in peer.tls_ca)
            by_pin = digest in peer.tls_fingerprints
            if peer.tls_ca and peer.tls_fingerprints:
                if by_ca and not by_pin:
                    pin_misses.append(peer.country)
                ok = by_ca and by_pin
            else:
                ok = by_ca or by_pin
            if ok:
                candidates.append(peer)
        if not candidates:
            if pin_misses:
                raise PeerNotTrusted(
                    f"certificate {described} is issued by the CA of {', '.join(pin_misses)} "
                    "but is not one of its pinned certificates"
                )
            raise PeerNotTrusted(
                f"certificate {described} is issued by no peer's CA and matches no pinned "
                "fingerprint on the trust list"
            )
        country = subject_country(cert)
        for peer in candidates:
            if peer.country == country:
                return peer
        vouching = ", ".join(p.country for p in candidates)
        raise PeerNotTrusted(
            f"certificate {described} names country {country!r} but is trusted only for "
            f"{vouching}: a peer's certificate must name its own country"
        )

    def peer_for_certificate(
        self, cert: x509.Certificate, now: datetime | None = None
    ) -> Peer | None:
        try:
            return self.match_certificate(cert, now)
        except PeerNotTrusted:
            return None

    # --- signing keys ----------------------------------------------------------------------------

    def key_set(self, country: str, kid: str | None = None) -> KeySet:
        """The peer's signing keys. With ``kid``: if that kid is unknown, refetch the peer's JWKS
        (when it comes from a URL) unless it was fetched less than ``refresh_interval`` ago."""
        peer = self.peer(country)
        inline = self._inline.get(country)
        if inline is not None:
            return inline
        with self._locks[country]:
            cached = self._cache.get(country)
            now = self._monotonic()
            stale = cached is None or now - cached.fetched_at >= self.cache_ttl
            unknown = kid is not None and cached is not None and kid not in cached.key_set.keys
            last = self._attempted.get(country)
            if (stale or unknown) and (last is None or now - last >= self.refresh_interval):
                self._attempted[country] = now
                try:
                    cached = self._fetch(peer, now)
                except (JwksUnavailable, InvalidJwk) as exc:
                    if cached is None:
                        raise JwksUnavailable(f"{country}: {exc}") from exc
                    # Keep the keys we have: a peer that is down must not stop its own tokens.
                    log.warning("%s: JWKS refresh failed, keeping cached keys: %s", country, exc)
            if cached is None:
                raise JwksUnavailable(
                    f"{country}: JWKS not fetched yet; next attempt within "
                    f"{self.refresh_interval:.0f} s"
                )
            return cached.key_set

    def keys_for(self, issuer: str) -> KeySet | None:
        """The token verifier's key resolver (``ncp.security.tokens.KeyResolver``): the issuing
        country's keys, or None for a country not on the list or whose keys are unavailable.
        On ``KeyNotFound`` call :meth:`key_set` with the kid to refresh, then verify once more."""
        try:
            return self.key_set(issuer)
        except (UnknownPeer, JwksUnavailable):
            return None

    def _fetch(self, peer: Peer, now: float) -> _Cached:
        if self.fetcher is None:
            raise JwksUnavailable(f"jwks_url {peer.jwks_url} but no fetcher configured")
        # A peer pinned by fingerprint only has no CA of its own: any trust anchor may issue it.
        document = self.fetcher(peer, peer.tls_ca or tuple(self.ca_certificates()))
        try:
            key_set = key_set_from_jwks(peer.country, document)
        except InvalidJwk as exc:
            raise InvalidJwk(f"JWKS from {peer.jwks_url}: {exc}") from exc
        cached = _Cached(key_set, now)
        self._cache[peer.country] = cached
        log.info(
            "%s: fetched %d signing keys from %s", peer.country, len(key_set.keys), peer.jwks_url
        )
        return cached


class _Parser:
    """Reads the TOML mapping; every error names the file and the key at fault."""

    def __init__(self, base_dir: Path, source: str) -> None:
        self.base_dir = base_dir
        self.source = source

    def error(self, key: str, why: str) -> TrustListError:
        return TrustListError(f"{self.source}: {key}: {why}")

    def parse(
        self, data: Mapping[str, Any]
    ) -> tuple[dict[str, Peer], dict[str, KeySet], list[x509.Certificate]]:
        unknown = set(data) - {"format", "shared_ca", "peers"}
        if unknown:
            raise self.error(sorted(unknown)[0], "unknown key")
        if data.get("format", 1) != 1:
            raise self.error("format", f"{data['format']!r} is not a format this version reads")
        shared = [
            c
            for p in self._paths("shared_ca", data.get("shared_ca", []))
            for c in self._cas("shared_ca", p)
        ]
        peers_table = data.get("peers", {})
        if not isinstance(peers_table, dict):
            raise self.error("peers", "must be a table of peers by country code ([peers.BE])")
        peers: dict[str, Peer] = {}
        inline: dict[str, KeySet] = {}
        for country, entry in peers_table.items():
            peer, keys = self._peer(country, entry)
            peers[country] = peer
            if keys is not None:
                inline[country] = keys
        return peers, inline, shared

    def _peer(self, country: str, entry: Any) -> tuple[Peer, KeySet | None]:
        where = f"peers.{country}"
        if not _COUNTRY.match(country):
            raise self.error(where, "a peer is named by its ISO 3166-1 alpha-2 code, e.g. BE")
        if not isinstance(entry, dict):
            raise self.error(where, "must be a table")
        unknown = set(entry) - _PEER_KEYS
        if unknown:
            raise self.error(f"{where}.{sorted(unknown)[0]}", "unknown key")
        urls = {
            name: self._url(f"{where}.{name}", entry.get(name, ""))
            for name in ("standard", "imaging", "viewer")
        }
        if not urls["standard"]:
            raise self.error(
                f"{where}.standard", "required: the FHIR base of the peer's standard channel"
            )
        cas = [
            c
            for p in self._paths(f"{where}.tls_ca", entry.get("tls_ca", []))
            for c in self._cas(f"{where}.tls_ca", p)
        ]
        pins = frozenset(
            self._fingerprints(f"{where}.tls_fingerprint", entry.get("tls_fingerprint", []))
        )
        if not cas and not pins:
            raise self.error(
                where, "needs tls_ca and/or tls_fingerprint: how else to know its TLS?"
            )
        sources = [k for k in ("jwks", "jwks_file", "jwks_url") if k in entry]
        if len(sources) != 1:
            raise self.error(
                where, "needs exactly one of jwks, jwks_file, jwks_url for its signing keys"
            )
        keys: KeySet | None = None
        jwks_url: str | None = None
        if sources[0] == "jwks_url":
            jwks_url = self._url(f"{where}.jwks_url", entry["jwks_url"])
        else:
            key = f"{where}.{sources[0]}"
            document = (
                entry["jwks"] if sources[0] == "jwks" else self._json(key, entry["jwks_file"])
            )
            try:
                keys = key_set_from_jwks(country, document)
            except InvalidJwk as exc:
                raise self.error(key, str(exc)) from exc
            if not keys.keys:
                raise self.error(key, "holds no signing key")
        peer = Peer(
            country=country,
            standard=urls["standard"],
            imaging=urls["imaging"],
            viewer=urls["viewer"],
            tls_ca=tuple(cas),
            tls_fingerprints=pins,
            jwks_url=jwks_url,
        )
        return peer, keys

    def _url(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        if value and not value.startswith("https://"):
            raise self.error(key, f"{value!r}: peers are reached over https only")
        return value.rstrip("/")

    def _paths(self, key: str, value: Any) -> list[Path]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise self.error(key, "must be a path or a list of paths")
        return [p if p.is_absolute() else self.base_dir / p for p in map(Path, values)]

    def _cas(self, key: str, path: Path) -> list[x509.Certificate]:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except OSError as exc:
            raise self.error(key, f"{path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise self.error(key, f"{path}: not a PEM certificate file") from exc
        for cert in certs:
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if not is_ca:
                raise self.error(
                    key,
                    f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate; "
                    "pin a peer's own certificate with tls_fingerprint instead",
                )
        return certs

    def _fingerprints(self, key: str, value: Any) -> list[bytes]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            raise self.error(key, "must be a fingerprint or a list of them")
        digests = []
        for index, item in enumerate(values):
            match = _FINGERPRINT.match(item) if isinstance(item, str) else None
            if match is None:
                raise self.error(
                    f"{key}[{index}]", "must be 'sha256:' and 64 hex digits (colons allowed)"
                )
            digests.append(bytes.fromhex(match.group(1).replace(":", "")))
        return digests

    def _json(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise self.error(key, "must be a path")
        path = self.base_dir / value
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise self.error(key, f"{path}: cannot read: {exc.strerror or exc}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.error(key, f"{path}: not JSON: {exc}") from exc
