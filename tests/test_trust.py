"""The trust list: parsing with errors that name the key, recognising a peer's certificate, and
its signing keys (inline, from a file, or fetched and cached with a bounded refresh)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ncp.security.keystore import KeyStore
from ncp.security.trust import (
    JwksUnavailable,
    Peer,
    PeerNotTrusted,
    TrustList,
    TrustListError,
    UnknownPeer,
    fingerprint,
    format_fingerprint,
)
from tests.security_support import (
    Node,
    cert_of,
    expired_window,
    make_node,
    trust_toml,
    write_client,
)


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Node]:
    return {c: make_node(tmp_path, c) for c in ("AT", "BE", "FR")}


def _load(tmp_path: Path, text: str, **options: Any) -> TrustList:
    path = tmp_path / "trust.toml"
    path.write_text(text)
    return TrustList.load(path, **options)


def _be(world: dict[str, Node], **extra: str | list[str]) -> dict[str, str | list[str]]:
    entry: dict[str, str | list[str]] = {
        "standard": "https://ncp-be.example/fhir",
        "imaging": "https://ncp-be.example/dicomweb/",
        "tls_ca": str(world["BE"].path("ca.pem")),
        "jwks_file": str(world["BE"].path("jwks.json")),
    }
    entry.update(extra)
    return entry


# --- parsing -------------------------------------------------------------------------------------


def test_a_trust_list_with_inline_file_and_url_keys_loads(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    be_jwks = json.loads(world["BE"].path("jwks.json").read_text())
    jwk = be_jwks["keys"][0]
    fr_fp = format_fingerprint(fingerprint(cert_of(world["FR"].path("client.pem"))))
    text = trust_toml(
        {
            "BE": _be(world),
            "FR": {
                "standard": "https://ncp-fr.example/fhir",
                "tls_fingerprint": [fr_fp.upper().replace("SHA256:", "sha256:")],
                "jwks_url": "https://ncp-fr.example/jwks.json",
            },
        },
        shared_ca=[str(world["FR"].path("ca.pem"))],
    )
    text += "\n[peers.LU]\nstandard = 'https://ncp-lu.example/fhir'\n"
    text += f"tls_ca = '{world['AT'].path('ca.pem')}'\n"
    text += "[[peers.LU.jwks.keys]]\n" + "".join(f'{k} = "{v}"\n' for k, v in jwk.items())
    trust = _load(tmp_path, text)
    assert [p.country for p in trust.peers()] == ["BE", "FR", "LU"]
    be = trust.peer("BE")
    assert be.imaging == "https://ncp-be.example/dicomweb" and be.viewer == ""
    assert trust.key_set("BE").issuer == "BE" and jwk["kid"] in trust.key_set("LU").keys
    assert trust.peer("FR").jwks_url == "https://ncp-fr.example/jwks.json"
    assert len(trust.ca_certificates()) == 3  # FR shared, BE, AT (LU's)
    with pytest.raises(UnknownPeer, match="'DE' is not on the trust list"):
        trust.peer("DE")
    assert trust.keys_for("DE") is None and trust.keys_for("BE") == trust.key_set("BE")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda e: e.update(tls_cert="x.pem"), r"peers\.BE\.tls_cert: unknown key"),
        (lambda e: e.pop("standard"), r"peers\.BE\.standard: required"),
        (lambda e: e.update(standard="http://ncp-be/fhir"), r"peers\.BE\.standard: .* https only"),
        (
            lambda e: e.update(tls_ca="missing.pem"),
            r"peers\.BE\.tls_ca: .*missing\.pem: cannot read",
        ),
        (lambda e: e.update(tls_fingerprint=["sha256:abc"]), r"peers\.BE\.tls_fingerprint\[0\]"),
        (lambda e: e.update(jwks_url="https://x/jwks"), r"peers\.BE: needs exactly one of jwks"),
        (lambda e: (e.pop("tls_ca"),), r"peers\.BE: needs tls_ca and/or tls_fingerprint"),
    ],
)
def test_parsing_errors_name_the_file_and_key(
    tmp_path: Path, world: dict[str, Node], edit: Any, words: str
) -> None:
    entry = _be(world)
    edit(entry)
    with pytest.raises(TrustListError, match=words) as caught:
        _load(tmp_path, trust_toml({"BE": entry}))
    assert str(caught.value).startswith(str(tmp_path / "trust.toml"))


def test_a_leaf_certificate_as_tls_ca_and_a_private_jwk_are_refused(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    with pytest.raises(TrustListError, match=r"tls_ca: .* is not a CA certificate"):
        _load(tmp_path, trust_toml({"BE": _be(world, tls_ca=str(world["BE"].path("client.pem")))}))
    leaked = tmp_path / "leaked.json"
    jwks = json.loads(world["BE"].path("jwks.json").read_text())
    jwks["keys"][0]["d"] = "AAAA"
    leaked.write_text(json.dumps(jwks))
    with pytest.raises(TrustListError, match=r"peers\.BE\.jwks_file: keys\[0\]: .*private key"):
        _load(tmp_path, trust_toml({"BE": _be(world, jwks_file=str(leaked))}))


def test_bad_country_codes_unknown_top_level_keys_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(TrustListError, match=r"peers\.be: a peer is named by its ISO"):
        _load(tmp_path, "[peers.be]\nstandard = 'https://x'\n")
    with pytest.raises(TrustListError, match=r"trust\.toml: peer: unknown key"):
        _load(tmp_path, "[peer.BE]\n")
    with pytest.raises(TrustListError, match="not valid TOML"):
        _load(tmp_path, "[peers.BE\n")
    with pytest.raises(TrustListError, match="no such trust list file"):
        TrustList.load(tmp_path / "none.toml")


# --- recognising peers ---------------------------------------------------------------------------


def test_a_peer_is_recognised_by_its_ca_and_its_country(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    trust = _load(tmp_path, trust_toml({"BE": _be(world)}))
    assert trust.match_certificate(cert_of(world["BE"].path("client.pem"))).country == "BE"
    assert trust.peer_for_certificate(cert_of(world["BE"].path("server.pem"))) is not None


def test_a_certificate_from_an_unknown_ca_identifies_no_peer(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    trust = _load(tmp_path, trust_toml({"BE": _be(world)}))
    fr = cert_of(world["FR"].path("client.pem"))
    assert trust.peer_for_certificate(fr) is None
    with pytest.raises(PeerNotTrusted, match="issued by no peer's CA"):
        trust.match_certificate(fr)


def test_a_peer_ca_cannot_vouch_for_another_country(tmp_path: Path, world: dict[str, Node]) -> None:
    fr = _be(world, tls_ca=str(world["FR"].path("ca.pem")))
    trust = _load(tmp_path, trust_toml({"BE": _be(world), "FR": fr}))
    # BE's CA issues a certificate that claims to be FR: trusted CA, wrong country.
    cert_path, _ = write_client(tmp_path / "x", "fake-fr", world["BE"].ca, "FR")
    with pytest.raises(PeerNotTrusted, match="names country 'FR' but is trusted only for BE"):
        trust.match_certificate(cert_of(cert_path))


def test_pinned_fingerprints_narrow_a_ca(tmp_path: Path, world: dict[str, Node]) -> None:
    pinned = cert_of(world["BE"].path("client.pem"))
    trust = _load(
        tmp_path,
        trust_toml({"BE": _be(world, tls_fingerprint=format_fingerprint(fingerprint(pinned)))}),
    )
    assert trust.match_certificate(pinned).country == "BE"
    other, _ = write_client(tmp_path / "x", "other", world["BE"].ca, "BE")
    with pytest.raises(PeerNotTrusted, match="not one of its pinned certificates"):
        trust.match_certificate(cert_of(other))


def test_a_peer_pinned_by_fingerprint_only_under_a_shared_ca(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    # A central CA (here FR's) issues LU's certificate; LU is known by its fingerprint only.
    lu, _ = write_client(tmp_path / "x", "lu", world["FR"].ca, "LU")
    other_lu, _ = write_client(tmp_path / "x", "lu2", world["FR"].ca, "LU")
    entry: dict[str, str | list[str]] = {
        "standard": "https://ncp-lu.example/fhir",
        "tls_fingerprint": format_fingerprint(fingerprint(cert_of(lu))),
        "jwks_file": str(world["BE"].path("jwks.json")),
    }
    trust = _load(tmp_path, trust_toml({"LU": entry}, shared_ca=[str(world["FR"].path("ca.pem"))]))
    assert trust.match_certificate(cert_of(lu)).country == "LU"
    assert trust.peer_for_certificate(cert_of(other_lu)) is None
    assert trust.peer_for_certificate(cert_of(world["FR"].path("client.pem"))) is None


def test_an_expired_certificate_identifies_no_peer(tmp_path: Path, world: dict[str, Node]) -> None:
    trust = _load(tmp_path, trust_toml({"BE": _be(world)}))
    start, end = expired_window()
    old, _ = write_client(
        tmp_path / "x", "old", world["BE"].ca, "BE", not_before=start, not_after=end
    )
    with pytest.raises(PeerNotTrusted, match="outside its validity"):
        trust.match_certificate(cert_of(old))


# --- fetched signing keys ------------------------------------------------------------------------


class FakeFetcher:
    def __init__(self, documents: list[Mapping[str, Any] | Exception]) -> None:
        self.documents = documents
        self.calls = 0
        self.anchors: Sequence[x509.Certificate] = ()

    def __call__(self, peer: Peer, anchors: Sequence[x509.Certificate]) -> Mapping[str, Any]:
        self.calls += 1
        self.anchors = anchors
        item = self.documents[min(self.calls, len(self.documents)) - 1]
        if isinstance(item, Exception):
            raise item
        return item


class Ticker:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _url_trust(
    tmp_path: Path, world: dict[str, Node], fetcher: FakeFetcher, ticker: Ticker
) -> TrustList:
    entry = _be(world, jwks_url="https://ncp-be.example/jwks.json")
    entry.pop("jwks_file")
    return _load(
        tmp_path,
        trust_toml({"BE": entry}),
        fetcher=fetcher,
        monotonic=ticker,
        refresh_interval=30.0,
        cache_ttl=3600.0,
    )


def test_an_unknown_kid_refreshes_at_most_once_per_interval(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    store = KeyStore.load(world["BE"].directory)
    before = store.jwks()
    old_kid = store.current_signing_key().kid
    new_kid = store.rotate(300)
    after = store.jwks()
    fetcher, ticker = FakeFetcher([before, after]), Ticker()
    trust = _url_trust(tmp_path, world, fetcher, ticker)

    assert old_kid in trust.key_set("BE").keys
    assert fetcher.calls == 1 and fetcher.anchors == trust.peer("BE").tls_ca
    # A flood of tokens with unknown kids: one fetch per interval, no more.
    for _ in range(50):
        assert new_kid not in trust.key_set("BE", kid=new_kid).keys
    assert fetcher.calls == 1
    ticker.now += 30
    assert new_kid in trust.key_set("BE", kid=new_kid).keys
    assert fetcher.calls == 2
    assert new_kid in trust.key_set("BE", kid=new_kid).keys  # known now: no fetch
    assert fetcher.calls == 2


def test_cached_keys_survive_a_failed_refresh_and_expire_to_a_refetch(
    tmp_path: Path, world: dict[str, Node]
) -> None:
    jwks = KeyStore.load(world["BE"].directory).jwks()
    fetcher = FakeFetcher([jwks, JwksUnavailable("peer down"), jwks])
    ticker = Ticker()
    trust = _url_trust(tmp_path, world, fetcher, ticker)
    kid = jwks["keys"][0]["kid"]
    assert kid in trust.key_set("BE").keys
    ticker.now += 3600  # stale: refetch, which fails; the cached keys stay
    assert kid in trust.key_set("BE").keys and fetcher.calls == 2
    ticker.now += 30
    assert kid in trust.key_set("BE").keys and fetcher.calls == 3


def test_no_keys_at_all_when_the_first_fetch_fails(tmp_path: Path, world: dict[str, Node]) -> None:
    fetcher, ticker = FakeFetcher([JwksUnavailable("connection refused")]), Ticker()
    trust = _url_trust(tmp_path, world, fetcher, ticker)
    with pytest.raises(JwksUnavailable, match="BE: connection refused"):
        trust.key_set("BE")
    with pytest.raises(JwksUnavailable, match="not fetched yet"):
        trust.key_set("BE")  # within the interval: no second attempt
    assert fetcher.calls == 1


def test_a_malformed_fetched_jwks_is_refused(tmp_path: Path, world: dict[str, Node]) -> None:
    fetcher = FakeFetcher([{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}])
    trust = _url_trust(tmp_path, world, fetcher, Ticker())
    with pytest.raises(JwksUnavailable, match="only EC P-256"):
        trust.key_set("BE")


def test_without_a_fetcher_a_url_peer_has_no_keys(tmp_path: Path, world: dict[str, Node]) -> None:
    entry = _be(world, jwks_url="https://ncp-be.example/jwks.json")
    entry.pop("jwks_file")
    trust = _load(tmp_path, trust_toml({"BE": entry}))
    with pytest.raises(JwksUnavailable, match="no fetcher configured"):
        trust.key_set("BE", kid="x")
