"""StructureDefinition snapshots compiled once into trees the validator walks.

A snapshot is a flat list of ElementDefinitions; the validator wants, at each element of a
resource, "which children may appear here, under which JSON names, with which rules". The tree
is built once per StructureDefinition and kept by :class:`Catalogue` (one per loaded
definitions), so validating a resource never re-reads a definition.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ncp.fhir.conformance import DefinitionNotFound, Definitions

CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
SYSTEM_TYPE = "http://hl7.org/fhirpath/System."
_BACKBONE = frozenset({"BackboneElement", "Element"})


def canonical(url: str) -> str:
    """A canonical URL without its ``|version``."""
    return url.split("|", 1)[0]


def is_primitive(type_code: str) -> bool:
    """FHIR primitive types are spelt in lower case; FHIRPath system types are primitives too."""
    return type_code.startswith(SYSTEM_TYPE) or type_code[:1].islower()


@dataclass(frozen=True, slots=True)
class TypeRef:
    code: str
    profiles: tuple[str, ...] = ()
    target_profiles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Constraint:
    key: str
    severity: str
    human: str
    expression: str
    source: str


@dataclass(frozen=True, slots=True)
class Binding:
    strength: str
    value_set: str


@dataclass(frozen=True, slots=True)
class Discriminator:
    type: str
    path: str


@dataclass(slots=True)
class ElementNode:
    """One element of a snapshot with its children and slices."""

    id: str
    path: str
    name: str
    """Last path segment (``value[x]`` for a choice)."""
    min: int
    max: int | None
    """None for ``*``."""
    array: bool
    """Whether JSON holds it as an array: decided by the base definition's max, which a profile
    may narrow to 1 without changing the JSON form."""
    types: tuple[TypeRef, ...]
    fixed: tuple[str, Any] | None = None
    """(JSON type suffix, value) of ``fixed[x]``."""
    pattern: tuple[str, Any] | None = None
    binding: Binding | None = None
    constraints: tuple[Constraint, ...] = ()
    max_length: int | None = None
    content_reference: str | None = None
    slice_name: str | None = None
    discriminators: tuple[Discriminator, ...] = ()
    slicing_rules: str = "open"
    sliced: bool = False
    children: dict[str, ElementNode] = field(default_factory=dict)
    """By JSON name: a choice ``value[x]`` appears once per allowed type (``valueString``)."""
    slices: list[ElementNode] = field(default_factory=list)
    is_choice: bool = False
    _required: tuple[ElementNode, ...] | None = None
    at_path: dict[str, ElementNode | None] = field(default_factory=dict)
    """The element at each slicing discriminator path below this one, once looked up."""
    slice_tests: tuple[Any, ...] | None = None
    """For a slice: what each discriminator of its sliced element asks of an item (see
    ``profile_rules``), once worked out."""

    def required_children(self) -> tuple[ElementNode, ...]:
        """Children that must be present (min > 0, or a slice with min > 0); computed once."""
        if self._required is None:
            self._required = tuple(
                c for c in self.unique_children() if c.min > 0 or any(s.min > 0 for s in c.slices)
            )
        return self._required

    def child(self, key: str) -> ElementNode | None:
        """The child a JSON key belongs to (``valueString`` and ``_valueString`` alike)."""
        found = self.children.get(key)
        if found is None and key[:1] == "_":
            found = self.children.get(key[1:])
        return found

    def type_of(self, json_name: str) -> str | None:
        """The type code a JSON name stands for (the choice suffix, or the one type)."""
        if self.is_choice:
            suffix = json_name[len(self.name) - 3 :]
            for t in self.types:
                if t.code[:1].upper() + t.code[1:] == suffix:
                    return t.code
            return None
        return self.types[0].code if self.types else None

    def type_ref(self, code: str) -> TypeRef | None:
        for t in self.types:
            if t.code == code:
                return t
        return None

    def unique_children(self) -> Iterator[ElementNode]:
        """Each child element once (a choice is listed under each of its JSON names)."""
        seen: set[int] = set()
        for child in self.children.values():
            if id(child) not in seen:
                seen.add(id(child))
                yield child

    def json_names(self) -> list[str]:
        if not self.is_choice:
            return [self.name]
        stem = self.name[:-3]
        return [stem + t.code[:1].upper() + t.code[1:] for t in self.types]


@dataclass(slots=True)
class Tree:
    """A compiled StructureDefinition."""

    url: str
    type: str
    root: ElementNode
    by_id: dict[str, ElementNode]
    derivation: str


def _choice_value(element: dict[str, Any], prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper():
            return key[len(prefix) :], value
    return None


def _node(element: dict[str, Any]) -> ElementNode:
    path = element["path"]
    raw_max = element.get("max", "*")
    types = tuple(
        TypeRef(
            _type_code(t),
            tuple(canonical(p) for p in t.get("profile", [])),
            tuple(canonical(p) for p in t.get("targetProfile", [])),
        )
        for t in element.get("type", [])
    )
    binding = element.get("binding")
    slicing = element.get("slicing")
    return ElementNode(
        id=element.get("id", path),
        path=path,
        name=path.rsplit(".", 1)[-1],
        min=int(element.get("min", 0)),
        max=None if raw_max == "*" else int(raw_max),
        array=str((element.get("base") or {}).get("max", raw_max)) != "1",
        types=types,
        fixed=_choice_value(element, "fixed"),
        pattern=_choice_value(element, "pattern"),
        binding=(
            Binding(binding["strength"], canonical(binding["valueSet"]))
            if binding and binding.get("valueSet")
            else None
        ),
        constraints=tuple(
            Constraint(
                c["key"],
                c.get("severity", "error"),
                c.get("human", ""),
                c.get("expression", ""),
                c.get("source", ""),
            )
            for c in element.get("constraint", [])
        ),
        max_length=element.get("maxLength"),
        content_reference=element.get("contentReference"),
        slice_name=element.get("sliceName"),
        discriminators=tuple(
            Discriminator(d["type"], d["path"]) for d in (slicing or {}).get("discriminator", [])
        ),
        slicing_rules=(slicing or {}).get("rules", "open"),
        sliced=slicing is not None,
        is_choice=path.endswith("[x]"),
    )


def _type_code(t: dict[str, Any]) -> str:
    code = str(t.get("code", ""))
    if code.startswith(SYSTEM_TYPE):
        # Element.id and Extension.url: the fhir-type extension names the FHIR type.
        for ext in t.get("extension", []):
            if ext.get("url", "").endswith("structuredefinition-fhir-type"):
                return str(ext.get("valueUrl") or ext.get("valueUri") or code)
    return code


def _parent_id(element_id: str) -> tuple[str, str]:
    """(parent id, last segment) of an element id; the root has parent ''."""
    if "." not in element_id:
        return "", element_id
    parent, last = element_id.rsplit(".", 1)
    return parent, last


def compile_tree(sd: dict[str, Any]) -> Tree:
    """The tree of a StructureDefinition's snapshot."""
    elements = (sd.get("snapshot") or {}).get("element") or []
    if not elements:
        raise ValueError(f"{sd.get('url')}: the StructureDefinition has no snapshot")
    by_id: dict[str, ElementNode] = {}
    root: ElementNode | None = None
    for element in elements:
        node = _node(element)
        by_id[node.id] = node
        parent_id, last = _parent_id(node.id)
        if not parent_id:
            root = node
            continue
        if ":" in last:  # a slice ``a.b:name`` of the element ``a.b``
            sliced = by_id.get(f"{parent_id}.{last.split(':', 1)[0]}")
            if sliced is not None:
                sliced.slices.append(node)
            continue
        parent = by_id.get(parent_id)
        if parent is None:
            continue
        for json_name in node.json_names():
            parent.children[json_name] = node
    if root is None:
        raise ValueError(f"{sd.get('url')}: the snapshot has no root element")
    return Tree(
        url=canonical(str(sd.get("url", ""))),
        type=str(sd.get("type", root.path)),
        root=root,
        by_id=by_id,
        derivation=str(sd.get("derivation", "specialization")),
    )


class Catalogue:
    """Compiled trees by canonical URL, built on first use and kept."""

    def __init__(self, definitions: Definitions) -> None:
        self.definitions = definitions
        self._trees: dict[str, Tree | None] = {}
        self._bases: dict[str, Tree | None] = {}

    def tree(self, url: str) -> Tree | None:
        """The tree of a StructureDefinition, or None when it is not held or has no snapshot."""
        key = canonical(url)
        if key not in self._trees:
            try:
                sd = self.definitions.structure_definition(key)
                self._trees[key] = compile_tree(sd)
            except (DefinitionNotFound, ValueError, KeyError):
                self._trees[key] = None
        return self._trees[key]

    def base(self, type_code: str) -> Tree | None:
        """The tree of a base resource or datatype."""
        try:
            return self._bases[type_code]  # asked at every element of a datatype
        except KeyError:
            pass
        url = type_code if "/" in type_code else CORE_SD + type_code
        found = self._bases[type_code] = self.tree(url)
        return found

    def resolve(self, tree: Tree, reference: str) -> ElementNode | None:
        """The element a ``contentReference`` (``#Composition.section``) points to."""
        target = reference.split("#", 1)[-1]
        return tree.by_id.get(target)
