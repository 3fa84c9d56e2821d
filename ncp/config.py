"""Settings for one node: a TOML file per node, overridden by ``NCP_*`` environment variables.

Every field is documented where it is declared. Relative paths in the file are resolved against the
folder of the file, so a node's config, keys and data can move together.

Environment overrides use ``NCP_<SECTION>__<KEY>``, for example ``NCP_DATABASE__URL``; they win over
the file, so an operator can keep secrets and per-replica values out of it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ncp.errors import ConfigError

_COUNTRY = re.compile(r"^[A-Z]{2}$")


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them and name them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    country: str = Field(
        description="ISO 3166-1 alpha-2 code of the country this node serves, e.g. 'AT'."
    )
    name: str = Field(
        default="", description="Human name of the node, shown in the portal and audit."
    )
    patient_id_issuer: str = Field(
        default="",
        description="Assigning authority of this country's patient identifiers "
        "(IssuerOfPatientID), e.g. '1.2.40.0.10.1.4.3.1'. Index and searches match "
        "identifiers exactly within it.",
    )
    demo: bool = Field(
        default=False,
        description="True only in the configs `ncp demo` writes: this node runs on test "
        "material. Outside the demo, `ncp check-config` and `ncp serve` refuse test keys and "
        "plain HTTP, and every demo-only convenience checks this flag before it acts.",
    )

    @field_validator("country")
    @classmethod
    def _country_code(cls, value: str) -> str:
        if not _COUNTRY.match(value):
            raise ValueError("must be an ISO 3166-1 alpha-2 code in capitals, e.g. 'AT'")
        return value


class UrlsSection(_Section):
    """Public base URLs per channel, as peers and browsers reach them (behind any proxy)."""

    standard: str = Field(
        default="", description="FHIR base of the standard channel, e.g. https://ncp-a/fhir"
    )
    imaging: str = Field(default="", description="DICOMweb base of the option A gateway")
    edge: str = Field(default="", description="DICOMweb base of the option C edge gateway")
    viewer: str = Field(default="", description="Base of the option B viewer")


class DatabaseSection(_Section):
    url: str = Field(
        default="sqlite:///ncp.db",
        description="SQLAlchemy URL. SQLite file by default; PostgreSQL as "
        "'postgresql+psycopg://user@host:5432/db' for several replicas of one node.",
    )


class _ArchiveSource(_Section):
    """What every archive source says of itself, whatever its kind."""

    patient_id_issuer: str = Field(
        default="",
        description="Assigning authority (Issuer of Patient ID, an OID such as "
        "'1.2.40.0.10.1.4.3.1' or an absolute URI) of this archive's Patient IDs that carry none: "
        "real archives rarely fill (0010,0021), and a national archive's IDs belong to the "
        "country's namespace. Applied wherever an instance's patient is read: the index, the "
        "list, image access tokens and the gateways' patient check (docs/study-index.md). "
        "Empty: such instances keep no issuer, and their patients cannot be named by a peer "
        "(`ncp index` reports them). Changing it re-reads the archive at the next `ncp index`.",
    )

    @field_validator("patient_id_issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        if not value:
            return value
        # As DICOM would write it (LO: 64 characters, no backslash) and as FHIR can name it
        # (an Identifier.system: an OID as urn:oid:..., or an absolute URI).
        if len(value) > 64 or "\\" in value or value != value.strip():
            raise ValueError("must fit DICOM LO: at most 64 characters, no backslash or padding")
        parts = value.split(".")
        if not (len(parts) > 1 and all(p.isdigit() for p in parts)) and ":" not in value:
            raise ValueError("must be an OID (digits and dots) or an absolute URI")
        return value


class FolderArchive(_ArchiveSource):
    kind: Literal["folder"] = "folder"
    path: Path = Field(
        description="Root of a tree of DICOM files (a DICOMDIR media layout is fine)."
    )


class DicomwebArchive(_ArchiveSource):
    kind: Literal["dicomweb"]
    url: str = Field(
        description="DICOMweb base of the archive, e.g. http://127.0.0.1:8042/dicom-web"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one archive request.")


ArchiveSection = Annotated[FolderArchive | DicomwebArchive, Field(discriminator="kind")]


class ReportsSection(_Section):
    kind: Literal["folder", "store"] = Field(
        default="store",
        description="'store': the node's own report store (fed by the ingest endpoint); "
        "'folder': a folder of report bundles loaded through the same path (demo).",
    )
    path: Path | None = Field(
        default=None, description="Folder of report bundles when kind = 'folder'."
    )


class KeysSection(_Section):
    dir: Path = Field(
        default=Path("keys"), description="Folder of this node's TLS and signing keys."
    )


class TrustSection(_Section):
    list: Path = Field(
        default=Path("trust.toml"), description="The trust list file naming each peer."
    )


class ListenSection(_Section):
    """Where this node's processes bind. The public URLs (``[urls]``) may differ behind a proxy;
    port 0 takes the port of the matching public URL."""

    host: str = Field(default="127.0.0.1", description="Address to bind, e.g. 0.0.0.0")
    standard_port: int = Field(
        default=0, ge=0, le=65535, description="Standard channel (FHIR, mutual TLS)."
    )
    imaging_port: int = Field(
        default=0, ge=0, le=65535, description="Imaging channel (DICOMweb gateway, option A)."
    )
    portal_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="The HP portal (HTTPS, the node's server certificate); 0: the port of "
        "portal.url.",
    )
    ops_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Operations listener (plain HTTP: /healthz, /readyz, /metrics); 0: none. "
        "It needs no client certificate, so it binds ops_host, loopback unless said otherwise.",
    )
    ops_host: str = Field(
        default="127.0.0.1",
        description="Address of the operations listener. Loopback by default; a container or "
        "a Kubernetes pod whose probes and Prometheus come from outside binds 0.0.0.0 and "
        "keeps the port off the public network.",
    )
    viewer_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Viewer channel (option B): HTTPS for browsers, no client certificate.",
    )


class GatewaySection(_Section):
    """Limits of a DICOMweb gateway (option A in the node, option C in ``ncp edge``)."""

    max_transfers: int = Field(
        default=8, ge=1, description="Retrieves served at once; more wait for a slot."
    )
    queue_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a retrieve may wait for a slot before 503 with Retry-After.",
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with a 503.")
    archive_timeout_s: float = Field(
        default=30.0, gt=0, description="Archive slower than this to answer: 503."
    )
    chunk_bytes: int = Field(
        default=1 << 20, ge=4096, description="Bytes moved per write on the byte path."
    )


class ListSection(_Section):
    """The metadata list of the standard channel."""

    memory_mib: int = Field(
        default=128,
        ge=0,
        description="Rendered list entries each process keeps in memory besides the database "
        "(MiB; 0: read them from the database on every request).",
    )


class TokensSection(_Section):
    image_access_lifetime_s: int = Field(
        default=300,
        ge=30,
        le=900,
        description="Life of an image access token (IUA recommends 5 minutes; at most 15).",
    )
    leeway_s: int = Field(default=30, ge=0, le=120, description="Clock skew tolerated.")


class HttpSection(_Section):
    """Limits of every HTTP listener of a process (the standard channel, the option A gateway,
    the edge gateway), against clients that hold connections open or send oversized heads.
    Values outside the bounds are refused: a limit that never fires is no limit."""

    idle_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="A connection with no request under way (new, or between requests) is "
        "closed after this many seconds without a byte.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="A request's head (request line and headers) must arrive whole within "
        "this many seconds of its first byte, or the connection is closed with 408 (slowloris).",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="While a request body is being received, at most this many seconds "
        "without a byte before the connection is closed.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=8 * 1024,
        le=1024 * 1024,
        description="Largest request head in bytes (431 beyond). The standard channel's "
        "assertions take up to 16 KiB of it.",
    )


class BudgetSection(_Section):
    """The budget of CPU-heavy requests on the standard channel (validation, large bodies):
    they run off the event loop, a few at a time, each within a size and a time budget."""

    validate_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=20 * 1024 * 1024,
        description="Largest body $validate accepts (413 beyond): validating takes about "
        "half a second per MiB on one core.",
    )
    validate_time_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="Longest a validation ($validate, report ingest) may take; beyond it "
        "the request ends with 413.",
    )
    slots: int = Field(
        default=2,
        ge=1,
        le=64,
        description="CPU-heavy steps run at once; as many more may wait, the rest get 503.",
    )
    queue_timeout_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="How long a heavy step may wait for a slot before 503 with Retry-After.",
    )
    retry_after_s: int = Field(default=5, ge=1, le=600, description="Retry-After of that 503.")


class FolderStoreSection(_Section):
    kind: Literal["folder"] = "folder"
    path: Path = Field(
        default=Path("retrieved"),
        description="Folder where verified instances are kept, one folder per study "
        "(STUDY/SERIES/SOP.dcm); written atomically (temporary file, fsync, rename).",
    )


class StowStoreSection(_Section):
    kind: Literal["stowrs"]
    url: str = Field(
        description="DICOMweb base of country B's own archive, which accepts STOW-RS "
        "(POST {url}/studies), e.g. http://127.0.0.1:8042/dicom-web"
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one archive request.")
    batch_instances: int = Field(
        default=8, ge=1, le=1000, description="Verified instances sent in one STOW-RS request."
    )
    connections: int = Field(
        default=4, ge=1, le=32, description="STOW-RS requests sent to the archive at once."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


StoreSection = Annotated[FolderStoreSection | StowStoreSection, Field(discriminator="kind")]


class CliHpSection(_Section):
    """The health professional ``ncp pull`` acts for. A command line has no logged-in HP: the
    operator names one here, and every pull from the command line is signed and audited as this
    identity (with ``hp_source`` = ``cli`` in B's audit records)."""

    id: str = Field(
        min_length=1, description="The HP's identifier in country B (``sub`` of the assertion)."
    )
    name: str = Field(min_length=1, description="The HP's name as people read it.")
    role_code: str = Field(
        default="221",
        description="ISCO-08 code of the HP's profession (221: medical doctors).",
    )
    role_display: str = Field(default="Medical doctors", description="Display of role_code.")
    organisation: str = Field(min_length=1, description="Name of the HP's organisation.")
    organisation_id: str = Field(
        min_length=1, description="Identifier of the organisation, a URI (URL or urn:oid:)."
    )
    point_of_care: str = Field(
        min_length=1, description="Where the HP works now (eHDSI point of care)."
    )
    locale: str = Field(default="en", description="The HP's language, a BCP 47 tag.")
    authentication: str = Field(
        default="urn:ncp:acr:operator-configured",
        min_length=1,
        description="What the HP assertion's acr says of how B authenticated the HP: for the "
        "command line, that the node's operator configured this identity (no interactive "
        "login), so that A can tell such requests apart.",
    )


class RetrievalSection(_Section):
    """Country B's retriever: jobs that pull studies from a peer, verify and store them."""

    enabled: bool = Field(
        default=False,
        description="Run the workers of every lane and the retention purge inside `ncp serve` "
        "(one of its roles). Off: `ncp jobs work` runs them as a process of its own. Every "
        "replica that enables it takes jobs from the one database; on SIGTERM its running "
        "jobs are handed back (queued) after the instance each is receiving.",
    )
    emergency_workers: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Workers reserved for emergency jobs; no other lane may occupy them.",
    )
    normal_workers: int = Field(
        default=2, ge=0, le=32, description="Workers for normal jobs (and emergencies waiting)."
    )
    batch_workers: int = Field(
        default=1,
        ge=0,
        le=8,
        description="Workers for batch (prefetch) jobs; they run only while no emergency or "
        "normal job is queued or running, and pause between instances for an emergency.",
    )
    connections_per_peer: int = Field(
        default=4,
        ge=1,
        le=32,
        description="DICOMweb connections this process opens to one peer at once (emergency "
        "jobs get one more, reserved).",
    )
    poll_s: float = Field(
        default=1.0, gt=0, le=60, description="How often an idle worker looks for queued jobs."
    )
    lease_s: float = Field(
        default=30.0,
        ge=2,
        le=3600,
        description="A running job whose worker has not reported for this long is taken over "
        "by another worker (its process died); workers report every third of it.",
    )
    retry_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Attempts of a job that fails for a transient reason (peer or its archive "
        "unreachable, 503) before it fails for good; an attempt that stored anything "
        "starts the count again.",
    )
    retry_backoff_s: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="Wait before the second attempt; doubled for each further one, "
        "at most retry_backoff_max_s.",
    )
    retry_backoff_max_s: float = Field(default=60.0, ge=0, le=3600)
    renew_before_s: float = Field(
        default=60.0,
        ge=0,
        le=600,
        description="An image access token this close to its expiry is renewed through "
        "$imaging-access (while the TRC is valid) before the next request.",
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest silence on a DICOMweb connection to a peer."
    )
    store: StoreSection = FolderStoreSection()
    staging: Path | None = Field(
        default=None,
        description="Folder for instances being received and verified (default: "
        "STORE/.incoming for a folder store, 'retrieval-staging' beside the config file "
        "for STOW-RS). Never holds anything unverified for longer than one job.",
    )
    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Days a retrieved study is kept after it was stored; then the purge job "
        "removes it (audited). 0 keeps studies until removed by hand.",
    )
    purge_every_s: float = Field(
        default=3600.0,
        gt=0,
        description="How often the workers (`ncp jobs work`, or `ncp serve` with enabled) run "
        "the purge job.",
    )
    reconcile: bool = Field(
        default=False,
        description="Import reconciliation: write B's local patient identifier (when a job "
        "names one) into Patient ID and keep A's in Other Patient IDs Sequence, after "
        "verification on A's bytes; UIDs are never changed.",
    )
    local_patient_issuer: str = Field(
        default="",
        description="Issuer of Patient ID written with B's local identifier (default: "
        "node.patient_id_issuer).",
    )
    cli_hp: CliHpSection | None = Field(
        default=None,
        description="The HP identity `ncp pull` signs and audits as; without it `ncp pull` "
        "refuses to run.",
    )


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _https_or_loopback(value: str, what: str) -> str:
    """An https:// URL, or plain http:// on loopback only (a test identity provider)."""
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.netloc:
        return value
    if parts.scheme == "http" and parts.hostname is not None:
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if host in _LOOPBACK_HOSTS:
            return value
    raise ValueError(f"{what} must be an https:// URL (plain http only on loopback)")


class OidcSection(_Section):
    """A national identity provider for health professionals, through OpenID Connect
    (authorization code flow with PKCE; the ID token's signature, nonce and ``acr`` checked).
    An HP who signs in there must also have an account at the portal, linked by the IdP's
    ``sub`` (``ncp portal add-user --oidc-subject``): the account carries the role and
    organisation the HP identity assertion needs, which an eID does not."""

    issuer: str = Field(
        description="The provider's issuer URL; its configuration is read from "
        "<issuer>/.well-known/openid-configuration. https:// (http:// on loopback only)."
    )
    client_id: str = Field(description="The portal's client id at the provider.")
    client_secret: str = Field(
        default="",
        description="The client secret (client_secret_basic); keep it out of the file: "
        "NCP_PORTAL__OIDC__CLIENT_SECRET. Empty: a public client (PKCE only).",
    )
    scopes: tuple[str, ...] = Field(
        default=("openid", "profile"), description="Scopes asked for; 'openid' is required."
    )
    acr_values: tuple[str, ...] = Field(
        default=(),
        description="Authentication context classes asked for and the only ones accepted, "
        "e.g. ['http://eidas.europa.eu/LoA/substantial', 'http://eidas.europa.eu/LoA/high']. "
        "Empty: any acr the provider states (an ID token without acr is refused).",
    )
    display_name: str = Field(
        default="National eID", description="The provider's name on the login page."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=60, description="Timeout of one call.")

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        return _https_or_loopback(value.rstrip("/"), "portal.oidc.issuer")

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        return value


class PortalSection(_Section):
    """Country B's portal for health professionals (``ncp.portal``): login with a second
    factor (or a national OpenID Connect provider), server-side sessions in the node's
    database. docs/portal.md explains each limit."""

    enabled: bool = Field(default=False, description="Serve the portal (ncp serve).")
    url: str = Field(
        default="",
        description="The portal's public base URL as browsers reach it, e.g. "
        "https://ncp.example.be/portal-root; https:// only (its cookies are Secure).",
    )
    idle_timeout_s: int = Field(
        default=900, ge=60, le=3600, description="A session unused this long ends (seconds)."
    )
    absolute_lifetime_s: int = Field(
        default=8 * 3600,
        ge=600,
        le=12 * 3600,
        description="A session ends this long after login, used or not (seconds).",
    )
    login_timeout_s: int = Field(
        default=300, ge=30, le=900, description="Time to finish a login's steps (seconds)."
    )
    max_failures_account: int = Field(
        default=5, ge=1, le=100, description="Failed logins of one account that lock it."
    )
    max_failures_source: int = Field(
        default=20, ge=1, le=1000, description="Failed logins from one address that block it."
    )
    failure_window_s: int = Field(
        default=900, ge=60, description="Failures older than this are not counted (seconds)."
    )
    lockout_s: int = Field(default=900, ge=60, description="How long a lock-out lasts (seconds).")
    default_language: str = Field(
        default="en",
        description="Language of pages before login when the browser asks for none we have "
        "(en, de, fr).",
    )
    local_accounts: bool = Field(
        default=True, description="Allow login with a local password and TOTP code."
    )
    oidc: OidcSection | None = Field(
        default=None, description="A national identity provider (OpenID Connect), optional."
    )
    identifier_systems: dict[str, str] = Field(
        default_factory=dict,
        description="Per peer country, the FHIR system of its national patient identifier, "
        'which the HP types the value of, e.g. {AT = "urn:oid:1.2.40.0.10.1.4.3.1"}. A country '
        "without one takes SYSTEM|VALUE as typed.",
    )

    @field_validator("identifier_systems")
    @classmethod
    def _systems(cls, value: dict[str, str]) -> dict[str, str]:
        for country, system in value.items():
            if not re.fullmatch(r"[A-Z]{2}", country):
                raise ValueError(f"{country!r}: a country code such as AT")
            if not system.startswith(("urn:oid:", "urn:", "http://", "https://")):
                raise ValueError(f"{country}: {system!r} is not a FHIR system URI")
        return value

    @field_validator("url")
    @classmethod
    def _portal_url(cls, value: str) -> str:
        if value and not value.startswith("https://"):
            raise ValueError("must be an https:// URL: the portal's cookies are Secure")
        return value.rstrip("/")

    @field_validator("default_language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value not in ("en", "de", "fr"):
            raise ValueError("must be one of the portal's languages: en, de, fr")
        return value

    @model_validator(mode="after")
    def _served_somewhere(self) -> PortalSection:
        if self.enabled and not self.url:
            raise ValueError("portal.enabled needs portal.url (the portal's public https:// URL)")
        if self.enabled and not self.local_accounts and self.oidc is None:
            raise ValueError("with local_accounts off, portal.oidc is the only way in: set it")
        return self


class OpsSection(_Section):
    """What operators watch: readiness, certificate expiry, shutdown (docs/operations.md)."""

    readiness_cache_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="A /readyz answer is reused this long, so a probe every second costs "
        "the database and the archive one check every this many seconds.",
    )
    check_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="Longest wait for the database or the archive to answer a readiness check.",
    )
    peer_timeout_s: float = Field(
        default=3.0, gt=0, le=30, description="Longest wait for a peer's TLS handshake."
    )
    peer_cache_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="A peer's reachability is checked at most once in this many seconds, "
        "however often /readyz is asked: readiness probes never hammer a peer.",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="On SIGTERM the node stops accepting connections and lets requests under "
        "way (transfers) finish for at most this long, then closes what is left.",
    )
    certificate_warning_days: int = Field(
        default=30,
        ge=0,
        le=365,
        description="`ncp check-config` (and `ncp serve` at start) warns of a certificate "
        "that expires within this many days.",
    )


class ViewerSection(_Section):
    """The server-side viewer: option B at A (``urls.viewer``), and B's local viewer."""

    session_lifetime_s: int = Field(
        default=1800,
        ge=60,
        le=7200,
        description="Longest life of a viewer session opened by a launch code (seconds). A "
        "session never outlives the HP assertion and TRC its code was issued under, is not "
        "extended by use, and is renewed only by a new launch. At most the 2 h of a TRC.",
    )
    frame_memory_mib: int = Field(
        default=256,
        ge=0,
        le=8192,
        description="Decoded frames kept in memory per process (MiB), so that windowing and "
        "scrolling back re-render without decoding again; 0 keeps none.",
    )
    render_threads: int = Field(
        default=4, ge=1, le=64, description="Threads that render and encode frames."
    )
    read_ahead_frames: int = Field(
        default=8,
        ge=0,
        le=64,
        description="Frames of a series decoded ahead of the one asked for, in the direction "
        "of scrolling (half as many behind), so that a first pass over a series finds them "
        "decoded; never more than a quarter of frame_memory_mib. 0 reads nothing ahead.",
    )
    max_parts: int = Field(
        default=500,
        ge=1,
        le=10000,
        description="Most images one rendered study, series or instance answer may hold; "
        "more is refused (413) and the client asks per instance or frame.",
    )
    audit_idle_s: int = Field(
        default=120,
        ge=5,
        le=3600,
        description="A study not viewed for this long in a session has its frames counted in "
        "one audit record (image-view, phase viewed).",
    )


class ConsumerSection(_Section):
    """Country B's peer client: which peers this node may ask, and how patiently. Where each
    peer is and how to recognise it (base URL, CA, pins, signing keys) is the trust list's."""

    peers: list[str] = Field(
        default_factory=list,
        description="Countries (on the trust list) whose standard channel this node may ask, "
        "e.g. ['AT']. Empty: this node asks no one (a node that only answers).",
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Longest wait for a TCP and TLS connection."
    )
    timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait for each read of an answer."
    )
    attempts: int = Field(
        default=4,
        ge=1,
        le=10,
        description="Tries of one request when the failure is transient (connection failed, "
        "503); 4xx answers are never retried.",
    )
    backoff_s: float = Field(
        default=0.5,
        ge=0,
        le=30,
        description="First wait between tries, doubled each time (up to retry_after_max_s).",
    )
    retry_after_max_s: float = Field(
        default=30.0,
        ge=0,
        le=300,
        description="Longest wait honoured from a peer's Retry-After (a larger one is cut).",
    )
    assertion_lifetime_s: int = Field(
        default=3600,
        ge=60,
        le=7200,
        description="Life of the HP identity assertions and TRCs this node signs (eHDSI: a "
        "TRC is valid at most 2 hours).",
    )
    max_pages: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Most pages of one list followed; a longer list is refused as unusable.",
    )

    @field_validator("peers")
    @classmethod
    def _peer_codes(cls, value: list[str]) -> list[str]:
        for code in value:
            if not _COUNTRY.match(code):
                raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 code in capitals")
        if len(set(value)) != len(value):
            raise ValueError("a peer is named twice")
        return value


class _FileSettings(BaseSettings):
    """Settings read from a TOML file (passed as init values) with ``NCP_*`` overrides."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (which arrives as init values).
        return (env_settings, init_settings)


class NodeSettings(_FileSettings):
    """Everything one node needs to know about itself. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="NCP_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    node: NodeSection
    urls: UrlsSection = UrlsSection()
    database: DatabaseSection = DatabaseSection()
    archive: ArchiveSection
    reports: ReportsSection = ReportsSection()
    keys: KeysSection = KeysSection()
    trust: TrustSection = TrustSection()
    listen: ListenSection = ListenSection()
    gateway: GatewaySection = GatewaySection()
    tokens: TokensSection = TokensSection()
    lists: ListSection = ListSection()
    http: HttpSection = HttpSection()
    budget: BudgetSection = BudgetSection()
    retrieval: RetrievalSection = RetrievalSection()
    """Country B's retrieval jobs (workers, lanes, local store, retention)."""
    portal: PortalSection = PortalSection()
    viewer: ViewerSection = ViewerSection()
    consumer: ConsumerSection = ConsumerSection()
    ops: OpsSection = OpsSection()
    """Readiness, certificate warnings and graceful shutdown (docs/operations.md)."""


class EdgeSection(_Section):
    country: str = Field(description="Country A, whose access tokens this edge gateway accepts.")
    audience: str = Field(
        description="This gateway's public DICOMweb base, exactly as A writes it into tokens "
        "(node A's urls.edge), e.g. https://edge-a.example/dicomweb"
    )
    jwks: Path = Field(description="A's published signing keys (JWKS file, `ncp keys init`).")
    name: str = Field(default="", description="Human name, shown in audit records.")
    demo: bool = Field(
        default=False,
        description="True only in the config `ncp demo` writes (as node.demo): test "
        "certificates are accepted; `ncp check-config` refuses them otherwise.",
    )

    @field_validator("country")
    @classmethod
    def _country_code(cls, value: str) -> str:
        return NodeSection._country_code(value)


class EdgeListenSection(_Section):
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=0, ge=0, le=65535, description="0: the port of edge.audience.")
    ops_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Operations listener (plain HTTP: /healthz, /readyz, /metrics); 0: none.",
    )
    ops_host: str = Field(default="127.0.0.1", description="Address of the operations listener.")


class EdgeTlsSection(_Section):
    certificate: Path = Field(description="PEM server certificate (chain) of the edge gateway.")
    key: Path = Field(description="PEM private key of that certificate.")


class EdgeSettings(_FileSettings):
    """``ncp edge``: the stateless option C gateway country A runs before its national archive.
    It holds no data of A's node: A's public keys, the archive, and its own audit database."""

    model_config = SettingsConfigDict(
        env_prefix="NCP_EDGE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    edge: EdgeSection
    archive: ArchiveSection
    tls: EdgeTlsSection
    listen: EdgeListenSection = EdgeListenSection()
    database: DatabaseSection = DatabaseSection(url="sqlite:///edge-audit.db")
    gateway: GatewaySection = GatewaySection()
    tokens: TokensSection = TokensSection()
    http: HttpSection = HttpSection()
    ops: OpsSection = OpsSection()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> NodeSettings:
    """Read a node's TOML file, apply environment overrides, resolve relative paths.

    Raises :class:`ConfigError` naming the file and the offending key.
    """
    data = _read_toml(path)
    return settings_from_mapping(data, base_dir=path.parent, source=str(path), environ=environ)


def load_edge_settings(path: Path, environ: Mapping[str, str] | None = None) -> EdgeSettings:
    """Read an edge gateway's TOML file (``ncp edge --config``), like :func:`load_settings`."""
    data = _read_toml(path)
    with _environment(environ):
        try:
            settings = EdgeSettings(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(str(path), exc)) from exc
    base = path.parent

    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    return settings.model_copy(
        update={
            "archive": _resolve_archive(settings.archive, rel),
            "database": _resolve_database(settings.database, rel),
            "edge": settings.edge.model_copy(update={"jwks": rel(settings.edge.jwks)}),
            "tls": settings.tls.model_copy(
                update={"certificate": rel(settings.tls.certificate), "key": rel(settings.tls.key)}
            ),
        }
    )


def settings_from_mapping(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    source: str = "<settings>",
    environ: Mapping[str, str] | None = None,
) -> NodeSettings:
    """Build settings from an already parsed mapping (tests and generated demo configs use this)."""
    with _environment(environ):
        try:
            settings = NodeSettings(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(source, exc)) from exc
    return _resolve_paths(settings, base_dir)


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    """pydantic-settings reads os.environ: swap in the caller's view for the duration."""
    if environ is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _resolve_archive(
    archive: FolderArchive | DicomwebArchive, rel: Callable[[Path], Path]
) -> FolderArchive | DicomwebArchive:
    if isinstance(archive, FolderArchive):
        return archive.model_copy(update={"path": rel(archive.path)})
    return archive


def _resolve_database(db: DatabaseSection, rel: Callable[[Path], Path]) -> DatabaseSection:
    if db.url.startswith("sqlite:///") and not db.url.startswith("sqlite:////"):
        file_part = db.url.removeprefix("sqlite:///")
        if file_part and file_part != ":memory:":
            return db.model_copy(update={"url": f"sqlite:///{rel(Path(file_part))}"})
    return db


def _resolve_retrieval(section: RetrievalSection, rel: Callable[[Path], Path]) -> RetrievalSection:
    store = section.store
    if isinstance(store, FolderStoreSection):
        store = store.model_copy(update={"path": rel(store.path)})
        staging = section.staging or store.path / ".incoming"
    else:
        staging = section.staging or Path("retrieval-staging")
    return section.model_copy(update={"store": store, "staging": rel(staging)})


def _describe(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
        # Discriminated unions put the tag in the location: drop it, operators never typed it.
        key = re.sub(r"\.(folder|dicomweb|stowrs)(?=\.|$)", "", key)
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _resolve_paths(settings: NodeSettings, base: Path) -> NodeSettings:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    reports = settings.reports
    if reports.path is not None:
        reports = reports.model_copy(update={"path": rel(reports.path)})
    return settings.model_copy(
        update={
            "archive": _resolve_archive(settings.archive, rel),
            "reports": reports,
            "retrieval": _resolve_retrieval(settings.retrieval, rel),
            "database": _resolve_database(settings.database, rel),
            "keys": settings.keys.model_copy(update={"dir": rel(settings.keys.dir)}),
            "trust": settings.trust.model_copy(update={"list": rel(settings.trust.list)}),
        }
    )
