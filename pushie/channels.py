# -*- test-case-name: tests.test_units -*-
"""
Channel rules: which names are channels, which kinds need a token or keep
members, and what a client may give as its place in a channel.
"""

from __future__ import annotations

import re

import attr

from pushie.errors import bad_request

MAX_CHANNEL_LENGTH = 164
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-=@,.;:]{1,%d}\Z" % MAX_CHANNEL_LENGTH)  # noqa: UP031
PRIVATE_PREFIXES = ("private-", "presence-")


def is_valid_channel(name: object) -> bool:
    """Whether C{name} is a string that docs/PROTOCOL.md §2.1 allows as a channel name."""
    return isinstance(name, str) and _CHANNEL_RE.match(name) is not None


def check_channel(name: object) -> str:
    """
    Return C{name} if it is a valid channel name.

    @raise PushieError: 400 C{invalid_channel} naming the rule.
    """
    if not is_valid_channel(name):
        raise bad_request(
            "invalid_channel",
            f"a channel name is 1 to {MAX_CHANNEL_LENGTH} characters of A-Z a-z 0-9 _ - = @ , . ; :",
            channel=name if isinstance(name, str) and len(name) <= 200 else None,
        )
    assert isinstance(name, str)
    return name


def is_guarded(name: str) -> bool:
    """Whether a channel needs a granting subscriber token (C{private-*}, C{presence-*})."""
    return name.startswith(PRIVATE_PREFIXES)


def is_presence(name: str) -> bool:
    """
    Whether a channel keeps a member list (C{presence-*}), in any app's
    channel space (see L{pushie.doors.pusher.apps.App.hub_name}).
    """
    return name.rpartition(APP_SEPARATOR)[2].startswith("presence-")


APP_SEPARATOR = "|"
"""
Between a Pusher app id and a channel name in the Hub's name of a channel of
an app other than the first.  No channel name of either protocol holds it.
"""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Position:
    """A client's place in a channel: the last offset it has, in which epoch."""

    offset: int
    epoch: str


MAX_OFFSET = 2**53 - 1
"""
The largest offset a client may name (C{since}, C{Last-Event-ID}, C{?since=}):
JavaScript's C{Number.MAX_SAFE_INTEGER}, so every offset a browser holds is
exact.  A channel would need 285 years at a million messages a second to get there.
"""
_MAX_OFFSET_DIGITS = len(str(MAX_OFFSET))
_ASCII_DIGITS = re.compile(r"[0-9]+\Z")


def parse_offset(text: str | bytes) -> int | None:
    """
    A whole number written in ASCII digits, at most L{MAX_OFFSET}; C{None} for anything else.

    Stricter than C{int()}, which takes signs, spaces, underscores and other
    scripts' digits (C{"²".isdigit()} is true, C{int("²")} raises), and
    raises on more than 4300 digits.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not 0 < len(text) <= _MAX_OFFSET_DIGITS or _ASCII_DIGITS.match(text) is None:
        return None
    number = int(text)
    return number if number <= MAX_OFFSET else None


def check_since(value: object, channel: str | None = None) -> Position:
    """
    Validate a client's C{since}: C{{"offset": <int >= 0>, "epoch": "<string>"}}.

    @raise PushieError: 400 C{invalid_since}.
    """
    if (
        isinstance(value, dict)
        and isinstance(value.get("offset"), int)
        and not isinstance(value.get("offset"), bool)
        and 0 <= value["offset"] <= MAX_OFFSET
        and isinstance(value.get("epoch"), str)
        and 0 < len(value["epoch"]) <= 64
    ):
        return Position(value["offset"], value["epoch"])
    raise bad_request(
        "invalid_since",
        '"since" must be {"offset": <the last offset you have, 0 to 2^53-1>, "epoch": "<its epoch>"}',
        channel=channel,
    )
