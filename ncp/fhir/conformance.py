"""Offline access to the conformance resources the node validates against.

Three places hold them, all under one root (the repository, or ``NCP_CONFORMANCE_DIR``):

- ``profiles/base/``: the base FHIR R4 4.0.1 definitions the project needs (StructureDefinitions
  of resources and datatypes, and the ValueSets and CodeSystems of their required bindings),
  extracted from the official ``hl7.fhir.r4.core`` package by ``scripts/extract-fhir-base``;
  ``profiles/base/index.json`` maps each canonical URL to its file, so files are read on demand.
- ``profiles/*.json``: the project's own StructureDefinitions, SearchParameters and
  OperationDefinitions.
- ``terminology/**/*.json``: the project's own CodeSystems, ValueSets and ConceptMaps.

Project resources take precedence over base ones with the same canonical URL. Canonical URLs may
be given with a ``|version`` suffix; the version is ignored (one version of each is held).

A project StructureDefinition that transcribes a profile of an implementation guide (HL7 Europe
imaging, IHE MADO: extension :data:`TRANSCRIPTION_OF`) also answers to the guide's canonical URL,
so a resource claiming the guide's profile is checked against the transcription.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ncp.errors import NcpError

CORE_SD_BASE = "http://hl7.org/fhir/StructureDefinition/"

ENV_DIR = "NCP_CONFORMANCE_DIR"
TRANSCRIPTION_OF = "https://ncp.example/fhir/StructureDefinition/transcription-of"
"""Extension of a project StructureDefinition naming the guide profile it transcribes."""


class DefinitionNotFound(NcpError, LookupError):
    """No conformance resource with this canonical URL (or of this type) is held."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"no {kind} {key!r} in the conformance resources")
        self.kind = kind
        self.key = key


def conformance_dir(kind: Literal["profiles", "terminology"]) -> Path:
    """``profiles/`` or ``terminology/`` under ``$NCP_CONFORMANCE_DIR`` or the repository root."""
    override = os.environ.get(ENV_DIR)
    root = Path(override) if override else _package_root()
    return root / kind


@functools.cache
def _package_root() -> Path:
    # Resolved once: lists build thousands of codings, each asking for the terminology folder.
    return Path(__file__).resolve().parents[2]


def _strip_version(url: str) -> str:
    return url.split("|", 1)[0]


def transcribed(resource: dict[str, Any]) -> str | None:
    """The guide canonical URL a project StructureDefinition transcribes, if any."""
    for ext in resource.get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == TRANSCRIPTION_OF:
            value = ext.get("valueCanonical")
            return value if isinstance(value, str) else None
    return None


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


class Definitions:
    """Canonical URL -> resource, over the base package and the project's own resources."""

    def __init__(self, profiles_dir: Path, terminology_dir: Path) -> None:
        self.profiles_dir = profiles_dir
        self.terminology_dir = terminology_dir
        # canonical url -> (resourceType, path) of base files, read lazily
        self._base: dict[str, tuple[str, Path]] = {}
        self._loaded: dict[Path, dict[str, Any]] = {}
        # canonical url -> resource, the project's own (read eagerly: they are few)
        self._own: dict[str, dict[str, Any]] = {}
        self._own_paths: dict[str, Path] = {}
        # a guide's canonical url -> the project's transcription of it
        self.transcriptions: dict[str, str] = {}

        base_dir = profiles_dir / "base"
        index_path = base_dir / "index.json"
        if index_path.is_file():
            for entry in _read(index_path)["files"]:
                url = entry.get("url")
                if isinstance(url, str):
                    path = base_dir / entry["filename"]
                    self._base.setdefault(url, (entry["resourceType"], path))
        elif base_dir.is_dir():
            for path in sorted(base_dir.glob("*.json")):
                res = _read(path)
                if isinstance(res.get("url"), str):
                    self._base.setdefault(res["url"], (res["resourceType"], path))
                    self._loaded[path] = res

        own_files: list[Path] = []
        if profiles_dir.is_dir():
            own_files.extend(sorted(profiles_dir.glob("*.json")))
        if terminology_dir.is_dir():
            own_files.extend(sorted(terminology_dir.rglob("*.json")))
        for path in own_files:
            res = _read(path)
            url = res.get("url")
            if isinstance(url, str) and "resourceType" in res:
                self._own[url] = res
                self._own_paths[url] = path
                guide = transcribed(res)
                if guide is not None:
                    self.transcriptions[guide] = url

    # -- generic -------------------------------------------------------------------------------

    def resource(self, url: str, resource_type: str | None = None) -> dict[str, Any]:
        """The resource with this canonical URL (of this resourceType, if given)."""
        key = _strip_version(url)
        res = self._own.get(key)
        if res is None and key not in self._base:
            # A guide's canonical (some guide examples write the version after '#').
            alias = self.transcriptions.get(key) or self.transcriptions.get(key.split("#", 1)[0])
            res = self._own.get(alias) if alias else None
        if res is None:
            hit = self._base.get(key)
            if hit is not None:
                path = hit[1]
                res = self._loaded.get(path)
                if res is None:
                    res = _read(path)
                    self._loaded[path] = res
        if res is None or (resource_type is not None and res.get("resourceType") != resource_type):
            raise DefinitionNotFound(resource_type or "resource", key)
        return res

    def has(self, url: str, resource_type: str | None = None) -> bool:
        try:
            self.resource(url, resource_type)
        except DefinitionNotFound:
            return False
        return True

    def urls(self, resource_type: str | None = None) -> list[str]:
        """Every canonical URL held (of this resourceType, if given), sorted."""
        found: set[str] = set()
        for url, (rtype, _path) in self._base.items():
            if resource_type is None or rtype == resource_type:
                found.add(url)
        for url, res in self._own.items():
            if resource_type is None or res.get("resourceType") == resource_type:
                found.add(url)
        return sorted(found)

    def own(self, resource_type: str | None = None) -> Iterator[dict[str, Any]]:
        """The project's own resources (of this resourceType, if given), by canonical URL."""
        for url in sorted(self._own):
            res = self._own[url]
            if resource_type is None or res.get("resourceType") == resource_type:
                yield res

    def own_path(self, url: str) -> Path:
        """The file a project resource was read from."""
        try:
            return self._own_paths[_strip_version(url)]
        except KeyError:
            raise DefinitionNotFound("project resource", url) from None

    # -- typed lookups -------------------------------------------------------------------------

    def structure_definition(self, url: str) -> dict[str, Any]:
        return self.resource(url, "StructureDefinition")

    def by_type(self, type_name: str) -> dict[str, Any]:
        """The base StructureDefinition of a resource or datatype (``Patient``, ``string``)."""
        if "/" in type_name:  # an absolute type URL, as in ElementDefinition.type.code
            return self.structure_definition(type_name)
        try:
            return self.structure_definition(CORE_SD_BASE + type_name)
        except DefinitionNotFound:
            raise DefinitionNotFound("base type", type_name) from None

    def value_set(self, url: str) -> dict[str, Any]:
        return self.resource(url, "ValueSet")

    def code_system(self, url: str) -> dict[str, Any]:
        return self.resource(url, "CodeSystem")

    def search_parameter(self, url: str) -> dict[str, Any]:
        return self.resource(url, "SearchParameter")

    def operation_definition(self, url: str) -> dict[str, Any]:
        return self.resource(url, "OperationDefinition")


@functools.cache
def _load(profiles_dir: Path, terminology_dir: Path) -> Definitions:
    return Definitions(profiles_dir, terminology_dir)


def load_definitions() -> Definitions:
    """The definitions under the current conformance root, read once per root and cached."""
    return _load(conformance_dir("profiles"), conformance_dir("terminology"))


def clear_cache() -> None:
    """Forget loaded definitions (after files changed on disk, e.g. in tests or the build)."""
    _load.cache_clear()
