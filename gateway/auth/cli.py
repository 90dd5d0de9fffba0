"""python -m gateway users|tokens ...: bootstrap and manage users and API tokens without a running gateway.

    python -m gateway users add EMAIL --role admin|client [--password-stdin]
    python -m gateway users list
    python -m gateway tokens create --user EMAIL --description TEXT [--requests-per-second R] [--tokens-per-minute N]
    python -m gateway tokens list [--user EMAIL]
    python -m gateway tokens revoke TOKEN_ID

`tokens create` prints the new token alone on stdout, so a script can capture it; it is never shown again.
Every command reads the same --run-dir / --auth-database (and EMBED_RUN_DIR / EMBED_AUTH_DATABASE) as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from gateway.auth.store import ROLES, Limits, StoreUnavailable, UnknownUser, UserExists, open_store
from gateway.ops.settings import Settings, auth_store_location

COMMANDS = ("users", "tokens")


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    # Where the store is, as the server takes it; accepted after any command.
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--run-dir", type=Path, default=Path(environ.get("EMBED_RUN_DIR", Settings.run_dir)))
    store.add_argument("--auth-database", default=environ.get("EMBED_AUTH_DATABASE", ""), help="SQLite path or postgresql:// URL")
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Manage the gateway's users and API tokens.")
    commands = parser.add_subparsers(dest="command", required=True)

    users = commands.add_parser("users").add_subparsers(dest="action", required=True)
    add = users.add_parser("add", help="add a user", parents=[store])
    add.add_argument("email")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--password-stdin", action="store_true", help="read the login password from the first line of stdin")
    users.add_parser("list", help="list users", parents=[store])

    tokens = commands.add_parser("tokens").add_subparsers(dest="action", required=True)
    create = tokens.add_parser("create", help="mint a token and print it alone on stdout", parents=[store])
    create.add_argument("--user", required=True)
    create.add_argument("--description", required=True)
    create.add_argument("--requests-per-second", type=float)
    create.add_argument("--tokens-per-minute", type=int)
    listing = tokens.add_parser("list", help="list tokens' metadata (never the tokens)", parents=[store])
    listing.add_argument("--user")
    revoke = tokens.add_parser("revoke", help="revoke a token by id", parents=[store])
    revoke.add_argument("token_id", type=int)
    return parser


def _run(args: argparse.Namespace, store) -> str:
    """What the command prints on success."""
    if args.command == "users" and args.action == "add":
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
        if args.password_stdin and not password:
            raise ValueError("--password-stdin read an empty password")
        user = store.add_user(args.email, args.role, password)
        return f"added {user.email} ({user.role})"
    if args.command == "users":
        return "\n".join(f"{user.email}\t{user.role}" for user in store.users())
    if args.action == "create":
        limits = Limits(args.requests_per_second, args.tokens_per_minute)
        _, secret = store.create_token(args.user, args.description, limits)
        return secret
    if args.action == "list":
        return "\n".join(json.dumps(token.to_json()) for token in store.tokens(args.user))
    if not store.revoke(args.token_id):
        raise ValueError(f"no live token {args.token_id}")
    return f"revoked token {args.token_id}"


def main(argv: list[str], environ: dict[str, str] | None = None) -> int:
    args = _parser(os.environ if environ is None else environ).parse_args(argv)
    try:
        store = open_store(auth_store_location(args.run_dir, args.auth_database))
    except StoreUnavailable as error:
        print(f"gateway: the token store is unavailable: {error}", file=sys.stderr)
        return 1
    try:
        output = _run(args, store)
    except UserExists as error:
        print(f"gateway: user {error} already exists", file=sys.stderr)
        return 1
    except UnknownUser as error:
        print(f"gateway: no user {error}; add it with: python -m gateway users add EMAIL --role client", file=sys.stderr)
        return 1
    except (ValueError, StoreUnavailable) as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if output:
        print(output)
    return 0
