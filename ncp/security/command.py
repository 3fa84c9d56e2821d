"""``ncp keys``: make a test PKI for a node, rotate its signing key.

Wired into the ``ncp`` command by :func:`register`; each handler takes the parsed arguments and
returns an exit code (0 done, 1 failed, 2 usage), so tests call them in-process.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from ncp.errors import NcpError
from ncp.security import pki
from ncp.security.keystore import DEFAULT_CLOCK_SKEW, KeyStore
from ncp.security.trust import fingerprint, format_fingerprint

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> None:
    """Add ``keys init`` and ``keys rotate`` to the ``ncp`` command's sub-commands."""
    keys = subparsers.add_parser("keys", help="a node's TLS and signing keys")
    keys_sub = keys.add_subparsers(metavar="ACTION", required=True)

    init = keys_sub.add_parser(
        "init",
        help="make a TEST PKI: a CA, TLS server and client certificates, a signing key, a JWKS",
        description="Writes a test PKI for one country into a new keys folder (layout in "
        "docs/trust.md). Production nodes put their PKI's files in the same layout instead.",
    )
    init.add_argument("--country", required=True, help="ISO 3166-1 alpha-2 code, e.g. AT")
    init.add_argument("--out", type=Path, required=True, help="the keys folder to create")
    init.add_argument(
        "--names",
        nargs="*",
        default=[],
        metavar="NAME",
        help="extra DNS names or IP addresses of the TLS server certificate "
        "(localhost and 127.0.0.1 are always in it)",
    )
    init.set_defaults(handler=cmd_keys_init)

    rotate = keys_sub.add_parser(
        "rotate",
        help="make a new signing key; the old one stays published until its tokens expired",
    )
    rotate.add_argument("--dir", type=Path, required=True, help="the node's keys folder")
    rotate.add_argument(
        "--max-token-lifetime",
        type=int,
        default=300,
        metavar="SECONDS",
        help="the longest lifetime of a token this node signs (default 300)",
    )
    rotate.add_argument(
        "--clock-skew",
        type=int,
        default=int(DEFAULT_CLOCK_SKEW.total_seconds()),
        metavar="SECONDS",
        help="the clock skew verifiers allow (default 60)",
    )
    rotate.set_defaults(handler=cmd_keys_rotate)

    prune = keys_sub.add_parser(
        "prune", help="withdraw retired signing keys whose tokens have all expired"
    )
    prune.add_argument("--dir", type=Path, required=True, help="the node's keys folder")
    prune.set_defaults(handler=cmd_keys_prune)


def cmd_keys_init(args: argparse.Namespace) -> int:
    country = str(args.country)
    if not re.fullmatch(r"[A-Z]{2}", country):
        print(
            f"ncp keys init: --country {country!r}: an ISO code in capitals, e.g. AT",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        made = pki.init_keys_folder(args.out, country, args.names)
    except NcpError as exc:
        print(f"ncp keys init: {exc}", file=sys.stderr)
        return EXIT_FAILED
    ca = made.ca.certificate
    print(f"test PKI for {country} in {made.directory}")
    print(f"  CA        {made.directory / pki.CA_CERT}  {format_fingerprint(fingerprint(ca))}")
    print(f"  signing   kid {made.kid}")
    print(f"  JWKS      {made.directory / pki.JWKS_JSON}")
    print("Peers trust this node with its ca.pem (tls_ca) and jwks.json (see docs/trust.md).")
    print(f"{pki.CA_KEY} is for making more test certificates only: never deploy it.")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    if args.max_token_lifetime <= 0 or args.clock_skew < 0:
        print("ncp keys rotate: lifetimes must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = KeyStore.load(args.dir)
        old = store.current_signing_key().kid
        kid = store.rotate(
            timedelta(seconds=args.max_token_lifetime),
            clock_skew=timedelta(seconds=args.clock_skew),
        )
    except NcpError as exc:
        print(f"ncp keys rotate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    published = store.published_keys()
    until = published.keys[old].not_after
    print(f"current signing key: {kid}")
    print(f"retired: {old}, published until {until.isoformat() if until else '?'}")
    print(f"{len(published.keys)} keys published in {args.dir / pki.JWKS_JSON}")
    print("Running nodes pick up the new key when they reload their keys folder.")
    return EXIT_OK


def cmd_keys_prune(args: argparse.Namespace) -> int:
    try:
        gone = KeyStore.load(args.dir).prune()
    except NcpError as exc:
        print(f"ncp keys prune: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"withdrawn: {', '.join(gone)}" if gone else "nothing to withdraw")
    return EXIT_OK
