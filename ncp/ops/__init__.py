"""Operations: what an operator runs and watches around a node's roles.

``checks`` (``ncp check-config``, also run by ``ncp serve`` at start), ``logs`` (text or JSON
lines with request ids, no patient data), ``observe`` (every listener's requests: id, latency by
route template, one log line), ``metrics`` (Prometheus), ``health`` (/healthz, /readyz and the
operations listener) and ``runner`` (the servers of a process together, stopped gracefully).
See docs/operations.md.
"""
