# -*- test-case-name: tests.test_cli -*-
"""
The C{pushie} command: a client for people and scripts.

  pushie publish CHANNEL JSON    publish one message (prints the offset)
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
    commands.add_parser("version", help="print the version").set_defaults(run=lambda a: print(__version__) or 0)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
