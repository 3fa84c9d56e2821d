"""A :class:`~ncp.consumer.model.StudyManifest` as JSON, the way a job keeps it in B's database,
so that a resumed job verifies against exactly the manifest it started with."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ncp.consumer.model import ManifestInstance, ManifestSeries, StudyManifest
from ncp.security.claims import PatientRef

FORMAT = 1


def manifest_to_json(manifest: StudyManifest) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "study": manifest.study_uid,
            "patient": manifest.patient.to_json(),
            "size": manifest.size,
            "accession": manifest.accession,
            "description": manifest.description,
            "started": manifest.started.isoformat() if manifest.started else None,
            "series": [
                {
                    "uid": s.series_uid,
                    "modality": s.modality,
                    "endpoint": s.endpoint,
                    "instances": [
                        [i.sop_instance_uid, i.sop_class_uid, i.number, i.frames, i.size]
                        for i in s.instances
                    ],
                }
                for s in manifest.series
            ],
        },
        separators=(",", ":"),
    )


def manifest_from_json(text: str) -> StudyManifest:
    data: dict[str, Any] = json.loads(text)
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown manifest format {data.get('format')!r}")
    started = data.get("started")
    return StudyManifest(
        study_uid=data["study"],
        patient=PatientRef(data["patient"]["system"], data["patient"]["value"]),
        size=data.get("size"),
        accession=data.get("accession"),
        description=data.get("description"),
        started=datetime.fromisoformat(started) if started else None,
        series=tuple(
            ManifestSeries(
                series_uid=s["uid"],
                modality=s.get("modality"),
                endpoint=s.get("endpoint"),
                instances=tuple(
                    ManifestInstance(
                        sop_instance_uid=i[0],
                        sop_class_uid=i[1],
                        number=i[2],
                        frames=i[3],
                        size=i[4],
                    )
                    for i in s["instances"]
                ),
            )
            for s in data["series"]
        ),
    )
