"""Building and reading FHIR R4 resources."""
