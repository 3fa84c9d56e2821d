"""Audit records as FHIR R4 AuditEvent resources, in the style of IHE Basic Audit Log Patterns.

One AuditEvent per record (:func:`audit_event`), claiming the ``ncp-auditevent`` profile:

- ``type``: a DICOM audit event id (DCM 110106 Export, 110107 Import, 110110 Patient Record,
  110112 Query, ...) or, for the token operation, the FHIR ``rest`` type; ``subtype`` the FHIR
  interaction (restful-interaction) or, for a login, DCM 110122 Login. See :data:`EVENT_TYPES`.
- ``agent``: the health professional (BALP user: type IRCP, requestor, the access token's jti
  as ``policy`` ``urn:ietf:params:oauth:jti:<jti>``, role, point of care), the professional's
  organisation, and the two nodes as source (DCM 110153) and destination (DCM 110152) of the
  request; a step without a peer names this node as the application (DCM 110150).
- ``source``: this node (site = its country, type 4 application server).
- ``entity``: the patient (by identifier), the query (base64, for searches), each study (Study
  Instance UID as ``urn:dicom:uid`` / ``urn:oid:<uid>``), and the exchange's correlation id
  (BALP ``XrequestId``) with the volumes, option, priority and the record's chain hash.
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TextIO

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.audit.models import Action, AuditRecord, Side
from ncp.fhir.canonical import structure_definition

PROFILE = structure_definition("ncp-auditevent")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
COUNTRY_SYSTEM = "urn:iso:std:iso:3166"
JTI_PREFIX = "urn:ietf:params:oauth:jti:"

_DCM_DISPLAY = {
    "110102": "Begin Transferring DICOM Instances",
    "110103": "DICOM Instances Accessed",
    "110104": "DICOM Instances Transferred",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110107": "Import",
    "110110": "Patient Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
    "110122": "Login",
    "110123": "Logout",
    "110150": "Application",
    "110152": "Destination Role ID",
    "110153": "Source Role ID",
    "110180": "Study Instance UID",
}
_PURPOSE_DISPLAY = {"TREAT": "treatment", "ETREAT": "Emergency Treatment"}
_PROVIDING = {Side.PROVIDER, Side.GATEWAY, Side.EDGE, Side.VIEWER}
"""Sides that answer a peer's request (country A); the consumer asks (country B)."""


@dataclass(frozen=True, slots=True)
class EventType:
    """How one kind of step appears as an AuditEvent."""

    system: str
    code: str
    action: str
    """FHIR AuditEvent.action: C, R, U, D or E."""
    interaction: str | None = None
    """Default FHIR interaction for ``subtype`` (a record's own ``interaction`` wins)."""

    @property
    def display(self) -> str:
        return "Restful Operation" if self.code == "rest" else _DCM_DISPLAY[self.code]


_REST_OPERATION = EventType(AUDIT_EVENT_TYPE, "rest", "E", "operation")

EVENT_TYPES: dict[tuple[Action, str], EventType] = {
    (Action.HP_LOGIN, "*"): EventType(DCM, "110114", "E"),
    (Action.HP_LOGOUT, "*"): EventType(DCM, "110114", "E"),
    (Action.PATIENT_IDENTIFY, "*"): EventType(DCM, "110112", "E", "search-type"),
    (Action.TRC_CONFIRM, Side.CONSUMER): EventType(DCM, "110110", "C"),
    (Action.TRC_CONFIRM, "*"): EventType(DCM, "110110", "E"),
    (Action.LIST_QUERY, "*"): EventType(DCM, "110112", "E", "search-type"),
    (Action.REPORT_READ, "providing"): EventType(DCM, "110106", "R", "read"),
    (Action.REPORT_READ, Side.CONSUMER): EventType(DCM, "110107", "C", "read"),
    (Action.ACCESS_TOKEN_ISSUE, "*"): _REST_OPERATION,
    (Action.ACCESS_TOKEN_RENEW, "*"): _REST_OPERATION,
    (Action.IMAGE_TRANSFER_BEGIN, "*"): EventType(DCM, "110102", "E"),
    (Action.IMAGE_RETRIEVE, "providing"): EventType(DCM, "110106", "R"),
    (Action.IMAGE_RETRIEVE, Side.CONSUMER): EventType(DCM, "110107", "C"),
    (Action.IMAGE_STORE, "*"): EventType(DCM, "110104", "C"),
    (Action.RETRIEVAL_JOB, "*"): EventType(DCM, "110102", "E"),
    (Action.IMAGE_PURGE, "*"): EventType(DCM, "110105", "D"),
    (Action.VIEWER_LAUNCH, "*"): EventType(DCM, "110103", "R"),
    (Action.VIEWER_SESSION, "*"): EventType(DCM, "110114", "E"),
    (Action.IMAGE_VIEW, "*"): EventType(DCM, "110103", "R"),
    (Action.INGEST, "*"): EventType(DCM, "110110", "C", "create"),
    (Action.REFUSAL, "*"): EventType(DCM, "110113", "E"),
}
"""(step, side) to AuditEvent type and action. ``"providing"`` is any side answering a peer
(provider, gateway, edge, viewer); ``"*"`` any side not listed on its own."""


def event_type(action: Action, side: Side) -> EventType:
    """The AuditEvent type of a step recorded on ``side`` (see :data:`EVENT_TYPES`)."""
    keys = [(action, str(side))]
    if side in _PROVIDING:
        keys.append((action, "providing"))
    keys.append((action, "*"))
    for key in keys:
        found = EVENT_TYPES.get(key)
        if found is not None:
            return found
    raise KeyError(f"no AuditEvent type for {action} on the {side} side")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _instant(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _identifier_system(issuer: str) -> str | None:
    """A FHIR Identifier.system for an issuer given as an OID or a URI (None otherwise)."""
    parts = issuer.split(".")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return f"urn:oid:{issuer}"
    if ":" in issuer and " " not in issuer:
        return issuer
    return None


def _node(country: str, type_code: str, *, requestor: bool) -> dict[str, Any]:
    return {
        "type": {"coding": [_coding(DCM, type_code, _DCM_DISPLAY[type_code])]},
        "who": {
            "identifier": {"system": COUNTRY_SYSTEM, "value": country},
            "display": f"NCPeH {country}",
        },
        "requestor": requestor,
    }


def _agents(r: AuditRecord, purpose: list[dict[str, Any]]) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = []
    has_user = r.actor_id is not None or r.actor_name is not None
    if has_user:
        who: dict[str, Any] = {}
        if r.actor_id is not None:
            who["identifier"] = {"value": r.actor_id}
            if r.actor_country is not None:  # the country whose node vouched for the id
                who["identifier"]["assigner"] = {
                    "identifier": {"system": COUNTRY_SYSTEM, "value": r.actor_country},
                    "display": f"NCPeH {r.actor_country}",
                }
        if r.actor_name is not None:
            who["display"] = r.actor_name
        user: dict[str, Any] = {
            "type": {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]},
            "who": who,
            "requestor": True,
        }
        if r.actor_role is not None:
            user["role"] = [{"text": r.actor_role}]
        if r.actor_name is not None:
            user["name"] = r.actor_name
        if r.actor_point_of_care is not None:
            user["location"] = {"display": r.actor_point_of_care}
        if r.token_jti is not None:
            user["policy"] = [f"{JTI_PREFIX}{r.token_jti}"]
        if purpose:
            user["purposeOfUse"] = purpose
        agents.append(user)
    if r.actor_organisation is not None or r.actor_organisation_id is not None:
        org: dict[str, Any] = {}
        if r.actor_organisation_id is not None:
            org["identifier"] = {"value": r.actor_organisation_id}
        if r.actor_organisation is not None:
            org["display"] = r.actor_organisation
        agents.append(
            {
                "type": {"text": "organisation of the health professional"},
                "who": org,
                "requestor": False,
            }
        )
    # The node that asked is the requestor when no professional is named (a node's own call).
    if r.peer_country is None:
        client, server = _node(r.node_country, "110150", requestor=not has_user), None
    elif Side(r.side) in _PROVIDING:
        client = _node(r.peer_country, "110153", requestor=not has_user)
        server = _node(r.node_country, "110152", requestor=False)
    else:
        client = _node(r.node_country, "110153", requestor=not has_user)
        server = _node(r.peer_country, "110152", requestor=False)
    if r.token_jti is not None and not has_user:
        client["policy"] = [f"{JTI_PREFIX}{r.token_jti}"]
    agents.append(client)
    if server is not None:
        agents.append(server)
    return agents


def _entities(r: AuditRecord) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if r.patient_id is not None:
        identifier: dict[str, Any] = {"value": r.patient_id}
        if r.patient_issuer:
            system = _identifier_system(r.patient_issuer)
            if system is not None:
                identifier["system"] = system
            else:
                identifier["assigner"] = {"display": r.patient_issuer}
        entities.append(
            {
                "what": {"identifier": identifier},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if r.query is not None:
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "query": base64.b64encode(r.query.encode("utf-8")).decode("ascii"),
            }
        )
    for uid in r.studies:
        entities.append(
            {
                "what": {
                    "identifier": {
                        "type": {"coding": [_coding(DCM, "110180", _DCM_DISPLAY["110180"])]},
                        "system": "urn:dicom:uid",
                        "value": f"urn:oid:{uid}",
                    }
                },
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "3", "Report"),
            }
        )
    detail = [{"type": "chain-seq", "valueString": str(r.seq)}]
    detail.append({"type": "chain-hash", "valueString": r.hash})
    for name, value in (
        ("option", r.option),
        ("priority", r.priority),
        ("instances", r.num_instances),
        ("bytes", r.size_bytes),
        ("duration-ms", r.duration_ms),
    ):
        if value is not None:
            detail.append({"type": name, "valueString": str(value)})
    if r.details:
        detail.append({"type": "details", "valueString": json.dumps(r.details, sort_keys=True)})
    entities.append(
        {
            "what": {"identifier": {"value": r.request_id}},
            "type": _coding(BALP_ENTITY_TYPE, "XrequestId"),
            "detail": detail,
        }
    )
    return entities


def _narrative(r: AuditRecord, kind: EventType) -> dict[str, Any]:
    # No patient data here either: the narrative is what a reader shows first.
    outcome = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
    text = (
        f"{r.action} ({kind.display}) on the {r.side} side of NCPeH {r.node_country}"
        + (f" with {r.peer_country}" if r.peer_country else "")
        + f", request {r.request_id}: {outcome.get(r.outcome, str(r.outcome))}"
    )
    div = f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(text)}</p></div>'
    return {"status": "generated", "div": div}


def audit_event(r: AuditRecord) -> dict[str, Any]:
    """The AuditEvent (FHIR R4 JSON) of one record; see the module docstring and
    :data:`EVENT_TYPES` for the mapping."""
    kind = event_type(Action(r.action), Side(r.side))
    purpose = []
    if r.purpose is not None:
        display = _PURPOSE_DISPLAY.get(r.purpose)
        purpose.append({"coding": [_coding(ACT_REASON, r.purpose, display)]})
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{r.node_country.lower()}-{r.seq}",
        "meta": {"profile": [PROFILE]},
        "text": _narrative(r, kind),
        "type": _coding(kind.system, kind.code, kind.display),
    }
    if Action(r.action) is Action.HP_LOGIN:
        resource["subtype"] = [_coding(DCM, "110122", _DCM_DISPLAY["110122"])]
    elif Action(r.action) in (Action.HP_LOGOUT, Action.VIEWER_SESSION):
        # A session's end is a logout (DCM 110123), as ATNA records one.
        resource["subtype"] = [_coding(DCM, "110123", _DCM_DISPLAY["110123"])]
    else:
        interaction = r.interaction or kind.interaction
        if interaction is not None:
            resource["subtype"] = [_coding(INTERACTION, interaction, interaction)]
    resource["action"] = kind.action
    if r.duration_ms is not None:
        start = r.recorded - timedelta(milliseconds=r.duration_ms)
        resource["period"] = {"start": _instant(start), "end": _instant(r.recorded)}
    resource["recorded"] = _instant(r.recorded)
    resource["outcome"] = str(r.outcome)
    if r.reason:
        resource["outcomeDesc"] = r.reason
    if purpose:
        resource["purposeOfEvent"] = purpose
    resource["agent"] = _agents(r, purpose)
    resource["source"] = {
        "site": r.node_country,
        "observer": {
            "identifier": {"system": COUNTRY_SYSTEM, "value": r.node_country},
            "display": f"ncp {r.side} {r.node_country}",
        },
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }
    resource["entity"] = _entities(r)
    return resource


def validated(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` after checking it with the fhir.resources R4B model (raises
    ``pydantic.ValidationError`` when it is not a valid AuditEvent)."""
    FhirAuditEvent.model_validate(resource)
    return resource


def full_url(resource: Mapping[str, Any]) -> str:
    """A stable ``urn:uuid:`` for a Bundle entry, derived from the resource id."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, PROFILE + '/' + str(resource['id']))}"


def export_events(
    session: Session, *, since: datetime | None = None, check: bool = True
) -> Iterator[dict[str, Any]]:
    """The AuditEvents of the records written at or after ``since`` (naive UTC), oldest
    first, each checked with the R4B model unless ``check`` is false."""
    stmt = select(AuditRecord).order_by(AuditRecord.seq).execution_options(yield_per=500)
    if since is not None:
        stmt = stmt.where(AuditRecord.recorded >= since)
    for record in session.scalars(stmt):
        resource = audit_event(record)
        yield validated(resource) if check else resource


def write_ndjson(resources: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """One resource per line; returns how many."""
    n = 0
    for resource in resources:
        out.write(json.dumps(resource, ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
        n += 1
    return n


def collection(resources: Iterable[Mapping[str, Any]], *, timestamp: datetime) -> dict[str, Any]:
    """A Bundle of type collection holding ``resources``."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": _instant(timestamp),
        "entry": [{"fullUrl": full_url(r), "resource": dict(r)} for r in resources],
    }
