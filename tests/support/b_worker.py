"""Country B's ``ncp`` as a process of its own, with the stand-in peer client:

    python -m tests.support.b_worker A_DESC_JSON ncp-arguments...

runs ``ncp.cli.main(ncp-arguments)`` with ``ncp.consumer.jobs_command.WIRING`` reaching node A
through :class:`tests.support.peer_stub.NodeAPeer` (A's description as JSON, ``NodeADesc``). The
fault tests kill such processes with SIGKILL and start them again.
"""

from __future__ import annotations

import sys

from ncp.cli import main
from ncp.consumer import jobs_command
from tests.support.peer_stub import NodeADesc, NodeAPeer, StubWiring


def run(argv: list[str]) -> int:
    desc = NodeADesc.from_json(argv[0])
    jobs_command.WIRING = lambda node: StubWiring(None, NodeAPeer(desc))
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
