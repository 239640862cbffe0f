# -*- test-case-name: tests.test_cli -*-
"""
The C{pushie} command: a client for people and scripts.

  pushie publish [--url U] [--key K] CHANNEL [JSON]
                                 publish one message (JSON from the argument,
                                 or from stdin when it is omitted or "-");
                                 prints the daemon's answer (channel, offset, epoch)
  pushie listen [--url U] [--token T] [--once N] CHANNEL...
                                 print every message of the channels as one JSON
                                 line (the envelope); reconnects after drops and
                                 resumes where it was, so nothing is missed
  pushie token --sub ID --channel NAME [--channel ...] [--ttl S] [--info JSON]
                                 print a subscriber token signed with the first
                                 configured secret (from the secrets file or
                                 PUSHIE_SUBSCRIBER_SECRETS, never from argv)
  pushie version                 print the version

Environment: PUSHIE_URL (the daemon, default http://127.0.0.1:8080),
PUSHIE_PUBLISHER_KEY (publish), PUSHIE_TOKEN (listen).  Options win over them.

Exit codes:
  0  done (listen: stopped with Ctrl-C or SIGTERM, or --once reached)
  1  the daemon refused (the message names its error code), could not be
     reached, or did not answer like a Pushie daemon
  2  usage error: bad arguments, data that is not JSON, no secret for token

C{pushie serve} is not here: the daemon runs under twistd (C{twistd -n pushie}).
Only L{pushie.client} (standard library) is imported for publish and listen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from pushie import __version__

EXIT_CODES = """exit codes:
  0  done (listen: stopped with Ctrl-C or SIGTERM, or --once reached)
  1  the daemon refused (the message names its error code), could not be
     reached, or did not answer like a Pushie daemon
  2  usage error: bad arguments, data that is not JSON, no secret for token

environment: PUSHIE_URL, PUSHIE_PUBLISHER_KEY, PUSHIE_TOKEN; options win over them."""


class _Usage(Exception):
    """A usage error: the message is printed and the exit code is 2."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


EXAMPLES = """for example '{"text": "hi"}', '"hi"', 42 or null (quoted for the shell)"""


def _read_data(text: str | None) -> Any:
    """The message data: the JSON argument, or stdin for none or "-"."""
    if text is None or text == "-":
        if sys.stdin is None:
            raise _Usage("give the data as an argument, or on stdin")
        if sys.stdin.isatty():
            print("pushie publish: reading the JSON data from stdin (end with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read()
        where = "the data on stdin"
    else:
        where = "DATA"
    if not text.strip():
        raise _Usage(f"{where} is empty: give JSON, {EXAMPLES}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise _Usage(f"{where} must be JSON ({e}): {EXAMPLES}") from None


def _publish(args: argparse.Namespace) -> int:
    from pushie.client import PushieClientError, publish

    data = _read_data(args.data)
    try:
        answer = publish(
            args.channel,
            data,
            url=args.url,
            key=args.key,
            event=args.event,
            idempotency_key=args.idempotency_key,
            timeout=args.timeout,
        )
    except PushieClientError as e:
        print(f"pushie publish: {_describe(e)}", file=sys.stderr)
        if e.code == "unauthorized" and not (args.key or os.environ.get("PUSHIE_PUBLISHER_KEY")):
            print("pushie publish: this daemon needs a publisher key: set PUSHIE_PUBLISHER_KEY", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pushie publish: interrupted; the message may or may not have been published", file=sys.stderr)
        return 1
    except ValueError as e:  # a malformed --url or key, found before anything is sent
        raise _Usage(str(e)) from None
    print(json.dumps(answer))
    return 0


def _describe(error: Any) -> str:
    """An error for people: the status and code first, then what to do."""
    text = str(error)
    if error.retry_after is not None:
        text += f" (retry after {error.retry_after:g} s)"
    return text


class _Output:
    """JSON lines on stdout, one per event, flushed at once."""

    def __init__(self) -> None:
        encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        self.ascii = encoding != "utf8"

    def write(self, value: Any) -> None:
        print(json.dumps(value, ensure_ascii=self.ascii, separators=(",", ":")), flush=True)


def _listen(args: argparse.Namespace) -> int:
    from pushie.client import PushieClientError, base_url, listen

    try:
        url = base_url(args.url)
    except ValueError as e:
        raise _Usage(str(e)) from None
    if args.once is not None and args.once < 1:
        raise _Usage("--once takes a number of messages of at least 1")
    if args.last_event_id is not None and not args.last_event_id.isprintable():
        raise _Usage("--last-event-id must be an id the daemon sent")
    token = args.token if args.token is not None else os.environ.get("PUSHIE_TOKEN") or None

    def note(text: str) -> None:
        if not args.quiet:
            print(f"pushie listen: {text}", file=sys.stderr, flush=True)

    def retrying(error: PushieClientError, delay: float) -> None:
        note(f"{error}; reconnecting in {delay:.1f} s")

    output = _Output()
    count = 0
    previous = signal.signal(signal.SIGTERM, _interrupt) if _in_main_thread() else None
    try:
        events = listen(
            args.channels,
            url=url,
            token=token,
            last_event_id=args.last_event_id,
            timeout=args.timeout,
            on_retry=retrying,
        )
        with closing(events):
            for event in events:
                if event.type == "message":
                    output.write(event.data)
                    count += 1
                    if args.once is not None and count >= args.once:
                        return 0
                    continue
                frame = event.data if isinstance(event.data, dict) else {}
                if event.type == "subscribed":
                    _subscribed(frame, note)
                elif event.type == "error":
                    note(f"the daemon says {frame.get('code')}: {frame.get('message')}")
                if args.all:
                    output.write(event.data)
    except PushieClientError as e:
        print(f"pushie listen: {e}", file=sys.stderr)
        if e.code in ("unauthorized", "invalid_token", "forbidden"):
            print(
                "pushie listen: this channel needs a subscriber token that grants it: --token or PUSHIE_TOKEN "
                "(an app mints them; so does: pushie token --sub ID --channel NAME)",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (| head): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _subscribed(frame: dict[str, Any], note: Any) -> None:
    channel = frame.get("channel")
    where = f"offset {frame.get('offset')}, epoch {frame.get('epoch')}"
    recovered = frame.get("recovered")
    if recovered is False:
        print(
            f"pushie listen: WARNING: messages of {channel} published while disconnected could not be recovered "
            f"(recovered: false: the history no longer reaches back, or the channel restarted); "
            f"continuing from {where}",
            file=sys.stderr,
            flush=True,
        )
    elif recovered:
        note(f"resumed {channel}; missed messages follow ({where})")
    else:
        note(f"subscribed to {channel} ({where})")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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
    secret = first_secret(settings.subscriber_secrets, settings.subscriber_secrets_file)
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
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pushie {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    url_help = "the daemon's base URL (environment: PUSHIE_URL; default http://127.0.0.1:8080)"
    publish = commands.add_parser(
        "publish",
        help="publish one message to a channel",
        description='Publish one message; print the daemon\'s answer, {"channel", "offset", "epoch"}.',
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("channel")
    publish.add_argument("data", nargs="?", help='the message data as JSON; read from stdin when omitted or "-"')
    publish.add_argument("--url", help=url_help)
    publish.add_argument(
        "--key",
        help="the publisher key (environment: PUSHIE_PUBLISHER_KEY, which is better: "
        "other users can see command lines)",
    )
    publish.add_argument("--event", help="event name (default: message)")
    publish.add_argument(
        "--idempotency-key", help="publish at most once per key and channel within 5 minutes (safe retries)"
    )
    publish.add_argument("--timeout", type=float, default=10.0, help="seconds to wait to connect and for each read")
    publish.set_defaults(run=_publish)

    listen = commands.add_parser(
        "listen",
        help="print the messages of channels, one JSON line each",
        description=(
            "Print every message of the channels as one JSON line (its envelope: type, channel,\n"
            "event, offset, epoch, data).  After a drop it reconnects (backoff 0.5 s to 15 s) and\n"
            "resumes where it was; if messages were lost meanwhile it says so on stderr.\n"
            "Progress notes go to stderr."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument("channels", nargs="+", metavar="CHANNEL")
    listen.add_argument("--url", help=url_help)
    listen.add_argument(
        "--token", help="a subscriber token for private-* and presence-* channels (environment: PUSHIE_TOKEN)"
    )
    listen.add_argument("--once", type=int, metavar="N", help="exit after N messages")
    listen.add_argument(
        "--all", action="store_true", help="also print the subscribed, join, leave and error events as JSON lines"
    )
    listen.add_argument("--last-event-id", metavar="ID", help="resume from this event id (from an earlier stream)")
    listen.add_argument("--timeout", type=float, default=10.0, help="seconds to wait to connect (default 10)")
    listen.add_argument("-q", "--quiet", action="store_true", help="no progress notes on stderr, only warnings")
    listen.set_defaults(run=_listen)

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
    try:
        return int(args.run(args))
    except _Usage as e:
        print(f"pushie {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
