"""Bundles: references resolved by ``fullUrl`` and the rules of documents.

Resolution follows FHIR R4 "Resolving references in Bundles": a ``urn:uuid:``/``urn:oid:`` or
absolute reference must equal an entry's ``fullUrl``; a relative ``Type/id`` is resolved against
the RESTful base of the referring entry's ``fullUrl`` when it has one, otherwise by type and id.

A document (``Bundle.type = document``) must hold every resource its Composition references
(subject, authors, section entries...) and give each entry a ``fullUrl``. That it starts with its
Composition and carries an identifier and a timestamp are R4's own invariants (``bdl-11``,
``bdl-9``, ``bdl-10``), checked with the Bundle's definition: not again here, so each fault is
reported once. A ``urn:`` reference that does not resolve is an error in any bundle: nothing
outside the bundle can resolve it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ncp.validation.issues import DUPLICATE, NOT_FOUND, REQUIRED, Issue

_RESTFUL = re.compile(r"^(?P<base>.+)/(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")
_RELATIVE = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")
_HISTORY = re.compile(r"/_history/[^/]+$")


@dataclass(slots=True)
class BundleIndex:
    """The entries of one bundle by ``fullUrl`` and by type and id."""

    bundle: dict[str, Any]
    locations: list[str] = field(default_factory=list)
    resources: list[dict[str, Any] | None] = field(default_factory=list)
    full_urls: list[str | None] = field(default_factory=list)
    by_full_url: dict[str, int] = field(default_factory=dict)
    by_type_id: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of(cls, bundle: dict[str, Any]) -> BundleIndex:
        index = cls(bundle)
        entries = bundle.get("entry")
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            entry = entry if isinstance(entry, dict) else {}
            resource = entry.get("resource")
            resource = resource if isinstance(resource, dict) else None
            full_url = entry.get("fullUrl")
            full_url = full_url if isinstance(full_url, str) else None
            rtype = resource.get("resourceType") if resource else None
            location = f"Bundle.entry[{i}].resource"
            if isinstance(rtype, str):
                location = f"{location}.ofType({rtype})"
            index.locations.append(location)
            index.resources.append(resource)
            index.full_urls.append(full_url)
            if full_url is not None:
                index.by_full_url.setdefault(full_url, i)
            if resource is not None and isinstance(rtype, str):
                rid = resource.get("id")
                if isinstance(rid, str):
                    index.by_type_id.setdefault((rtype, rid), i)
        return index

    @property
    def is_document(self) -> bool:
        return self.bundle.get("type") == "document"

    def resolve(self, reference: str, from_entry: int | None = None) -> int | None:
        """The entry index a reference points to, or None."""
        if reference.startswith("#"):
            return None
        ref = _HISTORY.sub("", reference)
        if ref in self.by_full_url:
            return self.by_full_url[ref]
        relative = _RELATIVE.match(ref)
        if relative is None:
            return None
        if from_entry is not None:
            full_url = self.full_urls[from_entry]
            restful = _RESTFUL.match(full_url or "")
            if restful is not None:
                absolute = f"{restful['base']}/{ref}"
                if absolute in self.by_full_url:
                    return self.by_full_url[absolute]
        return self.by_type_id.get((relative["type"], relative["id"]))

    def resource(self, reference: str, from_entry: int | None = None) -> dict[str, Any] | None:
        found = self.resolve(reference, from_entry)
        return None if found is None else self.resources[found]


def reference_issue(
    index: BundleIndex,
    reference: str,
    location: str,
    from_entry: int | None,
    from_type: str | None,
) -> Issue | None:
    """An issue when a reference that must resolve inside the bundle does not."""
    if reference.startswith("#") or index.resolve(reference, from_entry) is not None:
        return None
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        return Issue(
            "error",
            NOT_FOUND,
            location,
            f"the reference {reference!r} matches no fullUrl in the bundle (a urn: reference "
            "can only be resolved inside it)",
            "reference-resolution",
        )
    if index.is_document and from_type == "Composition":
        return Issue(
            "error",
            NOT_FOUND,
            location,
            f"the document does not contain the resource {reference!r} its Composition references",
            "document-reference",
        )
    if index.is_document:
        return Issue(
            "warning",
            NOT_FOUND,
            location,
            f"the reference {reference!r} is not resolved inside the document",
            "document-reference",
        )
    return None


def bundle_issues(index: BundleIndex) -> list[Issue]:
    """fullUrl uniqueness and, for documents, the document rules."""
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for i, full_url in enumerate(index.full_urls):
        if full_url is None:
            if index.is_document and index.resources[i] is not None:
                issues.append(
                    Issue(
                        "error",
                        REQUIRED,
                        f"Bundle.entry[{i}]",
                        "every entry of a document needs a fullUrl",
                        "document-fullurl",
                    )
                )
            continue
        resource = index.resources[i] or {}
        key = f"{full_url}|{(resource.get('meta') or {}).get('versionId', '')}"
        if key in seen:
            issues.append(
                Issue(
                    "error",
                    DUPLICATE,
                    f"Bundle.entry[{i}].fullUrl",
                    f"the fullUrl {full_url!r} is already used by entry {seen[key]}",
                    "bundle-fullurl-unique",
                )
            )
        else:
            seen[key] = i
    return issues
