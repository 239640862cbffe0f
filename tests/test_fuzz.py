"""
Fuzzing every input surface of a running daemon (ISSUE12 B1).

Hypothesis generates hostile and random input (tests/fuzz_strategies.py) and
each property sends it over real sockets to an in-process daemon on port 0:
C{POST /publish} as raw bytes (the short path in pushie/doors/_http.py and
twisted.web's, lying lengths, chunking, pipelining), native WebSocket
frames, subscriber tokens, SSE queries and C{Last-Event-ID}, Pusher
WebSocket frames and the signed Pusher HTTP API.  For every example:

  - every request gets a documented answer: a status of the documented set
    with a JSON C{{"error", "message"}} body, an C{error} frame, or a
    documented close code;
  - every JSON the daemon sends, and every envelope it keeps, is RFC 8259
    JSON (no NaN, no Infinity, valid UTF-8);
  - nothing is half-published: after an error answer the offsets of every
    channel the fuzzers use are unchanged;
  - no traceback (or "Unhandled error") in the daemon's log;
  - the daemon serves the next client, and once the example's clients have
    closed it holds no more connections, subscribers or channels than before.

The quick profile runs in the default suite; C{PUSHIE_FUZZ_LONG=1} runs 20x
more examples (see README, Development).  Examples are random on each run
(no example database); a failure prints Hypothesis' minimal example and the
seed to rerun it with C{PUSHIE_FUZZ_SEED}.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import example, given, note, seed
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint

from pushie.channels import is_valid_channel
from pushie.doors.pusher.apps import api_string_to_sign, channel_auth_string, signin_string
from tests import fuzz_strategies as fs
from tests.helpers import (
    HANDSHAKE,
    Daemon,
    LogWatcher,
    assert_reactor_clean,
    daemon_counts,
    raw_connect,
    raw_exchange,
    raw_handshake,
    start_daemon,
    strict_json,
    wait_for,
)

SECRET = "s" * 40
APP_ID, KEY, APP_SECRET = "3", "278d425bdf160c739803", "7ad3773142a6692b25b8"
NOW = int(time.time())
COUNTER = [0]  # numbers the sentinel frames
FUZZ_SEED = int(os.environ.get("PUSHIE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))

MAX_FRAME = 65536  # the default max_message_size
PUBLISH_STATUSES = {200, 400, 401, 405, 413, 415, 429, 503}
SSE_STATUSES = {200, 400, 401, 403, 429, 503}
HANDSHAKE_STATUSES = {101, 400, 401, 403, 429, 503}
PUSHER_API_STATUSES = {200, 400, 401, 403, 404, 413, 429, 503}
CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013}
NATIVE_FRAME_TYPES = {
    "welcome", "subscribed", "unsubscribed", "pong", "authorized", "presence", "error", "message", "join", "leave",
}  # fmt: skip
PUSHER_SERVER_EVENTS = {
    "pusher:connection_established", "pusher:error", "pusher:subscription_error", "pusher:pong", "pusher:ping",
    "pusher:signin_success", "pusher:cache_miss", "pusher_internal:subscription_succeeded",
    "pusher_internal:member_added", "pusher_internal:member_removed",
}  # fmt: skip


async def _daemon_for_a_run(engine: str) -> Any:
    daemon = await start_daemon(
        engine=engine,
        subscriber_secrets=[SECRET],
        pusher_apps=[f"{APP_ID}:{KEY}:{APP_SECRET}"],
        publish_rate=0,
    )
    daemon.baseline = daemon_counts(daemon)
    try:
        yield daemon
        await settled(daemon, daemon.baseline, published=True)
    finally:
        await daemon.stop()
        await assert_reactor_clean()


# One daemon for a whole Hypothesis run: every example talks to the same
# daemon, which is the point: it must survive them all.  After the run it must
# hold no more than before, and stop cleanly.  (One fixture per engine rather
# than a parametrized one: pytest-twisted wraps a Hypothesis test in place,
# which breaks when pytest runs the same function object twice.)


@pytest_twisted.async_yield_fixture
async def fuzzed_memory():
    async for daemon in _daemon_for_a_run("memory"):
        yield daemon


@pytest_twisted.async_yield_fixture
async def fuzzed_redis(redis_server):
    redis_server.cli("FLUSHALL")
    async for daemon in _daemon_for_a_run(redis_server.url):
        yield daemon


@pytest.fixture
def watcher():
    watch = LogWatcher().start()
    yield watch
    watch.stop()


def begin(watcher: LogWatcher) -> None:
    """
    Start an example: name the run's seed in any failure report, and forget
    what the log holds from an example that failed before its log check
    (that one was reported already; this one must not be blamed for it).
    """
    note(f"fuzz seed: rerun with PUSHIE_FUZZ_SEED={FUZZ_SEED}")
    watcher.take()


# -- shared checks ---------------------------------------------------------


def check_error_body(body: bytes, where: str) -> None:
    parsed = strict_json(body)
    assert isinstance(parsed, dict), f"{where}: error body is not a JSON object: {body[:200]!r}"
    assert isinstance(parsed.get("error"), str) and isinstance(parsed.get("message"), str), (where, body[:300])


def check_http_answer(answer: Any, statuses: set[int], closed: bool, where: str) -> None:
    """A documented status with a JSON body; a bodiless 400 only as twisted.web's refusal of unparseable HTTP."""
    assert answer.status in statuses, f"{where}: undocumented status {answer.status}: {answer.body[:300]!r}"
    if answer.status == 200:
        return
    if answer.status == 400 and not answer.body and closed:
        return  # the request was not HTTP: a bare 400 and a close
    check_error_body(answer.body, where)


async def offsets(daemon: Daemon, names: list[str]) -> dict[str, tuple[int, str]]:
    result = {}
    for name in names:
        state = await daemon.engine.state(name)
        result[name] = state.offset
    return result


async def check_history_is_json(daemon: Daemon, names: list[str]) -> None:
    """Every envelope a channel keeps is RFC 8259 JSON (ISSUE12 A7: 1e999, NaN)."""
    for name in names:
        history = await daemon.engine.history(name, 0, None)
        for publication in history.publications:
            try:
                strict_json(publication.envelope)
            except ValueError as e:
                raise AssertionError(f"{name}: a kept envelope is not JSON ({e}): {publication.envelope[:200]!r}")


async def serves_next_client(daemon: Daemon) -> None:
    answers, _, raw = await raw_exchange(daemon.port, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert answers and answers[0].status == 200, f"the daemon no longer serves: {raw[:200]!r}"


async def settled(daemon: Daemon, baseline: dict[str, int], published: bool = False) -> None:
    """
    The daemon holds no more than before, once the example's clients are
    gone.  With C{published}, channels the engine keeps for their history
    (kept C{history_ttl} by design) are not counted.
    """

    def counts() -> dict[str, int]:
        now = daemon_counts(daemon)
        if published:
            now.pop("engine_channels", None)
        return now

    expected = dict(baseline)
    if published:
        expected.pop("engine_channels", None)
    try:
        await wait_for(lambda: counts() == expected, timeout=5)
    except AssertionError:
        raise AssertionError(f"left behind: {counts()} (before: {expected})") from None


# -- POST /publish -------------------------------------------------------------


async def publish_example(daemon: Daemon, request: dict[str, Any], pipelined: int) -> None:
    names = fs.CHANNEL_POOL
    before = await offsets(daemon, names)
    framing = request["framing"]
    raw = request["raw"]
    if pipelined > 1 and framing in ("exact", "chunked"):
        raw = raw * pipelined
    expected = pipelined if framing in ("exact", "chunked") else 1
    timeout = 0.5 if framing == "long" else 5.0
    answers, closed, received = await raw_exchange(daemon.port, [raw], answers=expected, timeout=timeout)
    note(f"answers: {received[:600]!r}")
    if framing != "long":
        assert answers, f"no answer to a {framing} publish (connection {'closed' if closed else 'open'})"
    published = False
    answered: list[str] = []
    for answer in answers:
        if not answer.complete:
            continue
        check_http_answer(answer, PUBLISH_STATUSES, closed, "publish")
        if answer.status == 200:
            published = True
            result = strict_json(answer.body)
            results = [result] if "channel" in result else result["results"]
            for item in results:
                assert isinstance(item["offset"], int) and isinstance(item["epoch"], str), item
                answered.append(item["channel"])
    after = await offsets(daemon, names)
    if not published:
        assert after == before, f"an error answer, yet offsets moved: {before} -> {after}"
    await check_history_is_json(daemon, sorted(set(names + answered)))


async def publish_property(daemon: Daemon, watcher: LogWatcher, request: dict[str, Any], pipelined: int) -> None:
    begin(watcher)
    await publish_example(daemon, request, pipelined)
    watcher.check("a publish")
    await serves_next_client(daemon)


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(request=fs.publish_requests(), pipelined=st.integers(1, 3))
@example(request=fs.KNOWN_PUBLISH[0], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[1], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[2], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[3], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[4], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[5], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[6], pipelined=1)
@pytest_twisted.ensureDeferred
async def test_publish_fuzz_memory(fuzzed_memory, watcher, request, pipelined):
    await publish_property(fuzzed_memory, watcher, request, pipelined)


@seed(FUZZ_SEED)
@fs.profile(quick=30)
@given(request=fs.publish_requests(), pipelined=st.integers(1, 3))
@example(request=fs.KNOWN_PUBLISH[0], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[1], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[2], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[3], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[4], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[5], pipelined=1)
@example(request=fs.KNOWN_PUBLISH[6], pipelined=1)
@pytest_twisted.ensureDeferred
async def test_publish_fuzz_redis(fuzzed_redis, watcher, request, pipelined):
    await publish_property(fuzzed_redis, watcher, request, pipelined)


@pytest_twisted.ensureDeferred
async def test_publish_huge_content_length_digits(fuzzed_memory, watcher):
    """A8: a 5,000-digit Content-Length (short path): a documented answer, not silence."""
    raw = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + b"9" * 5000
    answers, closed, received = await raw_exchange(fuzzed_memory.port, [raw + b"\r\n\r\n{}"])
    assert answers, f"no answer (closed={closed}): {received[:200]!r}"
    check_http_answer(answers[0], {400, 413}, closed, "5000-digit Content-Length")
    watcher.check()


# -- native WebSocket frames -------------------------------------------------


class RecordingProtocol(WebSocketClientProtocol):
    """A client that keeps the raw payloads it receives (the test judges them) and its close code."""

    def onOpen(self) -> None:
        self.factory.recorder["opened"].callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.recorder["frames"].append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        recorder = self.factory.recorder
        recorder["code"] = code
        if not recorder["opened"].called:
            recorder["opened"].errback(ConnectionError(reason))
        if not recorder["closed"].called:
            recorder["closed"].callback(code)


async def record_ws(port: int, path: str) -> tuple[RecordingProtocol, dict[str, Any]]:
    recorder: dict[str, Any] = {"frames": [], "code": None, "opened": Deferred(), "closed": Deferred()}
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = RecordingProtocol
    factory.recorder = recorder
    factory.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0, closeHandshakeTimeout=2)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    protocol = await recorder["opened"]
    return protocol, recorder


async def close_ws(protocol: RecordingProtocol, recorder: dict[str, Any]) -> None:
    if protocol.state == WebSocketClientProtocol.STATE_OPEN:
        protocol.sendClose(1000)
    elif not recorder["closed"].called and protocol.transport is not None:
        protocol.transport.loseConnection()
    await recorder["closed"]


def check_close(recorder: dict[str, Any], where: str) -> None:
    code = recorder["code"]
    assert code in CLOSE_CODES or (code is not None and 4000 <= code <= 4999), (
        f"{where}: the server dropped the connection without a documented close code (code {code}); "
        f"frames: {recorder['frames'][-3:]!r}"
    )


def check_native_frames(frames: list[bytes]) -> None:
    for payload in frames:
        frame = strict_json(payload)
        assert isinstance(frame, dict) and frame.get("type") in NATIVE_FRAME_TYPES, payload[:300]
        if frame["type"] == "error":
            assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str), frame


def native_sentinel(n: int) -> tuple[bytes, str]:
    """A frame whose answer is known: an error naming a channel that no fuzz frame uses."""
    name = f"sentinel-{n}"
    return json.dumps({"type": "unsubscribe", "channel": name}).encode(), name


async def native_example(daemon: Daemon, frames: list[bytes]) -> None:
    protocol, recorder = await record_ws(daemon.port, "/websocket")
    for payload in frames:
        if protocol.state != WebSocketClientProtocol.STATE_OPEN:
            break
        protocol.sendMessage(payload, isBinary=False)
    COUNTER[0] += 1
    sentinel, name = native_sentinel(COUNTER[0])
    if protocol.state == WebSocketClientProtocol.STATE_OPEN:
        protocol.sendMessage(sentinel, isBinary=False)

    def answered() -> bool:
        return recorder["closed"].called or any(name.encode() in f for f in recorder["frames"])

    await wait_for(answered, timeout=5)
    note(f"received: {recorder['frames'][:8]!r} close: {recorder['code']}")
    if recorder["closed"].called:
        check_close(recorder, "native frames")
    check_native_frames(recorder["frames"])
    await close_ws(protocol, recorder)


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(frames=st.lists(fs.native_frames(SECRET, NOW), min_size=1, max_size=6))
@example(frames=fs.KNOWN_NATIVE_FRAMES[0])
@example(frames=fs.KNOWN_NATIVE_FRAMES[1])
@example(frames=fs.KNOWN_NATIVE_FRAMES[2])
@pytest_twisted.ensureDeferred
async def test_native_websocket_fuzz(fuzzed_memory, watcher, frames):
    begin(watcher)
    await native_example(fuzzed_memory, frames)
    watcher.check("native frames")
    await settled(fuzzed_memory, fuzzed_memory.baseline)
    await check_history_is_json(fuzzed_memory, fs.CHANNEL_POOL)


# -- subscriber tokens -----------------------------------------------------------


def url_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


async def token_example(daemon: Daemon, token: Any, channel: str) -> None:
    # In the handshake URL: a bare status line of the documented set.
    path = f"/websocket?channel={url_value(channel)}&token={url_value(token)}"
    handshake = HANDSHAKE.format(path=path, port=daemon.port, extra="").encode()
    client = await raw_connect(daemon.port)
    client.transport.write(handshake)
    await wait_for(lambda: b"\r\n\r\n" in client.received or client.lost.called)
    note(f"handshake: {client.received[:300]!r}")
    assert client.received, f"no answer to a handshake with a token of {len(path)} bytes"
    assert int(client.received.split(b" ", 2)[1]) in HANDSHAKE_STATUSES, client.received[:300]
    client.transport.abortConnection()
    await client.lost
    # In auth and subscribe frames: an answer frame, the connection stays open.
    protocol, recorder = await record_ws(daemon.port, "/websocket")
    protocol.sendMessage(json.dumps({"type": "auth", "token": token}, allow_nan=True).encode("utf-8", "surrogatepass"))
    subscribe = {"type": "subscribe", "channel": channel, "token": token}
    subscribe_frame = json.dumps(subscribe, allow_nan=True).encode("utf-8", "surrogatepass")
    protocol.sendMessage(subscribe_frame)
    COUNTER[0] += 1
    sentinel, name = native_sentinel(COUNTER[0])
    if protocol.state == WebSocketClientProtocol.STATE_OPEN:
        protocol.sendMessage(sentinel)
    await wait_for(lambda: recorder["closed"].called or any(name.encode() in f for f in recorder["frames"]), 5)
    note(f"frames: {recorder['frames']!r} close: {recorder['code']}")
    if recorder["closed"].called and len(subscribe_frame) > MAX_FRAME:
        assert recorder["code"] == 1009, recorder["code"]  # the frame was over max_message_size
        return
    assert not recorder["closed"].called, f"a token in a frame closed the connection (code {recorder['code']})"
    check_native_frames(recorder["frames"])
    await close_ws(protocol, recorder)


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(token=fs.tokens(SECRET, NOW), channel=st.sampled_from(["fz0", "private-fz", "presence-fz"]))
@example(token=fs.known_token(fs.KNOWN_TOKEN_CLAIMS[0], SECRET), channel="private-fz")
@example(token=fs.known_token(fs.KNOWN_TOKEN_CLAIMS[1], SECRET), channel="private-fz")
@example(token=fs.known_token(fs.KNOWN_TOKEN_CLAIMS[2], SECRET), channel="private-fz")
@example(token=fs.known_token(fs.KNOWN_TOKEN_CLAIMS[3], SECRET), channel="private-fz")
@pytest_twisted.ensureDeferred
async def test_token_fuzz(fuzzed_memory, watcher, token, channel):
    begin(watcher)
    await token_example(fuzzed_memory, token, channel)
    watcher.check("a token")
    await settled(fuzzed_memory, fuzzed_memory.baseline)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest_twisted.ensureDeferred
async def test_token_time_claim_past_a_double_is_refused(fuzzed_memory, watcher, claim):
    """
    Found by test_token_fuzz: a signed token whose C{exp} (or C{nbf},
    C{iat}) is an integer of more than 308 digits (valid JSON) overflowed
    C{math.isfinite}: a 500 to the WebSocket handshake and a traceback.  It
    is a 401 C{unauthorized} like any other bad time claim, on every door.
    """
    claims = {"sub": "u", "exp": NOW + 600, "channels": ["*"], claim: 10**400}
    token = fs.known_token(claims, SECRET)
    status, client = await raw_handshake(fuzzed_memory.port, f"/websocket?channel=private-fz&token={token}")
    assert status == 401, client.received[:300]
    client.transport.abortConnection()
    await client.lost
    answers, _, received = await raw_exchange(
        fuzzed_memory.port, [f"GET /events?channel=private-fz&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()]
    )
    assert answers and answers[0].status == 401, received[:300]
    assert strict_json(answers[0].body)["error"] == "unauthorized"
    protocol, recorder = await record_ws(fuzzed_memory.port, "/websocket")
    protocol.sendMessage(json.dumps({"type": "auth", "token": token}).encode())
    await wait_for(lambda: recorder["frames"][1:] or recorder["closed"].called)
    assert not recorder["closed"].called, recorder["code"]
    frame = strict_json(recorder["frames"][1])
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame
    watcher.check()
    await close_ws(protocol, recorder)


# -- Server-Sent Events -------------------------------------------------------


async def sse_example(daemon: Daemon, query: bytes, last_event_id: bytes | None) -> None:
    request = b"GET /events?" + query + b" HTTP/1.1\r\nHost: x\r\n"
    if last_event_id is not None:
        request += b"Last-Event-ID: " + last_event_id + b"\r\n"
    request += b"\r\n"
    answers, closed, received = await raw_exchange(daemon.port, [request], timeout=0.25)
    note(f"answer: {received[:600]!r}")
    assert answers, f"no answer to an event-stream request (closed={closed})"
    answer = answers[0]
    if answer.status == 200:
        assert answer.headers.get(b"content-type", b"").startswith(b"text/event-stream"), answer.headers
        for line in answer.body.split(b"\n"):
            if line.startswith(b"data: "):
                strict_json(line[6:])
        return
    assert answer.complete or closed, f"an incomplete {answer.status} answer"
    check_http_answer(answer, SSE_STATUSES, closed, "SSE")


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(request=fs.sse_queries(SECRET, NOW))
@example(request=fs.KNOWN_SSE[0])
@example(request=fs.KNOWN_SSE[1])
@example(request=fs.KNOWN_SSE[2])
@pytest_twisted.ensureDeferred
async def test_sse_fuzz(fuzzed_memory, watcher, request):
    begin(watcher)
    query, last_event_id = request
    await sse_example(fuzzed_memory, query, last_event_id)
    watcher.check("an event-stream request")
    await settled(fuzzed_memory, fuzzed_memory.baseline)


# -- Pusher WebSocket frames -----------------------------------------------------


def sign(secret: str, text: str) -> str:
    import hashlib
    import hmac

    return hmac.new(secret.encode(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def fill_signatures(frame: Any, socket_id: str) -> Any:
    """Replace the L{fs.SIGN} markers with a correct auth for the frame's channel (or sign-in)."""
    if not isinstance(frame, dict) or not isinstance(frame.get("data"), dict):
        return frame
    data = dict(frame["data"])
    if data.get("auth") != fs.SIGN:
        return frame
    if frame["event"] == "pusher:signin":
        user_data = data.get("user_data")
        text = signin_string(socket_id, user_data) if isinstance(user_data, str) else ""
    else:
        channel = data.get("channel")
        channel_data = data.get("channel_data") if isinstance(data.get("channel_data"), str) else None
        text = channel_auth_string(socket_id, channel, channel_data) if isinstance(channel, str) else ""
    data["auth"] = f"{KEY}:{sign(APP_SECRET, text)}"
    return {**frame, "data": data}


def check_pusher_frames(frames: list[bytes]) -> None:
    for payload in frames:
        frame = strict_json(payload)
        assert isinstance(frame, dict) and isinstance(frame.get("event"), str), payload[:300]
        event = frame["event"]
        assert event in PUSHER_SERVER_EVENTS, payload[:300]
        assert isinstance(frame.get("data"), str), payload[:300]
        strict_json(frame["data"].encode("utf-8"))


async def pusher_example(daemon: Daemon, frames: list[Any], preamble: bool) -> None:
    protocol, recorder = await record_ws(daemon.port, f"/app/{KEY}?protocol=7&client=js&version=8.4.0")
    await wait_for(lambda: recorder["frames"] or recorder["closed"].called, 5)
    established = json.loads(recorder["frames"][0])
    socket_id = json.loads(established["data"])["socket_id"]
    if preamble:
        frames = [{"event": "pusher:subscribe", "data": {"channel": "private-fz", "auth": fs.SIGN}}, *frames]
    for frame in frames:
        if protocol.state != WebSocketClientProtocol.STATE_OPEN:
            break
        frame = fill_signatures(frame, socket_id)
        payload = (
            frame if isinstance(frame, bytes) else json.dumps(frame, allow_nan=True).encode("utf-8", "surrogatepass")
        )
        protocol.sendMessage(payload, isBinary=False)
    COUNTER[0] += 1
    name = f"!sentinel-{COUNTER[0]}"
    if protocol.state == WebSocketClientProtocol.STATE_OPEN:
        protocol.sendMessage(json.dumps({"event": "pusher:subscribe", "data": {"channel": name}}).encode())
    await wait_for(lambda: recorder["closed"].called or any(name.encode() in f for f in recorder["frames"]), 5)
    note(f"received: {recorder['frames'][:10]!r} close: {recorder['code']}")
    if recorder["closed"].called:
        check_close(recorder, "Pusher frames")
    check_pusher_frames(recorder["frames"])
    await close_ws(protocol, recorder)


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(frames=st.lists(fs.pusher_frames(), min_size=1, max_size=6), preamble=st.booleans())
@example(frames=fs.KNOWN_PUSHER_FRAMES[0], preamble=True)
@example(frames=fs.KNOWN_PUSHER_FRAMES[1], preamble=True)
@example(frames=fs.KNOWN_PUSHER_FRAMES[2], preamble=True)
@pytest_twisted.ensureDeferred
async def test_pusher_websocket_fuzz(fuzzed_memory, watcher, frames, preamble):
    begin(watcher)
    await pusher_example(fuzzed_memory, frames, preamble)
    watcher.check("Pusher frames")
    await settled(fuzzed_memory, fuzzed_memory.baseline, published=True)
    await check_history_is_json(fuzzed_memory, fs.CHANNEL_POOL + fs.PUSHER_CHANNELS)


# -- the signed Pusher HTTP API ------------------------------------------------


def signed_request(method: str, path: str, body: bytes, extra: dict[str, str]) -> bytes:
    """The raw HTTP request, signed with the app's secret (as PUSHER.md says) so the fuzz reaches the parser."""
    import hashlib

    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0", **extra}
    if body:
        params["body_md5"] = hashlib.md5(body).hexdigest()
    params["auth_signature"] = sign(APP_SECRET, api_string_to_sign(method, path, params))
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    head = f"{method} {path}?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def pusher_api_example(daemon: Daemon, call: tuple[str, str, bytes, dict[str, str]]) -> None:
    method, path, body, extra = call
    names = fs.CHANNEL_POOL + fs.PUSHER_CHANNELS
    before = await offsets(daemon, names)
    raw = signed_request(method, f"/apps/{APP_ID}/{path}", body, extra)
    answers, closed, received = await raw_exchange(daemon.port, [raw])
    note(f"answer: {received[:600]!r}")
    assert answers and answers[0].complete, f"no answer from the Pusher API (closed={closed})"
    answer = answers[0]
    check_http_answer(answer, PUSHER_API_STATUSES, closed, "Pusher API")
    if answer.status == 200:
        strict_json(answer.body)
        try:  # the channels the trigger named: their envelopes must be JSON too
            sent = json.loads(body)
            events = sent.get("batch", []) if path == "batch_events" else [sent]
            for event in events:
                names += event.get("channels", []) if "channels" in event else [event.get("channel")]
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
    else:
        after = await offsets(daemon, names)
        assert after == before, f"an error answer, yet offsets moved: {before} -> {after}"
    await check_history_is_json(daemon, sorted({n for n in names if isinstance(n, str) and is_valid_channel(n)}))


async def pusher_api_property(daemon: Daemon, watcher: LogWatcher, call: Any) -> None:
    begin(watcher)
    await pusher_api_example(daemon, call)
    watcher.check("a Pusher API call")
    await serves_next_client(daemon)


@seed(FUZZ_SEED)
@fs.profile(quick=60)
@given(call=fs.pusher_api_calls())
@example(call=fs.KNOWN_PUSHER_API[0])
@example(call=fs.KNOWN_PUSHER_API[1])
@example(call=fs.KNOWN_PUSHER_API[2])
@pytest_twisted.ensureDeferred
async def test_pusher_api_fuzz_memory(fuzzed_memory, watcher, call):
    await pusher_api_property(fuzzed_memory, watcher, call)


@seed(FUZZ_SEED)
@fs.profile(quick=30)
@given(call=fs.pusher_api_calls())
@example(call=fs.KNOWN_PUSHER_API[0])
@example(call=fs.KNOWN_PUSHER_API[1])
@example(call=fs.KNOWN_PUSHER_API[2])
@pytest_twisted.ensureDeferred
async def test_pusher_api_fuzz_redis(fuzzed_redis, watcher, call):
    await pusher_api_property(fuzzed_redis, watcher, call)


# -- regressions for what the fuzzers found ------------------------------------


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /publish HTTP/1.1\r\nContent-Type: application/json\r\nX-Long: %s\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /events?channel=fz0&token=%s HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /websocket?token=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /channels HTTP/1.1\r\nCookie: %s\r\n\r\n",
    ],
    ids=["publish-header", "sse-query", "websocket-query", "twisted-web-header"],
)
@pytest_twisted.ensureDeferred
async def test_over_long_line_is_answered(fuzzed_memory, watcher, request_head):
    """
    Found by test_publish_fuzz / test_token_fuzz / test_sse_fuzz: a request
    line or a header line over 16 KiB (a long token in a URL) was closed
    without an answer; README's Limits promise a 400 and a close.
    """
    raw = request_head.replace(b"%s", b"a" * 17000)
    answers, closed, received = await raw_exchange(fuzzed_memory.port, [raw])
    assert answers and answers[0].status == 400 and closed, received[:200]
    watcher.check()
    await serves_next_client(fuzzed_memory)


@pytest_twisted.ensureDeferred
async def test_pusher_auth_with_lone_surrogates_is_refused(fuzzed_memory, watcher):
    """
    Found by test_pusher_websocket_fuzz: a lone surrogate (valid JSON to
    Python: C{"\\ud800"}) in a C{pusher:signin} or C{pusher:subscribe} auth,
    user_data or channel_data raised UnicodeEncodeError while checking the
    signature: a traceback, and the connection dropped without a close frame.

    Since the strict decoder (ISSUE12 A7, README Limits: client JSON) such a
    frame is refused whole, before any signature is checked: one
    C{pusher:error} each (no C{pusher:subscription_error}: no channel was
    read).  The escape can still reach the signature and the inner JSON as
    text (C{\\\\ud800} in user_data or channel_data, correctly signed): the
    inner JSON is refused as well.  The connection stays open throughout.
    """
    protocol, recorder = await record_ws(fuzzed_memory.port, f"/app/{KEY}?protocol=7&client=js&version=8.4.0")
    await wait_for(lambda: recorder["frames"] or recorder["closed"].called)
    socket_id = json.loads(json.loads(recorder["frames"][0])["data"])["socket_id"]
    frames = [
        {"event": "pusher:signin", "data": {"user_data": '{"id": "u1"}', "auth": "\ud800"}},
        {"event": "pusher:signin", "data": {"user_data": '{"id": "\ud800"}', "auth": f"{KEY}:00"}},
        {"event": "pusher:subscribe", "data": {"channel": "private-fz", "auth": f"{KEY}:\udfff"}},
        {"event": "pusher:subscribe", "data": {"channel": "presence-fz", "auth": "x", "channel_data": "\ud800"}},
    ]
    for frame in frames:
        protocol.sendMessage(json.dumps(frame).encode())  # ensure_ascii: the surrogates travel as \\u escapes
    await wait_for(lambda: len(recorder["frames"]) >= 1 + 4 or recorder["closed"].called)
    assert not recorder["closed"].called, recorder["code"]
    refusals = [json.loads(json.loads(f)["data"])["message"] for f in recorder["frames"][1:]]
    assert [json.loads(f)["event"] for f in recorder["frames"][1:]] == ["pusher:error"] * 4, recorder["frames"]
    assert all("surrogate" in message for message in refusals), refusals
    # The escape as text inside the signed strings: past the outer decoder, refused by the inner one.
    user_data = '{"id": "\\ud800"}'
    channel_data = '{"user_id": "u1", "user_info": "\\ud800"}'
    signed = [
        {
            "event": "pusher:signin",
            "data": {"user_data": user_data, "auth": f"{KEY}:" + sign(APP_SECRET, signin_string(socket_id, user_data))},
        },
        {
            "event": "pusher:subscribe",
            "data": {
                "channel": "presence-fz",
                "auth": f"{KEY}:" + sign(APP_SECRET, channel_auth_string(socket_id, "presence-fz", channel_data)),
                "channel_data": channel_data,
            },
        },
    ]
    for frame in signed:
        protocol.sendMessage(json.dumps(frame).encode())
    await wait_for(lambda: len(recorder["frames"]) >= 1 + 4 + 3 or recorder["closed"].called)
    assert not recorder["closed"].called, recorder["code"]
    events = [json.loads(f)["event"] for f in recorder["frames"][5:]]
    assert events == ["pusher:error", "pusher:error", "pusher:subscription_error"], recorder["frames"][5:]
    messages = [json.loads(json.loads(f)["data"])["message"] for f in recorder["frames"][5:7]]
    assert "user_data must be" in messages[0] and "channel_data must be" in messages[1], messages  # signatures held
    check_pusher_frames(recorder["frames"])
    watcher.check()
    await close_ws(protocol, recorder)


@pytest.mark.parametrize("timestamp", ["1" + "0" * 400, "-" + "9" * 400], ids=["huge", "huge-negative"])
@pytest_twisted.ensureDeferred
async def test_pusher_api_timestamp_past_a_double_is_refused(fuzzed_memory, watcher, timestamp):
    """
    Found by reading the code after test_token_fuzz's overflow: an
    C{auth_timestamp} of hundreds of digits (an int, under Python's 4300-digit
    limit) overflowed the float subtraction from the server's clock: a 500 and
    a traceback.  It is a 401 C{unauthorized} like any other stale timestamp.
    """
    raw = signed_request("GET", f"/apps/{APP_ID}/channels", b"", {"auth_timestamp": timestamp})
    answers, _, received = await raw_exchange(fuzzed_memory.port, [raw])
    assert answers and answers[0].status == 401, received[:300]
    assert strict_json(answers[0].body)["error"] == "unauthorized", answers[0].body
    watcher.check()
