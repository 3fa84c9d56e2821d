"""Reading the ``Parameters`` resource of an operation from a peer, whatever shape it has.

A body that parsed as JSON may still hold anything where FHIR expects an object or a list: a
``parameter`` of ``[[null]]``, ``"x"`` or ``1.5``, a ``name`` that is a list. The operations read
their input through these functions, which check the shape before any value is used and refuse
with a 400 OperationOutcome naming the element, so that no shape of JSON can reach code that
assumes another (issue 13: such bodies were 500s, unaudited).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ncp.fhir.http import FhirHttpError


def _invalid(what: str, where: str) -> FhirHttpError:
    return FhirHttpError(400, "structure", what, expression=where)


def parameters_of(body: Any, operation: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Each parameter of a Parameters resource as (name, location, the parameter object)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirHttpError(
            400, "invalid", f"{operation} takes a Parameters resource", expression="resourceType"
        )
    for i, param in enumerate(object_list(body.get("parameter"), "Parameters.parameter")):
        where = f"Parameters.parameter[{i}]"
        name = param.get("name")
        if not isinstance(name, str):
            raise _invalid("a parameter's name is a string", f"{where}.name")
        yield name, where, param


def object_list(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` as a list of JSON objects (absent: empty), or a 400 naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(f"{where.rsplit('.', 1)[-1]} is a list of objects", where)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _invalid("each item is a JSON object", f"{where}[{i}]")
    return value


def optional_text(value: Any, where: str) -> str | None:
    """``value`` when it is a string (absent: None), or a 400 naming ``where``."""
    if value is None or isinstance(value, str):
        return value
    raise _invalid(f"{where.rsplit('.', 1)[-1]} is a string", where)


def text_list(value: Any, where: str) -> list[str]:
    """``value`` as a list of strings (absent: empty), or a 400 naming ``where``."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{where.rsplit('.', 1)[-1]} is a list of strings", where)
    return value
