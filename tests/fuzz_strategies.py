"""
Hypothesis strategies for hostile and random input, for the fuzz tests in
L{tests.test_fuzz}: JSON values with the numbers and strings that are not
JSON (NaN, Infinity, 1e999, lone surrogates), deep nesting, wrong types,
publish bodies, HTTP requests with lying framing, native and Pusher
WebSocket frames, SSE queries and subscriber tokens.

The strategies only build values; the tests send them to a running daemon.
Values that can only be completed once a connection exists (a Pusher
C{auth} signature needs the socket id) carry the L{SIGN} marker, which the
test replaces with the right signature before sending.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jwt
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("PUSHIE_FUZZ_LONG", "") not in ("", "0")
"""The long profile (nightly-style runs): many more examples per property."""


def profile(quick: int, long: int | None = None) -> settings:
    """
    Hypothesis settings for one property: C{quick} examples in the default
    suite, C{long} (default 20x) with C{PUSHIE_FUZZ_LONG=1}.  No example
    database (runs are independent); no deadline (real sockets); the
    health checks that a fixture-driven, socket-bound test trips are off.
    """
    return settings(
        max_examples=(long or quick * 20) if LONG else quick,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# -- names ------------------------------------------------------------------

CHANNEL_POOL = ["fz0", "fz1", "fz-2", "fz:3", "private-fz", "presence-fz", "cache-fz"]
"""Valid channel names the fuzzers reuse, so that offsets can be compared before and after."""

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfffb",
    "\u2028",
    "\ufeff",
    "é",
    "² .x.c",
    "#server-to-user-1",
    "a" * 165,
    "a" * 5000,
    "private-",
    "presence-",
    "*",
    "../../etc/passwd",
    "%00",
    "\r\nX-Injected: 1",
    "NaN",
    "1e999",
    "-0",
    "1.",
    "0x10",
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
)

channel_names = st.one_of(
    st.sampled_from(CHANNEL_POOL),
    st.from_regex(r"[A-Za-z0-9_\-=@,.;:]{1,20}", fullmatch=True),
    hostile_text,
)

# -- JSON values -------------------------------------------------------------

NON_JSON_NUMBERS = [float("nan"), float("inf"), float("-inf")]

RAW_TEXTS = [
    "1e999",
    "-1e999",
    "1E400",
    "-0.0e-999",
    "1" * 5000,
    "[" * 30000 + "]" * 30000,
    '{"a":' * 3000 + "1" + "}" * 3000,
]
"""JSON-ish text that no Python value encodes to: put in place of L{raw} markers by L{to_json_text}."""


def raw(text: str) -> str:
    """A marker string that L{to_json_text} replaces with C{text}, unquoted."""
    return "\x00raw:" + str(RAW_TEXTS.index(text))


raw_values = st.sampled_from(RAW_TEXTS).map(raw)

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NON_JSON_NUMBERS),
    raw_values,
    hostile_text,
    st.text(max_size=8).map(lambda s: s * 1000),  # big strings
)

json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), hostile_text), inner, max_size=4),
    ),
    max_leaves=12,
)


def deep(depth: int, kind: str = "list") -> str:
    """JSON text nested C{depth} levels deep (Python's parser recurses on it)."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


deep_json = st.builds(deep, st.sampled_from([100, 1000, 5000, 30000]), st.sampled_from(["list", "dict"]))


def to_json_text(value: Any, ascii_only: bool) -> str:
    """
    Encode as Python does by default: NaN and Infinity included, lone
    surrogates escaped or raw; then the L{raw} markers become their text.
    """
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    if "raw:" in text:
        for index, raw_text in enumerate(RAW_TEXTS):
            text = text.replace(f'"\\u0000raw:{index}"', raw_text)
    return text


@st.composite
def json_texts(draw: Any, value: Any = json_values) -> bytes:
    """The bytes of a JSON-ish document: real JSON, JSON with non-JSON constants, broken or deep text."""
    choice = draw(st.integers(0, 9))
    if choice <= 5:
        text = to_json_text(draw(value), draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass")
    if choice == 6:
        return draw(deep_json).encode()
    if choice == 7:
        return draw(st.sampled_from([b"1e999", b"-1e999", b"NaN", b'"\\ud800"', b'{"a":1,}', b"[", b"", b"\xff\xfe"]))
    if choice == 8:
        return draw(st.binary(max_size=64))
    return draw(st.sampled_from(["\ufeff{}", '{"data": 1}'])).encode("utf-16")


# -- publish bodies ----------------------------------------------------------


def _case(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.upper(), name.capitalize()])


@st.composite
def publication(draw: Any, batch_item: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        body[draw(_case("channel"))] = draw(st.one_of(channel_names, json_values))
    if not batch_item and draw(st.integers(0, 5)) == 0:
        body["channels"] = draw(st.one_of(st.lists(channel_names, max_size=5), json_values))
    if draw(st.integers(0, 9)) > 0:
        body[draw(_case("data"))] = draw(json_values)
    if draw(st.booleans()):
        body["event"] = draw(st.one_of(st.text(max_size=10), json_values))
    if draw(st.booleans()):
        body["idempotency_key"] = draw(st.one_of(st.sampled_from(["k1", "k2", "eu:17"]), hostile_text, json_values))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


publish_values = st.one_of(
    publication(),
    st.lists(publication(batch_item=True), min_size=1, max_size=5),
    st.lists(publication(batch_item=True), min_size=1, max_size=3).map(lambda items: items * 40),  # > 100 items
    json_values,
)


@st.composite
def publish_bodies(draw: Any) -> bytes:
    """A /publish body: mostly publish-shaped JSON with hostile parts, sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_texts())
    return to_json_text(draw(publish_values), draw(st.booleans())).encode("utf-8", "surrogatepass")


# -- HTTP requests -----------------------------------------------------------

content_types = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"APPLICATION/JSON;charset=UTF8",
            b"application/json; charset=latin-1",
            b"text/plain",
            b"application/jsonx",
            b"",
        ]
    ),
    st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b),
)


@st.composite
def header_lines(draw: Any) -> list[bytes]:
    """Extra header lines, including odd ones the short publish path must hand to twisted.web."""
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        lines.append(
            draw(
                st.one_of(
                    st.sampled_from(
                        [
                            b"Authorization: Bearer nope",
                            b"Authorization: ",
                            b"Connection: close",
                            b"Connection: keep-alive, close",
                            b"Expect: 100-continue",
                            b"X-Folded: a\r\n b",
                            b"Upgrade: websocket",
                            b"X-Empty:",
                            b"X-Tab:\tvalue\t",
                            b"Bad Header: x",
                            b"X-Nul: a\x00b",
                            b"Transfer-Encoding: identity",
                            b"X-Long: " + b"a" * 20000,
                        ]
                    ),
                    st.tuples(
                        st.from_regex(rb"[A-Za-z][A-Za-z0-9\-]{0,15}", fullmatch=True),
                        st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
                    ).map(lambda kv: kv[0] + b": " + kv[1]),
                )
            )
        )
    return lines


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """C{body} in HTTP/1.1 chunked encoding, cut at C{sizes} (then the rest)."""
    out, start = [], 0
    for size in sizes:
        piece = body[start : start + size]
        if not piece:
            break
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        start += len(piece)
    if start < len(body):
        out.append(b"%x\r\n%s\r\n" % (len(body) - start, body[start:]))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


@st.composite
def publish_requests(draw: Any) -> dict[str, Any]:
    """
    One C{POST /publish} as raw bytes, with its framing chosen to hit both
    the short path in pushie/doors/_http.py and twisted.web's (chunked bodies, odd
    headers), and sometimes a lie in its length.

    @return: C{{"raw": bytes, "framing": str, "body": bytes}}; C{framing} is
        C{"exact"}, C{"chunked"}, C{"short"} (declares less than it sends: the
        rest is a second, garbage request), C{"long"} (declares more: the
        server waits), C{"bad"} (a length that is not a number).
    """
    body = draw(publish_bodies())
    lines = [draw(st.sampled_from([b"POST /publish HTTP/1.1", b"POST /publish HTTP/1.0", b"POST /publish/ HTTP/1.1"]))]
    lines.append(b"Host: 127.0.0.1")
    content_type = draw(content_types)
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    lines.extend(draw(header_lines()))
    framing = draw(st.sampled_from(["exact"] * 6 + ["chunked", "chunked", "short", "long", "bad"]))
    if framing == "exact":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        payload = chunked(body, draw(st.lists(st.integers(1, 64), max_size=4)))
        if draw(st.integers(0, 5)) == 0:
            payload = draw(st.sampled_from([b"zz\r\n", b"-1\r\n", b"f" * 5000 + b"\r\n", b"5\r\nab\r\n0\r\n\r\n"]))
    elif framing == "short":
        lines.append(b"Content-Length: %d" % max(0, len(body) - draw(st.integers(1, 10))))
        payload = body
    elif framing == "long":
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 100))))
        payload = body
    else:
        value = draw(
            st.sampled_from(
                [b"9" * 5000, b"-1", b"1e3", b" 12", b"0x10", b"12, 12", b"\xb2", b"99999999999999999999", b""]
            )
        )
        lines.append(b"Content-Length: " + value)
        payload = body
    return {"raw": b"\r\n".join(lines) + b"\r\n\r\n" + payload, "framing": framing, "body": body}


# -- subscriber tokens -------------------------------------------------------

claim_values = st.one_of(
    json_leaves,
    st.lists(st.one_of(channel_names, json_leaves), max_size=3),
    st.dictionaries(st.text(max_size=5), json_leaves, max_size=3),
)


@st.composite
def token_claims(draw: Any, now: int) -> dict[str, Any]:
    """Claims, mostly well formed, with hostile values in any field (exp NaN, sub a list, ...)."""
    claims: dict[str, Any] = {
        "sub": draw(st.one_of(st.just("user-1"), st.text(max_size=10), claim_values)),
        "exp": draw(
            st.one_of(
                st.just(now + 600),
                st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, now + 0.5, 2**64, -1, 0]),
                st.sampled_from([str(now + 600), True, None, [now + 600]]),
                claim_values,
            )
        ),
        "channels": draw(
            st.one_of(st.just(["*"]), st.lists(st.one_of(st.sampled_from(["*", "fz*"]), channel_names)), claim_values)
        ),
    }
    if draw(st.booleans()):
        claims["info"] = draw(json_values)
    for name in draw(st.lists(st.sampled_from(["iat", "nbf", "aud", "iss", "jti"]), max_size=2)):
        claims[name] = draw(claim_values)
    for name in draw(st.lists(st.sampled_from(["sub", "exp", "channels"]), max_size=1)):
        claims.pop(name, None)
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(header: dict[str, Any], payload: bytes, secret: str) -> str:
    import hashlib
    import hmac

    head = _b64(json.dumps(header).encode())
    body = _b64(payload)
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


@st.composite
def tokens(draw: Any, secret: str, now: int) -> Any:
    """
    A subscriber token: signed with the right secret (random claims, or a
    payload that is not a JSON object), with another secret or algorithm,
    a broken encoding, or not a string at all.
    """
    choice = draw(st.integers(0, 9))
    if choice <= 4:
        claims = draw(token_claims(now))
        payload = json.dumps(claims, allow_nan=True).encode("utf-8", "surrogatepass")
        return _sign({"alg": "HS256", "typ": "JWT"}, payload, secret)
    if choice == 5:
        return _sign({"alg": "HS256"}, draw(json_texts()), secret)
    if choice == 6:
        header = draw(
            st.sampled_from(
                [{"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {"alg": "HS256", "crit": ["x"]}, {}, {"alg": 1}]
            )
        )
        return _sign(header, json.dumps({"sub": "u", "exp": now + 600, "channels": ["*"]}).encode(), secret)
    if choice == 7:
        return jwt.encode({"sub": "u", "exp": now + 600, "channels": ["*"]}, "w" * 32, algorithm="HS256")
    if choice == 8:
        return draw(
            st.one_of(
                hostile_text,
                st.binary(max_size=60).map(_b64),
                st.lists(st.binary(max_size=20).map(_b64), min_size=2, max_size=5).map(".".join),
            )
        )
    return draw(json_values)


# -- native WebSocket frames -------------------------------------------------

FRAME_TYPES = ["subscribe", "unsubscribe", "ping", "auth", "presence"]


@st.composite
def native_frames(draw: Any, secret: str, now: int) -> bytes:
    """A client frame for /websocket: a typed object with random fields, or anything."""
    choice = draw(st.integers(0, 9))
    if choice <= 6:
        frame: dict[str, Any] = {"type": draw(st.one_of(st.sampled_from(FRAME_TYPES), json_values))}
        if draw(st.integers(0, 5)) > 0:
            frame["channel"] = draw(st.one_of(channel_names, json_values))
        if draw(st.booleans()):
            frame["token"] = draw(tokens(secret, now))
        if draw(st.integers(0, 3)) == 0:
            frame["since"] = draw(
                st.one_of(
                    st.fixed_dictionaries(
                        {"offset": st.one_of(st.integers(-5, 10**30), json_values), "epoch": hostile_text}
                    ),
                    json_values,
                )
            )
        if draw(st.integers(0, 4)) == 0:
            frame[draw(st.text(max_size=6))] = draw(json_values)
        return to_json_text(frame, draw(st.booleans())).encode("utf-8", "surrogatepass")
    return draw(json_texts())


# -- Pusher WebSocket frames -------------------------------------------------

SIGN = "<<sign>>"
"""Replaced by the test with C{"<key>:<HMAC of the auth string>"} for the frame's channel."""

PUSHER_EVENTS = [
    "pusher:subscribe",
    "pusher:unsubscribe",
    "pusher:ping",
    "pusher:pong",
    "pusher:signin",
    "pusher:unknown",
    "client-fz",
    "other",
]
PUSHER_CHANNELS = ["fz0", "private-fz", "presence-fz", "private-encrypted-fz", "cache-fz", "private-cache-fz"]


@st.composite
def pusher_frames(draw: Any) -> Any:
    """
    A Pusher protocol 7 client frame as a Python value (to be JSON-encoded by
    the test), or raw bytes; a subscribe may carry a correct C{auth} (L{SIGN}).
    """
    choice = draw(st.integers(0, 9))
    if choice >= 8:
        return draw(json_texts())
    event = draw(st.one_of(st.sampled_from(PUSHER_EVENTS), hostile_text))
    channel = draw(st.one_of(st.sampled_from(PUSHER_CHANNELS), channel_names, json_values))
    frame: dict[str, Any] = {"event": event}
    if event == "pusher:subscribe":
        data: Any = {"channel": channel}
        if draw(st.integers(0, 3)) > 0:
            data["auth"] = draw(st.one_of(st.just(SIGN), st.just(SIGN), hostile_text, json_values))
        if draw(st.booleans()):
            data["channel_data"] = draw(
                st.one_of(
                    st.builds(
                        lambda user, info: json.dumps({"user_id": user, "user_info": info}, allow_nan=True),
                        st.one_of(st.just("u1"), st.integers(), hostile_text, json_values),
                        json_values,
                    ),
                    json_values,
                )
            )
    elif event == "pusher:signin":
        data = {
            "user_data": draw(
                st.one_of(
                    st.builds(lambda u: json.dumps({"id": u}, allow_nan=True), st.one_of(st.just("u1"), json_values)),
                    json_values,
                )
            ),
            "auth": draw(st.one_of(st.just(SIGN), hostile_text)),
        }
    else:
        data = draw(json_values)
        frame["channel"] = channel
    if draw(st.integers(0, 4)) == 0 and isinstance(data, dict | list | int | float | bool | type(None)):
        data = to_json_text(data, True)  # some clients send data as a JSON string
    frame["data"] = data
    return frame


# -- SSE -------------------------------------------------------------------

last_event_ids = st.one_of(
    st.sampled_from(["", "0.e.fz0", "5.abc.fz0 3.def.fz1", "²" + ".x.c", "1" * 5000 + ".e.fz0", "a.b", "1..c"]),
    st.tuples(st.integers(-5, 10**40), hostile_text, channel_names).map(lambda t: f"{t[0]}.{t[1]}.{t[2]}"),
    hostile_text,
)


@st.composite
def sse_queries(draw: Any, secret: str, now: int) -> tuple[bytes, bytes | None]:
    """A query string for /events (raw bytes, percent-encoded or not) and a Last-Event-ID header value."""
    from urllib.parse import quote

    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["channel", "channel", "token", "last_event_id", "x", ""]))
        if name == "token":
            value = draw(tokens(secret, now))
            value = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
        elif name == "last_event_id":
            value = draw(last_event_ids)
        else:
            value = draw(channel_names)
        encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
        if draw(st.integers(0, 4)) == 0:
            encoded = draw(st.sampled_from(["%", "%zz", "%ff", "%ed%a0%80", "+", "a b"]))
        parts.append(f"{name}={encoded}" if draw(st.integers(0, 9)) else name)
    header = None
    if draw(st.booleans()):
        header = draw(last_event_ids).encode("utf-8", "surrogatepass")
        header = header.replace(b"\r", b"").replace(b"\n", b"")
    return "&".join(parts).encode("latin-1", "replace"), header


# -- the Pusher HTTP API -----------------------------------------------------

pusher_event = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["ev", "pusher:x", "a" * 201]), st.text(max_size=8), json_values),
        "data": st.one_of(st.text(max_size=20), json_values),
        "channel": st.one_of(st.sampled_from(PUSHER_CHANNELS), channel_names, json_values),
        "channels": st.one_of(
            st.lists(st.one_of(st.sampled_from(PUSHER_CHANNELS), channel_names), max_size=4), json_values
        ),
        "socket_id": st.one_of(st.sampled_from(["1.2", "1234.5678"]), hostile_text, json_values),
        "info": st.one_of(st.sampled_from(["user_count", "subscription_count", "user_count,x"]), json_values),
    },
)


@st.composite
def pusher_api_calls(draw: Any) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path under /apps/<id>/, body bytes, extra query parameters) for a signed API call."""
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        body = to_json_text(draw(st.one_of(pusher_event, json_values)), draw(st.booleans()))
        return "POST", "events", body.encode("utf-8", "surrogatepass"), {}
    if kind <= 6:
        batch = draw(st.one_of(st.lists(pusher_event, max_size=12), json_values))
        body = to_json_text({"batch": batch} if draw(st.integers(0, 5)) else batch, draw(st.booleans()))
        return "POST", "batch_events", body.encode("utf-8", "surrogatepass"), {}
    if kind == 7:
        return "POST", draw(st.sampled_from(["events", "batch_events"])), draw(json_texts()), {}
    path = draw(
        st.sampled_from(
            [
                "channels",
                "channels/fz0",
                "channels/presence-fz",
                "channels/presence-fz/users",
                "users/u1/terminate_connections",
            ]
        )
    )
    extra = {}
    if draw(st.booleans()):
        extra["info"] = draw(st.one_of(st.sampled_from(["user_count", "subscription_count", "x"]), st.text(max_size=8)))
    if draw(st.booleans()):
        extra["filter_by_prefix"] = draw(st.one_of(st.sampled_from(["presence-", "fz"]), st.text(max_size=8)))
    if draw(st.integers(0, 9)) == 0:  # a hostile timestamp, still signed: the check before the signature's
        extra["auth_timestamp"] = draw(
            st.one_of(
                st.sampled_from(["1" + "0" * 400, "-" + "9" * 400, "9" * 5000, "1e3", " 1", "\u0663", "nan"]),
                st.integers().map(str),
                st.text(max_size=8),
            )
        )
    method = "POST" if path.endswith("terminate_connections") else "GET"
    return method, path, b"", extra


# -- the inputs the adversarial probe of ISSUE12 used, run first by every fuzz test -


def publish_request(body: bytes, framing: str = "exact", content_length: bytes | None = None) -> dict[str, Any]:
    """A C{POST /publish} in the shape L{publish_requests} draws, for explicit examples."""
    head = b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if framing == "chunked":
        return {
            "raw": head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [100]),
            "framing": framing,
            "body": body,
        }
    length = content_length if content_length is not None else b"%d" % len(body)
    return {"raw": head + b"Content-Length: " + length + b"\r\n\r\n" + body, "framing": framing, "body": body}


DEEP = deep(30000).encode()
KNOWN_PUBLISH = [
    publish_request(b'{"channel": "fz0", "data": 1e999}'),  # A7
    publish_request(b'{"channel": "fz0", "data": "\\ud800"}'),  # A8: a lone surrogate
    publish_request(b'{"channel": "\\ud800", "data": 1}'),  # A8
    publish_request(b'{"channel": "fz0", "data": ' + DEEP + b"}"),  # A8: deep nesting, short path
    publish_request(b'{"channel": "fz0", "data": ' + DEEP + b"}", "chunked"),  # A8: twisted.web's path
    publish_request(b"{}", "bad", b"9" * 5000),  # A8: a 5,000-digit Content-Length
    publish_request(b'[{"channel": "fz0", "data": 1}, {"channel": "fz1", "data": 1e999}]'),  # nothing half-published
]
KNOWN_NATIVE_FRAMES = [
    [b'{"type": "subscribe", "channel": "\\ud800"}'],  # A8
    [b'{"type": "subscribe", "channel": "fz0", "since": ' + DEEP + b"}"],  # A8
    [DEEP],  # A8
]
KNOWN_TOKEN_CLAIMS = [
    {"sub": "u", "exp": float("nan"), "channels": ["*"]},  # A10
    {"sub": "u", "exp": float("inf"), "channels": ["*"]},  # A10
    {"sub": "\ud800", "exp": 4102444800, "channels": ["*"]},  # a lone surrogate in a claim
    {"sub": "u", "exp": 10**400, "channels": ["*"]},  # past a double: overflowed math.isfinite (a 500)
]


def known_token(claims: dict[str, Any], secret: str) -> str:
    """Sign claims as an app would with Python's json (NaN and Infinity included)."""
    return _sign({"alg": "HS256", "typ": "JWT"}, json.dumps(claims).encode("utf-8", "surrogatepass"), secret)


KNOWN_SSE = [
    (b"channel=fz0", "\u00b2.x.c".encode()),  # A8: Last-Event-ID: ².x.c
    (b"channel=fz0", b"1" * 5000 + b".e.fz0"),  # A8: a 5,000-digit offset
    (b"channel=%ED%A0%80", None),  # a lone surrogate's UTF-8 bytes as a channel
]
KNOWN_PUSHER_FRAMES = [
    [{"event": "client-fz", "channel": "private-fz", "data": float("nan")}],  # A7: with the preamble
    [DEEP],  # A8
    [{"event": "pusher:subscribe", "data": {"channel": "private-fz", "auth": SIGN, "channel_data": "\ud800"}}],
]
KNOWN_PUSHER_API = [
    ("POST", "events", b'{"name": "ev", "channel": "fz0", "data": NaN}', {}),  # A7
    ("POST", "events", b'{"name": "ev", "channel": "fz0", "data": ' + DEEP + b"}", {}),  # A8
    ("POST", "batch_events", b'{"batch": [{"name": "ev", "channel": "fz0", "data": "1"}, {"name": 1}]}', {}),
]
