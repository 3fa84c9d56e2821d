"""Reading and writing FHIR R4 resources as JSON and XML, safely, both ways.

``read_resource`` takes bytes in either format (the first non-space byte decides: ``{`` JSON,
``<`` XML) and gives the JSON form as a dict; ``to_json`` and ``to_xml`` write one. JSON to XML
and back gives the same JSON.

Reading is bounded before anything is parsed: a size limit (checked on the bytes, or while
reading a stream), a nesting limit, and for XML no DOCTYPE at all (so no entity expansion, no
external entity, no DTD fetch) with lxml told not to resolve entities nor touch the network.
Every refusal is a :class:`FhirReadError` carrying an :class:`~ncp.validation.issues.Issue`
with an OperationOutcome issue code and a location, never a raw traceback.

Reading is tolerant of content: an unknown element or a malformed value is kept as it is in the
JSON so that the validator reports it with its location; only input that is not a FHIR resource
in JSON or XML syntax at all is refused here.

The element order, cardinality and types of the XML form come from the ``fhir.resources.R4B``
model classes (wire-compatible with R4 for the resources the node exchanges). The conversion
itself is done here and not with ``model_dump_xml`` / ``model_validate_xml`` of fhir.resources,
whose round trip is not exact: it rewrites date-times (``...00.000Z`` becomes ``...00+00:00``,
``.120`` becomes ``.120000``), drops the ``id`` of a primitive (``_birthDate.id``), writes
non-ASCII characters of the narrative as character references on reading, and raises a bare
``KeyError`` on an unknown element. R4/R4B differences met: R4B's ``Extension.value[x]`` lacks
``valueMeta`` and adds ``valueCodeableReference``/``valueRatioRange``; an R4 ``valueMeta``
extension is therefore not known to the XML form here (it is rare: no profile of the node uses it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from fhir_core.utils import get_fhir_type_name, is_list_type, is_primitive_type
from lxml import etree

from ncp.validation.issues import PROCESSING, SECURITY, STRUCTURE, TOO_COSTLY, Issue

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""Largest resource read (20 MB): an imaging report bundle is tens of kilobytes."""
DEFAULT_MAX_DEPTH = 64
"""Deepest nesting of objects and arrays (JSON) or elements (XML) accepted."""

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
_VERSION_PREFIX = "R4."  # fhir_core's key prefix for the R4B model classes
_INTEGER_TYPES = frozenset({"integer", "unsignedInt", "positiveInt", "integer64"})
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_ENCODING_DECL = re.compile(rb"""^\s*<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


class FhirReadError(ValueError):
    """The input is not a FHIR resource in JSON or XML, or is refused (size, depth, DTD)."""

    def __init__(self, code: str, diagnostics: str, location: str = "") -> None:
        super().__init__(f"{location}: {diagnostics}" if location else diagnostics)
        self.issue = Issue("fatal", code, location, diagnostics, "read")


class FhirWriteError(ValueError):
    """A resource cannot be written in the asked format (unknown element, not serialisable)."""

    def __init__(self, diagnostics: str, location: str = "") -> None:
        super().__init__(f"{location}: {diagnostics}" if location else diagnostics)
        self.issue = Issue("error", STRUCTURE, location, diagnostics, "write")


# --- reading bytes with a limit --------------------------------------------------------------


def read_limited(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """At most ``max_bytes`` from a stream; refuses a longer one before reading all of it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(1024 * 1024, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)


def read_path(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A file's bytes; a file larger than the limit is refused without being read."""
    file = Path(path)
    if file.stat().st_size > max_bytes:
        raise _too_large(max_bytes)
    with file.open("rb") as stream:
        return read_limited(stream, max_bytes)


def _too_large(max_bytes: int) -> FhirReadError:
    return FhirReadError(TOO_COSTLY, f"the input is larger than the limit of {max_bytes} bytes")


# --- the element model (from the fhir.resources R4B classes) ----------------------------------


@dataclass(frozen=True, slots=True)
class ElementInfo:
    """One element of a FHIR type as the JSON and XML forms see it."""

    name: str
    type_name: str
    """FHIR type (``string``, ``Reference``, ``Resource``, ``xhtml``) or the model class name of a
    backbone element (``BundleEntry``)."""
    is_list: bool
    primitive: bool


@functools.cache
def type_elements(type_name: str) -> dict[str, ElementInfo] | None:
    """The elements of a resource, datatype or backbone element in FHIR order; None when the
    R4B models do not know the type."""
    try:
        model = get_fhir_model_class(type_name)
    except (ValueError, KeyError):
        return None
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    out: dict[str, ElementInfo] = {}
    for name in model.elements_sequence():
        field = fields[name]
        primitive = is_primitive_type(field)
        out[name] = ElementInfo(
            name, get_fhir_type_name(field, prefix=_VERSION_PREFIX), is_list_type(field), primitive
        )
    return out


@functools.cache
def is_resource_type(type_name: str) -> bool:
    try:
        model = get_fhir_model_class(type_name)
    except (ValueError, KeyError):
        return False
    return issubclass(model, Resource) and model.get_resource_type() == type_name


def _loc(parent: str, name: str, index: int | None = None) -> str:
    step = f"{parent}.{name}" if parent else name
    return step if index is None else f"{step}[{index}]"


# --- JSON ----------------------------------------------------------------------------------


class _Object(dict[str, Any]):
    """A JSON object that remembers a key given twice (seen by the depth walk, with its path)."""

    duplicate: str | None = None


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Object()
    for key, value in pairs:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _read_json(data: bytes, max_depth: int) -> dict[str, Any]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FhirReadError(
            STRUCTURE, f"JSON is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except RecursionError:
        raise FhirReadError(TOO_COSTLY, f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise FhirReadError(
            STRUCTURE, f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:  # NaN/Infinity, an integer of more than 4300 digits
        raise FhirReadError(STRUCTURE, f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FhirReadError(STRUCTURE, "a FHIR resource is a JSON object, not an array or scalar")
    _check_json_tree(value, max_depth)
    if _SURROGATE_ESCAPE.search(text):  # only an escape can give one: UTF-8 cannot encode it
        _check_unicode(value)
    plain: dict[str, Any] = _plain(value)
    return plain


def _check_json_tree(root: dict[str, Any], max_depth: int) -> None:
    """Depth and duplicate keys, iteratively (a deep input must not exhaust the stack)."""
    rtype = root.get("resourceType")
    stack: list[tuple[Any, str, int]] = [(root, rtype if isinstance(rtype, str) else "", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > max_depth:
            raise FhirReadError(TOO_COSTLY, f"JSON nested deeper than {max_depth} levels", where)
        if isinstance(node, dict):
            if isinstance(node, _Object) and node.duplicate is not None:
                raise FhirReadError(STRUCTURE, f"the key {node.duplicate!r} is given twice", where)
            for key, child in node.items():
                if isinstance(child, dict | list):
                    step = _loc(where, key)
                    if key == "resource" and isinstance(child, dict):
                        inner = child.get("resourceType")
                        if isinstance(inner, str):
                            step = f"{step}.ofType({inner})"
                    stack.append((child, step, depth + 1))
        else:
            for index, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, f"{where}[{index}]", depth + 1))


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(root: dict[str, Any]) -> None:
    """Refuse a string holding a lone surrogate (``"\\ud800"``): valid JSON syntax, but not
    Unicode text, so it could be neither stored, hashed nor answered (JSON RFC 8259 8.2)."""
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        texts: list[tuple[str, str]] = []
        if isinstance(node, dict):
            for key, child in node.items():
                texts.append((key, where))
                stack.append((child, _loc(where, key) if isinstance(key, str) else where))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, str):
            texts.append((node, where))
        for text, at in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise FhirReadError(
                    STRUCTURE, "a string holds a lone surrogate: it is not Unicode text", at
                ) from None


def _plain(node: Any) -> Any:
    """The tree with plain dicts (the duplicate marker class is an implementation detail)."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def to_json(resource: dict[str, Any], *, pretty: bool = False) -> bytes:
    """UTF-8 JSON, characters kept (not escaped), element order as given."""
    try:
        text = json.dumps(
            resource,
            ensure_ascii=False,
            allow_nan=False,
            indent=1 if pretty else None,
            separators=None if pretty else (",", ":"),
        )
    except (TypeError, ValueError) as exc:
        raise FhirWriteError(f"not serialisable as JSON: {exc}") from None
    return text.encode("utf-8")


# --- XML reading ----------------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    # Entities stay unresolved and no DTD is loaded or fetched; a DOCTYPE is refused before
    # this parser runs at all, so these settings are the second line of defence.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        collect_ids=False,
        encoding="utf-8",
    )


def _check_xml_bytes(data: bytes) -> None:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4]:
        raise FhirReadError(STRUCTURE, "FHIR XML must be UTF-8 (found UTF-16 or UTF-32)")
    declared = _ENCODING_DECL.match(data[:200])
    if declared and declared.group(1).lower().replace(b"_", b"-") not in (b"utf-8", b"utf8"):
        raise FhirReadError(
            STRUCTURE, f"FHIR XML must be UTF-8, not {declared.group(1).decode('ascii')}"
        )
    # A DOCTYPE is how entity bombs and external entities (XXE) get in; FHIR XML never needs one.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise FhirReadError(SECURITY, "XML with a DOCTYPE or entity declaration is refused")


def _read_xml(data: bytes, max_depth: int) -> dict[str, Any]:
    _check_xml_bytes(data)
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        message = str(exc)
        code = TOO_COSTLY if "depth" in message.lower() else STRUCTURE
        raise FhirReadError(code, f"malformed XML: {message}") from None
    if root.getroottree().docinfo.doctype:
        raise FhirReadError(SECURITY, "XML with a DOCTYPE is refused")
    namespace, name = _qname(root)
    if namespace != FHIR_NS:
        raise FhirReadError(
            STRUCTURE, f"the root element <{name}> is not in the FHIR namespace {FHIR_NS}"
        )
    return _XmlReader(max_depth).resource(root, name, 1)


def _qname(element: Any) -> tuple[str, str]:
    q = etree.QName(element)
    return q.namespace or "", q.localname


def _primitive_value(type_name: str, text: str) -> Any:
    """The JSON value of an XML ``value`` attribute; a malformed one stays a string (the
    validator then reports it with its location)."""
    if type_name == "boolean":
        return {"true": True, "false": False}.get(text, text)
    if type_name in _INTEGER_TYPES:
        return int(text) if _INTEGER.fullmatch(text) else text
    if type_name == "decimal" and _DECIMAL.fullmatch(text):
        if _INTEGER.fullmatch(text):
            return int(text)
        number = float(text)
        return number if math.isfinite(number) else text
    return text


class _XmlReader:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth

    def resource(self, element: Any, name: str, depth: int) -> dict[str, Any]:
        elements = type_elements(name) if is_resource_type(name) else None
        if elements is None:
            raise FhirReadError(STRUCTURE, f"<{name}> is not a FHIR R4 resource type")
        out: dict[str, Any] = {"resourceType": name}
        out.update(self.children(element, name, elements, name, depth, is_resource=True))
        return out

    def children(
        self,
        element: Any,
        type_name: str,
        elements: dict[str, ElementInfo],
        where: str,
        depth: int,
        *,
        is_resource: bool = False,
        attributes: bool = True,
    ) -> dict[str, Any]:
        if depth > self.max_depth:
            raise FhirReadError(TOO_COSTLY, f"XML nested deeper than {self.max_depth}", where)
        if element.text is not None and element.text.strip():
            raise FhirReadError(STRUCTURE, "text content is not allowed in FHIR XML", where)
        values: dict[str, Any] = {}
        exts: dict[str, Any] = {}
        if attributes and not is_resource:
            for attr, value in element.attrib.items():
                # Datatypes carry ``id`` (and an extension its ``url``) as attributes.
                values[etree.QName(attr).localname] = value
        for child in element:
            if child.tail is not None and child.tail.strip():
                raise FhirReadError(STRUCTURE, "text content is not allowed in FHIR XML", where)
            namespace, name = _qname(child)
            info = elements.get(name)
            if info is not None and info.type_name == "xhtml":
                if namespace != XHTML_NS:
                    raise FhirReadError(STRUCTURE, f"<{name}> must be XHTML", _loc(where, name))
                values[name] = etree.tostring(child, encoding="unicode", with_tail=False)
                continue
            if namespace != FHIR_NS:
                raise FhirReadError(
                    STRUCTURE, f"<{name}> is not in the FHIR namespace", _loc(where, name)
                )
            if info is None:  # unknown: kept so that the validator names it
                values[name] = self.unknown(child, depth + 1)
                continue
            index = len(values.get(name, [])) if info.is_list else None
            here = _loc(where, name, index)
            if info.primitive:
                value, ext = self.primitive(child, info, here, depth + 1)
            else:
                value, ext = self.complex(child, info, here, depth + 1), None
            if info.is_list:
                values.setdefault(name, []).append(value)
                exts.setdefault(name, []).append(ext)
            else:
                values[name] = value
                exts[name] = ext
        return self.ordered(elements, values, exts)

    @staticmethod
    def ordered(
        elements: dict[str, ElementInfo], values: dict[str, Any], exts: dict[str, Any]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in elements:
            ext = exts.get(name)
            if name in values and values[name] is not None:
                if isinstance(values[name], list) and all(v is None for v in values[name]):
                    if any(e is not None for e in ext or ()):
                        out[name] = values[name]
                else:
                    out[name] = values[name]
            if isinstance(ext, list):
                if any(e is not None for e in ext):
                    out[f"_{name}"] = ext
            elif ext is not None:
                out[f"_{name}"] = ext
        for name, value in values.items():  # unknown elements and attributes, after the known
            if name not in elements:
                out[name] = value
        return out

    def primitive(
        self, child: Any, info: ElementInfo, where: str, depth: int
    ) -> tuple[Any, dict[str, Any] | None]:
        raw = child.get("value")
        value = None if raw is None else _primitive_value(info.type_name, raw)
        ext: dict[str, Any] = {}
        if child.get("id") is not None:
            ext["id"] = child.get("id")
        for attr in child.attrib:
            if attr not in ("value", "id"):
                ext[etree.QName(attr).localname] = child.get(attr)
        if len(child):
            elements = type_elements("Element")
            assert elements is not None
            ext.update(self.children(child, "Element", elements, where, depth, attributes=False))
        return value, ext or None

    def complex(self, child: Any, info: ElementInfo, where: str, depth: int) -> Any:
        if info.type_name == "Resource":
            inner = [c for c in child]
            if len(inner) != 1:
                raise FhirReadError(
                    STRUCTURE, "a resource element holds exactly one resource", where
                )
            namespace, name = _qname(inner[0])
            if namespace != FHIR_NS:
                raise FhirReadError(STRUCTURE, f"<{name}> is not in the FHIR namespace", where)
            return self.resource(inner[0], name, depth + 1)
        elements = type_elements(info.type_name)
        if elements is None:
            return self.unknown(child, depth)
        return self.children(child, info.type_name, elements, where, depth)

    def unknown(self, element: Any, depth: int) -> Any:
        if depth > self.max_depth:
            raise FhirReadError(TOO_COSTLY, f"XML nested deeper than {self.max_depth}")
        if len(element) == 0 and element.get("value") is not None:
            return element.get("value")
        out: dict[str, Any] = dict(element.attrib)
        for child in element:
            out[_qname(child)[1]] = self.unknown(child, depth + 1)
        return out


# --- XML writing ----------------------------------------------------------------------------


def to_xml(resource: dict[str, Any], *, pretty: bool = False) -> bytes:
    """The XML form of a resource given in its JSON form (UTF-8, with an XML declaration)."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        raise FhirWriteError(f"{rtype!r} is not a FHIR R4 resource type")
    root = etree.Element(f"{{{FHIR_NS}}}{rtype}", nsmap={None: FHIR_NS})
    _XmlWriter().resource(root, resource, rtype)
    if pretty:
        _indent(root, 0)
    try:
        return bytes(etree.tostring(root, encoding="UTF-8", xml_declaration=True))
    except ValueError as exc:
        raise FhirWriteError(f"not serialisable as XML: {exc}") from None


def _indent(element: Any, level: int) -> None:
    """Indent FHIR elements only: whitespace inside a narrative would change its content (lxml's
    own pretty printing indents the XHTML too)."""
    children = list(element)
    if not children:
        return
    element.text = "\n" + "  " * (level + 1)
    for child in children:
        if etree.QName(child).namespace == FHIR_NS:
            _indent(child, level + 1)
        child.tail = "\n" + "  " * (level + 1)
    children[-1].tail = "\n" + "  " * level


def _attribute_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FhirWriteError("a decimal must be finite", where)
        return repr(value)
    raise FhirWriteError(f"a primitive value, not {type(value).__name__}", where)


class _XmlWriter:
    def resource(self, element: Any, resource: dict[str, Any], rtype: str) -> None:
        elements = type_elements(rtype)
        assert elements is not None
        self.fill(element, resource, elements, rtype, is_resource=True)

    def fill(
        self,
        element: Any,
        obj: Any,
        elements: dict[str, ElementInfo],
        where: str,
        *,
        is_resource: bool = False,
        is_extension: bool = False,
    ) -> None:
        if not isinstance(obj, dict):
            raise FhirWriteError("an object is expected here", where)
        for key in obj:
            base = key[1:] if key.startswith("_") else key
            if key != "resourceType" and base not in elements:
                raise FhirWriteError(f"unknown element {key!r}", _loc(where, key))
        for name, info in elements.items():
            value, ext = obj.get(name), obj.get(f"_{name}")
            if value is None and ext is None:
                continue
            here = _loc(where, name)
            if not is_resource and (name == "id" or (is_extension and name == "url")):
                element.set(name, _attribute_text(value, here))
                continue
            if info.is_list:
                values = value if isinstance(value, list) else [] if value is None else None
                extensions = ext if isinstance(ext, list) else [] if ext is None else None
                if values is None or extensions is None:
                    raise FhirWriteError("an array is expected here", here)
                for index in range(max(len(values), len(extensions))):
                    item = values[index] if index < len(values) else None
                    item_ext = extensions[index] if index < len(extensions) else None
                    self.element(element, info, item, item_ext, _loc(where, name, index))
            else:
                self.element(element, info, value, ext, here)

    def element(self, parent: Any, info: ElementInfo, value: Any, ext: Any, where: str) -> None:
        if value is None and ext is None:
            return
        if info.type_name == "xhtml":
            parent.append(_xhtml(value, where))
            return
        child = etree.SubElement(parent, f"{{{FHIR_NS}}}{info.name}")
        if info.primitive:
            if value is not None:
                child.set("value", _attribute_text(value, where))
            if ext is not None:
                elements = type_elements("Element")
                assert elements is not None
                self.fill(child, ext, elements, where)
            return
        if info.type_name == "Resource":
            rtype = value.get("resourceType") if isinstance(value, dict) else None
            if not isinstance(rtype, str) or not is_resource_type(rtype):
                raise FhirWriteError(f"{rtype!r} is not a FHIR R4 resource type", where)
            inner = etree.SubElement(child, f"{{{FHIR_NS}}}{rtype}")
            self.resource(inner, value, rtype)
            return
        elements = type_elements(info.type_name)
        if elements is None:
            raise FhirWriteError(f"no model for the type {info.type_name}", where)
        self.fill(child, value, elements, where, is_extension=info.type_name == "Extension")


def _xhtml(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        raise FhirWriteError("the narrative div is a string of XHTML", where)
    try:
        div = etree.fromstring(value.encode("utf-8"), parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise FhirWriteError(f"the narrative is not well-formed XHTML: {exc}", where) from None
    if etree.QName(div).namespace != XHTML_NS:
        raise FhirWriteError("the narrative div is not in the XHTML namespace", where)
    return div


# --- entry point ----------------------------------------------------------------------------


def detect_format(data: bytes) -> str:
    """``json`` or ``xml`` from the first non-space byte (after a UTF-8 byte order mark)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FhirReadError(STRUCTURE, "FHIR JSON and XML must be UTF-8 (found UTF-16)")
    head = data[:4096].lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith((b"{", b"[")):  # an array is JSON too, refused by the JSON reader
        return "json"
    if head.startswith(b"<"):
        return "xml"
    if not head:
        raise FhirReadError(STRUCTURE, "the input is empty")
    raise FhirReadError(STRUCTURE, "neither JSON (starts with '{') nor XML (starts with '<')")


_READERS: dict[str, Callable[[bytes, int], dict[str, Any]]] = {
    "json": _read_json,
    "xml": _read_xml,
}


def read_resource(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> dict[str, Any]:
    """The JSON form of a resource given as JSON or XML bytes.

    Raises :class:`FhirReadError` for input that is too large (checked before parsing), too
    deep, malformed, not a resource, or that carries a DOCTYPE.
    """
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    try:
        return _READERS[detect_format(data)](data, max_depth)
    except FhirReadError:
        raise
    except (RecursionError, MemoryError) as exc:  # last resort: still a typed answer
        raise FhirReadError(TOO_COSTLY, f"the input is too costly to read: {exc!r}") from None
    except Exception as exc:  # a reader bug must not become a traceback
        raise FhirReadError(PROCESSING, f"the input could not be read: {exc!r}") from None
