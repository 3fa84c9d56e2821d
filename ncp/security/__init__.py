"""PKI, assertions, tokens, JWKS, mutual TLS."""
