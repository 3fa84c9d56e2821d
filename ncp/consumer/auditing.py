"""B's audit records of its requests to peers (side ``consumer``), in B's own hash chain.

One record per HTTP request sent (each page of a list is a request), and one for each request
refused before sending (a peer B may not ask, a pin that does not match). Each names, as the
provider's records do (BALP style): the HP (subject, name, role, organisation, point of care,
country), the peer, the patient, the purpose, the query, the outcome with A's reason, the
exchange's correlation id (the ``X-Request-ID`` B sent, which A writes into its own records), and
the assertions' ids as BALP policies (``urn:ietf:params:oauth:jti:<jti>``). Details add the
method, URL, HTTP status, tries and waits, and what the answer held.

Fail closed: if the record cannot be written, the caller gets ``AuditError`` instead of the
answer (a step that is not audited did not happen).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ncp.audit.models import Action, Outcome, Side
from ncp.audit.record import AuditEvent, Auditor, hp_fields, patient_fields
from ncp.security.claims import HpAssertion, PatientRef, Trc

_COUNTRY = re.compile(r"[A-Z]{2}")


@dataclass
class PeerStep:
    """One request to a peer, as B's audit record describes it; the client fills in what it
    learns (status, tries, result) and :func:`record` writes it."""

    action: Action
    peer: str
    request_id: str
    hp: HpAssertion | None = None
    trc: Trc | None = None
    patient: PatientRef | None = None
    query: str | None = None
    interaction: str | None = None
    studies: Sequence[str] = ()
    option: str | None = None
    priority: str | None = None
    token_jti: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def event(self, outcome: Outcome, reason: str | None, duration_ms: int | None) -> AuditEvent:
        values: dict[str, Any] = {}
        policies: list[str] = []
        if self.hp is not None:
            hp = self.hp
            values.update(hp_fields(hp))
            policies.append(hp.audit_policy)
            if hp.authentication_context is not None:
                self.details.setdefault("acr", hp.authentication_context)
        patient = self.patient
        if self.trc is not None:
            values["purpose"] = self.trc.purpose_of_use
            policies.append(self.trc.audit_policy)
            patient = patient or self.trc.patient
        if patient is not None:
            values.update(patient_fields(patient))
        jti = self.token_jti or (self.trc.jti if self.trc else self.hp.jti if self.hp else None)
        details = {**self.details}
        country = self.peer if _COUNTRY.fullmatch(self.peer) else None
        if country is None:  # a caller's typo, kept for the record but not as a country
            details["peer"] = self.peer[:64]
        if policies:
            details["policies"] = policies
        return AuditEvent(
            action=self.action,
            side=Side.CONSUMER,
            request_id=self.request_id,
            outcome=outcome,
            reason=reason[:2000] if reason else None,
            interaction=self.interaction,
            peer_country=country,
            studies=tuple(self.studies),
            option=self.option,
            priority=self.priority,
            token_jti=jti,
            query=self.query[:4000] if self.query else None,
            duration_ms=duration_ms,
            details=details,
            **values,
        )


def record(
    auditor: Auditor,
    step: PeerStep,
    outcome: Outcome,
    reason: str | None = None,
    *,
    duration_ms: int | None = None,
) -> None:
    """Write the step's record (raises ``AuditError`` when it cannot: fail closed)."""
    auditor.record(step.event(outcome, reason, duration_ms))


def outcome_of_status(status: int) -> Outcome:
    """BALP outcome of a peer's answer: success for 2xx, a serious failure for a refusal of who
    asks (401, 403), a minor failure for another 4xx, a major one for 5xx."""
    if status < 400:
        return Outcome.SUCCESS
    if status in (401, 403):
        return Outcome.SERIOUS_FAILURE
    if status < 500:
        return Outcome.MINOR_FAILURE
    return Outcome.MAJOR_FAILURE
