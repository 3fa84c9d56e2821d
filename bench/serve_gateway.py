"""One gateway process for the benches, served as the node and ``ncp edge`` serve it.

    python bench/serve_gateway.py --kind a|edge --port P --public-base URL --jwks FILE --db FILE
        (--archive URL | --folder DIR) [--cert PEM --key PEM] [--index DB] [--no-splice] [--asgi]

``--kind a``: option A's app (``build_gateway_app``: the bench signer's keys from a JWKS file,
audit to a SQLite file, the node's index of the study with ``--index``); ``--kind edge``: ``ncp
edge``'s app (``build_edge_app`` from an ``EdgeSettings``). Both under
``ncp.gateway.server.imaging_server``, the server ``ncp serve`` and ``ncp edge`` run; without
``--cert`` over plain HTTP, and the alternatives measured against the deployed path:
``--no-splice`` (the mover with ``splice=False``), ``--asgi`` (uvicorn's h11 protocol).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COUNTRY = "AT"
"""The country of the benches' signer: the tokens' issuer and the gateways' own."""
PATIENT_ID_ISSUER = "1.2.40.0.10.1.4.3.1"
"""The assigning authority of the bench study's Patient ID, which carries none (as in most real
archives): configured on the archive source, as an operator does (``patient_id_issuer``)."""


def build(args: argparse.Namespace) -> Any:
    from ncp.audit.record import Auditor
    from ncp.config import DicomwebArchive, EdgeSettings, FolderArchive
    from ncp.gateway.access import JwksFileKeys
    from ncp.gateway.app import build_gateway_app
    from ncp.gateway.edge import build_edge_app
    from ncp.gateway.relay import relay
    from ncp.gateway.studyindex import NodeIndex
    from ncp.store.db import make_engine, migrate, session_factory

    archive: Any = (
        FolderArchive(kind="folder", path=Path(args.folder), patient_id_issuer=PATIENT_ID_ISSUER)
        if args.folder
        else DicomwebArchive(kind="dicomweb", url=args.archive, patient_id_issuer=PATIENT_ID_ISSUER)
    )
    if args.kind == "edge":
        settings = EdgeSettings.model_validate(
            {
                "edge": {"country": COUNTRY, "audience": args.public_base, "jwks": args.jwks},
                "archive": archive.model_dump(),
                "tls": {"certificate": args.cert, "key": args.key},
                "database": {"url": f"sqlite:///{args.db}"},
            }
        )
        return build_edge_app(settings)
    engine = make_engine(f"sqlite:///{args.db}")
    migrate(engine)
    extra: dict[str, Any] = {}
    if args.index:
        extra["index"] = NodeIndex(session_factory(make_engine(f"sqlite:///{args.index}")))
    if args.no_splice:
        extra["relay"] = functools.partial(relay, splice=False)
    return build_gateway_app(
        archive=archive,
        public_base=args.public_base,
        issuer=COUNTRY,
        keys=JwksFileKeys(Path(args.jwks), COUNTRY),
        auditor=Auditor(session_factory(engine), country=COUNTRY),
        **extra,
    )


def main() -> None:
    from ncp.gateway.server import TlsFiles, imaging_server

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kind", choices=["a", "edge"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-base", required=True)
    parser.add_argument("--jwks", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--archive", default="")
    parser.add_argument("--folder", default="")
    parser.add_argument("--index", default="", help="the node index database (option A)")
    parser.add_argument("--no-splice", action="store_true", help="the mover with splice=False")
    parser.add_argument("--asgi", action="store_true", help="uvicorn's h11, not RelayH11Protocol")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    args = parser.parse_args()
    tls = TlsFiles(Path(args.cert), Path(args.key)) if args.cert else None
    imaging_server(
        build(args),
        host="127.0.0.1",
        port=args.port,
        tls=tls,
        log_level="warning",
        **({"protocol": "h11"} if args.asgi else {}),
    ).run()


if __name__ == "__main__":
    main()
