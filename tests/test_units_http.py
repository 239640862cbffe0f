"""
The hand-written HTTP channel (L{pushie.doors._http.PushieHTTPChannel}) with
no sockets: the daemon is wired as twistd wires it on a L{MemoryReactorClock},
clients talk to its site through L{twisted.test.iosim}, and every deadline
fires because a test moved the fake clock, never because real time passed.

The contract is docs/PROTOCOL.md §3.1 (the request) and docs/PROTOCOL.md §12
(the limits of the request line, headers, Content-Length and the whole-request
deadline).  The same behaviours cross real sockets in
tests/test_publish_path.py and tests/test_hostile_input.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from twisted.internet import reactor

from pushie.doors._http import MAX_CONTENT_LENGTH_DIGITS, PushieRequest
from tests.helpers import LogWatcher, parse_http_answers
from tests.iosim_helpers import START, WS_ACCEPT, Node, ws_handshake

TIMEOUT = 10.0  # handshake_timeout, the whole-request deadline
DATE = re.compile(rb"\r\nDate: ([A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT)\r\n")


def post(body: bytes, headers: bytes = b"Content-Type: application/json\r\n", length: bool = True) -> bytes:
    head = b"POST /publish HTTP/1.1\r\nHost: x\r\n" + headers
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def publish(channel: str, data: Any) -> bytes:
    return post(json.dumps({"channel": channel, "data": data}).encode())


class CountingRequest(PushieRequest):
    """twisted.web's Request, counted: the short paths never build one."""

    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made += 1
        super().__init__(*args, **kwargs)


@pytest.fixture
def node():
    """A daemon on a fake clock whose twisted.web requests are counted; it must log no traceback."""
    before = set(reactor.getDelayedCalls())
    node = Node(handshake_timeout=TIMEOUT, max_message_size=1024)
    CountingRequest.made = 0
    node.service.site.requestFactory = CountingRequest
    watcher = LogWatcher().start()
    yield node
    watcher.stop()
    watcher.check()
    node.stop()
    left = [call for call in reactor.getDelayedCalls() if call.active() and call not in before]
    assert not left, f"timers left on the real reactor: {left}"


def without_date(answer: bytes) -> bytes:
    """C{answer} with its C{Date} value (which twisted.web reads from the wall clock) masked."""
    assert DATE.search(answer), answer
    return DATE.sub(b"\r\nDate: <date>\r\n", answer)


def test_publish_answered_on_the_short_path_byte_for_byte(node):
    """A plain publish is answered by the short path, with exactly the bytes twisted.web would write."""
    _, client, pump = node.connect()
    client.send(publish("news", {"a": 1}))
    pump.flush()
    answer = client.take()
    epoch = json.loads(answer.partition(b"\r\n\r\n")[2])["epoch"].encode()
    body = b'{"channel":"news","offset":1,"epoch":"%s"}' % epoch
    assert without_date(answer) == (
        b"HTTP/1.1 200 OK\r\nServer: Pushie\r\nDate: <date>\r\nContent-Type: application/json\r\n"
        b"Cache-Control: no-store\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert CountingRequest.made == 0
    assert client.lost is None  # kept alive


def test_the_short_path_and_twisted_web_answer_the_same_bytes(node):
    """The same publish through twisted.web (a chunked body) gets the same answer but for the offset."""
    _, client, pump = node.connect()
    client.send(publish("news", 1))
    pump.flush()
    short = client.take()
    assert CountingRequest.made == 0
    body = b'{"channel": "news", "data": 1}'
    client.send(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    pump.flush()
    slow = client.take()
    assert CountingRequest.made == 1
    assert without_date(slow) == without_date(short).replace(b'"offset":1', b'"offset":2')


def test_pipelined_requests_are_answered_in_order(node):
    """Several requests in one write, on both paths: one answer each, in the order asked."""
    _, client, pump = node.connect()
    client.send(publish("a", 1) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + publish("a", 2) + publish("b", 3))
    pump.flush()
    answers = parse_http_answers(client.take())
    assert [a.status for a in answers] == [200, 200, 200, 200]
    bodies = [json.loads(a.body) for a in answers]
    assert [(b.get("channel"), b.get("offset")) for b in bodies] == [("a", 1), (None, None), ("a", 2), ("b", 1)]
    assert CountingRequest.made == 1  # the GET only
    assert client.lost is None


def test_a_body_in_one_byte_pieces_is_answered_once_whole(node):
    """A request fed one byte per dataReceived: no answer until its last byte, then exactly one."""
    _, client, pump = node.connect()
    request = publish("slow", "x" * 40)
    for byte in request[:-1]:
        client.send(bytes([byte]))
        pump.flush()
    assert client.received == b""
    client.send(request[-1:])
    pump.flush()
    answers = parse_http_answers(client.take())
    assert [(a.status, json.loads(a.body)["offset"]) for a in answers] == [(200, 1)]
    assert CountingRequest.made == 0


def test_a_publish_without_content_length_has_an_empty_body(node):
    """No Content-Length on a POST: an empty body (RFC 9112 6.3), refused as JSON that is not there."""
    _, client, pump = node.connect()
    client.send(post(b"", length=False))
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "invalid_json"
    assert client.lost is None


def test_a_content_length_over_the_limit_is_refused_as_it_arrives(node):
    """A Content-Length over max_message_size: a JSON 413, without the body being kept."""
    _, client, pump = node.connect()
    client.send(post(b"x" * 2000))
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 413
    assert json.loads(answer.body)["error"] == "payload_too_large"


@pytest.mark.parametrize("digits", [MAX_CONTENT_LENGTH_DIGITS + 1, 5000])
def test_a_content_length_of_too_many_digits_is_a_bad_request(node, digits):
    """A Content-Length too long to be read as a number (5,000 digits broke int()): a JSON 400, then close."""
    _, client, pump = node.connect()
    client.send(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + b"0" * (digits - 1) + b"\r\n\r\n{}")
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "bad_request"
    assert client.lost is not None


def test_an_over_long_header_line_is_a_bad_request(node):
    """A header line over 16 KiB: a JSON 400 and a close, not LineReceiver's silent drop."""
    _, client, pump = node.connect()
    client.send(b"POST /publish HTTP/1.1\r\nX-Long: " + b"a" * (17 * 1024) + b"\r\n\r\n")
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "bad_request"
    assert client.lost is not None


def test_a_trickled_request_not_whole_by_the_deadline_gets_408(node):
    """
    A request trickled a byte a second (each byte resets twisted.web's idle
    timer): when handshake_timeout has passed since the connection came, a
    JSON 408, then close.
    """
    _, client, pump = node.connect()
    request = publish("late", 1)
    for byte in request[: int(TIMEOUT) - 1]:
        node.clock.advance(1)
        client.send(bytes([byte]))
        pump.flush()
    node.clock.advance(0.5)
    pump.flush()
    assert node.clock.seconds() == START + TIMEOUT - 0.5
    assert client.received == b"" and client.lost is None
    node.clock.advance(0.5)
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 408
    assert json.loads(answer.body)["error"] == "request_timeout"
    assert client.lost is not None


def test_a_silent_connection_is_closed_without_an_answer_at_the_deadline(node):
    """Nothing sent by the deadline: closed with no answer (there was no request to answer)."""
    _, client, pump = node.connect()
    node.clock.advance(TIMEOUT)
    pump.flush()
    assert client.received == b""
    assert client.lost is not None


@pytest.mark.parametrize("second", ["publish", "get"])
def test_each_answer_on_a_kept_alive_connection_moves_the_deadline_on(node, second):
    """
    After an answer the next request has a whole handshake_timeout again,
    counted from that answer (on both paths), not from the first request.
    """
    _, client, pump = node.connect()
    node.clock.advance(TIMEOUT * 0.8)
    client.send(publish("a", 1) if second == "publish" else b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    pump.flush()
    assert [a.status for a in parse_http_answers(client.take())] == [200]
    node.clock.advance(TIMEOUT * 0.8)  # past the first deadline
    pump.flush()
    assert client.lost is None
    client.send(b"POST /publish HTTP/1.1\r\n")  # begun, never finished
    pump.flush()
    node.clock.advance(TIMEOUT * 0.2)
    pump.flush()
    [answer] = parse_http_answers(client.take())
    assert answer.status == 408
    assert client.lost is not None


def test_a_websocket_handshake_on_the_short_path_gets_101(node):
    """A plain opening handshake goes to the WebSocket factory as it arrived: 101 with RFC 6455's accept value."""
    server, client, pump = node.connect()
    client.send(ws_handshake())
    pump.flush()
    head, _, rest = client.take().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
    assert headers[b"sec-websocket-accept"] == WS_ACCEPT
    assert headers[b"upgrade"].lower() == b"websocket"
    assert headers[b"server"] == b"Pushie"
    assert json.loads(rest[2:])["type"] == "welcome"  # an unmasked text frame under 126 bytes
    assert CountingRequest.made == 0
    assert pump.serverIO.protocol is not server  # handed over to the WebSocket protocol
    assert len(node.hub.connections) == 1
    # The request deadline no longer applies to the open WebSocket.
    node.clock.advance(TIMEOUT * 2)
    pump.flush()
    assert client.lost is None


def test_a_websocket_handshake_twisted_web_takes_gets_the_same_101(node):
    """A handshake with a folded header goes through twisted.web and WebSocketResource: the same 101."""
    _, client, pump = node.connect()
    client.send(ws_handshake(extra=b"X-Folded: a\r\n b\r\n"))
    pump.flush()
    head = client.take().partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n" in head + b"\r\n"
    assert CountingRequest.made == 1
