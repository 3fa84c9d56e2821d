"""Profile rules of a snapshot element: cardinality (of the element and of each slice),
``fixed[x]`` and ``pattern[x]``, ``maxLength``, slicing (which item belongs to which slice,
closed slicing) and the target types of references.

Locations follow the HL7 validator: a cardinality issue sits at the element that should hold the
children (the parent), a value issue at the value itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ncp.validation.elements import CORE_SD, ElementNode
from ncp.validation.issues import REQUIRED, STRUCTURE, VALUE, Issue


@dataclass(slots=True)
class Item:
    """One occurrence of an element: its JSON name, index (None when not repeating), value
    (None for a primitive with only an extension) and location."""

    json_name: str
    index: int | None
    value: Any
    location: str


Resolver = Callable[[str], dict[str, Any] | None]
"""Reference string → the resource it points to within the bundle, or None."""
ProfileType = Callable[[str], str | None]
"""Profile URL → the resource type it constrains, or None when unknown."""


def cardinality(node: ElementNode, count: int, parent: str, issues: list[Issue]) -> None:
    label = node.id
    if count < node.min:
        issues.append(
            Issue(
                "error",
                REQUIRED,
                parent,
                f"{label}: minimum required = {node.min}, but found {count}",
                node.id,
            )
        )
    if node.max is not None and count > node.max:
        issues.append(
            Issue(
                "error",
                STRUCTURE,
                parent,
                f"{label}: maximum allowed = {node.max}, but found {count}",
                node.id,
            )
        )


def matches_pattern(value: Any, pattern: Any) -> bool:
    """FHIR pattern semantics: every element of the pattern is present with the same value;
    each item of a pattern array matches some item of the value's array."""
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(k in value and matches_pattern(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        if not isinstance(value, list):
            return False
        return all(any(matches_pattern(item, p) for item in value) for p in pattern)
    return bool(value == pattern and type(value) is type(pattern)) or (
        isinstance(value, int | float)
        and isinstance(pattern, int | float)
        and not isinstance(value, bool)
        and value == pattern
    )


def fixed_and_pattern(node: ElementNode, item: Item, issues: list[Issue]) -> None:
    if node.fixed is not None and item.value != node.fixed[1]:
        issues.append(
            Issue(
                "error",
                VALUE,
                item.location,
                f"{node.id}: the value must be exactly {node.fixed[1]!r:.120}",
                node.id,
            )
        )
    if node.pattern is not None and not matches_pattern(item.value, node.pattern[1]):
        issues.append(
            Issue(
                "error",
                VALUE,
                item.location,
                f"{node.id}: the value must match the pattern {node.pattern[1]!r:.160}",
                node.id,
            )
        )


def max_length(node: ElementNode, item: Item, issues: list[Issue]) -> None:
    if node.max_length and isinstance(item.value, str) and len(item.value) > node.max_length:
        issues.append(
            Issue(
                "error",
                VALUE,
                item.location,
                f"{node.id}: {len(item.value)} characters, more than maxLength {node.max_length}",
                node.id,
            )
        )


# --- slicing -----------------------------------------------------------------------------------


@functools.cache
def _steps(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _at(node: ElementNode, path: str) -> ElementNode | None:
    """The element of a slice at a discriminator path (``code``, ``url``, ``resource``), kept on
    the slice: slices are matched against every item of every resource validated."""
    if path not in node.at_path:
        node.at_path[path] = _walk_to(node, path)
    return node.at_path[path]


def _walk_to(node: ElementNode, path: str) -> ElementNode | None:
    current: ElementNode | None = node
    for step in _steps(path):
        if current is None:
            return None
        if step == "$this":
            continue
        if step.startswith(("resolve(", "ofType(")):
            continue
        current = current.children.get(step)
    return current


def _values(value: Any, path: str, resolve: Resolver) -> list[Any]:
    """The values at a discriminator path of an item (a FHIRPath subset: names, $this,
    resolve())."""
    found: list[Any] = [value]
    for step in _steps(path):
        if step == "$this":
            continue
        nxt: list[Any] = []
        for v in found:
            if step == "resolve()":
                ref = v.get("reference") if isinstance(v, dict) else None
                target = resolve(ref) if isinstance(ref, str) else None
                if target is not None:
                    nxt.append(target)
            elif step.startswith("ofType("):
                nxt.append(v)
            elif isinstance(v, dict) and step in v:
                child = v[step]
                nxt.extend(child if isinstance(child, list) else [child])
        found = nxt
    return found


def _canonical(url: Any) -> str:
    return url.split("|", 1)[0] if isinstance(url, str) else ""


def _profiles_at(node: ElementNode, path: str) -> set[str]:
    """The profiles a profile discriminator asks for: the target profiles of a reference
    followed by ``resolve()``, else the element's own type profiles."""
    if "resolve()" in path:
        return {_canonical(p) for t in node.types for p in t.target_profiles}
    return {_canonical(p) for t in node.types for p in t.profiles}


def _type_of(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return str(value["resourceType"])
    return None


_Test = tuple[str, Any, Any, Any]
"""One discriminator of one slice, worked out from the definitions: (kind, *what it needs)."""


def _slice_tests(
    sliced: ElementNode, candidate: ElementNode, profile_type: ProfileType
) -> tuple[_Test, ...]:
    """What each discriminator asks of an item for ``candidate`` to be its slice; kept on the
    slice (the same few slices are tried on every item of every resource validated)."""
    if candidate.slice_tests is not None:
        return candidate.slice_tests
    tests: list[_Test] = []
    for disc in sliced.discriminators:
        target = _at(candidate, disc.path)
        if disc.type in ("value", "pattern"):
            expected = None if target is None else (target.fixed or target.pattern)
            if expected is None and disc.path == "url" and candidate.types:
                # An extension slice names its extension by type profile; that is its url.
                profiles = candidate.types[0].profiles
                if profiles:
                    expected = ("Uri", profiles[0])
            tests.append(
                ("never", None, None, None)
                if expected is None
                else ("pattern", expected[1], _leaves([expected[1]]), None)
            )
        elif target is None:
            tests.append(("never", None, None, None))
        elif disc.type == "type":
            tests.append(("type", frozenset(t.code for t in target.types), None, None))
        elif disc.type == "profile":
            wanted = _profiles_at(target, disc.path)
            # Another slice's profile the item claims: it belongs there, not here by its type
            # (two slices of one resource type, e.g. MADO's WADO-RS and viewer endpoints).
            others = {
                p
                for s in sliced.slices
                if s is not candidate and (at := _at(s, disc.path)) is not None
                for p in _profiles_at(at, disc.path)
            } - wanted
            types = frozenset(profile_type(p) for p in wanted)
            tests.append(("profile", frozenset(wanted), frozenset(others), types))
        elif disc.type == "exists":
            tests.append(("exists", target.min > 0, None, None))
        else:
            tests.append(("never", None, None, None))
    candidate.slice_tests = done = tuple(tests)
    return done


def _leaves(values: list[Any]) -> frozenset[Any]:
    """The scalars anywhere in some values: a value matches a pattern only if it holds every
    scalar of the pattern (a set test that turns away most slices before the full match)."""
    found: set[Any] = set()
    stack = list(values)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            found.add(item)
    return frozenset(found)


class _Found:
    """The values at one discriminator path of one item, and their scalars once asked for."""

    __slots__ = ("_leaves", "values")

    def __init__(self, values: list[Any]) -> None:
        self.values = values
        self._leaves: frozenset[Any] | None = None

    def leaves(self) -> frozenset[Any]:
        if self._leaves is None:
            self._leaves = _leaves(self.values)
        return self._leaves


def _passes(test: _Test, found: _Found) -> bool:
    kind, a, b, c = test
    values = found.values
    if kind == "pattern":
        return b <= found.leaves() and any(matches_pattern(v, a) for v in values)
    if kind == "type":
        return any(_type_of(v) in a for v in values)
    if kind == "profile":
        for v in values:
            claimed = (
                {_canonical(p) for p in (v.get("meta") or {}).get("profile", [])}
                if isinstance(v, dict)
                else set()
            )
            if claimed & a or (_type_of(v) in c and not claimed & b):
                return True
        return False
    if kind == "exists":
        return bool(values) is bool(a)
    return False


def slice_matches(
    sliced: ElementNode,
    candidate: ElementNode,
    value: Any,
    resolve: Resolver,
    profile_type: ProfileType,
) -> bool:
    """Whether an item's value belongs to the slice ``candidate`` of ``sliced``."""
    values = [_Found(_values(value, disc.path, resolve)) for disc in sliced.discriminators]
    return _matches(sliced, candidate, values, profile_type)


def _matches(
    sliced: ElementNode, candidate: ElementNode, values: list[_Found], profile_type: ProfileType
) -> bool:
    if not sliced.discriminators:
        return False
    tests = candidate.slice_tests
    if tests is None:
        tests = _slice_tests(sliced, candidate, profile_type)
    for test, found in zip(tests, values, strict=True):  # noqa: SIM110 - no generator per try
        if not _passes(test, found):
            return False
    return True


def assign_slices(
    sliced: ElementNode,
    items: list[Item],
    parent: str,
    resolve: Resolver,
    profile_type: ProfileType,
    issues: list[Issue],
) -> list[tuple[Item, ElementNode]]:
    """Each item with the slice it belongs to (or the sliced element itself), after checking
    slice cardinality and closed slicing."""
    out: list[tuple[Item, ElementNode]] = []
    counts = {id(s): 0 for s in sliced.slices}
    for item in items:
        # The values at each discriminator path, read once per item for every slice tried.
        values = [_Found(_values(item.value, disc.path, resolve)) for disc in sliced.discriminators]
        chosen = None
        for s in sliced.slices:
            if _matches(sliced, s, values, profile_type):
                chosen = s
                break
        if chosen is None:
            if sliced.slicing_rules == "closed" and sliced.slices:
                issues.append(
                    Issue(
                        "error",
                        STRUCTURE,
                        item.location,
                        f"{sliced.id}: this item matches none of the slices, and the slicing "
                        "is closed",
                        sliced.id,
                    )
                )
            out.append((item, sliced))
        else:
            counts[id(chosen)] += 1
            out.append((item, chosen))
    for s in sliced.slices:
        cardinality(s, counts[id(s)], parent, issues)
    return out


# --- references ------------------------------------------------------------------------------


def target_types(node: ElementNode, profile_type: ProfileType) -> set[str] | None:
    """Resource types a Reference element may point to; None for any."""
    ref = node.type_ref("Reference")
    if ref is None or not ref.target_profiles:
        return None
    types: set[str] = set()
    for url in ref.target_profiles:
        if url.startswith(CORE_SD):
            types.add(url[len(CORE_SD) :])
        else:
            rtype = profile_type(url)
            if rtype is None:
                return None  # an unknown profile: do not guess
            types.add(rtype)
    return None if "Resource" in types else types


def reference_target(
    node: ElementNode,
    target: dict[str, Any],
    location: str,
    profile_type: ProfileType,
    issues: list[Issue],
) -> None:
    allowed = target_types(node, profile_type)
    rtype = _type_of(target)
    if allowed is not None and rtype not in allowed:
        issues.append(
            Issue(
                "error",
                STRUCTURE,
                location,
                f"{node.id}: the reference points to a {rtype}, but only "
                f"{', '.join(sorted(allowed))} may be referenced here",
                node.id,
            )
        )
