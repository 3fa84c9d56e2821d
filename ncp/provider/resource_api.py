"""Reads of what the list and its manifests point to, so that every reference a peer follows
answers: ``GET /fhir/Patient/{id}`` (the patient of the treatment relationship),
``GET /fhir/Organization/{id}`` (the custodian: this node, or a report's own custodian) and the
IHE MADO manifest document of a study, ``GET /fhir/Bundle/{id}`` with the id of the study's
manifest DocumentReference (dispatched here by :mod:`ncp.provider.report_api`, which owns the
``Bundle`` route).

Each needs a verified pair (HP assertion and TRC) and is audited like the list's own reads; an id
that is not the TRC patient's (another patient's, or unknown) answers 404 alike.
"""

from __future__ import annotations

from typing import Any, NoReturn

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from ncp.audit.models import Action, Outcome
from ncp.fhir.http import FhirHttpError, fhir_response, wants_xml
from ncp.fhir.identifiers import is_fhir_id, issuer_of, patient_resource_id
from ncp.fhir.listing import organization, patient_resource
from ncp.fhir.mado import mado_bundle, manifest_bundle_id
from ncp.fhir.manifest import Custodian, ImagingEndpoints
from ncp.fhir.values import PatientFacts
from ncp.node import node_of
from ncp.provider.auditing import audit
from ncp.provider.auth import PatientDep
from ncp.provider.describe import describe_indexed_study, describe_patient
from ncp.security.pair import RequestContext
from ncp.store.models import Patient, Report, ReportVersion, Study


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/fhir/Patient/{resource_id}")
    def read_patient(request: Request, resource_id: str, ctx: PatientDep) -> Response:
        wants_xml(request)
        node = node_of(request)
        issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
        found: dict[str, Any] | None = None
        if resource_id == patient_resource_id(ctx.patient.system, value):
            with node.sessions() as session:
                row = session.scalars(
                    select(Patient).where(Patient.issuer == issuer, Patient.patient_id == value)
                ).first()
                facts = describe_patient(row) if row is not None else None
                if facts is None and _has_reports(session, issuer, value):
                    facts = PatientFacts(patient_id=value, issuer=issuer)
            if facts is not None:
                found = patient_resource(facts)
        _audit_read(request, ctx, "Patient", resource_id, found is not None)
        if found is None:
            _not_found("Patient")
        return fhir_response(request, found)

    @api.get("/fhir/Organization/{resource_id}")
    def read_organization(request: Request, resource_id: str, ctx: PatientDep) -> Response:
        wants_xml(request)
        node = node_of(request)
        custodian = Custodian.from_settings(node.settings)
        found: Custodian | None = custodian if resource_id == custodian.resource_id else None
        if found is None:
            # A report names its own custodian: served to whoever may read that report.
            issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
            with node.sessions() as session:
                rows = session.execute(
                    select(
                        ReportVersion.custodian_name,
                        ReportVersion.custodian_system,
                        ReportVersion.custodian_value,
                    )
                    .join(Report, Report.id == ReportVersion.report_id)
                    .where(Report.patient_issuer == issuer, Report.patient_id == value)
                    .where(ReportVersion.custodian_value.is_not(None))
                    .distinct()
                ).all()
            for name, system, identifier in rows:
                if name and system and identifier:
                    named = Custodian(name, system, identifier)
                    if named.resource_id == resource_id:
                        found = named
                        break
        _audit_read(request, ctx, "Organization", resource_id, found is not None)
        if found is None:
            _not_found("Organization")
        return fhir_response(request, organization(found))

    return api


def read_manifest(request: Request, ctx: RequestContext, bundle_id: str) -> Response:
    """The MADO manifest document of one of the TRC patient's studies, built now."""
    wants_xml(request)
    node = node_of(request)
    issuer, value = issuer_of(ctx.patient.system), ctx.patient.value
    bundle: dict[str, Any] | None = None
    studies: list[str] = []
    with node.sessions() as session:
        candidates = session.execute(
            select(Study.id, Study.study_uid)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Patient.issuer == issuer, Patient.patient_id == value)
        ).all()
        # Manifest ids are digests of the Study Instance UID: a patient has at most a few
        # hundred studies, so hashing each is cheaper than keeping another column.
        pk = next((pk for pk, uid in candidates if manifest_bundle_id(uid) == bundle_id), None)
        study = session.get(Study, pk) if pk is not None else None
        if study is not None:
            custodian = Custodian.from_settings(node.settings)
            bundle = mado_bundle(
                describe_indexed_study(session, study),
                ImagingEndpoints.from_settings(node.settings),
                custodian,
                base_url=node.base_url,
                created=node.clock(),
            )
            studies = [study.study_uid]
    _audit_read(request, ctx, "Bundle", bundle_id, bundle is not None, studies=studies)
    if bundle is None:
        _not_found("Bundle")
    return fhir_response(request, bundle)


def _has_reports(session: Any, issuer: str, value: str) -> bool:
    found = session.scalar(
        select(Report.id).where(Report.patient_issuer == issuer, Report.patient_id == value)
    )
    return found is not None


def _audit_read(
    request: Request,
    ctx: RequestContext,
    rtype: str,
    resource_id: str,
    found: bool,
    *,
    studies: list[str] | None = None,
) -> None:
    audit(
        request,
        action=Action.LIST_QUERY,
        outcome=Outcome.SUCCESS if found else Outcome.MINOR_FAILURE,
        context=ctx,
        studies=studies or [],
        query=f"_id={resource_id}" if is_fhir_id(resource_id) else None,
        interaction="read",
        reason=None if found else "unknown id for the patient",
        details={"resourceType": rtype},
    )


def _not_found(rtype: str) -> NoReturn:
    raise FhirHttpError(
        404, "not-found", f"no {rtype} with this id for the patient of the treatment relationship"
    )


__all__ = ["read_manifest", "router"]
