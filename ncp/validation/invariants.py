"""FHIRPath constraints (``ElementDefinition.constraint``) of the snapshots.

Each distinct (key, expression) is prepared once: a hand-written equivalent when one is
registered for exactly that expression (the constraints met at nearly every element, where
calling a FHIRPath interpreter would cost more than the rest of validation), otherwise the
expression compiled by ``fhirpathpy`` (MIT, pure Python, offline; chosen because it is the
maintained Python FHIRPath engine with an R4 model and a compile-once API).

Constraints are skipped, and counted, when fhirpathpy cannot evaluate them reliably: a function
it lacks (``htmlChecks``, ``conformsTo``, ``resolve``...), an expression it cannot parse, one on
the list below of expressions it gets wrong, or an exception while evaluating. A skip is never
an error; the engine reports the count in an information issue.

A constraint fails when its expression gives ``false``. An empty result (FHIRPath could not
decide, e.g. ``fullUrl.contains(...)`` on an entry without ``fullUrl``) is not a failure: the
validator would otherwise report errors no reading of the specification supports.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

from lxml import etree

from ncp.validation.elements import Constraint
from ncp.validation.issues import INVARIANT, Issue, Severity

# fhirpathpy (with its ANTLR parser) is imported on first use, in :func:`_engine`: the
# constraints met in what the node exchanges are all native, so ``ncp validate`` of such files
# never loads it (start-up matters: CI runs one process per file).

Native = Callable[[Any, "Scope"], bool]

_XHTML = "{http://www.w3.org/1999/xhtml}"

# fhirpathpy compares FHIR date-times as strings when they are read from a resource (literals
# work), so ``start <= end`` is wrong across time zones (per-1 is done natively below), and it
# cannot compare two Quantities (rng-2 raises). Checked one by one against the R4 constraints.
UNRELIABLE = frozenset({"rng-2"})


@dataclass(slots=True)
class Scope:
    """The environment of one evaluation: ``%resource`` and ``%rootResource``."""

    resource: dict[str, Any]
    root_resource: dict[str, Any]
    _vars: dict[str, Any] | None = None

    def variables(self) -> dict[str, Any]:
        if self._vars is None:
            self._vars = {"resource": self.resource, "rootResource": self.root_resource}
        return self._vars


# --- hand-written equivalents ---------------------------------------------------------------


def _ele_1(value: Any, scope: Scope) -> bool:
    # hasValue() or (children().count() > id.count()); met at every element, so written for
    # speed: no generator, the common primitive first.
    if isinstance(value, str):
        return value != ""
    if isinstance(value, dict):
        for key in value:
            if key != "id" and key != "resourceType" and key != "fhir_comments":
                return True
        return False
    if isinstance(value, list):
        return bool(value)
    return value is not None


def _ext_1(value: Any, scope: Scope) -> bool:
    # extension.exists() != value.exists()
    if not isinstance(value, dict):
        return True
    has_value = any(k.startswith("value") and len(k) > 5 and k[5].isupper() for k in value)
    return bool(value.get("extension")) != has_value


def _child(value: Any, key: str) -> Any:
    """``value.<key>`` of an object; None of anything else (a primitive, a list, a malformed
    value: the structure check reports those, a constraint does not fail on them)."""
    return value.get(key) if isinstance(value, dict) else None


def _objects(value: Any, key: str) -> list[dict[str, Any]]:
    """The objects of a repeating element (``contained``, ``entry``); none unless a list."""
    found = _child(value, key)
    return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def _list(value: Any, key: str) -> list[Any]:
    """The items of an element as a FHIRPath collection: a single value is a list of one."""
    found = _child(value, key)
    if found is None:
        return []
    return found if isinstance(found, list) else [found]


def _dom_2(value: Any, scope: Scope) -> bool:
    return all(not c.get("contained") for c in _objects(value, "contained"))


def _strings(node: Any, key: str | None = None) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    stack: list[tuple[str | None, Any]] = [(key, node)]
    while stack:
        k, item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.items())
        elif isinstance(item, list):
            stack.extend((k, v) for v in item)
        elif isinstance(item, str):
            out.append((k, item))
    return out


def _dom_3(value: Any, scope: Scope) -> bool:
    contained = _objects(value, "contained")
    if not contained:
        return True
    # Every contained resource is referenced ('#id') from elsewhere in the resource, or some
    # reference is '#' (the container itself).
    refs = {s for k, s in _strings(value) if s.startswith("#")}
    if "#" in refs:
        return True
    return all(f"#{c.get('id')}" in refs for c in contained)


def _dom_4(value: Any, scope: Scope) -> bool:
    for c in _objects(value, "contained"):
        meta = c.get("meta") or {}
        if "versionId" in meta or "lastUpdated" in meta:
            return False
    return True


def _dom_5(value: Any, scope: Scope) -> bool:
    return all(not (c.get("meta") or {}).get("security") for c in _objects(value, "contained"))


def _dom_6(value: Any, scope: Scope) -> bool:
    text = _child(value, "text")
    return isinstance(text, dict) and bool(text.get("div"))


def _ref_1(value: Any, scope: Scope) -> bool:
    reference = _child(value, "reference")
    if not isinstance(reference, str) or not reference.startswith("#"):
        return True
    return reference[1:] in {c.get("id") for c in _objects(scope.root_resource, "contained")}


_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def _moment(text: str) -> tuple[datetime, int] | None:
    """(instant, precision) of a FHIR date/dateTime; precision 1 year .. 4 seconds."""
    m = _DATE_TIME.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    precision = 0 if month is None else 1 if day is None else 2 if hour is None else 3
    tz: tzinfo = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    moment = datetime(
        int(year),
        int(month or 1),
        int(day or 1),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        int((fraction or "0")[:6].ljust(6, "0")),
        tzinfo=tz,
    )
    return moment, precision


def _per_1(value: Any, scope: Scope) -> bool:
    # start.hasValue().not() or end.hasValue().not() or (start <= end)
    if not isinstance(value, dict):
        return True
    start, end = value.get("start"), value.get("end")
    if not isinstance(start, str) or not isinstance(end, str):
        return True
    a, b = _moment(start), _moment(end)
    if a is None or b is None:
        return True  # a malformed date is the structure check's finding
    if a[1] != b[1] and (a[1] < 3 or b[1] < 3):
        # Different precisions: compare on the shared one (FHIRPath gives empty when it
        # cannot decide; a period 2024 .. 2024-06 is not reversed).
        shared = min(a[1], b[1])
        width = (4, 7, 10)[min(shared, 2)]
        return start[:width] <= end[:width]
    return a[0] <= b[0]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_HTML_ELEMENTS = _words(
    "a abbr acronym b big blockquote br caption cite code col colgroup dd dfn div dl dt em "
    "h1 h2 h3 h4 h5 h6 hr i img li ol p pre q samp small span strong sub sup table tbody td "
    "tfoot th thead tr tt ul var"
)
_HTML_ATTRIBUTES = _words(
    "abbr accesskey align alt axis bgcolor border cellhalign cellpadding cellspacing cellvalign "
    "char charoff charset cite class colspan compact coords dir frame headers height href "
    "hreflang hspace id lang language longdesc name nowrap rel rev rowspan rules scope shape "
    "span src start style summary tabindex title type valign value vspace width"
)
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


@functools.lru_cache(maxsize=512)
def _html_checks(value: str) -> tuple[bool, bool]:
    """(txt-1, txt-2) of a narrative, parsed once for both."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        div = etree.fromstring(value.encode("utf-8"), parser=parser)
    except (etree.XMLSyntaxError, ValueError):
        return False, False
    text = "".join(div.itertext())
    content = bool(text.strip()) or any(True for _ in div.iter(f"{_XHTML}img"))
    return _basic_html(div), content


def _basic_html(div: Any) -> bool:
    # htmlChecks(): XHTML, only the basic formatting elements and attributes, no active content.
    if div.tag != f"{_XHTML}div":
        return False
    for element in div.iter():
        if not isinstance(element.tag, str):
            continue  # comments and processing instructions are harmless
        if not element.tag.startswith(_XHTML) or element.tag[len(_XHTML) :] not in _HTML_ELEMENTS:
            return False
        for attribute in element.attrib:
            if attribute not in _HTML_ATTRIBUTES and attribute != _XML_LANG:
                return False
        href = element.get("href", "") + element.get("src", "")
        if href.strip().lower().startswith("javascript:"):
            return False
    return True


def _txt_1(value: Any, scope: Scope) -> bool:
    return isinstance(value, str) and _html_checks(value)[0]


def _txt_2(value: Any, scope: Scope) -> bool:
    # htmlChecks(): the narrative has some non-whitespace content (text or an image).
    return isinstance(value, str) and _html_checks(value)[1]


def _exists(value: Any, key: str) -> bool:
    return _child(value, key) not in (None, [], {})


def _type_is(value: Any, *allowed: str) -> bool | None:
    kind = _child(value, "type")
    return None if kind is None else kind in allowed


def _implies(condition: bool | None, then: bool | None) -> bool | None:
    # FHIRPath three-valued ``implies``.
    if condition is False:
        return True
    if condition is True:
        return then
    return True if then is True else None


def _bdl_1(value: Any, scope: Scope) -> bool:
    return not _exists(value, "total") or bool(_type_is(value, "searchset", "history"))


def _bdl_2(value: Any, scope: Scope) -> bool:
    return not any(_exists(e, "search") for e in _objects(value, "entry")) or bool(
        _type_is(value, "searchset")
    )


def _bdl_3(value: Any, scope: Scope) -> bool:
    wanted = _type_is(value, "batch", "transaction", "history")
    return all(_exists(e, "request") == bool(wanted) for e in _objects(value, "entry"))


def _bdl_4(value: Any, scope: Scope) -> bool:
    wanted = _type_is(value, "batch-response", "transaction-response", "history")
    return all(_exists(e, "response") == bool(wanted) for e in _objects(value, "entry"))


def _bdl_7(value: Any, scope: Scope) -> bool:
    if _type_is(value, "history"):
        return True
    keys = []
    for e in _objects(value, "entry"):
        if isinstance(e.get("fullUrl"), str):
            version = _child(_child(e.get("resource"), "meta"), "versionId")
            keys.append(e["fullUrl"] + (version if isinstance(version, str) else ""))
    return len(keys) == len(set(keys))


def _bdl_9(value: Any, scope: Scope) -> bool:
    identifier = _child(value, "identifier")
    ok = _exists(identifier, "system") and _exists(identifier, "value")
    return _implies(_type_is(value, "document"), ok) is not False


def _bdl_10(value: Any, scope: Scope) -> bool:
    timestamp = _child(value, "timestamp")
    return _implies(_type_is(value, "document"), isinstance(timestamp, str)) is not False


def _first_is(value: Any, rtype: str) -> bool | None:
    entries = _child(value, "entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    resource = entries[0].get("resource")
    if not isinstance(resource, dict):
        return None
    return resource.get("resourceType") == rtype


def _bdl_11(value: Any, scope: Scope) -> bool:
    return _implies(_type_is(value, "document"), _first_is(value, "Composition")) is not False


def _bdl_12(value: Any, scope: Scope) -> bool:
    return _implies(_type_is(value, "message"), _first_is(value, "MessageHeader")) is not False


def _bdl_5(value: Any, scope: Scope) -> bool:
    return any(_exists(value, k) for k in ("resource", "request", "response"))


def _bdl_8(value: Any, scope: Scope) -> bool:
    full_url = _child(value, "fullUrl")
    return not isinstance(full_url, str) or "/_history/" not in full_url


def _cmp_1(value: Any, scope: Scope) -> bool:
    return any(_exists(value, k) for k in ("text", "entry", "section"))


def _cmp_2(value: Any, scope: Scope) -> bool:
    return not _exists(value, "emptyReason") or not _exists(value, "entry")


def _count(value: Any, key: str) -> int:
    found = _child(value, key)
    if found is None:
        # A primitive with only its extension (``_name``) is still an element that counts.
        return 1 if isinstance(value, dict) and value.get("_" + key) is not None else 0
    return len(found) if isinstance(found, list) else 1


def _org_1(value: Any, scope: Scope) -> bool:
    return _count(value, "identifier") + _count(value, "name") > 0


def _org_2(value: Any, scope: Scope) -> bool:
    return not (isinstance(value, dict) and value.get("use") == "home")


def _prr_1(value: Any, scope: Scope) -> bool:
    return not _exists(value, "orderDetail") or _exists(value, "code")


_REPORT_STATUSES = frozenset({"preliminary", "final", "amended"})


def _ncp_dr_1(value: Any, scope: Scope) -> bool:
    status = _child(value, "status")
    return status is None or (isinstance(status, str) and status in _REPORT_STATUSES)


def _resolved_organizations(bundle: Any, rtype: str, element: str) -> list[dict[str, Any]]:
    """``Bundle.entry.resource.ofType(rtype).<element>.resolve().ofType(Organization)``, where
    a reference resolves to the entry whose fullUrl it names (a document's references do)."""
    entries = _objects(bundle, "entry")
    by_url = {e.get("fullUrl"): e.get("resource") for e in entries}
    found: list[dict[str, Any]] = []
    for entry in entries:
        resource = entry.get("resource")
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            continue
        refs = resource.get(element)
        for ref in refs if isinstance(refs, list) else []:
            target = by_url.get(_child(ref, "reference"))
            if isinstance(target, dict) and target.get("resourceType") == "Organization":
                found.append(target)
    return found


def _dr_comp_author_org(value: Any, scope: Scope) -> bool:
    # HL7 Europe imaging (BundleReportEuImaging): FHIRPath '=' of two collections is true when
    # they hold equal items in the same order; both empty passes by the 'or' branch.
    performers = _resolved_organizations(value, "DiagnosticReport", "performer")
    authors = _resolved_organizations(value, "Composition", "author")
    return performers == authors


# --- the guides' invariants and ours on report and manifest resources ---------------------------
# Met once per section, resource or narrative of every emitted report and manifest: evaluated
# here rather than by fhirpathpy (checked against it in tests/test_validation_rules.py).

_NOTE_URL = "http://hl7.org/fhir/StructureDefinition/note"
_VERSION_URL = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Composition.version"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")


def _extension_values(value: Any, url: str) -> list[Any]:
    out: list[Any] = []
    for ext in _list(value, "extension"):
        if isinstance(ext, dict) and ext.get("url") == url:
            out.extend(v for k, v in ext.items() if k.startswith("value"))
    return out


def _eu_imaging_composition_1(value: Any, scope: Scope) -> bool:
    notes = _extension_values(value, _NOTE_URL)
    return (
        bool(_list(value, "entry"))
        or _exists(value, "emptyReason")
        or bool(_list(value, "section"))
        or any(isinstance(n, dict) and _exists(n, "text") for n in notes)
    )


def _accession_in_order_refs(value: Any, scope: Scope) -> bool:
    for ref in _list(value, "basedOn"):
        if not isinstance(ref, dict) or ref.get("type") != "ServiceRequest":
            continue
        identifier = _child(ref, "identifier")
        types = _list(_child(identifier, "type"), "coding")
        acsn = any(
            isinstance(c, dict) and c.get("system") == _V2_0203 and c.get("code") == "ACSN"
            for c in types
        )
        if not (_exists(identifier, "system") and _exists(identifier, "value") and acsn):
            return False
    return True


def _im_imagingstudy_01(value: Any, scope: Scope) -> bool:
    values = [
        i.get("value")
        for i in _list(value, "identifier")
        if isinstance(i, dict) and i.get("system") == "urn:dicom:uid" and "value" in i
    ]
    return all(isinstance(v, str) and v.startswith("urn:oid:") for v in values)


def _ncp_comp_1(value: Any, scope: Scope) -> bool:
    versions = _extension_values(value, _VERSION_URL)
    if not versions or all(v == "1" for v in versions):
        return True
    return any(
        isinstance(r, dict) and r.get("code") == "replaces" for r in _list(value, "relatesTo")
    )


def _ncp_comp_2(value: Any, scope: Scope) -> bool:
    return all(
        isinstance(v, str) and _VERSION_NUMBER.fullmatch(v) is not None
        for v in _extension_values(value, _VERSION_URL)
    )


def _mado_reqproc_1(value: Any, scope: Scope) -> bool:
    for code in _list(value, "procedureCode"):
        if _exists(code, "text") or any(_exists(c, "display") for c in _list(code, "coding")):
            return True
    return False


def _narrative_not_empty(value: Any, scope: Scope) -> bool:
    return not isinstance(value, dict) or value.get("status") != "empty"


def _has_choice(value: Any, stem: str) -> bool:
    """``<stem>[x]`` exists: some ``<stem>Type`` of the object holds something."""
    if not isinstance(value, dict):
        return False
    n = len(stem)
    return any(
        key.startswith(stem) and len(key) > n and key[n].isupper() and item not in (None, [], {})
        for key, item in value.items()
    )


# Met on every finding of a report (the HL7 Europe Observation) and on every Quantity: fhirpathpy
# took more than the rest of such an Observation's validation.


def _obs_6(value: Any, scope: Scope) -> bool:
    return not _exists(value, "dataAbsentReason") or not _has_choice(value, "value")


def _obs_7(value: Any, scope: Scope) -> bool:
    # value.empty() or component.code.where(coding.intersect(%resource.code.coding).exists())
    #   .empty(): no component is coded as the observation itself when there is a value.
    if not _has_choice(value, "value"):
        return True
    own = _list(_child(scope.resource, "code"), "coding")
    return not any(
        coding in own
        for component in _objects(value, "component")
        for coding in _list(_child(component, "code"), "coding")
    )


def _qty_3(value: Any, scope: Scope) -> bool:
    return not _exists(value, "code") or _exists(value, "system")


_ACCESSION_IN_ORDER_REFS = (
    "basedOn.where(type = 'ServiceRequest').all(identifier.system.exists() and "
    "identifier.value.exists() and identifier.type.coding.where(system = "
    "'http://terminology.hl7.org/CodeSystem/v2-0203' and code = 'ACSN').exists())"
)


NATIVE: dict[tuple[str, str], Native] = {
    (
        "eu-imaging-composition-1",
        "entry.empty().not() or emptyReason.exists() or section.exists() or "
        "extension('http://hl7.org/fhir/StructureDefinition/note').value.text.exists()",
    ): _eu_imaging_composition_1,
    ("eu-imaging-composition-2", "text.exists() or entry.exists() or section.exists()"): _cmp_1,
    ("hl7eu-diagnosticreporteuimaging-accession", _ACCESSION_IN_ORDER_REFS): (
        _accession_in_order_refs
    ),
    ("hl7eu-imagingstudyeuimaging-accession", _ACCESSION_IN_ORDER_REFS): _accession_in_order_refs,
    ("hl7eu-observationfindingeuimaging-accession", _ACCESSION_IN_ORDER_REFS): (
        _accession_in_order_refs
    ),
    (
        "im-imagingstudy-01",
        "identifier.where(system='urn:dicom:uid').value.startsWith('urn:oid:')",
    ): _im_imagingstudy_01,
    (
        "ncp-comp-1",
        f"extension('{_VERSION_URL}').value != '1' implies "
        "relatesTo.where(code = 'replaces').exists()",
    ): _ncp_comp_1,
    (
        "ncp-comp-2",
        f"extension('{_VERSION_URL}').value.all($this.matches('^[1-9][0-9]{{0,8}}$'))",
    ): _ncp_comp_2,
    (
        "mado-reqproc-1",
        "procedureCode.text.exists() or  procedureCode.coding.display.exists()",
    ): _mado_reqproc_1,
    ("mado-narrative-not-empty", "status != 'empty'"): _narrative_not_empty,
    ("mado-section-narrative-not-empty", "status != 'empty'"): _narrative_not_empty,
    (
        "dr-comp-author-org",
        "Bundle.entry.resource.ofType(DiagnosticReport).performer.resolve().ofType(Organization) "
        "= Bundle.entry.resource.ofType(Composition).author.resolve().ofType(Organization) or "
        "(Bundle.entry.resource.ofType(DiagnosticReport).performer.resolve().ofType(Organization)"
        ".empty() and Bundle.entry.resource.ofType(Composition).author.resolve().ofType("
        "Organization).empty())",
    ): _dr_comp_author_org,
    ("bdl-1", "total.empty() or (type = 'searchset') or (type = 'history')"): _bdl_1,
    ("bdl-2", "entry.search.empty() or (type = 'searchset')"): _bdl_2,
    (
        "bdl-3",
        "entry.all(request.exists() = (%resource.type = 'batch' or %resource.type = "
        "'transaction' or %resource.type = 'history'))",
    ): _bdl_3,
    (
        "bdl-4",
        "entry.all(response.exists() = (%resource.type = 'batch-response' or %resource.type = "
        "'transaction-response' or %resource.type = 'history'))",
    ): _bdl_4,
    (
        "bdl-7",
        "(type = 'history') or entry.where(fullUrl.exists()).select(fullUrl&resource.meta"
        ".versionId).isDistinct()",
    ): _bdl_7,
    (
        "bdl-9",
        "type = 'document' implies (identifier.system.exists() and identifier.value.exists())",
    ): _bdl_9,
    ("bdl-10", "type = 'document' implies (timestamp.hasValue())"): _bdl_10,
    ("bdl-11", "type = 'document' implies entry.first().resource.is(Composition)"): _bdl_11,
    ("bdl-12", "type = 'message' implies entry.first().resource.is(MessageHeader)"): _bdl_12,
    ("bdl-5", "resource.exists() or request.exists() or response.exists()"): _bdl_5,
    ("bdl-8", "fullUrl.contains('/_history/').not()"): _bdl_8,
    ("cmp-1", "text.exists() or entry.exists() or section.exists()"): _cmp_1,
    ("cmp-2", "emptyReason.empty() or entry.empty()"): _cmp_2,
    ("ele-1", "hasValue() or (children().count() > id.count())"): _ele_1,
    ("ext-1", "extension.exists() != value.exists()"): _ext_1,
    ("dom-2", "contained.contained.empty()"): _dom_2,
    (
        "dom-3",
        "contained.where((('#'+id in (%resource.descendants().reference | "
        "%resource.descendants().as(canonical) | %resource.descendants().as(uri) | "
        "%resource.descendants().as(url))) or descendants().where(reference = '#').exists() or "
        "descendants().where(as(canonical) = '#').exists() or "
        "descendants().where(as(canonical) = '#').exists()).not()).trace('unmatched', id).empty()",
    ): _dom_3,
    (
        "dom-4",
        "contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()",
    ): _dom_4,
    ("dom-5", "contained.meta.security.empty()"): _dom_5,
    ("dom-6", "text.`div`.exists()"): _dom_6,
    (
        "ref-1",
        "reference.startsWith('#').not() or (reference.substring(1).trace('url') in "
        "%rootResource.contained.id.trace('ids'))",
    ): _ref_1,
    (
        "per-1",
        "start.hasValue().not() or end.hasValue().not() or (start <= end)",
    ): _per_1,
    ("txt-1", "htmlChecks()"): _txt_1,
    ("txt-2", "htmlChecks()"): _txt_2,
    # Met in every report bundle; fhirpathpy took a tenth of a validation for these.
    ("org-1", "(identifier.count() + name.count()) > 0"): _org_1,
    ("org-2", "where(use = 'home').empty()"): _org_2,
    ("prr-1", "orderDetail.empty() or code.exists()"): _prr_1,
    ("ncp-dr-1", "status = 'preliminary' or status = 'final' or status = 'amended'"): _ncp_dr_1,
    ("obs-6", "dataAbsentReason.empty() or value.empty()"): _obs_6,
    (
        "obs-7",
        "value.empty() or component.code.where(coding.intersect(%resource.code.coding).exists())"
        ".empty()",
    ): _obs_7,
    ("qty-3", "code.empty() or system.exists()"): _qty_3,
}


# --- fhirpathpy ------------------------------------------------------------------------------


def _has_value(inputs: list[Any]) -> list[bool]:
    return [len(inputs) == 1 and inputs[0] is not None and not isinstance(inputs[0], dict | list)]


_USER_FUNCTIONS: dict[str, Any] = {"hasValue": {"fn": _has_value, "arity": {0: []}}}
_FUNCTION_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_OPERATORS = frozenset({"in", "and", "or", "xor", "implies", "contains", "is", "as", "div", "mod"})
_OPTIONS: dict[str, Any] = {
    "userInvocationTable": _USER_FUNCTIONS,
    "traceFn": lambda *args: None,  # trace() must not print into the validator's output
}


@dataclass(frozen=True, slots=True)
class _Engine:
    """What is used of fhirpathpy and its ANTLR runtime, loaded once."""

    compile: Callable[..., Callable[..., list[Any]]]
    model: Any
    known_functions: frozenset[str]
    resource_node: Any
    lexer: Any
    parser: Any
    input_stream: Any
    token_stream: Any
    eof: int
    error_listener: type[Any]


@functools.cache
def _engine() -> _Engine:
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy import compile as fhirpath_compile
    from fhirpathpy.engine.invocations import invocation_registry
    from fhirpathpy.engine.nodes import ResourceNode
    from fhirpathpy.models import models
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    return _Engine(
        compile=fhirpath_compile,
        model=models["r4"],
        known_functions=frozenset(invocation_registry) | frozenset(_USER_FUNCTIONS),
        resource_node=ResourceNode,
        lexer=FHIRPathLexer,
        parser=FHIRPathParser,
        input_stream=InputStream,
        token_stream=CommonTokenStream,
        eof=Token.EOF,
        error_listener=ErrorListener,
    )


def _strict_listener() -> Any:
    class _Strict(_engine().error_listener):  # type: ignore[misc]
        def syntaxError(
            self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any
        ) -> None:
            raise ValueError(f"column {column}: {msg}")

    return _Strict()


def check_syntax(expression: str) -> None:
    """Raise ValueError for an expression that is not FHIRPath: fhirpathpy's own parser
    recovers silently from syntax errors and would evaluate a fragment of the expression."""
    engine = _engine()
    listener = _strict_listener()
    lexer = engine.lexer(engine.input_stream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    tokens = engine.token_stream(lexer)
    parser = engine.parser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.expression()
    if tokens.LA(1) != engine.eof:
        raise ValueError(f"unexpected text after column {tokens.LT(1).start}")


_REMEMBERED = frozenset({"dom-3", "txt-1", "txt-2", "bdl-7", "dr-comp-author-org"})
"""Native constraints that read a whole resource, bundle or narrative: their results are kept
for the run. The others cost less than the memo key that would keep them."""


@dataclass(slots=True)
class Prepared:
    constraint: Constraint
    native: Native | None = None
    compiled: Callable[..., list[Any]] | None = None
    skip_reason: str = ""
    remembered: bool = True
    """Whether a result is kept in :attr:`Stats.memo` (evaluated again, it would cost more)."""


@dataclass(slots=True)
class Stats:
    evaluated: int = 0
    native: int = 0
    skipped: int = 0
    skipped_keys: set[str] = field(default_factory=set)
    memo: dict[tuple[int, int, int, str, str], bool] = field(default_factory=dict)
    """Results of one run by (object, %resource, %rootResource, key, expression): a resource
    checked against several profiles (ours and a guide's) meets the same base constraints on
    the same objects, evaluated once."""


def _failure(constraint: Constraint, location: str) -> Issue:
    severity: Severity = "warning" if constraint.severity == "warning" else "error"
    return Issue(
        severity, INVARIANT, location, f"{constraint.key}: {constraint.human}", constraint.key
    )


class Invariants:
    """Prepared constraints, shared by every validation (built once per validator)."""

    def __init__(self) -> None:
        self._prepared: dict[tuple[str, str], Prepared] = {}
        # By the constraints tuple of a compiled element (kept alive here, so its id is never
        # reused): a validation checks the same few hundred tuples thousands of times.
        self._by_tuple: dict[int, tuple[tuple[Constraint, ...], tuple[Prepared, ...]]] = {}

    def prepared(self, constraints: tuple[Constraint, ...]) -> tuple[Prepared, ...]:
        """The constraints of an element, prepared (cached for the element's own tuple)."""
        found = self._by_tuple.get(id(constraints))
        if found is not None and found[0] is constraints:
            return found[1]
        done = tuple(self.prepare(c) for c in constraints)
        self._by_tuple[id(constraints)] = (constraints, done)
        return done

    def prepare(self, constraint: Constraint) -> Prepared:
        key = (constraint.key, constraint.expression)
        found = self._prepared.get(key)
        if found is None:
            found = self._prepare(constraint)
            self._prepared[key] = found
        return found

    @staticmethod
    def _prepare(constraint: Constraint) -> Prepared:
        native = NATIVE.get((constraint.key, constraint.expression))
        if native is not None:
            return Prepared(constraint, native=native, remembered=constraint.key in _REMEMBERED)
        if not constraint.expression:
            return Prepared(constraint, skip_reason="no FHIRPath expression")
        if constraint.key in UNRELIABLE:
            return Prepared(constraint, skip_reason="fhirpathpy compares these values wrongly")
        engine = _engine()
        called = set(_FUNCTION_CALL.findall(constraint.expression)) - _OPERATORS
        missing = called - engine.known_functions
        if missing:
            return Prepared(
                constraint, skip_reason=f"fhirpathpy lacks {', '.join(sorted(missing))}"
            )
        try:
            check_syntax(constraint.expression)
            compiled = engine.compile(constraint.expression, engine.model, _OPTIONS)
        except Exception as exc:  # the parser raises plain exceptions
            return Prepared(constraint, skip_reason=f"fhirpathpy cannot parse it: {exc}")
        return Prepared(constraint, compiled=compiled)

    def coverage(self) -> dict[str, list[str]]:
        """Constraint keys prepared so far: evaluated natively, by fhirpathpy, or skipped."""
        out: dict[str, list[str]] = {"native": [], "fhirpath": [], "skipped": []}
        for (key, _expr), prepared in sorted(self._prepared.items()):
            kind = "native" if prepared.native else "fhirpath" if prepared.compiled else "skipped"
            out[kind].append(key)
        return out

    def check(
        self,
        constraints: tuple[Constraint, ...],
        value: Any,
        type_path: str,
        location: str,
        scope: Scope,
        stats: Stats,
        issues: list[Issue],
    ) -> None:
        """Evaluate the constraints of one element on one value, adding an issue per failure.

        ``constraints`` should be an element's own tuple (``ElementNode.constraints``): a tuple
        made per call is prepared each time (use :meth:`check_each` for those)."""
        found = self._by_tuple.get(id(constraints))  # prepared(), inlined: called per element
        done = found[1] if found is not None and found[0] is constraints else None
        if done is None:
            done = self.prepared(constraints)
        self._check(done, value, type_path, location, scope, stats, issues)

    def check_each(
        self,
        constraints: tuple[Constraint, ...],
        value: Any,
        type_path: str,
        location: str,
        scope: Scope,
        stats: Stats,
        issues: list[Issue],
    ) -> None:
        """:meth:`check` for a tuple made for this one call (not cached)."""
        done = tuple(self.prepare(c) for c in constraints)
        self._check(done, value, type_path, location, scope, stats, issues)

    def _check(
        self,
        prepared_all: tuple[Prepared, ...],
        value: Any,
        type_path: str,
        location: str,
        scope: Scope,
        stats: Stats,
        issues: list[Issue],
    ) -> None:
        memo = stats.memo
        is_object = isinstance(value, dict)
        for prepared in prepared_all:
            native = prepared.native
            if native is not None and not prepared.remembered:
                # The common case (ele-1 at every element): evaluated, no memo key built.
                stats.native += 1
                stats.evaluated += 1
                if not native(value, scope):
                    issues.append(_failure(prepared.constraint, location))
                continue
            constraint = prepared.constraint
            memo_key = None
            if is_object:
                # A value met again under the same resources (a profile walked once per claim)
                # gives the same answer: evaluate it once per validation.
                memo_key = (
                    id(value),
                    id(scope.resource),
                    id(scope.root_resource),
                    constraint.key,
                    constraint.expression,
                )
                known = memo.get(memo_key)
                if known is not None:
                    if not known:
                        issues.append(_failure(constraint, location))
                    continue
            if prepared.native is not None:
                ok = prepared.native(value, scope)
                stats.native += 1
            elif prepared.compiled is not None:
                try:
                    node = _engine().resource_node.create_node(value, type_path)
                    result = prepared.compiled(node, scope.variables())
                except Exception:  # an engine failure is a skip, never a crash
                    stats.skipped += 1
                    stats.skipped_keys.add(constraint.key)
                    continue
                ok = result != [False]
            else:
                stats.skipped += 1
                stats.skipped_keys.add(constraint.key)
                continue
            stats.evaluated += 1
            if memo_key is not None:
                memo[memo_key] = ok
            if not ok:
                issues.append(_failure(constraint, location))
