"""The OpenAPI document of a DICOMweb gateway (option A or the edge), served without a token at
``<public base>/openapi.json`` (e.g. ``/dicomweb/openapi.json``).

It describes the QIDO-RS and WADO-RS resources the gateway serves (PS3.18 10.4 and 10.6), the
bearer token they need, and the DICOMweb status of every refusal (a status code with a
``Warning: 299`` header and a short text). The gateway routes every path through one handler
(:mod:`ncp.gateway.app`), so this document is written here rather than read from routes; a test
asks every path and method of it (schemathesis). Decision record:
``docs/decisions/0017-openapi-documents.md``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ncp import __version__

DICOM_JSON = "application/dicom+json"
_UID = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 64}
_BEARER: list[dict[str, list[str]]] = [{"imageAccess": []}]

_QIDO_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "Modality",
    "StudyDescription",
    "PatientID",
    "includefield",
    "fuzzymatching",
)

_REFUSALS = {
    "400": "a path segment that is not a UID, a query the gateway does not take",
    "401": "no valid image access token for this gateway",
    "403": "the token does not cover this study or patient",
    "404": "nothing of that name in a study the token covers",
    "405": "only GET and HEAD are served",
    "406": "no representation the caller accepts can be served",
    "500": "the gateway failed (the request id is in X-Request-ID and the audit trail)",
    "502": "the archive answered something that is not what was asked",
    "503": "busy or the archive is unavailable: retry after Retry-After seconds",
}


def _param(name: str, where: str = "query", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string", "maxLength": 1024},
    }


def _responses(ok: str, media: str) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": ok, "content": {media: {}}}}
    for status, text in _REFUSALS.items():
        out[status] = {
            "description": text,
            "headers": {"Warning": {"schema": {"type": "string"}}},
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    return out


def gateway_openapi(public_base: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway at ``public_base``."""
    parts = urlsplit(public_base)
    root = parts.path.rstrip("/")
    paths: dict[str, Any] = {}

    def add(path: str, summary: str, params: list[dict[str, Any]], media: str) -> None:
        paths[root + path] = {
            "get": {
                "summary": summary,
                "security": _BEARER,
                "parameters": [
                    *params,
                    _param("X-Request-ID", "header", {"type": "string", "maxLength": 128}),
                ],
                "responses": _responses(summary, media),
            }
        }

    study, series, sop = (_param(n, "path", _UID) for n in ("study", "series", "instance"))
    qido = [_param(k) for k in _QIDO_KEYS] + [
        _param("limit", schema={"type": "integer", "minimum": 0}),
        _param("offset", schema={"type": "integer", "minimum": 0}),
    ]
    multipart = 'multipart/related; type="application/dicom"'
    add("/studies", "QIDO-RS: the token's studies", qido, DICOM_JSON)
    add("/series", "QIDO-RS: series of the token's studies", qido, DICOM_JSON)
    add("/instances", "QIDO-RS: instances of the token's studies", qido, DICOM_JSON)
    add("/studies/{study}/series", "QIDO-RS: a study's series", [study, *qido], DICOM_JSON)
    add("/studies/{study}/instances", "QIDO-RS: a study's instances", [study, *qido], DICOM_JSON)
    add(
        "/studies/{study}/series/{series}/instances",
        "QIDO-RS: a series' instances",
        [study, series, *qido],
        DICOM_JSON,
    )
    add("/studies/{study}", "WADO-RS: a study", [study], multipart)
    add("/studies/{study}/metadata", "WADO-RS: a study's metadata", [study], DICOM_JSON)
    add("/studies/{study}/series/{series}", "WADO-RS: a series", [study, series], multipart)
    add(
        "/studies/{study}/series/{series}/metadata",
        "WADO-RS: a series' metadata",
        [study, series],
        DICOM_JSON,
    )
    add(
        "/studies/{study}/series/{series}/instances/{instance}",
        "WADO-RS: an instance",
        [study, series, sop],
        multipart,
    )
    add(
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
        "WADO-RS: an instance's metadata",
        [study, series, sop],
        DICOM_JSON,
    )
    frames = _param("frames", "path", {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"})
    add(
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
        "WADO-RS: frames of an instance",
        [study, series, sop, frames],
        'multipart/related; type="application/octet-stream"',
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ncp DICOMweb gateway",
            "version": __version__,
            "summary": "DICOM PS3.18 QIDO-RS and WADO-RS of the studies an image access "
            "token names",
        },
        "servers": [{"url": f"{parts.scheme}://{parts.netloc}"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "imageAccess": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWS (typ image-access+jwt, ES256), issued by "
                    "$imaging-access on the standard channel",
                }
            }
        },
    }
