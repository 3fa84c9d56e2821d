"""Image access: ``POST /fhir/$imaging-access`` (profiles/OperationDefinition-imaging-access.json).

Under a verified pair (HP assertion and TRC), B names studies of the confirmed patient and an
option; A checks each study against its index and answers a short-lived token signed with its
current signing key:

- option A: an image access token for A's gateway (audience and ``dicomweb`` = ``urls.imaging``);
- option C: an image access token for A's edge gateway (audience and ``dicomweb`` =
  ``urls.edge``), 422 when the node has no edge gateway;
- option B: a one-time viewer launch token, ``viewer`` = ``<urls.viewer>/launch?code=<token>``
  (redeemed by the viewer, ``ncp.viewer.launch``).

A study that is not in the index, or is another patient's, refuses the whole request (403,
audited) and nothing is issued. Asking again while the pair is valid renews: a fresh token,
recorded as a renewal when this TRC already obtained one. A token never outlives the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ncp.audit.models import Action, AuditRecord, Side
from ncp.dicom.uids import is_uid
from ncp.fhir.http import FhirHttpError
from ncp.fhir.identifiers import issuer_of
from ncp.fhir.parameters import parameters_of
from ncp.node import Node
from ncp.security.claims import (
    IMAGE_ACCESS,
    MAX_STUDIES,
    OPTIONS,
    PRIORITIES,
    PURPOSES,
    VIEWER_LAUNCH,
    VIEWER_LAUNCH_CEILING,
)
from ncp.security.pair import RequestContext, image_access_for, viewer_launch_for
from ncp.security.tokens import issue
from ncp.store.models import Patient, Study


@dataclass(frozen=True)
class AccessRequest:
    studies: tuple[str, ...]
    option: str
    purpose: str
    priority: str = "routine"


@dataclass(frozen=True)
class Issued:
    token: str
    jti: str
    expires: str
    """FHIR instant."""
    dicomweb: str | None = None
    viewer: str | None = None


class StudyRefused(FhirHttpError):
    """A study asked for is not in the index or not the confirmed patient's (403, one answer
    for both; ``rule`` tells them apart in the audit record)."""

    def __init__(self, diagnostics: str, rule: str) -> None:
        super().__init__(403, "forbidden", diagnostics, expression="Parameters.parameter")
        self.rule = rule


def parse_parameters(body: dict[str, Any]) -> AccessRequest:
    """The request in the operation's Parameters: ``study`` 1..*, ``option``, ``purpose``,
    ``priority`` 0..1 (see the OperationDefinition). Any other shape of JSON is a 400."""
    studies: list[str] = []
    single: dict[str, str] = {}
    for name, where, param in parameters_of(body, "$imaging-access"):
        if name == "study":
            uid = param.get("valueString")
            if not isinstance(uid, str) or not is_uid(uid):
                raise FhirHttpError(
                    400,
                    "invalid",
                    "study needs a valueString holding a Study Instance UID",
                    expression=where,
                )
            if uid not in studies:
                studies.append(uid)
        elif name in ("option", "purpose", "priority"):
            value = param.get("valueCode")
            if not isinstance(value, str) or name in single:
                raise FhirHttpError(
                    400, "invalid", f"{name} is given once, as a valueCode", expression=where
                )
            single[name] = value
        else:
            raise FhirHttpError(
                400,
                "not-supported",
                f"unknown $imaging-access parameter {name!r}",
                expression=where,
            )
    if not studies:
        raise FhirHttpError(400, "required", "name at least one study", expression="study")
    if len(studies) > MAX_STUDIES:
        raise FhirHttpError(
            400, "too-costly", f"at most {MAX_STUDIES} studies per request", expression="study"
        )
    for name, allowed in (("option", OPTIONS), ("purpose", PURPOSES)):
        if name not in single:
            raise FhirHttpError(400, "required", f"{name} is required", expression=name)
        if single[name] not in allowed:
            raise FhirHttpError(
                400, "code-invalid", f"{name} must be one of {', '.join(allowed)}", expression=name
            )
    priority = single.get("priority", "routine")
    if priority not in PRIORITIES:
        raise FhirHttpError(
            400,
            "code-invalid",
            f"priority must be one of {', '.join(PRIORITIES)}",
            expression="priority",
        )
    return AccessRequest(tuple(studies), single["option"], single["purpose"], priority)


def check_studies(session: Session, context: RequestContext, studies: tuple[str, ...]) -> None:
    """Every study is in the index and is the confirmed patient's, or StudyRefused."""
    patient = context.patient
    rows = session.execute(
        select(Study.study_uid, Patient.patient_id, Patient.issuer)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_uid.in_(studies))
    ).all()
    owners = {uid: (pid, issuer) for uid, pid, issuer in rows}
    wanted = (patient.value, issuer_of(patient.system))
    for uid in studies:
        owner = owners.get(uid)
        if owner is None or owner != wanted:
            # One answer for both: telling "unknown" from "someone else's" would let a peer
            # learn which study UIDs exist here (the audit record keeps the rule).
            raise StudyRefused(
                f"study {uid} is not available for the patient of the treatment relationship "
                "confirmation",
                "UnknownStudy" if owner is None else "StudyOfAnotherPatient",
            )


def issue_token(node: Node, context: RequestContext, asked: AccessRequest) -> Issued:
    """Sign the token the option calls for (see the module doc)."""
    urls, now = node.settings.urls, node.clock()
    key = node.keystore.current_signing_key()
    if asked.option == "B":
        if not urls.viewer:
            raise FhirHttpError(
                422, "not-supported", "option B: this node has no viewer configured (urls.viewer)"
            )
        launch = viewer_launch_for(
            context,
            issuer=node.country,
            audience=urls.viewer,
            studies=asked.studies,
            now=now,
            priority=asked.priority,
            lifetime=VIEWER_LAUNCH_CEILING,
        )
        token = issue(VIEWER_LAUNCH, launch, key, now=now)
        viewer = f"{urls.viewer.rstrip('/')}/launch?code={token}"
        return Issued(token, launch.jti, _instant(launch.expires_at), viewer=viewer)
    base = urls.imaging if asked.option == "A" else urls.edge
    if not base:
        setting = "urls.imaging" if asked.option == "A" else "urls.edge"
        raise FhirHttpError(
            422,
            "not-supported",
            f"option {asked.option}: this node has no gateway for it configured ({setting})",
        )
    lifetime = timedelta(seconds=node.settings.tokens.image_access_lifetime_s)
    claims = image_access_for(
        context,
        issuer=node.country,
        audience=base,
        studies=asked.studies,
        option=asked.option,
        now=now,
        priority=asked.priority,
        lifetime=lifetime,
    )
    token = issue(IMAGE_ACCESS, claims, key, now=now, max_lifetime=lifetime)
    return Issued(token, claims.jti, _instant(claims.expires_at), dicomweb=base)


def is_renewal(session: Session, context: RequestContext, leeway_s: int) -> bool:
    """Whether this TRC already obtained a token (the audit trail says so): one indexed lookup
    among the patient's records since the TRC was issued."""
    patient = context.patient
    # B's clock may run ahead of ours by up to the leeway.
    issued = context.trc.issued_at - timedelta(seconds=leeway_s)
    since = issued.astimezone(UTC).replace(tzinfo=None)
    found = session.scalar(
        select(AuditRecord.seq)
        .where(
            AuditRecord.patient_id == patient.value,
            AuditRecord.patient_issuer == issuer_of(patient.system),
            AuditRecord.recorded >= since,
            AuditRecord.side == Side.PROVIDER.value,
            AuditRecord.action.in_(
                [Action.ACCESS_TOKEN_ISSUE.value, Action.ACCESS_TOKEN_RENEW.value]
            ),
            AuditRecord.outcome == 0,
            AuditRecord.details["trc_jti"].as_string() == context.trc.jti,
        )
        .limit(1)
    )
    return found is not None


def answer(issued: Issued) -> dict[str, Any]:
    """The operation's out Parameters."""
    params: list[dict[str, Any]] = [
        {"name": "token", "valueString": issued.token},
        {"name": "expires", "valueInstant": issued.expires},
    ]
    if issued.dicomweb is not None:
        params.append({"name": "dicomweb", "valueUrl": issued.dicomweb})
    if issued.viewer is not None:
        params.append({"name": "viewer", "valueUrl": issued.viewer})
    return {"resourceType": "Parameters", "parameter": params}


def _instant(moment: Any) -> str:
    return str(moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
