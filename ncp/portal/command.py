"""``ncp portal add-user`` and ``ncp portal users``: the portal's local accounts.

``add-user`` creates an account with what the HP assertion needs and, for a password account,
prints its TOTP secret and ``otpauth://`` URI once (to put into an authenticator app; the demo
prints its test secrets the same way). The password is read from the terminal, or from
``--password-file`` / ``NCP_PORTAL_PASSWORD`` for scripts; never from the command line, where
other users of the machine would see it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from ncp.config import load_settings
from ncp.portal.accounts import AccountError, HpProfile, create_account, list_accounts, otpauth_uri
from ncp.store.db import make_engine, migrate, session_factory

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "portal", help="the HP portal's local accounts"
    )
    actions = parser.add_subparsers(metavar="ACTION", required=True)
    add = actions.add_parser("add-user", help="create an HP account (password + TOTP, or OIDC)")
    add.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    add.add_argument("--username", required=True)
    add.add_argument("--name", required=True, help="the HP's name as people read it")
    add.add_argument("--role", default="221", help="ISCO-08 code (default 221 medical doctors)")
    add.add_argument("--role-display", default="Medical doctors")
    add.add_argument("--organisation", required=True)
    add.add_argument("--organisation-id", required=True, help="a URI, e.g. urn:oid:1.2.3")
    add.add_argument("--point-of-care", required=True)
    add.add_argument("--language", default="en", help="BCP 47, e.g. de-AT")
    add.add_argument("--password-file", type=Path, help="read the password from this file")
    add.add_argument(
        "--oidc-subject", help="link the national identity provider's 'sub' of this HP"
    )
    add.add_argument(
        "--no-password", action="store_true", help="an account that logs in through OIDC only"
    )
    add.add_argument("--json", action="store_true", help="print the result as JSON")
    add.set_defaults(handler=cmd_add_user)
    users = actions.add_parser("users", help="list the accounts")
    users.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    users.add_argument("--json", action="store_true")
    users.set_defaults(handler=cmd_users)
    return parser


def _password(args: argparse.Namespace) -> str | None:
    if args.no_password:
        return None
    if args.password_file is not None:
        text: str = args.password_file.read_text(encoding="utf-8")
        return text.rstrip("\r\n")
    from_env = os.environ.get("NCP_PORTAL_PASSWORD")
    if from_env:
        return from_env
    first: str = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise AccountError("the two passwords differ")
    return first


def cmd_add_user(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    profile = HpProfile(
        username=args.username,
        name=args.name,
        role_code=args.role,
        role_display=args.role_display,
        organisation=args.organisation,
        organisation_id=args.organisation_id,
        point_of_care=args.point_of_care,
        language=args.language,
    )
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        try:
            secret = create_account(
                session_factory(engine),
                profile,
                password=_password(args),
                oidc_subject=args.oidc_subject,
            )
        except AccountError as exc:
            print(f"ncp portal: {exc}", file=sys.stderr)
            return EXIT_USAGE
    finally:
        engine.dispose()
    issuer = settings.node.name or f"NCPeH {settings.node.country}"
    out: dict[str, Any] = {"username": args.username}
    if secret is not None:
        out["totp_secret"] = secret
        out["otpauth_uri"] = otpauth_uri(secret, args.username, issuer)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"created {args.username}")
        if secret is not None:
            print(f"TOTP secret: {secret}")
            print(f"otpauth URI: {out['otpauth_uri']}")
    return EXIT_OK


def cmd_users(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        accounts = list_accounts(session_factory(engine))
    finally:
        engine.dispose()
    rows = [
        {
            "username": a.username,
            "name": a.name,
            "role": a.role_code,
            "organisation": a.organisation,
            "language": a.language,
            "password": a.password_hash is not None,
            "oidc": a.oidc_subject is not None,
            "active": a.active,
            "locked_until": a.locked_until.isoformat() + "Z" if a.locked_until else None,
        }
        for a in accounts
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            login = "+".join(k for k in ("password", "oidc") if r[k])
            locked = f" locked until {r['locked_until']}" if r["locked_until"] else ""
            print(
                f"{r['username']}\t{r['name']}\t{r['role']}\t{r['organisation']}\t{login}{locked}"
            )
    return EXIT_OK
