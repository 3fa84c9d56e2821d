"""``ncp demo``: the A/B pair on embedded defaults (SQLite, a folder archive, generated data and
test PKIs), running on loopback.

One command prepares a data folder and starts the pair, each service a child process of ``ncp``
as an operator would run it:

- node A (``ncp serve``): the standard channel with mutual TLS, the DICOMweb gateway (option A)
  and the viewer (option B);
- A's edge gateway (``ncp edge``, option C) before the same archive;
- node B (``ncp serve``): its own standard channel, the peer client asking A, the retrieval
  workers (``[retrieval] enabled``) and the HP portal, with demo logins;
- with ``--archive orthanc``, a local Orthanc as A's archive (:mod:`ncp.demo.orthanc`).

Each trusts the other through the trust lists the demo writes. The data folder (``--data``,
default ``demo-data``)::

    dicom/  reports/  manifest.json    generated once (``ncp examples generate``)
    country-a/node.toml                node A's config, rewritten at every start (ports)
    country-a/keys/                    A's test PKI (``ncp keys init``), made once
    country-a/trust.toml               A's trust list: B
    country-a/index.db                 A's study index, reports and audit trail
    country-b/node.toml, trust.toml    node B's config (rewritten at every start) and trust list: A
    country-b/keys/                    B's test PKI; also the ``test_peer`` of demo.json
    country-b/hp.toml                  the HP ``ncp ask --hp`` signs as
    country-b/node-b.db                B's jobs, portal accounts and sessions, audit trail
    country-b/retrieved/               what B's retrieval jobs stored
    edge/edge.toml, edge/tls/          the edge gateway's config and its certificate (A's CA)
    edge/edge-audit.db                 its own audit trail
    orthanc-a/                         --archive orthanc: its config, storage and index
    logs/<service>.stdout|stderr.log   each child's output
    demo.json                          while the services run: each with its role and URLs,
                                       and every file above (:mod:`ncp.demo.describe`)

Ports: ``--base-port N`` (default 8443) gives A's standard channel N, its gateway N+1, the edge
N+2, A's viewer N+3, B's portal N+4, B's standard channel N+5 and the operations listeners of A,
the edge and B N+6..N+8 (:class:`~ncp.demo.layout.Ports`); a port taken stops the demo with an
error naming it; ``--base-port 0`` takes free ports. Ctrl-C (SIGINT) or SIGTERM stops every
child (terminate, wait, kill) and exits 0; if a child dies, the others are stopped and the demo
exits 1 with the child's last stderr lines.
"""

from ncp.demo.command import READY_LINE, cmd_demo, run_demo
from ncp.demo.configs import DemoError
from ncp.demo.layout import PortTaken

__all__ = ["READY_LINE", "DemoError", "PortTaken", "cmd_demo", "run_demo"]
