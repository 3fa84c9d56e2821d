"""Snapshot generation: apply a profile's differential to its base snapshot.

A small, strict generator for the constraints this project's profiles use. It refuses what it
does not understand instead of guessing, each refusal a :class:`SnapshotError` subclass:

- :class:`UnknownElement`: a differential path or id that the base does not have (after
  expanding complex datatypes on demand), or an id and path that disagree;
- :class:`CardinalityWidening`: ``min`` below the base's, ``max`` above it, or ``min > max``;
- :class:`InvalidSlicing`: a slice with no slicing on its element, re-slicing, a discriminator
  path that does not resolve, a value/pattern discriminator a slice gives no fixed or pattern
  value for, a type/profile discriminator a slice does not narrow, slices whose minimums exceed
  the sliced element's maximum;
- :class:`InvalidConstraint`: a type the base does not allow, a profile or target profile of the
  wrong resource type, a fixed or pattern value whose type is not the element's, a binding on an
  element that cannot be bound or one weaker than the base's, a maxLength on a non-string or above
  the base's, an element property the generator does not know.

Supported differential properties: ``min``/``max``, ``mustSupport``, ``fixed[x]``,
``pattern[x]``, ``binding`` (strength, valueSet, description), ``type`` narrowing (codes,
``profile``, ``targetProfile``, ``aggregation``), ``short``/``definition``/``comment``/
``requirements``/``alias``/``label``, ``maxLength``, ``minValue[x]``/``maxValue[x]``,
``example``, ``constraint`` (added to the base's), ``condition``, ``meaningWhenMissing``,
``slicing`` (discriminator, rules, ordered, description) and slices (``sliceName``) with their
own children. Children of complex datatypes (``Identifier.system``), of a choice element
narrowed to one type (``Extension.value[x].reference``) and of ``contentReference`` elements are
expanded from their definitions when a differential reaches into them. Not supported: re-slicing
(``a:b/c``), type slices on choice elements (``value[x]:valueString``), type-specific renames
of choice paths (``Extension.valueString``).

Element order in the snapshot follows FHIR: an element, its children, then its slices, each
followed by its own children.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncp.errors import NcpError
from ncp.fhir.conformance import transcribed

CORE_SD = "http://hl7.org/fhir/StructureDefinition/"

PRIMITIVE_TYPES = frozenset(
    {
        "base64Binary",
        "boolean",
        "canonical",
        "code",
        "date",
        "dateTime",
        "decimal",
        "id",
        "instant",
        "integer",
        "markdown",
        "oid",
        "positiveInt",
        "string",
        "time",
        "unsignedInt",
        "uri",
        "url",
        "uuid",
        "xhtml",
    }
)
STRING_TYPES = frozenset(
    {"string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid"}
)
BINDABLE_TYPES = frozenset({"code", "Coding", "CodeableConcept", "Quantity", "string", "uri"})
STRENGTHS = ("example", "preferred", "extensible", "required")
DISCRIMINATOR_TYPES = frozenset({"value", "exists", "pattern", "type", "profile"})
SLICING_RULES = frozenset({"closed", "open", "openAtEnd"})

# ElementDefinition properties in the order FHIR serialises them.
ELEMENT_ORDER = (
    "id",
    "extension",
    "modifierExtension",
    "path",
    "representation",
    "sliceName",
    "sliceIsConstraining",
    "label",
    "code",
    "slicing",
    "short",
    "definition",
    "comment",
    "requirements",
    "alias",
    "min",
    "max",
    "base",
    "contentReference",
    "type",
    "defaultValue",
    "meaningWhenMissing",
    "orderMeaning",
    "fixed",
    "pattern",
    "example",
    "minValue",
    "maxValue",
    "maxLength",
    "condition",
    "constraint",
    "mustSupport",
    "isModifier",
    "isModifierReason",
    "isSummary",
    "binding",
    "mapping",
)

_REPLACED = frozenset(
    {
        "short",
        "definition",
        "comment",
        "requirements",
        "alias",
        "label",
        "meaningWhenMissing",
        "example",
        "mustSupport",
    }
)
_HANDLED = frozenset(
    {
        "id",
        "path",
        "sliceName",
        "min",
        "max",
        "type",
        "binding",
        "maxLength",
        "slicing",
        "constraint",
        "condition",
    }
)


class SnapshotError(NcpError):
    """A differential cannot be applied to its base; the message names the element."""

    def __init__(self, profile: str, element: str, reason: str) -> None:
        super().__init__(f"{profile}: {element}: {reason}")
        self.profile = profile
        self.element = element
        self.reason = reason


class UnknownElement(SnapshotError):
    """The differential names an element the base does not have."""


class CardinalityWidening(SnapshotError):
    """The differential loosens (or contradicts) the base cardinality."""


class InvalidSlicing(SnapshotError):
    """Slicing or a slice is malformed or cannot be told apart."""


class InvalidConstraint(SnapshotError):
    """A constraint is not compatible with the base element."""


Resolver = Callable[[str], dict[str, Any]]
"""Canonical URL -> StructureDefinition; raises LookupError when unknown."""


@dataclass
class _Node:
    element: dict[str, Any]
    children: list[_Node] = field(default_factory=list)
    slices: list[_Node] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.element["id"])

    @property
    def path(self) -> str:
        return str(self.element["path"])

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def child(self, name: str) -> _Node | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    def slice(self, slice_name: str) -> _Node | None:
        for s in self.slices:
            if s.element.get("sliceName") == slice_name:
                return s
        return None

    def walk(self) -> Iterator[_Node]:
        yield self
        for c in self.children:
            yield from c.walk()
        for s in self.slices:
            yield from s.walk()


def _clone(node: _Node, old: str, new: str) -> _Node:
    """A deep copy of ``node``'s subtree with the id prefix ``old`` replaced by ``new``."""
    e = copy.deepcopy(node.element)
    e["id"] = new + str(e["id"])[len(old) :]
    return _Node(
        e, [_clone(c, old, new) for c in node.children], [_clone(c, old, new) for c in node.slices]
    )


def _segments(element_id: str) -> list[tuple[str, str | None]]:
    """``A.b:s.c`` -> [(A, None), (b, s), (c, None)]; ``[x]`` stays part of the name."""
    out: list[tuple[str, str | None]] = []
    for seg in element_id.split("."):
        name, _, slice_name = seg.partition(":")
        out.append((name, slice_name or None))
    return out


def _max_value(value: str) -> float:
    return float("inf") if value == "*" else float(int(value))


FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def _type_code(t: dict[str, Any]) -> str:
    """The FHIR type of a type entry; System.String of ``id``/``url`` elements -> its fhir-type."""
    for ext in t.get("extension", []):
        if ext.get("url") == FHIR_TYPE_EXT and isinstance(ext.get("valueUrl"), str):
            return str(ext["valueUrl"])
    return str(t.get("code"))


def _type_codes(element: dict[str, Any]) -> list[str]:
    return [_type_code(t) for t in element.get("type", [])]


def _typed_key(key: str, prefix: str) -> str | None:
    """``fixedUri`` -> ``uri``; ``patternCodeableConcept`` -> ``CodeableConcept``."""
    if not key.startswith(prefix) or len(key) == len(prefix):
        return None
    rest = key[len(prefix) :]
    if not rest[0].isupper():
        return None
    lowered = rest[0].lower() + rest[1:]
    return lowered if lowered in PRIMITIVE_TYPES else rest


def _order(element: dict[str, Any]) -> dict[str, Any]:
    def rank(key: str) -> tuple[int, str]:
        for i, prefix in enumerate(ELEMENT_ORDER):
            if key == prefix or (
                prefix in ("defaultValue", "fixed", "pattern", "minValue", "maxValue")
                and _typed_key(key, prefix) is not None
            ):
                return (i, key)
        return (len(ELEMENT_ORDER), key)

    return {k: element[k] for k in sorted(element, key=rank)}


def _resource_type_of(url: str, resolve: Resolver) -> str | None:
    """The type a StructureDefinition URL constrains.

    Core resources the project does not carry (Condition, CarePlan...) are named by convention:
    ``{CORE_SD}{Type}`` defines ``Type``.
    """
    try:
        return str(resolve(url)["type"])
    except LookupError:
        if url.startswith(CORE_SD) and re.fullmatch(r"[A-Z][A-Za-z]+", url[len(CORE_SD) :]):
            return url[len(CORE_SD) :]
        return None


class _Generator:
    def __init__(self, profile: dict[str, Any], resolve: Resolver) -> None:
        self.profile = profile
        self.url = str(profile.get("url", profile.get("id", "?")))
        self.resolve = resolve
        base_url = profile.get("baseDefinition")
        if not isinstance(base_url, str):
            raise InvalidConstraint(self.url, "(root)", "no baseDefinition")
        try:
            base = resolve(base_url)
        except LookupError:
            raise InvalidConstraint(self.url, "(root)", f"base {base_url} not found") from None
        if "snapshot" not in base:
            base = {**base, "snapshot": {"element": generate_snapshot(base, resolve)}}
        if base.get("type") != profile.get("type"):
            raise InvalidConstraint(
                self.url, "(root)", f"type {profile.get('type')} differs from base {base['type']}"
            )
        self.base_elements: list[dict[str, Any]] = copy.deepcopy(base["snapshot"]["element"])
        self.root = self._tree(self.base_elements)
        self.base_root = self._tree(copy.deepcopy(base["snapshot"]["element"]))

    # -- tree --------------------------------------------------------------------------------

    def _tree(self, elements: list[dict[str, Any]]) -> _Node:
        if not elements:
            raise InvalidConstraint(self.url, "(root)", "base snapshot is empty")
        root = _Node(elements[0])
        for element in elements[1:]:
            segs = _segments(str(element["id"]))[1:]
            self._place(root, segs, element, "base snapshot out of order")
        return root

    def _place(
        self,
        top: _Node,
        segs: list[tuple[str, str | None]],
        element: dict[str, Any],
        out_of_order: str,
    ) -> None:
        """Attach ``element`` under ``top`` along ``segs`` (name, slice) from ``top`` down."""
        node = top
        for name, slice_name in segs[:-1]:
            nxt = node.child(name)
            if nxt is not None and slice_name is not None:
                nxt = nxt.slice(slice_name)
            if nxt is None:
                raise UnknownElement(self.url, str(element["id"]), out_of_order)
            node = nxt
        name, slice_name = segs[-1]
        if slice_name is None:
            node.children.append(_Node(element))
            return
        sliced = node.child(name)
        if sliced is None:
            raise UnknownElement(self.url, str(element["id"]), "slice before its element")
        sliced.slices.append(_Node(element))

    def _rebased(self, elements: list[dict[str, Any]], old: str, node: _Node) -> list[_Node]:
        """Copies of ``elements`` (a definition's descendants of ``old``) under ``node``."""
        out: list[dict[str, Any]] = []
        for element in elements:
            e = copy.deepcopy(element)
            e["path"] = node.path + str(e["path"])[len(old) :]
            e["id"] = node.id + str(e["id"])[len(old) :]
            out.append(e)
        holder = _Node({"id": node.id, "path": node.path})
        for e in out:
            rel = _segments(str(e["id"])[len(node.id) + 1 :])
            self._place(holder, rel, e, "type definition out of order")
        return holder.children

    def _expand(self, node: _Node) -> None:
        """Give ``node`` the children of its (single) type or of its contentReference."""
        if node.children:
            return
        ref = node.element.get("contentReference")
        if isinstance(ref, str):
            target = self._find_base(ref.lstrip("#"))
            node.children = self._rebased(
                [n.element for c in target.children for n in c.walk()], target.path, node
            )
            return
        codes = _type_codes(node.element)
        if len(codes) != 1:
            raise UnknownElement(
                self.url, node.id, "children of an element with several types (narrow it first)"
            )
        # A type constrained to one profile (an extension definition, SimpleQuantity) brings
        # the children as that profile constrains them; otherwise the base type's.
        profiles = node.element["type"][0].get("profile", [])
        source = profiles[0] if len(profiles) == 1 else CORE_SD + codes[0]
        try:
            type_sd = self.resolve(source)
        except LookupError:
            raise UnknownElement(self.url, node.id, f"type {source} not found") from None
        if "snapshot" not in type_sd:
            type_sd = {**type_sd, "snapshot": {"element": generate_snapshot(type_sd, self.resolve)}}
        elements = type_sd["snapshot"]["element"]
        node.children = self._rebased(elements[1:], str(elements[0]["path"]), node)

    def _find_base(self, path: str) -> _Node:
        node = self.base_root
        for name, _ in _segments(path)[1:]:
            nxt = node.child(name)
            if nxt is None:
                raise UnknownElement(self.url, path, "contentReference target not found")
            node = nxt
        return node

    def _locate(self, element_id: str, *, create_slice: bool) -> _Node:
        segs = _segments(element_id)
        if segs[0] != (self.root.name, None):
            raise UnknownElement(self.url, element_id, f"does not start with {self.root.name}")
        node = self.root
        for i, (name, slice_name) in enumerate(segs[1:], start=1):
            if slice_name is not None and "/" in slice_name:
                raise InvalidSlicing(self.url, element_id, "re-slicing is not supported")
            nxt = node.child(name)
            if nxt is None and not node.children:
                self._expand(node)
                nxt = node.child(name)
            if nxt is None:
                raise UnknownElement(self.url, element_id, f"no element {name!r} here")
            if slice_name is not None:
                if "[x]" in name and slice_name.startswith(name.replace("[x]", "")):
                    raise InvalidSlicing(
                        self.url, element_id, "type slices on choice elements are not supported"
                    )
                found = nxt.slice(slice_name)
                if found is None:
                    if not (create_slice and i == len(segs) - 1):
                        raise UnknownElement(self.url, element_id, f"no slice {slice_name!r}")
                    found = self._new_slice(nxt, slice_name, element_id)
                nxt = found
            node = nxt
        return node

    def _new_slice(self, sliced: _Node, slice_name: str, element_id: str) -> _Node:
        if "slicing" not in sliced.element:
            raise InvalidSlicing(
                self.url, element_id, f"{sliced.id} is not sliced (define slicing before slices)"
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9\-_]*", slice_name):
            raise InvalidSlicing(self.url, element_id, f"bad slice name {slice_name!r}")
        element = copy.deepcopy(sliced.element)
        element.pop("slicing", None)
        element["id"] = f"{sliced.id}:{slice_name}"
        element["sliceName"] = slice_name
        element["min"] = 0
        # The slice starts from the sliced element as constrained so far (constraints on the
        # unsliced element apply to every slice), with its own copy of the children.
        slice_node = _Node(
            element, [_clone(c, sliced.id, element["id"]) for c in sliced.children], []
        )
        sliced.slices.append(slice_node)
        return slice_node

    # -- constraints ---------------------------------------------------------------------------

    def apply(self, diff: dict[str, Any]) -> None:
        element_id = diff.get("id")
        path = diff.get("path")
        if not isinstance(path, str):
            raise UnknownElement(self.url, str(element_id), "differential element without path")
        if element_id is None:
            element_id = path
            if "sliceName" in diff:
                element_id = f"{path}:{diff['sliceName']}"
        element_id = str(element_id)
        if re.sub(r":[^.]*", "", element_id) != path:
            raise UnknownElement(self.url, element_id, f"id and path {path!r} disagree")
        last_slice = _segments(element_id)[-1][1]
        if "sliceName" in diff and diff["sliceName"] != last_slice:
            raise InvalidSlicing(self.url, element_id, "sliceName differs from the id")
        node = self._locate(element_id, create_slice=last_slice is not None)
        self._constrain(node, diff)

    def _constrain(self, node: _Node, diff: dict[str, Any]) -> None:
        e = node.element
        where = node.id
        for key, value in diff.items():
            if key in _REPLACED:
                e[key] = copy.deepcopy(value)
            elif key in _HANDLED:
                continue
            elif _typed_key(key, "fixed") or _typed_key(key, "pattern"):
                self._fixed(node, key, value)
            elif _typed_key(key, "minValue") or _typed_key(key, "maxValue"):
                e[key] = copy.deepcopy(value)
            else:
                raise InvalidConstraint(self.url, where, f"unsupported property {key!r}")
        if "type" in diff:
            self._types(node, diff["type"])
        self._cardinality(node, diff)
        if "binding" in diff:
            self._binding(node, diff["binding"])
        if "maxLength" in diff:
            self._max_length(node, diff["maxLength"])
        if "constraint" in diff:
            keys = {c.get("key") for c in e.get("constraint", [])}
            for c in diff["constraint"]:
                if c.get("key") in keys:
                    raise InvalidConstraint(self.url, where, f"constraint {c.get('key')} exists")
                if not c.get("expression") or c.get("severity") not in ("error", "warning"):
                    raise InvalidConstraint(self.url, where, "constraint needs expression/severity")
                added = copy.deepcopy(c)
                added.setdefault("source", self.url)  # as core snapshots name each rule's origin
                e.setdefault("constraint", []).append(added)
        if "condition" in diff:
            e["condition"] = sorted(set(e.get("condition", [])) | set(diff["condition"]))
        if "slicing" in diff:
            self._slicing(node, diff["slicing"])

    def _cardinality(self, node: _Node, diff: dict[str, Any]) -> None:
        e = node.element
        base_min = int(e["min"])  # a new slice starts at 0
        new_min = int(diff.get("min", e["min"]))
        new_max = str(diff.get("max", e["max"]))
        if new_max != "*" and not new_max.isdigit():
            raise CardinalityWidening(self.url, node.id, f"max {new_max!r} is not a number or *")
        if new_min < base_min:
            raise CardinalityWidening(self.url, node.id, f"min {new_min} below base {base_min}")
        if _max_value(new_max) > _max_value(str(e["max"])):
            raise CardinalityWidening(self.url, node.id, f"max {new_max} above base {e['max']}")
        if new_min > _max_value(new_max):
            raise CardinalityWidening(self.url, node.id, f"min {new_min} above max {new_max}")
        e["min"] = new_min
        e["max"] = new_max

    def _types(self, node: _Node, types: list[dict[str, Any]]) -> None:
        e = node.element
        base_types = {str(t.get("code")): t for t in e.get("type", [])}
        if not types:
            raise InvalidConstraint(self.url, node.id, "empty type list")
        out = []
        for t in types:
            code = str(t.get("code"))
            base_t = base_types.get(code)
            if base_t is None:
                if not (
                    {"Resource", "DomainResource"} & set(base_types)
                    and re.fullmatch(r"[A-Z][A-Za-z]+", code)
                    and _resource_type_of(CORE_SD + code, self.resolve) == code
                    and self._is_resource(code)
                ):
                    raise InvalidConstraint(
                        self.url, node.id, f"type {code} not allowed by base {sorted(base_types)}"
                    )
                base_t = {"code": code}
            for prof in t.get("profile", []):
                if _resource_type_of(prof, self.resolve) != code:
                    raise InvalidConstraint(
                        self.url, node.id, f"profile {prof} is not a known profile of {code}"
                    )
            if "targetProfile" in t:
                self._targets(node, base_t.get("targetProfile"), t["targetProfile"])
            extra = set(t) - {"code", "profile", "targetProfile", "aggregation", "versioning"}
            if extra:
                raise InvalidConstraint(self.url, node.id, f"unsupported type keys {extra}")
            out.append(copy.deepcopy(t))
        e["type"] = out

    def _is_resource(self, code: str) -> bool:
        try:
            return self.resolve(CORE_SD + code).get("kind") == "resource"
        except LookupError:
            # Core resources the project does not carry: accept by naming convention.
            return code[0].isupper()

    def _targets(self, node: _Node, base: list[str] | None, new: list[str]) -> None:
        allowed = {_resource_type_of(u, self.resolve) for u in (base or [])}
        for url in new:
            rtype = _resource_type_of(url, self.resolve)
            if rtype is None:
                raise InvalidConstraint(self.url, node.id, f"target profile {url} unknown")
            if base and rtype not in allowed and "Resource" not in allowed:
                raise InvalidConstraint(
                    self.url, node.id, f"target {rtype} not allowed by base {sorted(base)}"
                )

    def _fixed(self, node: _Node, key: str, value: Any) -> None:
        e = node.element
        type_name = _typed_key(key, "fixed") or _typed_key(key, "pattern")
        codes = _type_codes(e)
        if type_name not in codes:
            raise InvalidConstraint(
                self.url, node.id, f"{key} does not match the element's types {codes}"
            )
        for old in [k for k in e if _typed_key(k, "fixed") or _typed_key(k, "pattern")]:
            if e[old] != value:
                raise InvalidConstraint(self.url, node.id, f"{key} conflicts with base {old}")
            del e[old]
        e[key] = copy.deepcopy(value)

    def _binding(self, node: _Node, binding: dict[str, Any]) -> None:
        e = node.element
        codes = set(_type_codes(e))
        if not codes & BINDABLE_TYPES:
            raise InvalidConstraint(self.url, node.id, f"types {sorted(codes)} cannot be bound")
        strength = binding.get("strength")
        if strength not in STRENGTHS:
            raise InvalidConstraint(self.url, node.id, f"binding strength {strength!r}")
        old = e.get("binding") or {}
        if old.get("strength") in STRENGTHS and STRENGTHS.index(strength) < STRENGTHS.index(
            old["strength"]
        ):
            raise InvalidConstraint(
                self.url, node.id, f"binding {strength} is weaker than base {old['strength']}"
            )
        if strength in ("required", "extensible") and not binding.get("valueSet"):
            raise InvalidConstraint(self.url, node.id, f"a {strength} binding needs a valueSet")
        extra = set(binding) - {"strength", "description", "valueSet"}
        if extra:
            raise InvalidConstraint(self.url, node.id, f"unsupported binding keys {extra}")
        # The base's binding name (an extension) is kept for code generators; the rest replaced.
        new = {k: v for k, v in old.items() if k == "extension"}
        new.update(copy.deepcopy(binding))
        keys = ("extension", "strength", "description", "valueSet")
        e["binding"] = {k: new[k] for k in keys if k in new}

    def _max_length(self, node: _Node, value: Any) -> None:
        e = node.element
        if not isinstance(value, int) or value < 1:
            raise InvalidConstraint(self.url, node.id, f"maxLength {value!r}")
        if not set(_type_codes(e)) <= STRING_TYPES:
            raise InvalidConstraint(self.url, node.id, "maxLength on a non-string element")
        if "maxLength" in e and value > int(e["maxLength"]):
            raise InvalidConstraint(self.url, node.id, f"maxLength above base {e['maxLength']}")
        e["maxLength"] = value

    def _slicing(self, node: _Node, slicing: dict[str, Any]) -> None:
        if _max_value(str(node.element["max"])) <= 1:
            raise InvalidSlicing(self.url, node.id, "slicing an element that repeats at most once")
        extra = set(slicing) - {"discriminator", "description", "ordered", "rules"}
        if extra:
            raise InvalidSlicing(self.url, node.id, f"unsupported slicing keys {extra}")
        if slicing.get("rules") not in SLICING_RULES:
            raise InvalidSlicing(self.url, node.id, f"slicing rules {slicing.get('rules')!r}")
        discriminators = slicing.get("discriminator") or []
        if not discriminators:
            raise InvalidSlicing(self.url, node.id, "slicing without discriminator")
        for d in discriminators:
            if d.get("type") not in DISCRIMINATOR_TYPES:
                raise InvalidSlicing(self.url, node.id, f"discriminator type {d.get('type')!r}")
            if not isinstance(d.get("path"), str) or not d["path"]:
                raise InvalidSlicing(self.url, node.id, "discriminator without path")
            self._discriminated(node, d["path"], where=node.id)
        old = node.element.get("slicing")
        if old and old.get("discriminator") != discriminators and node.slices:
            raise InvalidSlicing(self.url, node.id, "slicing changed after slices exist")
        node.element["slicing"] = copy.deepcopy(slicing)

    def _discriminated(self, node: _Node, path: str, *, where: str) -> _Node:
        """The element a discriminator path designates under ``node``.

        Reads through datatype definitions where ``node`` has no children yet, without adding
        them to the snapshot (a discriminator alone does not expand an element).
        """
        clean = path.removesuffix(".resolve()").removesuffix("resolve()").rstrip(".")
        if clean in ("", "$this"):
            return node
        clean = clean.removeprefix("$this.")
        current = node
        for part in clean.split("."):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(\[x\])?", part):
                raise InvalidSlicing(self.url, where, f"discriminator path {path!r} unsupported")
            nxt = current.child(part)
            if nxt is None and not current.children:
                peek = _Node(copy.deepcopy(current.element))
                try:
                    self._expand(peek)
                except UnknownElement as exc:
                    raise InvalidSlicing(self.url, where, exc.reason) from None
                nxt = peek.child(part)
            if nxt is None:
                raise InvalidSlicing(
                    self.url, where, f"discriminator path {path!r}: no {part!r} under {current.id}"
                )
            current = nxt
        return current

    # -- checks after all differential elements ------------------------------------------------

    def check_slices(self) -> None:
        for node in self.root.walk():
            slicing = node.element.get("slicing")
            if not node.slices:
                continue
            if not slicing:
                raise InvalidSlicing(self.url, node.id, "slices without slicing")
            total = sum(int(s.element["min"]) for s in node.slices)
            if total > _max_value(str(node.element["max"])):
                raise InvalidSlicing(self.url, node.id, "slice minimums exceed the element's max")
            seen: dict[str, str] = {}
            for s in node.slices:
                if _max_value(str(s.element["max"])) > _max_value(str(node.element["max"])):
                    raise InvalidSlicing(self.url, s.id, "slice max above the sliced element's")
                key = json.dumps(
                    [self._check_discriminator(node, s, d) for d in slicing["discriminator"]],
                    sort_keys=True,
                )
                if key in seen:
                    raise InvalidSlicing(
                        self.url, s.id, f"cannot be told apart from slice {seen[key]!r}"
                    )
                seen[key] = str(s.element.get("sliceName"))

    def _check_discriminator(self, sliced: _Node, s: _Node, d: dict[str, Any]) -> Any:
        """Check that slice ``s`` gives a value for discriminator ``d``; return that value."""
        kind, path = d["type"], d["path"]
        if (
            kind in ("value", "pattern")
            and path == "url"
            and any(t.get("profile") for t in s.element.get("type", []))
        ):
            # an extension slice takes its url from its profile
            return [p for t in s.element["type"] for p in t.get("profile", [])]
        target = self._discriminated(s, path, where=s.id)
        e = target.element
        if kind in ("value", "pattern"):
            values = [e[k] for k in e if _typed_key(k, "fixed") or _typed_key(k, "pattern")]
            if not values:
                raise InvalidSlicing(
                    self.url, s.id, f"slice gives no fixed/pattern value at {path!r}"
                )
            return values[0]
        if kind == "type":
            unsliced = self._discriminated(sliced, path, where=sliced.id)
            types = e.get("type", [])
            if len(types) != 1 or types == unsliced.element.get("type"):
                raise InvalidSlicing(self.url, s.id, f"slice does not narrow {path!r} to one type")
            return types[0].get("code")
        if kind == "profile":
            types = e.get("type", [])
            profiles = [p for t in types for p in t.get("profile", []) + t.get("targetProfile", [])]
            if not profiles:
                raise InvalidSlicing(self.url, s.id, f"slice sets no profile at {path!r}")
            return profiles
        # exists
        if e.get("min") == 0 and e.get("max") != "0":
            raise InvalidSlicing(self.url, s.id, f"slice neither requires nor forbids {path!r}")
        return e.get("min") != 0

    def snapshot(self) -> list[dict[str, Any]]:
        return [_order(n.element) for n in self.root.walk()]


def generate_snapshot(profile: dict[str, Any], resolve: Resolver) -> list[dict[str, Any]]:
    """The snapshot elements of ``profile`` (a StructureDefinition with a differential)."""
    if profile.get("derivation") not in (None, "constraint"):
        raise InvalidConstraint(
            str(profile.get("url")), "(root)", "only constraint profiles are supported"
        )
    gen = _Generator(profile, resolve)
    for diff in profile.get("differential", {}).get("element", []):
        gen.apply(diff)
    gen.check_slices()
    return gen.snapshot()


def with_snapshot(profile: dict[str, Any], resolve: Resolver) -> dict[str, Any]:
    """A copy of ``profile`` with its snapshot (re)generated, placed after the differential."""
    elements = generate_snapshot(profile, resolve)
    out = {k: v for k, v in profile.items() if k != "snapshot"}
    out["snapshot"] = {"element": elements}
    return out


# -- building the project's profiles ------------------------------------------------------------

SD_ORDER = (
    "resourceType",
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
    "url",
    "identifier",
    "version",
    "name",
    "title",
    "status",
    "experimental",
    "date",
    "publisher",
    "contact",
    "description",
    "useContext",
    "jurisdiction",
    "purpose",
    "copyright",
    "keyword",
    "fhirVersion",
    "mapping",
    "kind",
    "abstract",
    "context",
    "contextInvariant",
    "type",
    "baseDefinition",
    "derivation",
    "snapshot",
    "differential",
)


def render(structure_definition: dict[str, Any]) -> str:
    """A StructureDefinition as the project commits it: FHIR key order, 2-space JSON, UTF-8."""
    rank = {k: i for i, k in enumerate(SD_ORDER)}
    ordered = {
        k: structure_definition[k]
        for k in sorted(structure_definition, key=lambda k: (rank.get(k, len(rank)), k))
    }
    return json.dumps(ordered, ensure_ascii=False, indent=2) + "\n"


def build_profiles(profiles_dir: Path, base: Resolver) -> dict[Path, str]:
    """Every ``StructureDefinition-*.json`` of ``profiles_dir`` with its snapshot regenerated.

    ``base`` resolves the definitions the profiles build on (the base package); the profiles
    themselves resolve from the files being built, so they may name one another.
    """
    files = sorted(profiles_dir.glob("StructureDefinition-*.json"))
    loaded = {path: json.loads(path.read_text(encoding="utf-8")) for path in files}
    by_url = {str(sd["url"]): sd for sd in loaded.values()}
    # A transcription of a guide's profile also answers to the guide's canonical URL.
    aliases = {guide: str(sd["url"]) for sd in loaded.values() if (guide := transcribed(sd))}
    done: dict[str, dict[str, Any]] = {}

    def resolve(url: str) -> dict[str, Any]:
        key = url.split("|", 1)[0]
        key = aliases.get(key, key)
        if key in done:
            return done[key]
        if key in by_url:
            return build(by_url[key])
        return base(key)

    building: set[str] = set()

    def build(sd: dict[str, Any]) -> dict[str, Any]:
        url = str(sd["url"])
        if url in done:
            return done[url]
        if url in building:  # profiles naming each other: the type is all that is needed
            return sd
        building.add(url)
        try:
            done[url] = with_snapshot(sd, resolve)
        finally:
            building.discard(url)
        return done[url]

    return {path: render(build(sd)) for path, sd in loaded.items()}
