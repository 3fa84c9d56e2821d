"""The project's own terminology, offline: the CodeSystems, ValueSets and ConceptMaps under
``terminology/`` (see its README), read once and answered from memory.

It answers four questions the node asks while building, validating and showing resources:

- which (system, code) pairs a ValueSet holds (:meth:`Terminology.value_set`,
  :meth:`Terminology.contains`);
- how to show a code in the reader's language (:meth:`Terminology.display`), so that country B's
  portal shows country A's coded values in B's language;
- what a DICOM term maps to (:meth:`Terminology.translate`), e.g. Body Part Examined to SNOMED CT.

Expansion is local and complete: a ValueSet may list concepts, include every code of a
CodeSystem held here, or include other ValueSets held here; anything that would need a
terminology server (a filter, every code of SNOMED CT) is refused when the file is read, with a
:class:`TerminologyError` naming the file, instead of silently expanding to less than it says.
No network, no writes: the functions are pure given the files.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ncp.errors import NcpError
from ncp.fhir.conformance import ENV_DIR, DefinitionNotFound, conformance_dir

__all__ = [
    "Terminology",
    "TerminologyError",
    "clear_cache",
    "default_terminology",
]

_T = TypeVar("_T")
_KINDS = ("CodeSystem", "ValueSet", "ConceptMap")
_FALLBACK_LANGUAGE = "en"


class TerminologyError(NcpError, ValueError):
    """A terminology file is malformed or cannot be used offline; names the file and the fault."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


Pair = tuple[str, str]
"""(system, code)."""


@dataclass(slots=True)
class _ValueSetSource:
    path: Path
    url: str
    version: str
    compose: dict[str, Any]


@dataclass(slots=True)
class _Tables:
    """What the files say, gathered before value sets are expanded."""

    code_systems: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    value_sets: dict[str, dict[str, _ValueSetSource]] = field(default_factory=dict)
    concept_maps: dict[str, dict[str, dict[Pair, tuple[tuple[str, str, str], ...]]]] = field(
        default_factory=dict
    )
    names: dict[Pair, dict[str, str]] = field(default_factory=dict)
    own_display: dict[Pair, str] = field(default_factory=dict)
    vs_display: dict[Pair, str] = field(default_factory=dict)
    origin: dict[tuple[str, str, str], Path] = field(default_factory=dict)


class Terminology:
    """An immutable, expanded view of one ``terminology/`` folder."""

    def __init__(
        self,
        value_sets: dict[str, dict[str, frozenset[Pair]]],
        concept_maps: dict[str, dict[str, dict[Pair, tuple[tuple[str, str, str], ...]]]],
        names: dict[Pair, dict[str, str]],
        displays: dict[Pair, str],
    ) -> None:
        self._value_sets = value_sets
        self._concept_maps = concept_maps
        self._names = names
        self._displays = displays

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: Path | None = None) -> Terminology:
        """Read every ``*.json`` under ``folder`` (default: the conformance ``terminology/``).

        Raises :class:`TerminologyError` naming the file for malformed JSON, a resource without
        a canonical URL, a concept without a code, a duplicate canonical URL and version, or a
        ValueSet that cannot be expanded offline.
        """
        root = conformance_dir("terminology") if folder is None else folder
        if not root.is_dir():
            raise TerminologyError(root, "no such terminology folder")
        tables = _Tables()
        for path in sorted(root.rglob("*.json")):
            resource = _read(path)
            kind = resource.get("resourceType")
            if not isinstance(kind, str):
                raise TerminologyError(path, "has no resourceType")
            if kind not in _KINDS:
                continue  # not terminology; other readers of the folder may want it
            url = _text(resource, "url", path, kind)
            version = _optional_text(resource, "version", path, kind) or ""
            previous = tables.origin.get((kind, url, version))
            if previous is not None:
                raise TerminologyError(
                    path, f"{kind} {url}|{version} is already defined in {previous}"
                )
            tables.origin[(kind, url, version)] = path
            if kind == "CodeSystem":
                _read_code_system(resource, url, version, path, tables)
            elif kind == "ValueSet":
                _read_value_set(resource, url, version, path, tables)
            else:
                _read_concept_map(resource, url, version, path, tables)
        value_sets = _expand_all(tables)
        displays = dict(tables.vs_display)
        displays.update(tables.own_display)
        return cls(value_sets, tables.concept_maps, tables.names, displays)

    # -- value sets ----------------------------------------------------------------------------

    def value_set_urls(self) -> list[str]:
        """Canonical URLs of the ValueSets held, sorted (without versions)."""
        return sorted(self._value_sets)

    def concept_map_urls(self) -> list[str]:
        """Canonical URLs of the ConceptMaps held, sorted (without versions)."""
        return sorted(self._concept_maps)

    def value_set(self, url: str) -> frozenset[Pair]:
        """The expansion of a ValueSet as (system, code) pairs; ``url`` may end in ``|version``.

        Raises :class:`~ncp.fhir.conformance.DefinitionNotFound` for a ValueSet not held here.
        """
        found = _pick(self._value_sets, url)
        if found is None:
            raise DefinitionNotFound("ValueSet", url)
        return found

    def contains(self, url: str, system: str, code: str) -> bool | None:
        """Whether the ValueSet holds (system, code); None when the ValueSet is not held here."""
        found = _pick(self._value_sets, url)
        if found is None:
            return None
        return (system, code) in found

    # -- displays ------------------------------------------------------------------------------

    def display(self, system: str, code: str, language: str = "en") -> str | None:
        """How to show (system, code) to a reader of ``language`` (a BCP 47 tag).

        Falls back from the exact tag (``de-AT``) to its primary subtag (``de``), then to any
        regional variant of that subtag held (``pt-PT`` for ``pt``), then to English, then to
        the code system's own display. None only for a code no terminology file mentions.
        """
        names = self._names.get((system, code), {})
        tag = language.strip().replace("_", "-").lower()
        primary = tag.split("-", 1)[0]
        for candidate in (tag, primary):
            if candidate and candidate in names:
                return names[candidate]
        if primary:
            regional = sorted(lang for lang in names if lang.split("-", 1)[0] == primary)
            if regional:
                return names[regional[0]]
        if _FALLBACK_LANGUAGE in names:
            return names[_FALLBACK_LANGUAGE]
        return self._displays.get((system, code))

    def languages(self, system: str, code: str) -> frozenset[str]:
        """The language tags (lower case) a designation of (system, code) is held in."""
        return frozenset(self._names.get((system, code), {}))

    # -- concept maps --------------------------------------------------------------------------

    def translate(self, concept_map_url: str, system: str, code: str) -> list[tuple[str, str, str]]:
        """(target system, target code, equivalence) for (system, code) in a ConceptMap.

        An empty list when the map has no target for the code. Targets without a code (an
        ``unmatched`` statement) are left out. Raises
        :class:`~ncp.fhir.conformance.DefinitionNotFound` for a ConceptMap not held here.
        """
        found = _pick(self._concept_maps, concept_map_url)
        if found is None:
            raise DefinitionNotFound("ConceptMap", concept_map_url)
        return list(found.get((system, code), ()))


@functools.cache
def _load_cached(folder: Path) -> Terminology:
    return Terminology.load(folder)


def default_terminology() -> Terminology:
    """The terminology under the current conformance root, read once per root and cached."""
    # Keyed by the override alone: lists ask thousands of times, paths are dear to build.
    return _for_override(os.environ.get(ENV_DIR))


@functools.cache
def _for_override(_override: str | None) -> Terminology:
    return _load_cached(conformance_dir("terminology"))


def clear_cache() -> None:
    """Forget loaded terminology (after files changed on disk, e.g. in tests)."""
    _for_override.cache_clear()
    _load_cached.cache_clear()


# -- reading ----------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TerminologyError(path, f"cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise TerminologyError(path, f"is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TerminologyError(path, "is not a JSON object (a FHIR resource)")
    return data


def _text(obj: dict[str, Any], key: str, path: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TerminologyError(path, f"{where}.{key} must be a non-empty string")
    return value


def _optional_text(obj: dict[str, Any], key: str, path: Path, where: str) -> str | None:
    if key not in obj:
        return None
    return _text(obj, key, path, where)


def _objects(obj: dict[str, Any], key: str, path: Path, where: str) -> list[dict[str, Any]]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise TerminologyError(path, f"{where}.{key} must be a list of objects")
    return value


def _texts(obj: dict[str, Any], key: str, path: Path, where: str) -> list[str]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TerminologyError(path, f"{where}.{key} must be a list of non-empty strings")
    return value


def _add_designations(
    concept: dict[str, Any], pair: Pair, path: Path, where: str, tables: _Tables
) -> None:
    names = tables.names.setdefault(pair, {})
    for i, designation in enumerate(_objects(concept, "designation", path, where)):
        here = f"{where}.designation[{i}]"
        value = _text(designation, "value", path, here)
        language = _optional_text(designation, "language", path, here)
        if language is not None:
            names.setdefault(language.lower(), value)


def _read_code_system(
    resource: dict[str, Any], url: str, version: str, path: Path, tables: _Tables
) -> None:
    codes: set[str] = set()

    def walk(concepts: list[dict[str, Any]], where: str) -> None:
        for i, concept in enumerate(concepts):
            here = f"{where}[{i}]"
            code = _text(concept, "code", path, here)
            codes.add(code)
            display = _optional_text(concept, "display", path, here)
            if display is not None:
                tables.own_display.setdefault((url, code), display)
            _add_designations(concept, (url, code), path, here, tables)
            walk(_objects(concept, "concept", path, here), f"{here}.concept")

    walk(_objects(resource, "concept", path, "CodeSystem"), "CodeSystem.concept")
    tables.code_systems.setdefault(url, {})[version] = frozenset(codes)


def _read_value_set(
    resource: dict[str, Any], url: str, version: str, path: Path, tables: _Tables
) -> None:
    compose = resource.get("compose")
    if not isinstance(compose, dict):
        raise TerminologyError(path, "ValueSet.compose is missing (the node expands locally)")
    for part in ("include", "exclude"):
        for i, rule in enumerate(_objects(compose, part, path, "ValueSet.compose")):
            where = f"ValueSet.compose.{part}[{i}]"
            system = _optional_text(rule, "system", path, where)
            _texts(rule, "valueSet", path, where)
            if rule.get("filter"):
                raise TerminologyError(
                    path, f"{where}.filter needs a terminology server; list the concepts instead"
                )
            for j, concept in enumerate(_objects(rule, "concept", path, where)):
                here = f"{where}.concept[{j}]"
                if system is None:
                    raise TerminologyError(path, f"{here} has no {where}.system")
                code = _text(concept, "code", path, here)
                display = _optional_text(concept, "display", path, here)
                if display is not None and part == "include":
                    tables.vs_display.setdefault((system, code), display)
                if part == "include":
                    _add_designations(concept, (system, code), path, here, tables)
    if not compose.get("include"):
        raise TerminologyError(path, "ValueSet.compose.include is empty")
    tables.value_sets.setdefault(url, {})[version] = _ValueSetSource(path, url, version, compose)


def _read_concept_map(
    resource: dict[str, Any], url: str, version: str, path: Path, tables: _Tables
) -> None:
    targets: dict[Pair, list[tuple[str, str, str]]] = {}
    for i, group in enumerate(_objects(resource, "group", path, "ConceptMap")):
        where = f"ConceptMap.group[{i}]"
        source = _text(group, "source", path, where)
        target_system = _text(group, "target", path, where)
        for j, element in enumerate(_objects(group, "element", path, where)):
            here = f"{where}.element[{j}]"
            code = _text(element, "code", path, here)
            found = targets.setdefault((source, code), [])
            for k, target in enumerate(_objects(element, "target", path, here)):
                there = f"{here}.target[{k}]"
                equivalence = _text(target, "equivalence", path, there)
                target_code = _optional_text(target, "code", path, there)
                if target_code is not None:
                    found.append((target_system, target_code, equivalence))
    tables.concept_maps.setdefault(url, {})[version] = {
        pair: tuple(found) for pair, found in targets.items()
    }


# -- expansion --------------------------------------------------------------------------------


def _expand_all(tables: _Tables) -> dict[str, dict[str, frozenset[Pair]]]:
    done: dict[tuple[str, str], frozenset[Pair]] = {}
    busy: set[tuple[str, str]] = set()

    def expand(source: _ValueSetSource) -> frozenset[Pair]:
        key = (source.url, source.version)
        if key in done:
            return done[key]
        if key in busy:
            raise TerminologyError(source.path, f"ValueSet {source.url} includes itself")
        busy.add(key)
        included: set[Pair] = set()
        for rule in source.compose.get("include", []):
            included |= evaluate(source, rule)
        for rule in source.compose.get("exclude", []):
            included -= evaluate(source, rule)
        busy.discard(key)
        done[key] = frozenset(included)
        return done[key]

    def evaluate(source: _ValueSetSource, rule: dict[str, Any]) -> set[Pair]:
        parts: list[set[Pair]] = []
        system = rule.get("system")
        if isinstance(system, str):
            concepts = rule.get("concept") or []
            if concepts:
                parts.append({(system, c["code"]) for c in concepts})
            else:
                codes = _pick(tables.code_systems, _versioned(system, rule.get("version")))
                if codes is None:
                    raise TerminologyError(
                        source.path,
                        f"includes every code of {system}, which is not held here, so it "
                        "cannot be expanded offline; list the concepts instead",
                    )
                parts.append({(system, code) for code in codes})
        for reference in rule.get("valueSet", []):
            included = _pick(tables.value_sets, reference)
            if included is None:
                raise TerminologyError(source.path, f"includes ValueSet {reference}, not held here")
            parts.append(set(expand(included)))
        if not parts:
            raise TerminologyError(source.path, "has an include or exclude with no system")
        result = parts[0]
        for part in parts[1:]:
            result &= part
        return result

    expanded: dict[str, dict[str, frozenset[Pair]]] = {}
    for url, versions in tables.value_sets.items():
        for version, source in versions.items():
            expanded.setdefault(url, {})[version] = expand(source)
    return expanded


# -- canonical references ---------------------------------------------------------------------


def _versioned(url: str, version: object) -> str:
    return f"{url}|{version}" if isinstance(version, str) and version else url


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+]", version))


def _pick(table: dict[str, dict[str, _T]], reference: str) -> _T | None:
    """The entry a canonical reference names: its version if given, else the latest held."""
    url, _, version = reference.partition("|")
    versions = table.get(url)
    if not versions:
        return None
    if version:
        return versions.get(version)
    return versions[max(versions, key=_version_key)]
