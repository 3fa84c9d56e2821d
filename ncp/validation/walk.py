"""One pass over a resource along a compiled snapshot, calling every rule family per element.

The walker visits each element once per StructureDefinition the resource is checked against
(its base definition, or each profile it claims or is asked for: a profile's snapshot holds the
base rules too). At an element it runs the JSON structure checks, the profile rules, the
binding and the invariants, then descends: into the element's children in the same snapshot, a
``contentReference`` target, or the snapshot of the element's datatype (of the extension's own
definition, for an extension whose URL is known). A nested resource (``Bundle.entry.resource``,
``contained``) is handed back to the engine as a job: it is validated as a resource of its own,
with its own profiles.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ncp.errors import NcpError
from ncp.fhir.io import is_resource_type
from ncp.validation import profile_rules, structure
from ncp.validation.bundle import BundleIndex, reference_issue
from ncp.validation.elements import CORE_SD, Constraint, ElementNode, Tree, is_primitive
from ncp.validation.invariants import Scope, Stats
from ncp.validation.issues import STRUCTURE, Issue
from ncp.validation.profile_rules import Item

if TYPE_CHECKING:
    from ncp.validation.engine import Validator

_ENTRY = re.compile(r"^\.entry\[(\d+)\]\.resource")
_PRIMITIVE: dict[str, bool] = {}
"""Whether a type code is primitive, by type code (asked at every element)."""
_IGNORED_KEYS = frozenset({"resourceType", "fhir_comments"})
_Seen = tuple[int, int, int, str]
"""(element, tree, value, location): the children of one occurrence walked."""
_HOLDERS = frozenset({"resource", "contained"})
"""Elements whose location step names the type of the resource they hold (``ofType(X)``)."""


@dataclass(slots=True)
class ResourceScope:
    """Where a resource sits: its location, its FHIRPath variables, its bundle entry."""

    resource: dict[str, Any]
    location: str
    scope: Scope
    bundle: BundleIndex | None = None
    entry: int | None = None


class OverBudget(NcpError):
    """A validation ran past the deadline its caller gave (a request's time budget)."""


@dataclass(slots=True)
class Job:
    """A nested resource to validate, with profiles its container asks for."""

    resource: dict[str, Any]
    location: str
    scope: Scope
    bundle: BundleIndex | None
    entry: int | None
    profiles: tuple[str, ...] = ()


@dataclass(slots=True)
class Run:
    """What one validation collects."""

    issues: list[Issue] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    unchecked_value_sets: set[str] = field(default_factory=set)
    jobs: list[Job] = field(default_factory=list)
    demands: list[tuple[BundleIndex, int, str, str]] = field(default_factory=list)
    """(bundle, entry index, profile URL, location of the reference) asked by targetProfile:
    the entry of that bundle (a bundle inside a bundle has its own entries)."""
    walked: set[tuple[int, int, str]] = field(default_factory=set)
    """(id of the bundle, entry index, profile URL) already checked: a demand for one of them
    is met."""
    indexes: dict[int, BundleIndex] = field(default_factory=dict)
    deadline: float | None = None
    """``time.monotonic()`` by which the validation must end (:class:`OverBudget` after)."""
    steps: int = 0
    visited: dict[tuple[int, str, int, int, int, int | None], set[_Seen]] = field(
        default_factory=dict
    )
    """Per place of a resource (see :meth:`visited_in`), the occurrences already walked."""

    def visited_in(self, where: ResourceScope) -> set[_Seen]:
        """The occurrences whose children were walked so far in a resource at one place: a
        resource checked against two profiles (ours and a guide's) meets the same element of
        a shared definition (a datatype, an extension) at the same value twice, and its
        findings would be the same ones again."""
        key = (
            id(where.resource),
            where.location,
            id(where.scope.resource),
            id(where.scope.root_resource),
            id(where.bundle),
            where.entry,
        )
        found = self.visited.get(key)
        if found is None:
            found = self.visited[key] = set()
        return found

    def check_budget(self) -> None:
        """Raise :class:`OverBudget` once the deadline passed (looked at every 256 steps)."""
        self.steps += 1
        if self.deadline is not None and not self.steps & 0xFF and time.monotonic() > self.deadline:
            raise OverBudget("the validation did not finish within its time budget")

    def bundle_index(self, bundle: dict[str, Any]) -> BundleIndex:
        """The index of a bundle, built once per validation (the run holds the bundle)."""
        found = self.indexes.get(id(bundle))
        if found is None or found.bundle is not bundle:
            found = BundleIndex.of(bundle)
            self.indexes[id(bundle)] = found
        return found


class Walker:
    def __init__(self, validator: Validator, run: Run, where: ResourceScope) -> None:
        self.v = validator
        self.run = run
        self.issues = run.issues
        self.where = where
        self.visited = run.visited_in(where)

    # -- entry point ------------------------------------------------------------------------

    def resource(self, tree: Tree) -> None:
        resource = self.where.resource
        rid = resource.get("id")
        if isinstance(rid, str):
            # R4 declares Resource.id a string (fhir-type), but a logical id is an ``id``:
            # 1 to 64 of A-Z a-z 0-9 - . (R4 2.1.0 "Resource.id"; the HL7 validator checks it).
            self.v.formats.check("id", rid, f"{self.where.location}.id", self.issues)
        item = Item(tree.type, None, resource, self.where.location)
        self.item(tree.root, tree, tree.type, item)

    # -- one occurrence of an element ---------------------------------------------------------

    def item(self, node: ElementNode, tree: Tree, type_code: str, item: Item) -> None:
        value = item.value
        if value is None:
            return
        run = self.run
        run.steps += 1  # Run.check_budget, inlined: it runs at every element
        if run.deadline is not None and not run.steps & 0xFF and time.monotonic() > run.deadline:
            raise OverBudget("the validation did not finish within its time budget")
        issues = self.issues
        primitive = _PRIMITIVE.get(type_code)
        if primitive is None:
            primitive = _PRIMITIVE[type_code] = is_primitive(type_code)
        if primitive:
            structure.check_primitive(type_code, value, item.location, issues)
            self.v.formats.check(type_code, value, item.location, issues)
            self.rules(node, type_code, item)
            return
        if not isinstance(value, dict):
            issues.append(structure.json_type_issue(item.location, "object", value))
            return
        is_root = node is tree.root
        if not is_root and (type_code == "Resource" or is_resource_type(type_code)):
            self.rules(node, type_code, item)
            self.nested(node, type_code, item)
            return
        self.rules(node, type_code, item)
        if type_code == "Reference":
            self.reference(node, item)
        parent, inner = self.children_of(node, tree, type_code, value)
        if parent is None or inner is None:
            return
        if parent is inner.root and inner is not tree and parent.constraints:
            # The datatype's own constraints (ref-1 on Reference, per-1 on Period...).
            extra = self.datatype_constraints(node, parent)
            if extra:
                self.v.invariants.check(
                    extra,
                    value,
                    inner.type,
                    item.location,
                    self.where.scope,
                    self.run.stats,
                    issues,
                )
        if inner is not tree:
            # A datatype's or an extension's own definition, shared by every profile: two
            # profiles' elements (their own slices, names and rules) may hold the same value,
            # whose children there give the same findings: they are walked once.
            seen = (id(parent), id(inner), id(value), item.location)
            if seen in self.visited:
                return
            self.visited.add(seen)
        self.children(parent, inner, value, item.location)

    def datatype_constraints(self, node: ElementNode, root: ElementNode) -> tuple[Constraint, ...]:
        """The constraints of a datatype's root element that the element itself does not
        repeat, worked out once per pair (kept with the validator, whose trees they are)."""
        cache = self.v.datatype_constraints
        key = (id(node), id(root))
        found = cache.get(key)
        if found is None or found[0] is not node or found[1] is not root:
            own = {c.key for c in node.constraints}
            extra = tuple(c for c in root.constraints if c.key not in own)
            found = cache[key] = (node, root, extra)
        return found[2]

    def rules(self, node: ElementNode, type_code: str, item: Item) -> None:
        issues = self.issues
        if node.fixed is not None or node.pattern is not None:
            profile_rules.fixed_and_pattern(node, item, issues)
        if node.max_length:
            profile_rules.max_length(node, item, issues)
        if node.binding is not None:
            self.v.bindings.check(
                node, type_code, item.value, item.location, self.run.unchecked_value_sets, issues
            )
        if node.constraints:
            type_path = node.path if type_code in ("BackboneElement", "Element") else type_code
            if node.path == type_code or "." not in node.path:
                type_path = node.path
            self.v.invariants.check(
                node.constraints,
                item.value,
                type_path,
                item.location,
                self.where.scope,
                self.run.stats,
                issues,
            )

    def children_of(
        self, node: ElementNode, tree: Tree, type_code: str, value: dict[str, Any]
    ) -> tuple[ElementNode | None, Tree | None]:
        if node.children:
            return node, tree
        if node.content_reference:
            target = self.v.catalogue.resolve(tree, node.content_reference)
            return (target, tree) if target is not None else (None, None)
        catalogue = self.v.catalogue
        if type_code == "Extension":
            url = value.get("url")
            if isinstance(url, str):
                extension = catalogue.tree(url)
                if extension is not None and extension.type == "Extension":
                    return extension.root, extension
        ref = node.type_ref(type_code)
        if ref is not None:
            for profile in ref.profiles:
                if not profile.startswith(CORE_SD):
                    typed = catalogue.tree(profile)
                    if typed is not None:
                        return typed.root, typed
        base = catalogue.base(type_code)
        if base is None:
            return None, None
        return base.root, base

    # -- the children of an object ------------------------------------------------------------

    def children(self, parent: ElementNode, tree: Tree, obj: dict[str, Any], where: str) -> None:
        issues = self.issues
        # Only the elements present are visited (and the required ones, to say they are
        # missing): a definition lists tens of children, an instance uses a few.
        kids = parent.children
        present: dict[int, tuple[ElementNode, list[str]]] = {}
        extended = False  # whether some ``_name`` is there (most objects have none)
        for key in obj:
            name = key
            child = kids.get(key)
            if child is None:
                if key[:1] == "_":  # ``_valueString``: the extension of ``valueString``
                    extended = True
                    name = key[1:]
                    child = kids.get(name)
                if child is None:
                    if key not in _IGNORED_KEYS:
                        issues.append(structure.unknown_element(f"{where}.{key}", key))
                    continue
            found = present.get(id(child))
            if found is None:
                present[id(child)] = (child, [name])
            elif name not in found[1]:
                found[1].append(name)
        for child in parent.required_children():
            if id(child) not in present:
                profile_rules.cardinality(child, 0, where, issues)
                for s in child.slices:
                    profile_rules.cardinality(s, 0, where, issues)
        for child, names in present.values():
            if len(names) == 1:
                items = self.items(child, names[0], obj, where, extended)
            else:
                issues.append(
                    Issue(
                        "error",
                        STRUCTURE,
                        where,
                        f"{child.id}: only one of {', '.join(names)} may be present",
                        child.id,
                    )
                )
                items = [
                    it
                    for json_name in names
                    for it in self.items(child, json_name, obj, where, extended)
                ]
            count = len(items)
            if count < child.min or (child.max is not None and count > child.max):
                profile_rules.cardinality(child, count, where, issues)
            if not items:
                continue
            if child.slices:
                assigned = profile_rules.assign_slices(
                    child, items, where, self.resolve, self.v.profile_type, issues
                )
            else:
                assigned = [(it, child) for it in items]
            for it, node in assigned:
                type_code = node.type_of(it.json_name) or child.type_of(it.json_name) or ""
                if not type_code and child.content_reference:
                    # ``CapabilityStatement.rest.operation`` and the like: no type of their own,
                    # the walk takes the referenced element's children (see ``children``).
                    type_code = "BackboneElement"
                if not type_code:
                    issues.append(structure.unknown_element(it.location, it.json_name))
                    continue
                self.item(node, tree, type_code, it)

    def items(
        self,
        node: ElementNode,
        json_name: str,
        obj: dict[str, Any],
        where: str,
        extended: bool = True,
    ) -> list[Item]:
        """The occurrences of an element in an object (``extended``: the object may hold
        ``_name`` keys, the extensions of primitives)."""
        value = obj.get(json_name)
        ext = obj.get("_" + json_name) if extended else None
        if not node.array:
            if value is not None and ext is None and not isinstance(value, list):
                # The common case, first: one value, no extension of it.
                if json_name in _HOLDERS:
                    return [
                        Item(
                            json_name,
                            None,
                            value,
                            structure.location_step(where, json_name, None, value),
                        )
                    ]
                location = f"{where}.{json_name}" if where else json_name
                return [Item(json_name, None, value, location)]
            here = f"{where}.{json_name}"
            if isinstance(value, list):
                self.issues.append(structure.json_type_issue(here, "value (not an array)", value))
                return []
            if value is None and json_name in obj:
                self.issues.append(structure.json_type_issue(here, "value (not null)", value))
            if value is None and ext is None:
                return []
            return [
                Item(json_name, None, value, structure.location_step(where, json_name, None, value))
            ]
        here = f"{where}.{json_name}"
        values = value if isinstance(value, list) else None
        exts = ext if isinstance(ext, list) else None
        if (value is not None and values is None) or (ext is not None and exts is None):
            self.issues.append(structure.json_type_issue(here, "array", value))
            return []
        values, exts = values or [], exts or []
        if not values and not exts:
            self.issues.append(
                Issue("error", STRUCTURE, here, "an array must not be empty", "json-empty-array")
            )
            return []
        out: list[Item] = []
        for index in range(max(len(values), len(exts))):
            v = values[index] if index < len(values) else None
            e = exts[index] if index < len(exts) else None
            location = structure.location_step(where, json_name, index, v)
            if v is None and e is None:
                self.issues.append(
                    Issue(
                        "error",
                        STRUCTURE,
                        location,
                        "null in an array is only allowed opposite an extension (_element)",
                        structure.RULE_JSON_TYPE,
                    )
                )
                continue
            out.append(Item(json_name, index, v, location))
        return out

    # -- references and nested resources --------------------------------------------------------

    def resolve(self, reference: str) -> dict[str, Any] | None:
        bundle = self.where.bundle
        if reference.startswith("#"):
            return _contained(self.where.scope.root_resource, reference[1:])
        if bundle is None:
            return None
        return bundle.resource(reference, self.where.entry)

    def reference(self, node: ElementNode, item: Item) -> None:
        ref = item.value.get("reference")
        if not isinstance(ref, str) or not ref:
            return
        bundle = self.where.bundle
        target: dict[str, Any] | None
        if ref.startswith("#"):
            target = _contained(self.where.scope.root_resource, ref[1:])
        elif bundle is not None:
            rtype = self.where.resource.get("resourceType")
            found = reference_issue(
                bundle,
                ref,
                f"{item.location}.reference",
                self.where.entry,
                rtype if isinstance(rtype, str) else None,
            )
            if found is not None:
                self.issues.append(found)
            index = bundle.resolve(ref, self.where.entry)
            target = None if index is None else bundle.resources[index]
            if index is not None and target is not None:
                self.demand(node, index, target, item.location)
        else:
            return
        if target is not None:
            profile_rules.reference_target(
                node, target, item.location, self.v.profile_type, self.issues
            )

    def demand(self, node: ElementNode, index: int, target: dict[str, Any], where: str) -> None:
        ref = node.type_ref("Reference")
        if ref is None:
            return
        rtype = target.get("resourceType")
        bundle = self.where.bundle
        if bundle is None:
            return
        for url in ref.target_profiles:
            if not url.startswith(CORE_SD) and self.v.profile_type(url) == rtype:
                self.run.demands.append((bundle, index, url, where))

    def nested(self, node: ElementNode, type_code: str, item: Item) -> None:
        resource = item.value
        ref = node.type_ref(type_code)
        profiles = tuple(p for p in (ref.profiles if ref else ()) if not p.startswith(CORE_SD))
        entry = None
        bundle = self.where.bundle
        is_bundle = self.where.resource.get("resourceType") == "Bundle"
        if is_bundle and node.path == "Bundle.entry.resource":
            match = _ENTRY.match(item.location[len(self.where.location) :])
            entry = int(match.group(1)) if match else None
            bundle = self.run.bundle_index(self.where.resource)
            scope = Scope(resource, resource)
        else:
            scope = Scope(resource, self.where.scope.root_resource)
            entry = self.where.entry
        self.run.jobs.append(Job(resource, item.location, scope, bundle, entry, profiles))


def _contained(root: dict[str, Any], rid: str) -> dict[str, Any] | None:
    for c in root.get("contained") or []:
        if isinstance(c, dict) and c.get("id") == rid:
            return c
    return None
