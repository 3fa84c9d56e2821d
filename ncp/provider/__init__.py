"""Country A side: identification, metadata list, reports, tokens, and the study index."""
