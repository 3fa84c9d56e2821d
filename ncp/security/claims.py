"""The claim sets of the four kinds of signed object the nodes exchange, and the rules of each.

| kind | ``typ`` | issued by | verified by | longest life |
| --- | --- | --- | --- | --- |
| HP identity assertion | ``hp-assertion+jwt`` | B's node | A's node | 2 h |
| treatment relationship confirmation | ``trc+jwt`` | B's node | A's node | 2 h (eHDSI) |
| image access token | ``image-access+jwt`` | A's node | A's (edge) gateway | 5 min (<= 15) |
| viewer launch token, one-time | ``viewer-launch+jwt`` | A's node | A's viewer | 60 s |

Claim names are IHE IUA's where IUA has one, wrapped as IUA requires in
``extensions.ihe_iua`` (``subject_name``, ``subject_organization``, ``subject_organization_id``,
``subject_role``, ``purpose_of_use``, ``home_community_id``); OIDC's ``locale`` for the preferred
language and ``acr`` for how the HP authenticated; ``ncp_``-prefixed names for the rest.
docs/tokens.md has the tables.

A constructed claim set is a valid claim set: the dataclasses check their value rules when built,
so a node cannot sign a claim set that the other side would refuse, and ``from_payload`` (the
reading side) goes through the same checks. A broken rule raises ``ClaimProblem`` naming the claim;
``ncp.security.tokens`` turns it into ``InvalidClaim``. Time rules that depend on the clock (expiry,
not-before) are the verifier's; the lifetime ceiling of each kind is checked here.

Kinds are kept mutually exclusive (RFC 8725 3.12) three ways: each has its own ``typ``; each
refuses ``ncp_`` and IUA claims that belong to other kinds (an HP assertion carrying
``ncp_studies`` is not an HP assertion); and each has its own audience and lifetime.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, Self, TypeVar

from ncp.dicom.uids import is_uid

PURPOSE_OF_USE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
"""HL7 v3 ActReason, the system of IUA ``purpose_of_use``; eHDSI's TREATMENT and EMERGENCY."""
PURPOSES = ("TREAT", "ETREAT")
"""Treatment and emergency treatment: the two purposes of use eHDSI knows for patient data."""
ISCO_08_SYSTEM = "urn:oid:2.16.840.1.113883.2.9.6.2.7"
"""ISCO-08, the code system of eHDSI's HP roles (e.g. 221 Medical doctors). Not enforced: a
role in another system is the issuing country's business, the code must merely be present."""
OPTIONS = ("A", "B", "C")
"""Option A: B retrieves from A's gateway; B: A's web viewer; C: A's edge gateway before the
national archive."""
PRIORITIES = ("routine", "urgent", "asap", "stat")
"""FHIR R4 ``request-priority`` codes, in rising urgency; gateways may schedule by them."""

MAX_STUDIES = 50
"""Studies one token may name. A token names them all, so it must stay under the token size
limit (tokens.MAX_TOKEN_CHARS) with 64-character UIDs; B asks for several tokens beyond that."""
MAX_TEXT = 256
"""Longest string claim (identifiers, names): keeps tokens small and error messages readable."""

HP_ASSERTION_CEILING = timedelta(hours=2)
TRC_CEILING = timedelta(hours=2)
"""eHDSI: a TRC is valid 2 hours; the HP assertion it is issued under lives no longer."""
IMAGE_ACCESS_LIFETIME = timedelta(minutes=5)
"""IHE IUA recommends at most 5 minutes for access tokens; B renews rather than asking for more."""
IMAGE_ACCESS_CEILING = timedelta(minutes=15)
"""The most a node may configure for image access tokens."""
VIEWER_LAUNCH_CEILING = timedelta(seconds=60)
"""A launch URL is opened at once by the browser; a minute covers a slow redirect."""

_COUNTRY = re.compile(r"[A-Z]{2}\Z")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*\Z")
_LATEST = 253402300799  # 9999-12-31T23:59:59Z: NumericDates beyond this are nonsense here


class ClaimProblem(ValueError):
    """A claim set breaks a rule of its kind; ``claim`` names the claim, ``rule`` says what."""

    def __init__(self, claim: str, rule: str) -> None:
        super().__init__(f"claim {claim}: {rule}")
        self.claim = claim
        self.rule = rule


def new_jti() -> str:
    """A fresh unique token id (random UUID: unguessable, so also usable as a one-time id)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Coding:
    """A FHIR Coding, the form IUA gives to ``subject_role`` and ``purpose_of_use``."""

    system: str
    code: str
    display: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"system": self.system, "code": self.code}
        if self.display is not None:
            out["display"] = self.display
        return out


@dataclass(frozen=True)
class PatientRef:
    """A patient identifier in country A: the value and the system that issued it (FHIR
    Identifier shape; the index keeps Patient ID with its issuer). Compared exactly."""

    system: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"system": self.system, "value": self.value}

    def __str__(self) -> str:
        return f"{self.value} ({self.system})"


@dataclass(frozen=True, kw_only=True)
class Claims:
    """The registered claims every kind carries (RFC 7519 4.1), all required but ``nbf``.

    ``issuer`` is the issuing node's country, ISO 3166-1 alpha-2, as the trust list and the key
    store name issuers (a KeySet's ``issuer``): B for assertions, A for access tokens.
    ``audience`` is the one recipient that may accept the object; ``not_before`` absent means
    ``issued_at``. Times are aware datetimes, written as NumericDate (seconds since the epoch).
    """

    TYP: ClassVar[str] = ""
    LABEL: ClassVar[str] = ""
    CEILING: ClassVar[timedelta] = timedelta(0)
    NCP_CLAIMS: ClassVar[frozenset[str]] = frozenset()
    IUA_CLAIMS: ClassVar[frozenset[str]] = frozenset()

    issuer: str
    audience: str
    subject: str
    issued_at: datetime
    expires_at: datetime
    not_before: datetime | None = None
    jti: str = field(default_factory=new_jti)

    def __post_init__(self) -> None:
        _check_country("iss", self.issuer)
        for name, value in (("aud", self.audience), ("sub", self.subject)):
            _check_text(name, value)
        _check_text("jti", self.jti, max_len=128)
        for name, moment in (
            ("iat", self.issued_at),
            ("exp", self.expires_at),
            ("nbf", self.not_before),
        ):
            if moment is not None and moment.utcoffset() is None:
                raise ClaimProblem(name, "must be an aware datetime (UTC)")
        if self.expires_at <= self.issued_at:
            raise ClaimProblem("exp", "must be after iat")
        if self.expires_at - self.issued_at > self.CEILING:
            raise ClaimProblem(
                "exp",
                f"lifetime {span_text(self.expires_at - self.issued_at)} exceeds the "
                f"{span_text(self.CEILING)} {a(self.LABEL)} may live",
            )
        # nbf before iat is tolerated (some issuers backdate it for clock skew); the iat check
        # still bounds the validity, and exp - iat the lifetime.
        if self.not_before is not None and self.not_before >= self.expires_at:
            raise ClaimProblem("nbf", "must be before exp")
        self._check()

    def _check(self) -> None:
        """The value rules of the kind; subclasses raise ClaimProblem."""

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.issued_at

    @property
    def valid_from(self) -> datetime:
        return self.issued_at if self.not_before is None else self.not_before

    @property
    def audit_policy(self) -> str:
        """The token id as IHE BALP records it, as the agent's policy."""
        return f"urn:ietf:params:oauth:jti:{self.jti}"

    def to_payload(self) -> dict[str, Any]:
        """The JWT claim set of this object, IUA claims wrapped in ``extensions.ihe_iua``."""
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.audience,
            "iat": _numeric(self.issued_at),
            "exp": _numeric(self.expires_at),
            "jti": self.jti,
        }
        if self.not_before is not None:
            payload["nbf"] = _numeric(self.not_before)
        iua: dict[str, Any] = {}
        self._fill(payload, iua)
        if iua:
            payload["extensions"] = {"ihe_iua": iua}
        return payload

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        """Add the kind's claims: top-level ones to ``payload``, IUA ones to ``iua``."""

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Self:
        """Read a claim set of this kind; ClaimProblem names the first claim that fails.

        ``aud`` may be one string or a list of exactly one (RFC 7519 and IUA allow an array);
        more than one recipient is refused: every object here is for one recipient only.
        """
        reader = _Reader(payload, cls)
        reader.refuse_foreign_claims()
        aud = payload.get("aud")
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if aud is None:
            raise ClaimProblem("aud", "required claim is missing")
        if not isinstance(aud, str):
            raise ClaimProblem("aud", "must be one string (one recipient)")
        common: dict[str, Any] = {
            "issuer": reader.text("iss"),
            "audience": aud,
            "subject": reader.text("sub"),
            "jti": reader.text("jti"),
            "issued_at": reader.time("iat"),
            "expires_at": reader.time("exp"),
            "not_before": reader.time("nbf", required=False),
        }
        return cls(**common, **cls._read(reader))

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        """The kind's claims as constructor arguments."""
        return {}


@dataclass(frozen=True, kw_only=True)
class HpAssertion(Claims):
    """HP identity assertion: who the health professional in country B is (eHDSI HP assertion,
    SAML today), signed by B's node for A's node. ``subject`` is the HP's identifier in B."""

    TYP: ClassVar[str] = "hp-assertion+jwt"
    LABEL: ClassVar[str] = "HP identity assertion"
    CEILING: ClassVar[timedelta] = HP_ASSERTION_CEILING
    NCP_CLAIMS: ClassVar[frozenset[str]] = frozenset({"ncp_point_of_care"})
    IUA_CLAIMS: ClassVar[frozenset[str]] = frozenset(
        {
            "subject_name",
            "subject_organization",
            "subject_organization_id",
            "subject_role",
            "home_community_id",
        }
    )

    subject_name: str
    """IUA ``subject_name`` (XSPA subject-id): the HP's name as shown to people."""
    subject_organization: str
    """IUA ``subject_organization``: name of the HP's organisation."""
    subject_organization_id: str
    """IUA ``subject_organization_id``: its identifier, a URI (URL or ``urn:oid:``)."""
    subject_role: Coding
    """IUA ``subject_role``: the HP's role or profession; eHDSI codes it in ISCO-08."""
    point_of_care: str
    """``ncp_point_of_care``: where the HP works now (eHDSI/XSPA environment locality)."""
    preferred_language: str
    """OIDC ``locale``: the HP's preferred language, a BCP 47 tag (``de-AT``)."""
    home_community_id: str | None = None
    """IUA ``home_community_id``: B's home community, an OID in URN form, if B has one."""
    authentication_context: str | None = None
    """OIDC ``acr`` (authentication context class reference): how B authenticated the HP, a URI
    or a name B publishes (``http://eidas.europa.eu/LoA/substantial`` from a national identity
    provider, a two-factor login of B's own). Optional, so that assertions issued before the
    claim existed still verify; eHDSI requires two factors, and A may audit or require it."""

    @property
    def country(self) -> str:
        """The issuing country (B): ``iss``."""
        return self.issuer

    def _check(self) -> None:
        if self.authentication_context is not None:
            _check_text("acr", self.authentication_context)
        _check_text("extensions.ihe_iua.subject_name", self.subject_name)
        _check_text("extensions.ihe_iua.subject_organization", self.subject_organization)
        _check_text("extensions.ihe_iua.subject_organization_id", self.subject_organization_id)
        _check_coding("extensions.ihe_iua.subject_role", self.subject_role)
        _check_text("ncp_point_of_care", self.point_of_care)
        _check_language("locale", self.preferred_language)
        if self.home_community_id is not None:
            _check_text("extensions.ihe_iua.home_community_id", self.home_community_id)

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        payload["ncp_point_of_care"] = self.point_of_care
        payload["locale"] = self.preferred_language
        if self.authentication_context is not None:
            payload["acr"] = self.authentication_context
        iua["subject_name"] = self.subject_name
        iua["subject_organization"] = self.subject_organization
        iua["subject_organization_id"] = self.subject_organization_id
        iua["subject_role"] = [self.subject_role.to_json()]
        if self.home_community_id is not None:
            iua["home_community_id"] = self.home_community_id

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        return {
            "subject_name": reader.iua_text("subject_name"),
            "subject_organization": reader.iua_text("subject_organization"),
            "subject_organization_id": reader.iua_text("subject_organization_id"),
            "subject_role": reader.iua_coding("subject_role"),
            "point_of_care": reader.text("ncp_point_of_care"),
            "preferred_language": reader.text("locale"),
            "home_community_id": reader.iua_text("home_community_id", required=False),
            "authentication_context": reader.text("acr", required=False),
        }


@dataclass(frozen=True, kw_only=True)
class Trc(Claims):
    """Treatment relationship confirmation: the HP of ``subject`` treats ``patient`` for
    ``purpose_of_use``, confirmed by B's node under the HP assertion whose hash it carries."""

    TYP: ClassVar[str] = "trc+jwt"
    LABEL: ClassVar[str] = "treatment relationship confirmation"
    CEILING: ClassVar[timedelta] = TRC_CEILING
    NCP_CLAIMS: ClassVar[frozenset[str]] = frozenset(
        {"ncp_patient", "ncp_informed", "ncp_hp_assertion_hash"}
    )
    IUA_CLAIMS: ClassVar[frozenset[str]] = frozenset({"purpose_of_use"})

    patient: PatientRef
    """``ncp_patient``: the patient, by country A's identifier (found by identification)."""
    purpose_of_use: str
    """IUA ``purpose_of_use``: TREAT or ETREAT (v3 ActReason), eHDSI TREATMENT / EMERGENCY."""
    informed: bool
    """``ncp_informed``: the patient was informed of the access. Must be true for TREAT; may be
    false only for ETREAT (an unconscious patient cannot be informed first)."""
    hp_assertion_hash: str
    """``ncp_hp_assertion_hash``: base64url SHA-256 of the compact HP assertion this TRC was
    issued under (as DPoP's ``ath`` hashes a token), from ``tokens.token_hash``."""

    @property
    def country(self) -> str:
        """The issuing country (B): ``iss``."""
        return self.issuer

    def _check(self) -> None:
        _check_patient("ncp_patient", self.patient)
        _check_purpose(self.purpose_of_use)
        if not isinstance(self.informed, bool):
            raise ClaimProblem("ncp_informed", "must be true or false")
        if not self.informed and self.purpose_of_use != "ETREAT":
            raise ClaimProblem(
                "ncp_informed",
                "must be true: only emergency treatment (ETREAT) may go ahead "
                "before the patient is informed",
            )
        _check_text("ncp_hp_assertion_hash", self.hp_assertion_hash)

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        payload["ncp_patient"] = self.patient.to_json()
        payload["ncp_informed"] = self.informed
        payload["ncp_hp_assertion_hash"] = self.hp_assertion_hash
        iua["purpose_of_use"] = [_purpose_coding(self.purpose_of_use)]

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        return {
            "patient": reader.patient("ncp_patient"),
            "purpose_of_use": reader.purpose(),
            "informed": reader.boolean("ncp_informed"),
            "hp_assertion_hash": reader.text("ncp_hp_assertion_hash"),
        }


@dataclass(frozen=True, kw_only=True)
class StudyGrant(Claims):
    """What A's two kinds of access token share: who may see which studies of which patient.

    ``subject`` is the HP (the ``sub`` of the HP assertion), ``audience`` the exact gateway or
    viewer that must accept it.
    """

    requesting_country: str
    """``ncp_requesting_country``: ISO 3166-1 alpha-2 code of the country that asked (B)."""
    patient: PatientRef
    """``ncp_patient``: the patient, by A's identifier; every study named is this patient's."""
    studies: tuple[str, ...]
    """``ncp_studies``: the Study Instance UIDs covered, 1 to MAX_STUDIES, no repeats."""
    purpose_of_use: str
    """IUA ``purpose_of_use``: TREAT or ETREAT, from the TRC."""
    priority: str = "routine"
    """``ncp_priority``: FHIR request-priority (routine, urgent, asap, stat)."""

    def _check(self) -> None:
        _check_country("ncp_requesting_country", self.requesting_country)
        _check_patient("ncp_patient", self.patient)
        _check_studies(self.studies)
        _check_purpose(self.purpose_of_use)
        if self.priority not in PRIORITIES:
            raise ClaimProblem("ncp_priority", f"must be one of {', '.join(PRIORITIES)}")

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        payload["ncp_requesting_country"] = self.requesting_country
        payload["ncp_patient"] = self.patient.to_json()
        payload["ncp_studies"] = list(self.studies)
        payload["ncp_priority"] = self.priority
        iua["purpose_of_use"] = [_purpose_coding(self.purpose_of_use)]

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        return {
            "requesting_country": reader.text("ncp_requesting_country"),
            "patient": reader.patient("ncp_patient"),
            "studies": reader.studies("ncp_studies"),
            "purpose_of_use": reader.purpose(),
            "priority": reader.text("ncp_priority"),
        }

    def covers(self, study_uid: str) -> bool:
        return study_uid in self.studies


_GRANT_CLAIMS = frozenset({"ncp_requesting_country", "ncp_patient", "ncp_studies", "ncp_priority"})


@dataclass(frozen=True, kw_only=True)
class ImageAccess(StudyGrant):
    """Image access token: A lets the bearer read the named studies through ``audience`` (A's
    gateway for option A, the edge gateway for option C), for a few minutes, renewably."""

    TYP: ClassVar[str] = "image-access+jwt"
    LABEL: ClassVar[str] = "image access token"
    CEILING: ClassVar[timedelta] = IMAGE_ACCESS_CEILING
    NCP_CLAIMS: ClassVar[frozenset[str]] = _GRANT_CLAIMS | {"ncp_option"}
    IUA_CLAIMS: ClassVar[frozenset[str]] = frozenset({"purpose_of_use"})

    option: str
    """``ncp_option``: A, B or C, the way the images travel (see OPTIONS)."""

    def _check(self) -> None:
        super()._check()
        if self.option not in OPTIONS:
            raise ClaimProblem("ncp_option", "must be A, B or C")

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        super()._fill(payload, iua)
        payload["ncp_option"] = self.option

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        return {**super()._read(reader), "option": reader.text("ncp_option")}


@dataclass(frozen=True, kw_only=True)
class ViewerLaunch(StudyGrant):
    """Viewer launch token: opens A's web viewer (option B) once on the named studies; the
    viewer exchanges it for a short session. One-time: the viewer records its ``jti``."""

    TYP: ClassVar[str] = "viewer-launch+jwt"
    LABEL: ClassVar[str] = "viewer launch token"
    CEILING: ClassVar[timedelta] = VIEWER_LAUNCH_CEILING
    NCP_CLAIMS: ClassVar[frozenset[str]] = _GRANT_CLAIMS | {"ncp_pair_expires"}
    IUA_CLAIMS: ClassVar[frozenset[str]] = frozenset({"purpose_of_use"})

    preferred_language: str | None = None
    """OIDC ``locale``: the language the viewer should speak, from the HP assertion."""
    pair_expires_at: datetime | None = None
    """``ncp_pair_expires`` (NumericDate): when the HP assertion or the TRC the token was issued
    under expires, whichever is first. The viewer session the token opens ends by then: a
    session never outlives the pair, as no token does."""

    def _check(self) -> None:
        super()._check()
        if self.preferred_language is not None:
            _check_language("locale", self.preferred_language)
        if self.pair_expires_at is not None:
            if self.pair_expires_at.utcoffset() is None:
                raise ClaimProblem("ncp_pair_expires", "must be an aware datetime (UTC)")
            if self.pair_expires_at < self.expires_at:
                raise ClaimProblem(
                    "ncp_pair_expires", "is before exp: a token never outlives its pair"
                )

    def _fill(self, payload: dict[str, Any], iua: dict[str, Any]) -> None:
        super()._fill(payload, iua)
        if self.preferred_language is not None:
            payload["locale"] = self.preferred_language
        if self.pair_expires_at is not None:
            payload["ncp_pair_expires"] = _numeric(self.pair_expires_at)

    @classmethod
    def _read(cls, reader: _Reader) -> dict[str, Any]:
        return {
            **super()._read(reader),
            "preferred_language": reader.text("locale", required=False),
            "pair_expires_at": reader.time("ncp_pair_expires", required=False),
        }


C = TypeVar("C", bound=Claims)
C_co = TypeVar("C_co", bound=Claims, covariant=True)


@dataclass(frozen=True)
class TokenKind(Generic[C_co]):
    """One kind of signed object: its claims type (which carries ``typ`` and the ceiling), the
    default maximum lifetime a verifier enforces, and whether each token may be used once."""

    claims_type: type[C_co]
    default_max_lifetime: timedelta
    one_time: bool = False

    @property
    def typ(self) -> str:
        return self.claims_type.TYP

    @property
    def label(self) -> str:
        return self.claims_type.LABEL

    @property
    def ceiling(self) -> timedelta:
        return self.claims_type.CEILING

    def max_lifetime(self, configured: timedelta | None = None) -> timedelta:
        """The lifetime limit to enforce: the default, or a configured one up to the ceiling."""
        if configured is None:
            return self.default_max_lifetime
        if not timedelta(0) < configured <= self.ceiling:
            raise ValueError(
                f"{a(self.label)} may live at most {span_text(self.ceiling)}; "
                f"{span_text(configured)} configured"
            )
        return configured

    def __str__(self) -> str:
        return f"{self.label} ({self.typ})"


HP_ASSERTION = TokenKind(HpAssertion, HP_ASSERTION_CEILING)
TRC = TokenKind(Trc, TRC_CEILING)
IMAGE_ACCESS = TokenKind(ImageAccess, IMAGE_ACCESS_LIFETIME)
VIEWER_LAUNCH = TokenKind(ViewerLaunch, VIEWER_LAUNCH_CEILING, one_time=True)
KINDS: tuple[TokenKind[Any], ...] = (HP_ASSERTION, TRC, IMAGE_ACCESS, VIEWER_LAUNCH)


def kind_for_typ(typ: str) -> TokenKind[Any] | None:
    """The kind a ``typ`` header names, compared as RFC 7515 4.1.9 says: case-insensitively,
    with ``application/`` implied when absent."""
    wanted = normalise_typ(typ)
    return next((kind for kind in KINDS if kind.typ == wanted), None)


def a(label: str) -> str:
    """``label`` with its indefinite article: a TRC, an HP identity assertion."""
    return f"an {label}" if label[:1] in "aeiouAEIOU" or label.startswith("HP") else f"a {label}"


def normalise_typ(typ: str) -> str:
    lowered = typ.lower()
    return lowered.removeprefix("application/")


# --- value rules -------------------------------------------------------------------------------


def _check_text(claim: str, value: object, *, max_len: int = MAX_TEXT) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ClaimProblem(claim, "must be a non-empty string")
    if len(value) > max_len:
        raise ClaimProblem(claim, f"is longer than {max_len} characters")


def _check_country(claim: str, value: str) -> None:
    if not isinstance(value, str) or not _COUNTRY.match(value):
        raise ClaimProblem(claim, "must be an ISO 3166-1 alpha-2 code in capitals (BE, DE)")


def _check_language(claim: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 35 or not _LANGUAGE.match(value):
        raise ClaimProblem(claim, "must be a BCP 47 language tag (de, fr-BE)")


def _check_coding(claim: str, value: Coding) -> None:
    if not isinstance(value, Coding):
        raise ClaimProblem(claim, "must be a Coding")
    _check_text(f"{claim}.system", value.system)
    _check_text(f"{claim}.code", value.code)
    if value.display is not None:
        _check_text(f"{claim}.display", value.display)


def _check_patient(claim: str, value: PatientRef) -> None:
    if not isinstance(value, PatientRef):
        raise ClaimProblem(claim, "must be a patient identifier (system and value)")
    _check_text(f"{claim}.system", value.system)
    _check_text(f"{claim}.value", value.value)


def _check_purpose(value: str) -> None:
    if value not in PURPOSES:
        raise ClaimProblem(
            "extensions.ihe_iua.purpose_of_use", "must be TREAT or ETREAT (v3 ActReason)"
        )


def _check_studies(studies: tuple[str, ...]) -> None:
    if not isinstance(studies, tuple):
        raise ClaimProblem("ncp_studies", "must be a tuple of Study Instance UIDs")
    if not studies:
        raise ClaimProblem("ncp_studies", "must name at least one Study Instance UID")
    if len(studies) > MAX_STUDIES:
        raise ClaimProblem("ncp_studies", f"names more than {MAX_STUDIES} studies")
    for uid in studies:
        if not isinstance(uid, str) or not is_uid(uid):
            raise ClaimProblem("ncp_studies", f"{_quote(uid)} is not a DICOM UID (PS3.5 9.1)")
    if len(set(studies)) != len(studies):
        raise ClaimProblem("ncp_studies", "names a study twice")


def _purpose_coding(code: str) -> dict[str, str]:
    return {"system": PURPOSE_OF_USE_SYSTEM, "code": code}


# --- reading a payload -------------------------------------------------------------------------


class _Reader:
    """Typed access to a decoded claim set; every failure names the claim."""

    def __init__(self, payload: Mapping[str, Any], kind: type[Claims]) -> None:
        self.payload = payload
        self.kind = kind
        extensions = payload.get("extensions", {})
        if not isinstance(extensions, dict):
            raise ClaimProblem("extensions", "must be a JSON object")
        iua = extensions.get("ihe_iua", {})
        if not isinstance(iua, dict):
            raise ClaimProblem("extensions.ihe_iua", "must be a JSON object")
        self.iua: Mapping[str, Any] = iua

    def refuse_foreign_claims(self) -> None:
        for name in self.payload:
            if name.startswith("ncp_") and name not in self.kind.NCP_CLAIMS:
                raise ClaimProblem(name, f"{self._owners(name)}, not of {a(self.kind.LABEL)}")
        for name in self.iua:
            if name not in self.kind.IUA_CLAIMS:
                raise ClaimProblem(
                    f"extensions.ihe_iua.{name}", f"is not used in {a(self.kind.LABEL)}"
                )

    @staticmethod
    def _owners(name: str) -> str:
        owners = [kind.label for kind in KINDS if name in kind.claims_type.NCP_CLAIMS]
        return f"is a claim of {' and '.join(owners)}" if owners else "is not a known claim"

    def _get(self, source: Mapping[str, Any], name: str, label: str, required: bool) -> Any:
        value = source.get(name)
        if value is None and required:
            raise ClaimProblem(label, "required claim is missing")
        return value

    # Strings are only type-checked here; the dataclass checks emptiness and length when built.

    def text(self, name: str, *, required: bool = True) -> Any:
        value = self._get(self.payload, name, name, required)
        if value is not None and not isinstance(value, str):
            raise ClaimProblem(name, "must be a string")
        return value

    def iua_text(self, name: str, *, required: bool = True) -> Any:
        label = f"extensions.ihe_iua.{name}"
        value = self._get(self.iua, name, label, required)
        if value is not None and not isinstance(value, str):
            raise ClaimProblem(label, "must be a string")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(self.payload, name, name, True)
        if not isinstance(value, bool):
            raise ClaimProblem(name, "must be true or false")
        return value

    def time(self, name: str, *, required: bool = True) -> datetime | None:
        value = self._get(self.payload, name, name, required)
        if value is None:
            return None
        # bool is an int in Python; a NumericDate is a JSON number and nothing else.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClaimProblem(name, "must be a NumericDate (seconds since 1970)")
        if not 0 <= value <= _LATEST:
            raise ClaimProblem(name, "is not a plausible NumericDate")
        return datetime.fromtimestamp(value, UTC)

    def iua_coding(self, name: str) -> Coding:
        label = f"extensions.ihe_iua.{name}"
        value = self._get(self.iua, name, label, True)
        # IUA writes a Coding, its examples an array of one; both read, more is ambiguous.
        if isinstance(value, list):
            if len(value) != 1:
                raise ClaimProblem(label, "must hold exactly one Coding")
            value = value[0]
        if not isinstance(value, dict):
            raise ClaimProblem(label, "must be a FHIR Coding (system, code)")
        system, code, display = value.get("system"), value.get("code"), value.get("display")
        _check_text(f"{label}.system", system)
        _check_text(f"{label}.code", code)
        if display is not None and not isinstance(display, str):
            raise ClaimProblem(f"{label}.display", "must be a string")
        return Coding(str(system), str(code), display)

    def purpose(self) -> str:
        coding = self.iua_coding("purpose_of_use")
        if coding.system != PURPOSE_OF_USE_SYSTEM:
            raise ClaimProblem(
                "extensions.ihe_iua.purpose_of_use.system", f"must be {PURPOSE_OF_USE_SYSTEM}"
            )
        return coding.code

    def patient(self, name: str) -> PatientRef:
        value = self._get(self.payload, name, name, True)
        if not isinstance(value, dict):
            raise ClaimProblem(name, "must be an object with system and value")
        system, ident = value.get("system"), value.get("value")
        _check_text(f"{name}.system", system)
        _check_text(f"{name}.value", ident)
        return PatientRef(str(system), str(ident))

    def studies(self, name: str) -> tuple[str, ...]:
        value = self._get(self.payload, name, name, True)
        if not isinstance(value, list):
            raise ClaimProblem(name, "must be a list of Study Instance UIDs")
        return tuple(value)


def _numeric(moment: datetime) -> int | float:
    stamp = moment.timestamp()
    return int(stamp) if stamp.is_integer() else stamp


def span_text(delta: timedelta) -> str:
    """A duration as people write it: 2 h, 5 min, 90 s."""
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _quote(value: object, limit: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
