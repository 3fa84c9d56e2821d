"""Image archive sources and the mapping of DICOM headers to the study index."""
