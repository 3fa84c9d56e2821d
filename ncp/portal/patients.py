"""The patients an HP works with in one portal session: the candidates of an identification and
the confirmed treatment relationships, kept in the session's server-side ``data`` (the
``portal_session`` row), never in the browser.

- An identification (``$match`` at A) leaves its candidates under a random key; the HP picks one
  by its position, so no identifier travels back from the browser to be signed.
- A confirmation keeps the pair B signed (HP assertion and TRC, compact JWS) with the patient,
  purpose and when the pair expires, under a random key: the ``{key}`` of
  ``/patients/{key}/...``. The patient's identifier is never in a URL. Confirming the same
  patient again (after the pair expired) keeps the key, so a page the HP has open stays valid.

Both are bounded per session (the oldest go first): a session row stays small.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ncp.consumer.model import PeerContext
from ncp.consumer.results import MatchResult
from ncp.portal.sessions import PortalSessionView, SessionStore
from ncp.security.claims import PatientRef

MAX_MATCHES = 8
MAX_PATIENTS = 20
_MATCHES = "matches"
_PATIENTS = "patients"


def new_key() -> str:
    return secrets.token_urlsafe(9)


@dataclass(frozen=True)
class Candidate:
    """A patient A proposed, as the pages show it."""

    patient: PatientRef
    grade: str
    name: str
    birth_date: str | None
    gender: str | None
    score: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.patient.system,
            "value": self.patient.value,
            "grade": self.grade,
            "name": self.name,
            "birth_date": self.birth_date,
            "gender": self.gender,
            "score": self.score,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            patient=PatientRef(str(data["system"]), str(data["value"])),
            grade=str(data["grade"]),
            name=str(data.get("name") or ""),
            birth_date=data.get("birth_date"),
            gender=data.get("gender"),
            score=data.get("score"),
        )


@dataclass(frozen=True)
class Identification:
    key: str
    peer: str
    outcome: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Confirmed:
    """A confirmed treatment relationship: what every patient-level request to A carries."""

    key: str
    peer: str
    patient: PatientRef
    display: str
    purpose: str
    """TREAT or ETREAT."""
    informed: bool
    hp_assertion: str
    trc: str
    expires_at: datetime
    confirmed_at: datetime

    @property
    def context(self) -> PeerContext:
        return PeerContext(
            peer=self.peer,
            hp_assertion=self.hp_assertion,
            trc=self.trc,
            patient=self.patient,
            expires_at=self.expires_at,
        )

    @property
    def emergency(self) -> bool:
        return self.purpose == "ETREAT"

    def expired(self, now: datetime) -> bool:
        return self.expires_at <= now


def candidates_of(result: MatchResult) -> tuple[Candidate, ...]:
    out = []
    for c in result.candidates:
        name = c.name or " ".join(p for p in (*c.given, c.family or "") if p).strip()
        out.append(
            Candidate(
                patient=c.patient,
                grade=c.grade,
                name=name,
                birth_date=c.birth_date.isoformat() if c.birth_date else None,
                gender=c.gender,
                score=c.score,
            )
        )
    return tuple(out)


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


class SessionPatients:
    """Reads and changes the identifications and confirmations of portal sessions."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    # -- identifications ------------------------------------------------------------------------

    def remember_match(self, view: PortalSessionView, peer: str, result: MatchResult) -> str:
        key = new_key()
        entry = {
            "peer": peer,
            "outcome": result.outcome,
            "candidates": [c.to_json() for c in candidates_of(result)],
        }

        def change(data: dict[str, Any]) -> None:
            matches: dict[str, Any] = data.setdefault(_MATCHES, {})
            matches[key] = entry
            while len(matches) > MAX_MATCHES:  # dicts keep their order: the oldest first
                matches.pop(next(iter(matches)))

        self.store.change_data(view.id_hash, change)
        return key

    def identification(self, view: PortalSessionView, key: str) -> Identification | None:
        entry = view.data.get(_MATCHES, {}).get(key)
        if not isinstance(entry, dict):
            return None
        return Identification(
            key=key,
            peer=str(entry["peer"]),
            outcome=str(entry["outcome"]),
            candidates=tuple(Candidate.from_json(c) for c in entry.get("candidates", [])),
        )

    # -- confirmations --------------------------------------------------------------------------

    def confirm(
        self,
        view: PortalSessionView,
        context: PeerContext,
        *,
        display: str,
        purpose: str,
        informed: bool,
        now: datetime,
    ) -> str:
        """Keep the pair B signed for this session; returns the patient's key."""
        entry = {
            "peer": context.peer,
            "system": context.patient.system,
            "value": context.patient.value,
            "display": display,
            "purpose": purpose,
            "informed": informed,
            "hp_assertion": context.hp_assertion,
            "trc": context.trc,
            "expires_at": _instant(context.expires_at),
            "confirmed_at": _instant(now),
        }

        def change(data: dict[str, Any]) -> str:
            patients: dict[str, Any] = data.setdefault(_PATIENTS, {})
            key = next(
                (
                    k
                    for k, p in patients.items()
                    if (p.get("peer"), p.get("system"), p.get("value"))
                    == (context.peer, context.patient.system, context.patient.value)
                ),
                None,
            )
            if key is not None:
                patients.pop(key)  # re-inserted last: the most recent stays longest
            else:
                key = new_key()
            patients[key] = entry
            while len(patients) > MAX_PATIENTS:
                patients.pop(next(iter(patients)))
            return key

        key = self.store.change_data(view.id_hash, change)
        if key is None:
            raise LookupError("the session ended")
        return key

    def confirmed(self, view: PortalSessionView, key: str) -> Confirmed | None:
        entry = view.data.get(_PATIENTS, {}).get(key)
        return confirmed_entry(key, entry) if isinstance(entry, dict) else None

    def all_confirmed(self, view: PortalSessionView) -> list[Confirmed]:
        """Newest confirmation first."""
        patients = view.data.get(_PATIENTS, {})
        out = [confirmed_entry(k, v) for k, v in patients.items() if isinstance(v, dict)]
        return list(reversed(out))

    def for_patient(
        self, view: PortalSessionView, peer: str, patient: PatientRef
    ) -> Confirmed | None:
        return next(
            (c for c in self.all_confirmed(view) if c.peer == peer and c.patient == patient),
            None,
        )


def confirmed_entry(key: str, entry: dict[str, Any]) -> Confirmed:
    """A confirmation as the session's data keeps it."""
    return Confirmed(
        key=key,
        peer=str(entry["peer"]),
        patient=PatientRef(str(entry["system"]), str(entry["value"])),
        display=str(entry.get("display") or ""),
        purpose=str(entry.get("purpose") or "TREAT"),
        informed=bool(entry.get("informed")),
        hp_assertion=str(entry["hp_assertion"]),
        trc=str(entry["trc"]),
        expires_at=_moment(str(entry["expires_at"])),
        confirmed_at=_moment(str(entry["confirmed_at"])),
    )


__all__ = [
    "Candidate",
    "Confirmed",
    "Identification",
    "SessionPatients",
    "candidates_of",
    "confirmed_entry",
]
