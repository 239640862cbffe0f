# -*- test-case-name: tests.test_cli -*-
"""
The C{pushie} command: a client for people and scripts.

  pushie publish CHANNEL JSON    publish one message (prints the offset)
  pushie token --sub ID --channel NAME [--channel ...] [--ttl S] [--info JSON]
                                 print a subscriber token signed with the first
                                 configured secret (from the secrets file or
                                 PUSHIE_SUBSCRIBER_SECRETS, never from argv)
  pushie version                 print the version

C{pushie serve} is not here: the daemon runs under twistd (C{twistd -n pushie}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from pushie import __version__


def _publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        print('pushie publish: DATA must be JSON, for example \'{"text": "hi"}\' or \'"hi"\'', file=sys.stderr)
        return 2
    body: dict[str, object] = {"channel": args.channel, "data": data}
    if args.event:
        body["event"] = args.event
    request = urllib.request.Request(
        args.url.rstrip("/") + "/publish",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    key = os.environ.get("PUSHIE_PUBLISHER_KEY")
    if key:
        request.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as e:
        print(f"pushie publish: {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"pushie publish: cannot reach {args.url}: {e.reason}", file=sys.stderr)
        return 1


def _token(args: argparse.Namespace) -> int:
    import time

    from pushie.auth import first_secret, mint_token
    from pushie.config import ConfigError, load_settings

    try:
        command_line = {"subscriber_secrets_file": args.subscriber_secrets_file}
        settings = load_settings(command_line, os.environ, args.config)
    except ConfigError as e:
        print(f"pushie token: {e}", file=sys.stderr)
        return 2
    secret = first_secret(settings)
    if secret is None:
        print(
            "pushie token: no subscriber secret configured: set PUSHIE_SUBSCRIBER_SECRETS or "
            "--subscriber-secrets-file (or subscriber_secrets_file in --config)",
            file=sys.stderr,
        )
        return 2
    info = None
    if args.info is not None:
        try:
            info = json.loads(args.info)
        except ValueError:
            print('pushie token: --info must be JSON, for example \'{"name": "Ann"}\'', file=sys.stderr)
            return 2
    if args.ttl <= 0:
        print("pushie token: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    print(mint_token(secret, args.sub, args.channel, args.ttl, time.time(), info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pushie",
        description="Pushie's command-line client.  Run the daemon with: twistd -n pushie",
    )
    parser.add_argument("--version", action="version", version=f"pushie {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    publish = commands.add_parser("publish", help="publish one message to a channel")
    publish.add_argument("channel")
    publish.add_argument("data", help="the message data, as JSON")
    publish.add_argument("--event", help="event name (default: message)")
    publish.add_argument(
        "--url",
        default=os.environ.get("PUSHIE_URL", "http://127.0.0.1:8080"),
        help="the daemon's base URL (environment: PUSHIE_URL; default http://127.0.0.1:8080)",
    )
    publish.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    publish.set_defaults(run=_publish)
    token = commands.add_parser("token", help="print a subscriber token (JWT) for an app or a test")
    token.add_argument("--sub", required=True, help="the user id the token is for")
    token.add_argument(
        "--channel",
        action="append",
        required=True,
        help="a channel it grants; 'prefix*' grants a prefix, '*' everything (repeatable)",
    )
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    token.add_argument("--info", help="JSON shown to other members of presence channels")
    token.add_argument("--config", help="TOML settings file (as for the daemon)")
    token.add_argument("--subscriber-secrets-file", help="file of subscriber secrets; the first line signs")
    token.set_defaults(run=_token)
    commands.add_parser("version", help="print the version").set_defaults(run=lambda a: print(__version__) or 0)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
