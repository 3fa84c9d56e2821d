"""Audit records and their hash chain."""
