# -*- test-case-name: tests.test_units -*-
"""
Channel names and the records that travel through the Hub.

A L{Publication} is built once per published message and carries its encoded
forms (the JSON envelope and the WebSocket frame), computed lazily the first
time a subscriber needs them, so fan-out never encodes per subscriber.
"""

from __future__ import annotations

import json
import re
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

import attr

from pushie.errors import bad_request

MAX_CHANNEL_LENGTH = 164
_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-=@,.;:]{1,%d}\Z" % MAX_CHANNEL_LENGTH)  # noqa: UP031
PRIVATE_PREFIXES = ("private-", "presence-")


def is_valid_channel(name: object) -> bool:
    """Whether C{name} is a string that PROTOCOL.md allows as a channel name."""
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


# json.dumps builds a new encoder for every call with options; this one is built once.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# Strings made of these characters need no escaping in JSON (channel names,
# the engines' epochs, most event names).
_PLAIN_RE = re.compile(r"[A-Za-z0-9_\-=@,.;: ]*\Z")


# JSONEncoder.encode still builds its C encoder (and a dict for circular
# reference checks) on every call; this one is built once.  What Pushie
# encodes cannot be circular (data parsed from JSON, or records it builds).
_C_ENCODE = (
    c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None
)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, non-ASCII kept as UTF-8."""
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(value, 0)).encode("utf-8")
    return _ENCODER.encode(value).encode("utf-8")


MAX_JSON_DEPTH = 64
"""
How deeply arrays and objects may nest in JSON a client sends.  Deeper
input is refused at decode: Python's decoder and encoder recurse, and a body
of 30,000 brackets would otherwise end in a RecursionError (a traceback and
a dropped request) instead of a 400.
"""


class InvalidJSON(ValueError):
    """Input that L{loads} refuses; C{str()} says why, in words a client can act on."""


def _finite_float(text: str) -> float:
    number = float(text)
    if number - number != 0.0:  # inf - inf and nan - nan are NaN: cheaper than math.isfinite's call
        raise InvalidJSON(f"the number {text[:32]} is too large for a 64-bit float (RFC 8259 interoperability)")
    return number


def _no_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


# json.loads builds a new decoder for every call with options; these are built once.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
# Checking every float costs a Python call each: that decoder is only for
# text that may hold one that overflows, found by L{_may_overflow}.
_DECODER_CHECKING_FLOATS = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
_NUMBER_SHAPE = bytes.maketrans(b"123456789E", b"000000000e")
_MANY_DIGITS = b"0" * 309
# A lone surrogate can only come from a \uD800-\uDFFF escape once the bytes are
# strict UTF-8; text without one needs no walk for it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_overflow(raw: bytes) -> bool:
    """
    Whether C{raw} may hold a float that overflows to infinity: one with an
    exponent of three digits or more, or 309 digits in a row.  (Two C scans
    of the bytes; a regular expression with a character class costs ten
    times more, and a Python call per float more still.)
    """
    shape = raw.translate(_NUMBER_SHAPE, b"+")
    return b"e000" in shape or _MANY_DIGITS in shape


def loads(raw: bytes | str) -> Any:
    """
    Decode JSON that a client sent, strictly: the one decoder of every door.

    Refused, with L{InvalidJSON} (a C{ValueError}): what is not JSON, the
    constants C{NaN}, C{Infinity} and C{-Infinity} that Python's decoder
    accepts, numbers that overflow a float (C{1e999} would come back as
    C{Infinity}), invalid UTF-8 (UTF-16 and UTF-32 bodies are read as RFC
    8259 allows), strings holding a lone surrogate (C{"\\ud800"}: it cannot
    be encoded as UTF-8 when the data is sent on), and nesting deeper than
    L{MAX_JSON_DEPTH}.  Whatever this returns, L{dumps} encodes as valid JSON.
    """
    if isinstance(raw, bytes):
        encoding = json.detect_encoding(raw)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise InvalidJSON(f"the text is not valid {encoding.upper()}") from None
        utf8 = raw if encoding == "utf-8" else text.encode("utf-8")
        surrogates = False
    else:
        text = raw
        utf8 = raw.encode("utf-8", "surrogatepass")
        surrogates = _SURROGATE.search(raw) is not None
    huge = _may_overflow(utf8)
    surrogates = surrogates or _SURROGATE_ESCAPE.search(utf8) is not None
    brackets = utf8.count(b"[") + utf8.count(b"{")
    try:
        value = (_DECODER_CHECKING_FLOATS if huge else _DECODER).decode(text)
    except RecursionError:
        raise InvalidJSON(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels") from None
    except InvalidJSON:
        raise
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at character {e.pos}") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise InvalidJSON("a number has more digits than this server reads") from None
    if surrogates or brackets > MAX_JSON_DEPTH:
        _check_decoded(value)
    return value


def _check_decoded(value: Any) -> None:
    """Walk a decoded value (without recursion): its depth, and no lone surrogate in any string."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                raise InvalidJSON("a string holds a lone UTF-16 surrogate (such as \\ud800); it is not Unicode text")
            continue
        if isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidJSON(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def json_string(text: str) -> bytes:
    """C{dumps(text)} for a string, without the encoder for the common plain strings."""
    if _PLAIN_RE.match(text) is not None:
        return b'"' + text.encode("ascii") + b'"'
    return _ENCODER.encode(text).encode("utf-8")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 5.2) carrying C{payload}."""
    size = len(payload)
    if size < 126:
        return b"\x81" + bytes((size,)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PublishRequest:
    """One validated publication, before the engine gives it an offset."""

    channel: str
    data: bytes
    """The published data as compact JSON bytes."""
    event: str = "message"
    idempotency_key: str | None = None
    exclude: str | None = None
    """A Pusher socket id that must not receive it (the sender of a client event, C{socket_id})."""
    user_id: str | None = None
    """Who sent it: the user of a Pusher client event on a presence channel."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ChannelState:
    """Where a channel stands: the offset of its last message and its epoch."""

    offset: int
    epoch: str


@attr.s(slots=True, auto_attribs=True, eq=False)
class Publication:
    """
    A message with its place in the channel: offset and epoch.

    The envelope and the WebSocket frame are built on first use and then
    shared by every subscriber.
    """

    channel: str
    offset: int
    epoch: str
    data: bytes
    event: str = "message"
    exclude: str | None = None
    user_id: str | None = None
    _envelope: bytes | None = attr.ib(default=None, init=False, repr=False)
    _frame: bytes | None = attr.ib(default=None, init=False, repr=False)
    _sse: bytes | None = attr.ib(default=None, init=False, repr=False)
    pusher_frame: tuple[bytes, bytes] | None = attr.ib(default=None, init=False, repr=False)
    """The Pusher door's message and WebSocket frame for it, built there on first use."""

    @classmethod
    def from_envelope(cls, envelope: bytes, exclude: str | None = None) -> Publication:
        """A publication read back from its envelope (another node's, or history); the bytes are reused."""
        fields = json.loads(envelope)
        publication = cls(
            fields["channel"],
            fields["offset"],
            fields["epoch"],
            dumps(fields["data"]),
            fields["event"],
            exclude,
            fields.get("user_id"),
        )
        publication._envelope = envelope
        return publication

    @classmethod
    def of(cls, request: PublishRequest, offset: int, epoch: str) -> Publication:
        """The publication of C{request} at C{offset} in C{epoch}."""
        return cls(request.channel, offset, epoch, request.data, request.event, request.exclude, request.user_id)

    @property
    def envelope(self) -> bytes:
        """The JSON envelope that subscribers receive, as UTF-8 bytes."""
        if self._envelope is None:
            self._envelope = b"".join(
                (
                    b'{"type":"message","channel":',
                    json_string(self.channel),
                    b',"event":',
                    b'"message"' if self.event == "message" else json_string(self.event),
                    b',"offset":%d,"epoch":' % self.offset,
                    json_string(self.epoch),
                    b',"data":',
                    self.data,
                    b"}" if self.user_id is None else b',"user_id":' + dumps(self.user_id) + b"}",
                )
            )
        return self._envelope

    @property
    def sse_data(self) -> bytes:
        """The envelope as an SSE C{data:} line and the blank line ending the event."""
        if self._sse is None:
            self._sse = b"data: " + self.envelope + b"\n\n"
        return self._sse

    @property
    def websocket_frame(self) -> bytes:
        """The envelope as one unmasked WebSocket text frame, ready for a transport."""
        if self._frame is None:
            self._frame = text_frame(self.envelope)
        return self._frame


class Burst:
    """
    The publications of one channel that the Hub dispatched in one reactor
    turn to the same subscribers, in offset order: they leave in one write
    per subscriber (one kernel send instead of one per publication), with
    their frames joined once for all of them.
    """

    __slots__ = ("publications", "_frames", "pusher_frames")

    def __init__(self, publications: list[Publication]) -> None:
        self.publications = publications
        self._frames: bytes | None = None
        self.pusher_frames: bytes | None = None
        """The Pusher door's frames of every publication, joined there on first use."""

    @property
    def websocket_frames(self) -> bytes:
        """The WebSocket frames of every publication, back to back."""
        if self._frames is None:
            self._frames = b"".join([p.websocket_frame for p in self.publications])
        return self._frames


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


@attr.s(frozen=True, slots=True, auto_attribs=True)
class History:
    """
    What an engine still has of a channel after some offset.

    @ivar state: the channel's current offset and epoch.
    @ivar publications: the kept publications after the asked offset, oldest first.
    @ivar complete: whether nothing between the asked offset and the first
        returned publication (or the current offset) has been forgotten.
    """

    state: ChannelState
    publications: list[Publication]
    complete: bool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Member:
    """A presence member: a token's C{sub} and its C{info}."""

    id: str
    info: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "info": self.info}


@attr.s(slots=True, auto_attribs=True, eq=False)
class PresenceEvent:
    """
    A member joined (its first connection arrived) or left (its last one went).

    @ivar origin: the client id of the connection that caused it; that
        connection is not told about its own join.
    """

    channel: str
    kind: str
    member: Member
    origin: str | None = None
    _json: bytes | None = attr.ib(default=None, init=False, repr=False)

    @property
    def json(self) -> bytes:
        """The C{join}/C{leave} frame, encoded once for every subscriber."""
        if self._json is None:
            self._json = dumps({"type": self.kind, "channel": self.channel, "member": self.member.to_json()})
        return self._json


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
