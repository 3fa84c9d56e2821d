"""The implementation guides ``ncp validate --ig NAME`` checks against: the profiles of each
guide that the project transcribes (``profiles/StructureDefinition-hl7eu-*``, ``-ihe-mado-*``;
docs/profiles.md, "Guides"), named by the guide's own canonical URLs.

``--ig`` applies the guide's entry profile of each resource type: the document Bundle profile for
a Bundle (its slices then bring the profiles of its entries), the guide's profile for a resource
given on its own. Types a guide profiles more than once (MADO's two kinds of Endpoint) are left
to the Bundle's slices.
"""

from __future__ import annotations

from dataclasses import dataclass

from ncp.fhir.datatypes import EU_IMAGING, MADO


@dataclass(frozen=True)
class Guide:
    name: str
    title: str
    profiles: tuple[str, ...]
    """Canonical URLs of the guide's profiles ``--ig`` applies, at most one per resource type."""


GUIDES: dict[str, Guide] = {
    "eu-imaging": Guide(
        "eu-imaging",
        "HL7 Europe Imaging Report (hl7.fhir.eu.imaging 1.0.0-ballot, R4)",
        tuple(
            EU_IMAGING + name
            for name in (
                "BundleReportEuImaging",
                "CompositionEuImaging",
                "DiagnosticReportEuImaging",
                "ImagingStudyEuImaging",
                "ServiceRequestOrderEuImaging",
                "ObservationFindingEuImaging",
            )
        ),
    ),
    "mado": Guide(
        "mado",
        "IHE RAD MADO (ihe.rad.mado 0.1.0, R4)",
        tuple(
            MADO + name
            for name in (
                "MadoFhirBundle",
                "MadoComposition",
                "MadoImagingStudy",
                "MadoCreator",
                "MadoPatient",
                "MadoRequestedProcedure",
            )
        ),
    ),
}


def guide_profiles(names: list[str] | tuple[str, ...]) -> list[str]:
    """The profiles of these guides (``KeyError`` for an unknown name)."""
    return [url for name in names for url in GUIDES[name].profiles]


__all__ = ["GUIDES", "Guide", "guide_profiles"]
