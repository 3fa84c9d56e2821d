"""Generated example data: DICOM studies and imaging reports."""
