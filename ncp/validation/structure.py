"""Structure: is it FHIR R4 at all (types, unknown elements, required elements, formats)?

Two sources, deduplicated by the engine:

- the ``fhir.resources.R4B`` model classes (wrong types, unknown elements, missing required
  elements, malformed dates and other primitive formats, empty strings), their pydantic error
  locations mapped to FHIRPath locations;
- checks of the JSON itself that the models, being lax, let through: a string ``"5"`` for an
  integer or ``"true"`` for a boolean (pydantic coerces them), ``null`` values, empty arrays,
  control characters in strings, a missing or unknown ``resourceType`` (the models ignore the
  first and crash on the second, so those resources are taken out before the model runs).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ncp.fhir.io import is_resource_type
from ncp.validation.formats import RULE_FORMAT, format_message, quote
from ncp.validation.issues import REQUIRED, STRUCTURE, VALUE, Issue

RULE_UNKNOWN = "unknown-element"
RULE_JSON_TYPE = "json-type"
RULE_RESOURCE_TYPE = "resource-type"

_INTEGERS = frozenset({"integer", "unsignedInt", "positiveInt"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_TYPE_ERRORS = re.compile(r"(_type|_parsing|^list_type|^dict_type|^model_type)$")
_DATE_ERRORS = {
    "date_from_datetime_parsing": "date",
    "date_parsing": "date",
    "datetime_parsing": "dateTime",
    "datetime_from_date_parsing": "dateTime",
    "time_parsing": "time",
}
"""pydantic's parse errors of dates and times, and the FHIR type each concerns."""
_EXPECTED = {
    "string": "string",
    "int": "integer",
    "bool": "boolean",
    "float": "decimal",
    "decimal": "decimal",
    "list": "array",
    "dict": "object",
    "model": "object",
}
"""pydantic's type errors (``<name>_type``, ``<name>_parsing``): what the JSON should hold."""
_SPEC_REGEX = re.compile(r"(\w+) value string does not match spec regex")
_FHIR_NAMES = {"Date": "date", "DateTime": "dateTime", "Instant": "instant", "Time": "time"}
_PATTERN_TYPES = {
    "^[A-Za-z0-9\\-.]+$": "id",
    "[ \r\n\t\\S]+": "string",
    "^[^\\s]+(\\s[^\\s]+)*$": "code",
}
"""fhir.resources' patterns, by the FHIR type they stand for."""


def location_step(parent: str, name: str, index: int | None, value: Any) -> str:
    """The FHIRPath step to a child element (``.resource.ofType(Patient)`` for a resource)."""
    step = f"{parent}.{name}" if parent else name
    if index is not None:
        step = f"{step}[{index}]"
    if (
        name in ("resource", "contained")
        and isinstance(value, dict)
        and isinstance(value.get("resourceType"), str)
    ):
        step = f"{step}.ofType({value['resourceType']})"
    return step


def element_path(location: str) -> str:
    """``Bundle.entry[1].resource.ofType(DiagnosticReport).status`` → ``DiagnosticReport.status``
    (the element definition path, as in a snapshot)."""
    tail = location.rsplit(".ofType(", 1)
    if len(tail) == 2:
        rtype, rest = tail[1].split(")", 1)
        location = rtype + rest
    return re.sub(r"\[\d+\]", "", location)


# --- JSON checks, called by the walker for every primitive ------------------------------------


def check_primitive(type_code: str, value: Any, location: str, issues: list[Issue]) -> None:
    if value is None:
        return  # an extension-only primitive; the walker checks for null elsewhere
    if type_code == "boolean":
        ok = isinstance(value, bool)
    elif type_code in _INTEGERS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_code == "decimal":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
        if ok and _CONTROL.search(value):
            issues.append(
                Issue(
                    "error",
                    VALUE,
                    location,
                    "FHIR strings must not contain control characters (other than tab, CR, LF)",
                    RULE_FORMAT,
                )
            )
    if not ok:
        issues.append(
            Issue(
                "error",
                STRUCTURE,
                location,
                f"{_a(type_code)} is expected, not the JSON {_json_kind(value)} {quote(value)}",
                RULE_JSON_TYPE,
            )
        )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def json_type_issue(location: str, expected: str, value: Any) -> Issue:
    return Issue(
        "error",
        STRUCTURE,
        location,
        f"a JSON {expected} is expected here, not {_json_kind(value)}",
        RULE_JSON_TYPE,
    )


def unknown_element(location: str, name: str) -> Issue:
    return Issue(
        "error", STRUCTURE, location, f"unknown element {name!r} (not in FHIR R4)", RULE_UNKNOWN
    )


# --- the fhir.resources models --------------------------------------------------------------


def model_issues(resource: dict[str, Any]) -> list[Issue]:
    """Issues from validating the resource with its ``fhir.resources.R4B`` model."""
    issues: list[Issue] = []
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        issues.append(_resource_type_issue(rtype, str(rtype) if isinstance(rtype, str) else ""))
        return issues
    bad = _bad_nested(resource, rtype, issues)
    data = resource
    if bad:
        data = copy.deepcopy(resource)
        for path in bad:
            _remove(data, path)
    try:
        get_fhir_model_class(rtype).model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            issues.append(_from_pydantic(resource, rtype, error))
    except (KeyError, ValueError, TypeError) as exc:  # fhir_core raises these for odd input
        issues.append(Issue("error", STRUCTURE, rtype, f"not a valid {rtype}: {exc}", "model"))
    return issues


def _resource_type_issue(rtype: Any, location: str) -> Issue:
    if rtype is None:
        return Issue("error", STRUCTURE, location, "resourceType is missing", RULE_RESOURCE_TYPE)
    return Issue(
        "error",
        STRUCTURE,
        location,
        f"{rtype!r} is not a FHIR R4 resource type",
        RULE_RESOURCE_TYPE,
    )


def _bad_nested(
    node: Any, where: str, issues: list[Issue], path: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Paths of nested resources (entry.resource, contained, parameter.resource) whose
    resourceType is missing or unknown: the models would ignore or crash on them. Only the
    elements that hold resources are looked at."""
    bad: list[tuple[Any, ...]] = []
    if not isinstance(node, dict):
        return bad
    holders: list[tuple[tuple[Any, ...], str, Any]] = []
    contained = node.get("contained")
    if isinstance(contained, list):
        for i, item in enumerate(contained):
            holders.append(
                ((*path, "contained", i), location_step(where, "contained", i, item), item)
            )
    for name in ("entry", "parameter"):
        items = node.get(name)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            if isinstance(item, dict) and "resource" in item:
                here = location_step(where, name, i, None)
                inner = item["resource"]
                holders.append(
                    (
                        (*path, name, i, "resource"),
                        location_step(here, "resource", None, inner),
                        inner,
                    )
                )
    for child_path, here, item in holders:
        if not isinstance(item, dict):
            continue
        rtype = item.get("resourceType")
        if not isinstance(rtype, str) or not is_resource_type(rtype):
            issues.append(_resource_type_issue(rtype, here))
            bad.append(child_path)
            continue
        bad.extend(_bad_nested(item, here, issues, child_path))
    return bad


def _remove(data: Any, path: tuple[Any, ...]) -> None:
    *head, last = path
    for step in head:
        data = data[step]
    if isinstance(last, int):
        data[last] = {"resourceType": "Basic", "code": {"text": "removed"}}
    else:
        del data[last]


def _from_pydantic(resource: dict[str, Any], rtype: str, error: Any) -> Issue:
    loc = [step for step in error.get("loc", ()) if isinstance(step, str | int)]
    location = rtype
    node: Any = resource
    steps: list[str] = []
    for i, step in enumerate(loc):
        if isinstance(step, int):
            location = f"{location}[{step}]"
            node = node[step] if isinstance(node, list) and step < len(node) else None
            if steps and steps[-1] == "contained" and isinstance(node, dict):
                inner = node.get("resourceType")
                if isinstance(inner, str):
                    location = f"{location}.ofType({inner})"
            continue
        if not isinstance(node, dict) or (step not in node and i < len(loc) - 1):
            break  # a validator-internal step (a union branch): the location so far stands
        node = node.get(step)
        steps.append(step)
        location = f"{location}.{step}"
        if isinstance(node, dict) and step == "resource":
            inner = node.get("resourceType")
            if isinstance(inner, str):
                location = f"{location}.ofType({inner})"
    kind = str(error.get("type", ""))
    if kind in ("missing",) or kind.endswith(".missing"):
        parent = location.rsplit(".", 1)[0] if steps else location
        path = element_path(location)
        return Issue("error", REQUIRED, parent, f"{path}: minimum required = 1, but found 0", path)
    if kind == "extra_forbidden":
        return unknown_element(location, str(loc[-1]) if loc else "?")
    value = error.get("input")
    if _TYPE_ERRORS.search(kind) and kind not in _DATE_ERRORS:
        expected = _EXPECTED.get(kind.rsplit("_", 1)[0], "value of another type")
        return Issue(
            "error",
            STRUCTURE,
            location,
            f"{_a(expected)} is expected, not the JSON {_json_kind(value)} {quote(value)}",
            RULE_JSON_TYPE,
        )
    return Issue("error", VALUE, location, _format_words(kind, error, value), RULE_FORMAT)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _format_words(kind: str, error: Any, value: Any) -> str:
    """A malformed value the model found, said as :mod:`~ncp.validation.formats` says it."""
    ctx = error.get("ctx") or {}
    reason = str(ctx.get("error", "")) if isinstance(ctx, dict) else ""
    if kind in _DATE_ERRORS:
        type_code = _DATE_ERRORS[kind]
        if "day value" in reason or "month value" in reason:
            return format_message(type_code, value, "no such day in the calendar")
        return format_message(type_code, value)
    named = _SPEC_REGEX.search(reason)
    if named is not None:
        return format_message(_FHIR_NAMES.get(named.group(1), named.group(1).lower()), value)
    if "timezone aware" in reason:
        type_code = "instant" if reason.startswith("Instant") else "dateTime"
        return format_message(type_code, value, "a time needs a time zone (Z or +hh:mm)")
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", "")) if isinstance(ctx, dict) else ""
        pattern_type = _PATTERN_TYPES.get(pattern)
        if pattern_type is not None:
            return format_message(pattern_type, value)
        return f"{quote(value)} does not match the pattern {pattern}"
    # Anything else the model refuses: its reason, without the library's own prefixes.
    text = reason or str(error.get("msg", ""))
    text = text.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{quote(value)} is not accepted here: {text}"


def not_found_again(model: list[Issue], walked: list[Issue]) -> list[Issue]:
    """The model's findings of malformed values, less those the walk made at the same place
    (the walk knows the FHIR type and names its rule; one finding per fault)."""
    seen = {i.expression for i in walked if i.rule in (RULE_FORMAT, RULE_JSON_TYPE)}
    return [
        i for i in model if i.rule not in (RULE_FORMAT, RULE_JSON_TYPE) or i.expression not in seen
    ]
