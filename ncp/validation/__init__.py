"""Profile validator."""
