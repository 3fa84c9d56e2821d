"""Terminology bindings: a coded value against the ValueSet its element is bound to.

Strength decides the severity (FHIR R4 "Terminology Binding"): ``required`` → error when the code
is not in the ValueSet, ``extensible`` → warning, ``preferred``/``example`` → not checked. The
project's ValueSets are answered by :mod:`ncp.fhir.terminology`; the base ones (held under
``profiles/base/``) are expanded here from their CodeSystems, once. A ValueSet that neither
knows, or that names a code system only a terminology server could enumerate, gives one
information issue per validation ("not checked"), never silence and never a false error.
"""

from __future__ import annotations

import re
from typing import Any

from ncp.fhir.conformance import DefinitionNotFound, Definitions
from ncp.fhir.terminology import Terminology
from ncp.validation.elements import ElementNode, canonical
from ncp.validation.issues import CODE_INVALID, NOT_FOUND, Issue

Pair = tuple[str, str]

# Code systems whose codes follow a grammar instead of an enumeration.
_GRAMMARS: dict[str, re.Pattern[str]] = {
    "urn:ietf:bcp:13": re.compile(r"[A-Za-z0-9][\w!#$&^.+-]*/[A-Za-z0-9][\w!#$&^.+-]*(\s*;.*)?"),
    "urn:ietf:bcp:47": re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*"),
    "urn:iso:std:iso:4217": re.compile(r"[A-Z]{3}"),
}
_CODED = frozenset({"code", "uri", "Coding", "CodeableConcept"})


class _Expansion:
    __slots__ = ("codes", "grammars", "pairs")

    def __init__(self) -> None:
        self.pairs: set[Pair] = set()
        self.codes: set[str] = set()
        self.grammars: dict[str, re.Pattern[str]] = {}

    def add(self, system: str, code: str) -> None:
        self.pairs.add((system, code))
        self.codes.add(code)

    def contains(self, system: str | None, code: str) -> bool:
        if system is None:
            if code in self.codes:
                return True
            return any(g.fullmatch(code) for g in self.grammars.values())
        if (system, code) in self.pairs:
            return True
        grammar = self.grammars.get(system)
        return grammar is not None and grammar.fullmatch(code) is not None


class Bindings:
    """Binding checks over the base and project value sets, expansions kept."""

    def __init__(self, definitions: Definitions, terminology: Terminology | None) -> None:
        self.definitions = definitions
        self.terminology = terminology
        self._expansions: dict[str, _Expansion | None] = {}
        self._project = frozenset(terminology.value_set_urls()) if terminology else frozenset()

    # -- expansion of base value sets ----------------------------------------------------------

    def expansion(self, url: str, _seen: frozenset[str] = frozenset()) -> _Expansion | None:
        key = canonical(url)
        if key not in self._expansions:
            self._expansions[key] = self._expand(key, _seen | {key})
        return self._expansions[key]

    def _expand(self, url: str, seen: frozenset[str]) -> _Expansion | None:
        if url in self._project and self.terminology is not None:
            out = _Expansion()
            for system, code in self.terminology.value_set(url):
                out.add(system, code)
            return out
        try:
            vs = self.definitions.value_set(url)
        except DefinitionNotFound:
            return None
        out = _Expansion()
        compose = vs.get("compose") or {}
        if compose.get("exclude"):
            return None
        for include in compose.get("include", []):
            if include.get("filter"):
                return None
            for imported in include.get("valueSet", []):
                if canonical(imported) in seen:
                    continue
                inner = self.expansion(imported, seen)
                if inner is None:
                    return None
                out.pairs |= inner.pairs
                out.codes |= inner.codes
                out.grammars.update(inner.grammars)
            system = include.get("system")
            if not system:
                continue
            if include.get("concept"):
                for concept in include["concept"]:
                    out.add(system, concept["code"])
            elif system in _GRAMMARS:
                out.grammars[system] = _GRAMMARS[system]
            elif not self._add_code_system(out, system):
                return None
        return out

    def _add_code_system(self, out: _Expansion, system: str) -> bool:
        try:
            cs = self.definitions.code_system(system)
        except DefinitionNotFound:
            return False
        if cs.get("content") not in ("complete", None):
            return False
        stack: list[dict[str, Any]] = list(cs.get("concept", []))
        while stack:
            concept = stack.pop()
            out.add(system, concept["code"])
            stack.extend(concept.get("concept", []))
        return True

    # -- checking -------------------------------------------------------------------------------

    def check(
        self,
        node: ElementNode,
        type_code: str,
        value: Any,
        location: str,
        unchecked: set[str],
        issues: list[Issue],
    ) -> None:
        binding = node.binding
        if binding is None or binding.strength not in ("required", "extensible"):
            return
        if type_code not in _CODED:
            return
        expansion = self.expansion(binding.value_set)
        if expansion is None:
            if binding.value_set not in unchecked:
                unchecked.add(binding.value_set)
                issues.append(
                    Issue(
                        "information",
                        NOT_FOUND,
                        location,
                        f"ValueSet {binding.value_set} is not available offline: codes bound "
                        f"to it are not checked",
                        node.id,
                    )
                )
            return
        severity = "error" if binding.strength == "required" else "warning"
        if type_code in ("code", "uri"):
            if isinstance(value, str) and not expansion.contains(None, value):
                issues.append(_not_in(severity, location, node, f"the code {value!r}"))
            return
        if type_code == "Coding":
            if isinstance(value, dict) and not _coding_in(expansion, value):
                issues.append(_not_in(severity, location, node, _describe(value)))
            return
        if not isinstance(value, dict):
            return
        codings = [c for c in value.get("coding", []) if isinstance(c, dict)]
        if not codings:
            if binding.strength == "required":
                issues.append(_not_in(severity, location, node, "no coding (text alone)"))
            return
        if not any(_coding_in(expansion, c) for c in codings):
            described = ", ".join(_describe(c) for c in codings)
            issues.append(_not_in(severity, location, node, described))


def _coding_in(expansion: _Expansion, coding: dict[str, Any]) -> bool:
    code = coding.get("code")
    if not isinstance(code, str):
        return False
    system = coding.get("system")
    return expansion.contains(system if isinstance(system, str) else None, code)


def _describe(coding: dict[str, Any]) -> str:
    return f"{coding.get('system', '(no system)')}#{coding.get('code', '(no code)')}"


def _not_in(severity: str, location: str, node: ElementNode, what: str) -> Issue:
    assert node.binding is not None
    strength = node.binding.strength
    return Issue(
        "error" if severity == "error" else "warning",
        CODE_INVALID,
        location,
        f"{what} is not in the ValueSet {node.binding.value_set} ({strength} binding)",
        node.id,
    )
