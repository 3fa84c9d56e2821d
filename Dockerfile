# syntax=docker/dockerfile:1
# The ncp image: a node (`ncp serve`, the default command) or an edge gateway (`ncp edge`).
# docs/operations.md says how to run it; tests/test_deploy_files.py checks this file, runs its
# command outside Docker against a generated config and probes its health check.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the package and its dependencies in a virtual environment --------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/ncp
COPY pyproject.toml README.md ./
COPY ncp ./ncp
RUN /opt/ncp/bin/pip install --no-cache-dir ".[postgres]"

# -- run: the environment, the conformance resources, an unprivileged user ---------------------
FROM ${PYTHON_IMAGE} AS run
RUN groupadd --system --gid 10001 ncp \
 && useradd --system --uid 10001 --gid ncp --home-dir /var/lib/ncp --create-home \
            --shell /usr/sbin/nologin ncp
COPY --from=build /opt/ncp /opt/ncp
# Profiles and terminology are read from NCP_CONFORMANCE_DIR (ncp/fhir/conformance.py).
COPY profiles /usr/share/ncp/profiles
COPY terminology /usr/share/ncp/terminology
# The operations listener on 9100 (node and edge), loopback: the health check below asks it.
ENV PATH=/opt/ncp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NCP_CONFORMANCE_DIR=/usr/share/ncp \
    NCP_LISTEN__OPS_PORT=9100 \
    NCP_EDGE_LISTEN__OPS_PORT=9100
USER ncp
WORKDIR /var/lib/ncp
# An empty archive folder for a node that holds no images of its own (country B in the pair).
RUN mkdir -p /var/lib/ncp/archive
# /etc/ncp: the node's config, keys and trust list (read-only); /var/lib/ncp: its data.
VOLUME ["/etc/ncp", "/var/lib/ncp"]
EXPOSE 8443 8444 8445
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["ncp"]
CMD ["serve", "--config", "/etc/ncp/node.toml", "--log-format", "json"]
