"""``$validate`` on the node's FHIR API: ``POST /fhir/$validate``, ``POST /fhir/{type}/$validate``.

The body is the resource itself, or a Parameters resource with a ``resource`` parameter (and
optionally ``profile``), in JSON or XML. The answer is an OperationOutcome, 200 whether or not the
resource is valid (FHIR's $validate reports problems in the outcome); 400 when the input cannot be
read or does not fit the request, 413 when it is larger than the size budget or its validation
takes longer than the time budget, 503 when the node is busy with other heavy work. Bodies are
read in chunks up to the limit, never whole beyond it.

Validating is CPU-heavy (seconds for a few megabytes): it runs off the event loop, on the heavy
work threads of :mod:`ncp.fhir.work` when the app has them, so that other requests (and the
option A gateway sharing the loop) go on being answered meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request, params
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ncp.fhir.http import (
    FhirHttpError,
    error_response,
    fhir_response,
    read_resource_body,
    wants_xml,
)
from ncp.fhir.io import DEFAULT_MAX_BYTES
from ncp.fhir.work import HeavyWork
from ncp.validation.engine import OverBudget, UnknownProfile, Validator
from ncp.validation.issues import Issue, to_operation_outcome

# fhirpathpy keeps global state per evaluation: one validation at a time per process.
_LOCK = threading.Lock()

ValidatorSource = Callable[[], tuple[Validator, threading.Lock]]
"""Where the validator and the lock guarding it come from (a node has its own)."""


def _default_validator() -> tuple[Validator, threading.Lock]:
    return Validator.default(), _LOCK


def router(
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    dependencies: Sequence[params.Depends] = (),
    validator: ValidatorSource = _default_validator,
    work: HeavyWork | None = None,
    time_budget_s: float | None = None,
) -> APIRouter:
    """The ``$validate`` routes. ``dependencies`` guard them (the node requires an HP
    assertion); ``validator`` gives the validator and its lock; ``max_bytes`` and
    ``time_budget_s`` are a request's budget; ``work`` runs the parse and the validation
    (default: the shared thread pool)."""
    api = APIRouter(dependencies=list(dependencies))

    async def validate(request: Request, resource_type: str | None) -> Response:
        try:
            wants_xml(request)  # an unsupported format fails before the body is read
            resource = await read_resource_body(
                request, max_bytes=max_bytes, offload=work.run if work is not None else None
            )
            target, profiles = _unwrap(resource, request.query_params.getlist("profile"))
            if resource_type is not None and target.get("resourceType") != resource_type:
                raise FhirHttpError(
                    400,
                    "invalid",
                    f"the resource is a {target.get('resourceType')!r}, the request names "
                    f"{resource_type!r}",
                    expression="resourceType",
                )
            engine, lock = validator()
            for url in profiles:
                engine.check_profile(url)

            def check() -> list[Issue]:
                with lock:
                    # The clock starts once this validation has the validator.
                    deadline = time.monotonic() + time_budget_s if time_budget_s else None
                    return engine.validate(target, profiles=profiles, deadline=deadline)

            issues = await (work.run(check) if work is not None else run_in_threadpool(check))
            return fhir_response(request, to_operation_outcome(issues))
        except UnknownProfile as exc:
            return error_response(
                request, FhirHttpError(400, "not-supported", str(exc), expression="profile")
            )
        except OverBudget:
            return error_response(
                request,
                FhirHttpError(
                    413,
                    "too-costly",
                    f"the validation did not finish within the time budget of {time_budget_s} s:"
                    " send a smaller resource",
                ),
            )
        except FhirHttpError as exc:
            # Answered here too, so the router works in an app without the node's handlers.
            return error_response(request, exc)

    @api.post("/fhir/$validate")
    async def validate_any(request: Request) -> Response:
        return await validate(request, None)

    @api.post("/fhir/{resource_type}/$validate")
    async def validate_type(request: Request, resource_type: str) -> Response:
        return await validate(request, resource_type)

    return api


def _unwrap(resource: dict[str, Any], profiles: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The resource to validate and the profiles asked for (query and Parameters)."""
    if resource.get("resourceType") != "Parameters":
        return resource, profiles
    target = None
    asked = list(profiles)
    params = resource.get("parameter")
    # Parameters of another shape are not refused: validated as they are, they get the
    # validator's issues (that is what $validate is for).
    for i, param in enumerate(params if isinstance(params, list) else []):
        if not isinstance(param, dict):
            continue
        name = param.get("name")
        if name == "resource":
            target = param.get("resource")
        elif name == "profile":
            url = param.get("valueUri") or param.get("valueCanonical")
            if not isinstance(url, str):
                raise FhirHttpError(
                    400, "invalid", "profile needs a valueUri", expression=f"parameter[{i}]"
                )
            asked.append(url)
    if not isinstance(target, dict):
        # A Parameters resource without a 'resource' parameter is itself what is validated.
        return resource, asked
    return target, asked
