"""Option B server-side viewer."""
