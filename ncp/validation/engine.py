"""The validator: every rule family over one resource, every issue with its location.

Build a :class:`Validator` once (``Validator.default()`` is cached) and call
:meth:`Validator.validate` per resource; definitions are compiled into lookup tables on first
use and kept, so later validations never re-read or re-parse them.

Families, each in its own module: :mod:`~ncp.validation.structure` (the fhir.resources models
and JSON checks), :mod:`~ncp.validation.profile_rules` (cardinality, slices, fixed and pattern
values, maxLength, reference targets), :mod:`~ncp.validation.bindings`,
:mod:`~ncp.validation.invariants` (FHIRPath constraints), :mod:`~ncp.validation.bundle`
(references and document rules) and :mod:`~ncp.validation.linkage` (report to study).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ncp.fhir.conformance import Definitions, load_definitions
from ncp.fhir.io import is_resource_type
from ncp.fhir.terminology import Terminology, TerminologyError, default_terminology
from ncp.validation import structure
from ncp.validation.bindings import Bindings
from ncp.validation.bundle import bundle_issues
from ncp.validation.elements import Catalogue, Constraint, ElementNode, Tree, canonical
from ncp.validation.formats import Formats
from ncp.validation.invariants import Invariants, Scope
from ncp.validation.issues import (
    INFORMATIONAL,
    NOT_FOUND,
    PROCESSING,
    STRUCTURE,
    Issue,
    unique,
)
from ncp.validation.linkage import linkage_issues
from ncp.validation.walk import Job, OverBudget, ResourceScope, Run, Walker

__all__ = ["OverBudget", "UnknownProfile", "Validator", "clear_cache"]


class UnknownProfile(LookupError):
    """A profile asked for by the caller is not among the definitions."""

    def __init__(self, url: str) -> None:
        super().__init__(f"unknown profile {url!r}")
        self.url = url


class Validator:
    """Validates resources against base FHIR R4, the project's profiles and terminology."""

    def __init__(self, definitions: Definitions, terminology: Terminology | None) -> None:
        self.definitions = definitions
        self.terminology = terminology
        self.catalogue = Catalogue(definitions)
        self.bindings = Bindings(definitions, terminology)
        self.invariants = Invariants()
        self.formats = Formats(definitions)
        self.datatype_constraints: dict[
            tuple[int, int], tuple[ElementNode, ElementNode, tuple[Constraint, ...]]
        ] = {}
        """By (element, datatype root): the datatype's own constraints the element lacks."""

    @classmethod
    def default(cls) -> Validator:
        """The validator over the repository's definitions and terminology (built once)."""
        return _default()

    # -- lookups the rule families share -----------------------------------------------------

    @functools.cache  # noqa: B019 - the validator lives as long as its definitions
    def profile_type(self, url: str) -> str | None:
        tree = self.catalogue.tree(url)
        return tree.type if tree is not None else None

    def check_profile(self, url: str) -> str:
        """The resource type a profile constrains; raises :class:`UnknownProfile`."""
        rtype = self.profile_type(url)
        if rtype is None:
            raise UnknownProfile(url)
        return rtype

    # -- validation -------------------------------------------------------------------------

    def validate(
        self,
        resource: dict[str, Any],
        *,
        profiles: Sequence[str] = (),
        deadline: float | None = None,
    ) -> list[Issue]:
        """Every issue found in the resource (never stops at the first, never raises but
        :class:`OverBudget`).

        ``profiles`` are checked in addition to those the resource claims in ``meta.profile``;
        each applies to the resource, or to the resources inside it, of the profile's type.
        ``deadline`` (``time.monotonic()``): a request's time budget; past it the validation
        stops with :class:`OverBudget` (checked as elements are walked).
        """
        run = Run(deadline=deadline)
        try:
            self._validate(resource, profiles, run)
        except OverBudget:
            raise
        except Exception as exc:  # a validator bug must become an issue, not a traceback
            run.issues.append(
                Issue(
                    "fatal",
                    PROCESSING,
                    str(resource.get("resourceType", "")) if isinstance(resource, dict) else "",
                    f"the validator failed: {exc!r}",
                    "validator",
                )
            )
        stats = run.stats
        if stats.skipped:
            run.issues.append(
                Issue(
                    "information",
                    INFORMATIONAL,
                    str(resource.get("resourceType", "")) if isinstance(resource, dict) else "",
                    f"{stats.evaluated} invariant evaluations done ({stats.native} natively), "
                    f"{stats.skipped} skipped because the FHIRPath engine cannot evaluate them "
                    f"reliably: {', '.join(sorted(stats.skipped_keys))}",
                    "invariant-coverage",
                )
            )
        return unique(run.issues)

    def _validate(self, resource: dict[str, Any], forced: Sequence[str], run: Run) -> None:
        if not isinstance(resource, dict):
            run.issues.append(Issue("fatal", STRUCTURE, "", "a resource is a JSON object", "json"))
            return
        rtype = resource.get("resourceType")
        model = structure.model_issues(resource)
        run.issues.extend(model)
        if not isinstance(rtype, str) or not is_resource_type(rtype):
            return
        self._walk_all(resource, rtype, forced, run)
        # A value the walk found malformed was found by the model too: one finding, the walk's
        # (it knows the FHIR type, so it names the rule).
        run.issues[: len(model)] = structure.not_found_again(model, run.issues[len(model) :])

    def _walk_all(
        self, resource: dict[str, Any], rtype: str, forced: Sequence[str], run: Run
    ) -> None:
        forced_by_type: dict[str, list[str]] = {}
        for url in forced:
            forced_by_type.setdefault(self.check_profile(url), []).append(canonical(url))
        scope = Scope(resource, resource)
        bundle = run.bundle_index(resource) if rtype == "Bundle" else None
        top = Job(resource, rtype, scope, bundle, None)
        self._resource(top, forced_by_type, run)
        done: set[tuple[int, int, str]] = set()
        while run.jobs or run.demands:
            while run.jobs:
                run.check_budget()
                self._resource(run.jobs.pop(0), forced_by_type, run)
            while run.demands:
                owner, entry, url, _where = run.demands.pop(0)
                # Only a bundle's own entries are demanded (of the bundle the reference is in:
                # a history holds document bundles); each (bundle, entry, profile) once.
                key = (id(owner), entry, url)
                if key in done or key in run.walked:
                    continue
                done.add(key)
                target = owner.resources[entry]
                if target is None or url in _claimed(target):
                    continue
                job = Job(target, owner.locations[entry], Scope(target, target), owner, entry)
                self._walk(job, self.catalogue.tree(url), run)
        if bundle is not None:
            run.issues.extend(bundle_issues(bundle))
            run.issues.extend(linkage_issues(bundle))

    def _resource(self, job: Job, forced: dict[str, list[str]], run: Run) -> None:
        resource = job.resource
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not is_resource_type(rtype):
            return  # reported by the structure checks
        if rtype == "Bundle":  # a bundle's references resolve among its own entries
            job.bundle = run.bundle_index(resource)
            job.entry = None
        urls: list[str] = []
        claimed = _claimed(resource)
        for i, url in enumerate(claimed):
            if self.profile_type(url) is None:
                run.issues.append(
                    Issue(
                        "warning",
                        NOT_FOUND,
                        f"{job.location}.meta.profile[{i}]",
                        f"profile {url} is unknown here: the resource is not checked against it",
                        "meta-profile",
                    )
                )
            else:
                urls.append(url)
        urls.extend(job.profiles)
        urls.extend(forced.get(rtype, ()))
        trees: list[Tree] = []
        for url in dict.fromkeys(urls):
            tree = self.catalogue.tree(url)
            if tree is None:
                continue
            if tree.type != rtype:
                run.issues.append(
                    Issue(
                        "error",
                        STRUCTURE,
                        job.location,
                        f"the profile {url} is for {tree.type}, not {rtype}",
                        "profile-type",
                    )
                )
                continue
            trees.append(tree)
        if not trees:
            base = self.catalogue.base(rtype)
            if base is None:
                run.issues.append(
                    Issue(
                        "information",
                        NOT_FOUND,
                        job.location,
                        f"no definition of {rtype} is held: only its structure was checked",
                        "base-definition",
                    )
                )
                return
            trees.append(base)
        for tree in trees:
            if job.entry is not None:
                # An entry is met once per profile of its bundle (ours and a guide's) that
                # slices the entries: each of its own profiles is walked once.
                key = (id(job.bundle), job.entry, tree.url)
                if key in run.walked:
                    continue
                run.walked.add(key)
            self._walk(job, tree, run)

    def _walk(self, job: Job, tree: Tree | None, run: Run) -> None:
        if tree is None:
            return
        where = ResourceScope(job.resource, job.location, job.scope, job.bundle, job.entry)
        Walker(self, run, where).resource(tree)


def _claimed(resource: dict[str, Any]) -> list[str]:
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    if not isinstance(profiles, list):
        return []
    return [canonical(p) for p in profiles if isinstance(p, str)]


@functools.cache
def _default() -> Validator:
    try:
        terminology: Terminology | None = default_terminology()
    except TerminologyError:
        terminology = None
    return Validator(load_definitions(), terminology)


def clear_cache() -> None:
    """Forget the default validator (after definitions or terminology changed on disk)."""
    _default.cache_clear()
