"""DICOMweb gateway (option A) and edge gateway (option C)."""
