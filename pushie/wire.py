# -*- test-case-name: tests.test_units -*-
"""
The wire format: how Pushie's JSON is read and written, the message
envelope, and WebSocket text frames.

Every door decodes what clients send with L{loads} (strict: RFC 8259 only)
and encodes with L{dumps}; a message's envelope is written by
L{envelope_parts} only (L{message_envelope} fills it in), and framed by L{text_frame}.

Private internals used (checked against CPython 3.11.7, the version the test
suite runs on): C{json.JSONDecoder.scan_once}, the scanner that
C{JSONDecoder.raw_decode} calls, undocumented; L{loads} calls it directly
for a text with no white space around its value, and leaves everything else
(and every error) to C{decode}.  L{tests.test_fast_publish} checks values and
error messages against what C{decode} gives.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pushie._json import ENCODER, dumps

__all__ = [
    "MAX_JSON_DEPTH",
    "InvalidJSON",
    "dumps",
    "envelope_parts",
    "json_string",
    "loads",
    "message_envelope",
    "text_frame",
]

# Strings made of these characters need no escaping in JSON (channel names,
# the engines' epochs, most event names).
_PLAIN_RE = re.compile(r"[A-Za-z0-9_\-=@,.;: ]*\Z")


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
_OPENING = (b"{", b"[")
# "+" becomes "e" rather than being deleted (a translation without deletions
# is the cheaper one): "e+308" reads "ee000", which holds "e000" all the same.
_NUMBER_SHAPE = bytes.maketrans(b"123456789E+", b"000000000ee")
# A float of at most 209 digits in a row and an exponent of at most two
# digits stays below 10**(209 + 99) = 1e308: longer runs may overflow
# (a long mantissa with a short exponent, 1000...0e99, as surely as 1e999).
_MANY_DIGITS = b"0" * 210
# A lone surrogate can only come from a \uD800-\uDFFF escape once the bytes are
# strict UTF-8; text without one needs no walk for it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_overflow(raw: bytes) -> bool:
    """
    Whether C{raw} may hold a float that overflows to infinity: one with an
    exponent of three digits or more, or 210 digits in a row (what a
    two-digit exponent needs to reach 1.8e308).  (Two C scans
    of the bytes; a regular expression with a character class costs ten
    times more, and a Python call per float more still.)
    """
    shape = raw.translate(_NUMBER_SHAPE)
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
        # A body that opens with a bracket and no NUL byte after it is UTF-8
        # (json.detect_encoding's answer, without its calls).
        encoding = "utf-8" if raw[:1] in _OPENING and raw[1:2] != b"\x00" else json.detect_encoding(raw)
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
    surrogates = surrogates or (b"\\u" in utf8 and _SURROGATE_ESCAPE.search(utf8) is not None)
    brackets = utf8.count(b"[") + utf8.count(b"{")
    decoder = _DECODER_CHECKING_FLOATS if huge else _DECODER
    try:
        if text[:1] in "{[" and text[-1:] in "}]" and text:
            # No surrounding white space: the scanner alone, as decode() would
            # call it; anything after the value (an error, or white space
            # inside) is left to decode(), which says what it is.
            try:
                value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]
            except StopIteration:  # a value missing inside: decode() says where
                end = -1
            if end != len(text):
                value = decoder.decode(text)
        else:
            value = decoder.decode(text)
    except RecursionError:
        raise InvalidJSON(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels") from None
    except InvalidJSON:
        raise
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at character {e.pos}") from None
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise InvalidJSON("a number has more digits than this server reads") from None
    if surrogates:
        _check_decoded(value)
    elif brackets > MAX_JSON_DEPTH and _depth(utf8) > MAX_JSON_DEPTH:
        raise InvalidJSON(f"arrays and objects nest deeper than {MAX_JSON_DEPTH} levels")
    return value


_ESCAPE = re.compile(rb"\\.")
_KEPT_FOR_DEPTH = bytes(b for b in range(256) if b not in b'"[]{}')
_INNERMOST = re.compile(rb"\{\}|\[\]")


def _depth(utf8: bytes) -> int:
    """
    How deep the arrays and objects of valid JSON text nest, at most
    L{MAX_JSON_DEPTH} + 1, with no Python-level walk of the decoded value (a
    batch of 100 publications has more brackets than the limit, but is two
    levels deep).  C scans only: escapes out, everything but quotes and
    brackets out, strings out, then innermost pairs removed one level a pass.
    """
    skeleton = _ESCAPE.sub(b"", utf8) if b"\\" in utf8 else utf8
    # Strings out: with the escapes gone, valid JSON's quotes pair up, and
    # what lies outside them is every other piece between quotes (no regular
    # expression with a match object per string).
    brackets = b"".join(skeleton.translate(None, _KEPT_FOR_DEPTH).split(b'"')[::2])
    depth = 0
    while brackets and depth <= MAX_JSON_DEPTH:
        brackets = _INNERMOST.sub(b"", brackets)
        depth += 1
    return depth


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


def is_plain(text: str) -> bool:
    """Whether C{json_string(text)} is C{text} between quotes (nothing to escape, ASCII only)."""
    return _PLAIN_RE.match(text) is not None


def json_string(text: str) -> bytes:
    """C{dumps(text)} for a string, without the encoder for the common plain strings."""
    if _PLAIN_RE.match(text) is not None:
        return b'"' + text.encode("ascii") + b'"'
    return ENCODER.encode(text).encode("utf-8")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 5.2) carrying C{payload}."""
    size = len(payload)
    if size < 126:
        return b"\x81" + bytes((size,)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


def envelope_parts(channel: str, event: str, data: bytes, user_id: str | None = None) -> tuple[bytes, bytes, bytes]:
    """
    The JSON envelope of one message as subscribers receive it (PROTOCOL.md,
    "message"), around its two holes: C{head + offset + middle + epoch + tail},
    the offset as decimal digits and the epoch as a JSON string.  The one
    place the envelope's fields, their names and their order are written:
    L{message_envelope} fills the holes in Python, and the Redis engine's
    publish script fills them in Redis, where the offset is assigned (it
    knows no field of the envelope).  C{data} is already compact JSON.
    """
    event_json = b'"message"' if event == "message" else json_string(event)
    return (
        b'{"type":"message","channel":' + json_string(channel) + b',"event":' + event_json + b',"offset":',
        b',"epoch":',
        b',"data":' + data + (b"}" if user_id is None else b',"user_id":' + dumps(user_id) + b"}"),
    )


def _plain_envelope_template() -> bytes:
    """
    L{envelope_parts} of an event C{"message"} without C{user_id}, as one
    C{%}-format: the channel's characters (a plain name: inside the quotes
    as they are), the offset, the epoch's JSON string and the data.
    """
    head, middle, tail = envelope_parts("%s", "message", b"%s")
    template = head + b"%d" + middle + b"%s" + tail
    assert template.count(b"%") == 4, template  # the four holes, and no other %
    return template


_PLAIN_ENVELOPE = _plain_envelope_template()
PLAIN_ENVELOPE = _PLAIN_ENVELOPE
"""
The envelope of the usual message as one C{%}-format: C{PLAIN_ENVELOPE %
(channel, offset, epoch_json, data)}, the channel's ASCII bytes (a name
L{_PLAIN_RE} matches: every valid channel name), the offset, the epoch as
a JSON string (L{json_string}) and the compact JSON data.  The same bytes as
L{message_envelope} for event C{message} and no C{user_id}.
"""


def message_envelope(
    channel: str, event: str, offset: int, epoch: str, data: bytes, user_id: str | None = None
) -> bytes:
    """The envelope of one message (L{envelope_parts}) with its offset and epoch."""
    if event == "message" and user_id is None and _PLAIN_RE.match(channel) is not None:
        # The usual message, in one formatting (the same bytes).
        return _PLAIN_ENVELOPE % (channel.encode("ascii"), offset, json_string(epoch), data)
    head, middle, tail = envelope_parts(channel, event, data, user_id)
    return b"%s%d%s%s%s" % (head, offset, middle, json_string(epoch), tail)
