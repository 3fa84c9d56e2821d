"""Report-to-study linkage inside a bundle (document or searchset).

The same study must be named the same way everywhere: its Study Instance UID (identifier
system ``urn:dicom:uid``, value ``urn:oid:<uid>``) and its accession number (identifier typed
v2-0203 ``ACSN`` or DCM 121022, qualified by its issuer's system) agree between

- the ImagingStudy (``identifier``),
- the DiagnosticReport (``imagingStudy`` references, which may also carry the study UID as a
  logical identifier; an accession in ``identifier``; the order in ``basedOn``),
- the ServiceRequest whose identifier is the accession number,
- a DocumentReference (``context.related``: references to the study and/or its identifiers).

A disagreement is an error located at the element that claims something else than the resource
it points to: the DiagnosticReport's ``imagingStudy[k].identifier.value``, the
DocumentReference's ``context.related[k].identifier.value``, or the ImagingStudy's accession when
it differs from the order it is based on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ncp.fhir.identifiers import UNQUALIFIED_ACCESSION_SYSTEM
from ncp.validation.bundle import BundleIndex
from ncp.validation.issues import NOT_FOUND, VALUE, Issue

DICOM_UID = "urn:dicom:uid"
_ACCESSION_TYPES = frozenset(
    {
        ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN"),
        ("http://dicom.nema.org/resources/ontology/DCM", "121022"),
    }
)
RULE_UID = "linkage-study-uid"
RULE_ACCESSION = "linkage-accession"


def _uid(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value[len("urn:oid:") :] if value.startswith("urn:oid:") else value


def _is_accession(identifier: dict[str, Any]) -> bool:
    codings = ((identifier.get("type") or {}).get("coding")) or []
    return any(
        isinstance(c, dict) and (c.get("system"), c.get("code")) in _ACCESSION_TYPES
        for c in codings
    )


def _identifiers(resource: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    found = resource.get("identifier")
    if isinstance(found, dict):
        return [(-1, found)]
    return [(i, x) for i, x in enumerate(found or []) if isinstance(x, dict)]


def study_uids(study: dict[str, Any]) -> set[str]:
    return {
        uid
        for _, x in _identifiers(study)
        if x.get("system") == DICOM_UID and (uid := _uid(x.get("value"))) is not None
    }


def accessions(resource: dict[str, Any]) -> list[tuple[int, tuple[str | None, str]]]:
    """(index, (system, value)) of the accession identifiers of a resource."""
    return [
        (i, (x.get("system"), x["value"]))
        for i, x in _identifiers(resource)
        if _is_accession(x) and isinstance(x.get("value"), str)
    ]


def _same_accession(a: tuple[str | None, str], b: tuple[str | None, str]) -> bool:
    # An archive that knows no issuer writes the unqualified system: it agrees with any system.
    loose = (None, UNQUALIFIED_ACCESSION_SYSTEM)
    return a[1] == b[1] and (a[0] in loose or b[0] in loose or a[0] == b[0])


def _refs(resource: dict[str, Any], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    found = resource.get(name)
    items = found if isinstance(found, list) else [found] if isinstance(found, dict) else []
    for k, ref in enumerate(items):
        if isinstance(ref, dict):
            yield k, ref


def _target(index: BundleIndex, entry: int, ref: dict[str, Any], rtype: str) -> int | None:
    reference = ref.get("reference")
    if not isinstance(reference, str):
        return None
    found = index.resolve(reference, entry)
    if found is None:
        return None
    target = index.resources[found]
    return found if target is not None and target.get("resourceType") == rtype else None


def _step(location: str, name: str, k: int, many: bool) -> str:
    return f"{location}.{name}[{k}]" if many else f"{location}.{name}"


def linkage_issues(index: BundleIndex) -> list[Issue]:
    issues: list[Issue] = []
    studies = [
        (i, r)
        for i, r in enumerate(index.resources)
        if r and r.get("resourceType") == "ImagingStudy"
    ]
    by_uid: dict[str, int] = {}
    for i, study in studies:
        for uid in study_uids(study):
            by_uid.setdefault(uid, i)
    for i, resource in enumerate(index.resources):
        if resource is None:
            continue
        rtype = resource.get("resourceType")
        if rtype == "DiagnosticReport":
            issues.extend(_diagnostic_report(index, i, resource, bool(studies), by_uid))
        elif rtype == "ImagingStudy":
            issues.extend(_study_and_order(index, i, resource))
        elif rtype == "DocumentReference":
            issues.extend(_document_reference(index, i, resource, by_uid))
    return issues


def _accession_mismatch(index: BundleIndex, study_entry: int, order: dict[str, Any]) -> list[Issue]:
    study = index.resources[study_entry] or {}
    ordered = [a for _, a in accessions(order)]
    if not ordered:
        return []
    out: list[Issue] = []
    for k, acc in accessions(study):
        if not any(_same_accession(acc, o) for o in ordered):
            many = isinstance(study.get("identifier"), list)
            out.append(
                Issue(
                    "error",
                    VALUE,
                    f"{_step(index.locations[study_entry], 'identifier', k, many)}.value",
                    f"the study's accession number {acc[1]!r} differs from its order's "
                    f"({', '.join(o[1] for o in ordered)})",
                    RULE_ACCESSION,
                )
            )
    return out


def _study_and_order(index: BundleIndex, i: int, study: dict[str, Any]) -> list[Issue]:
    out: list[Issue] = []
    for _, ref in _refs(study, "basedOn"):
        order = _target(index, i, ref, "ServiceRequest")
        if order is not None:
            out.extend(_accession_mismatch(index, i, index.resources[order] or {}))
    return out


def _diagnostic_report(
    index: BundleIndex, i: int, report: dict[str, Any], has_studies: bool, by_uid: dict[str, int]
) -> list[Issue]:
    out: list[Issue] = []
    where = index.locations[i]
    linked: list[int] = []
    for k, ref in _refs(report, "imagingStudy"):
        target = _target(index, i, ref, "ImagingStudy")
        identifier = ref.get("identifier") if isinstance(ref.get("identifier"), dict) else None
        claimed = (
            _uid(identifier.get("value"))
            if identifier and identifier.get("system") == DICOM_UID
            else None
        )
        location = f"{where}.imagingStudy[{k}].identifier.value"
        if target is not None:
            linked.append(target)
            uids = study_uids(index.resources[target] or {})
            if claimed is not None and uids and claimed not in uids:
                out.append(
                    Issue(
                        "error",
                        VALUE,
                        location,
                        f"Study Instance UID {claimed} differs from the referenced "
                        f"ImagingStudy's ({', '.join(sorted(uids))})",
                        RULE_UID,
                    )
                )
        elif claimed is not None:
            if claimed in by_uid:
                linked.append(by_uid[claimed])
            elif has_studies:
                out.append(
                    Issue(
                        "warning",
                        NOT_FOUND,
                        location,
                        f"no ImagingStudy in the bundle has the Study Instance UID {claimed}",
                        RULE_UID,
                    )
                )
    study_accessions = [a for s in linked for _, a in accessions(index.resources[s] or {})]
    if study_accessions:
        for j, acc in accessions(report):
            if not any(_same_accession(acc, s) for s in study_accessions):
                many = isinstance(report.get("identifier"), list)
                out.append(
                    Issue(
                        "error",
                        VALUE,
                        f"{_step(where, 'identifier', j, many)}.value",
                        f"the report's accession number {acc[1]!r} is not its study's "
                        f"({', '.join(a[1] for a in study_accessions)})",
                        RULE_ACCESSION,
                    )
                )
    for _, ref in _refs(report, "basedOn"):
        order = _target(index, i, ref, "ServiceRequest")
        if order is not None:
            for study in linked:
                out.extend(_accession_mismatch(index, study, index.resources[order] or {}))
    return out


def _document_reference(
    index: BundleIndex, i: int, document: dict[str, Any], by_uid: dict[str, int]
) -> list[Issue]:
    out: list[Issue] = []
    where = f"{index.locations[i]}.context"
    context = document.get("context")
    if not isinstance(context, dict):
        return out
    uid_claims: list[tuple[int, str]] = []
    accession_claims: list[tuple[int, tuple[str | None, str]]] = []
    referenced: list[tuple[int, int]] = []
    for k, related in _refs(context, "related"):
        identifier = related.get("identifier")
        if isinstance(identifier, dict):
            if identifier.get("system") == DICOM_UID and (uid := _uid(identifier.get("value"))):
                uid_claims.append((k, uid))
            elif _is_accession(identifier) and isinstance(identifier.get("value"), str):
                accession_claims.append((k, (identifier.get("system"), identifier["value"])))
        target = _target(index, i, related, "ImagingStudy")
        if target is not None:
            referenced.append((k, target))
    for k, target in referenced:
        uids = study_uids(index.resources[target] or {})
        own = [u for kk, u in uid_claims if kk == k]
        claims = own or [u for _, u in uid_claims]
        for claim in claims:
            if uids and claim not in uids:
                at = k if own else next(kk for kk, u in uid_claims if u == claim)
                out.append(
                    Issue(
                        "error",
                        VALUE,
                        f"{where}.related[{at}].identifier.value",
                        f"Study Instance UID {claim} differs from the related ImagingStudy's "
                        f"({', '.join(sorted(uids))})",
                        RULE_UID,
                    )
                )
    studies = {by_uid[u] for _, u in uid_claims if u in by_uid} | {t for _, t in referenced}
    study_accessions = [a for s in studies for _, a in accessions(index.resources[s] or {})]
    if study_accessions:
        for k, acc in accession_claims:
            if not any(_same_accession(acc, s) for s in study_accessions):
                out.append(
                    Issue(
                        "error",
                        VALUE,
                        f"{where}.related[{k}].identifier.value",
                        f"accession number {acc[1]!r} is not the related study's "
                        f"({', '.join(a[1] for a in study_accessions)})",
                        RULE_ACCESSION,
                    )
                )
    return out
