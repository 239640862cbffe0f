"""
Slow and half-sent requests (issue 12, A9): a client has C{handshake_timeout}
seconds from accept for its whole request (line, headers and body), however
it trickles the bytes, on every path (WebSocket and publish short paths,
twisted.web's, both WebSocket doors); and connections still sending a
request count against C{max_connections_per_ip} and C{max_connections}, so
that half-sent handshakes are refused at accept past them.  Raw TCP clients;
no timing is asserted beyond "closed long before the trickle would end".
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.helpers import HANDSHAKE, raw_connect, raw_handshake, sleep, wait_for
from tests.test_hostile_input import assert_no_traceback, log_events  # noqa: F401

PUBLISH = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
BODY = b'{"channel": "c", "data": "' + b"x" * 200 + b'"}'


def handshake(path: str, port: int) -> bytes:
    return HANDSHAKE.format(path=path, port=port, extra="").encode()


REQUESTS = {
    "websocket-short-path": lambda port: handshake("/websocket?channel=c", port),
    "websocket-twisted-web": lambda port: handshake("/websocket?channel=c", port).replace(
        b"\r\n\r\n", b"\r\nX-Folded: a\r\n b\r\n\r\n"
    ),
    "pusher": lambda port: handshake("/app/key?protocol=7", port),
    "sse": lambda port: b"GET /events?channel=c HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n",
    "publish-short-path": lambda port: PUBLISH % (len(BODY), BODY),
    "publish-twisted-web": lambda port: (PUBLISH % (len(BODY), BODY)).replace(
        b"Host: x\r\n", b"Host: x\r\nX-Folded: a\r\n b\r\n"
    ),
    "publish-chunked": lambda port: (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    ),
}


CASES = [(kind, False) for kind in sorted(REQUESTS)] + [
    (kind, True) for kind in sorted(REQUESTS) if kind.startswith("publish")
]


@pytest.mark.parametrize(
    "kind,body_only", CASES, ids=[f"{kind}-{'body' if body else 'whole'}-trickled" for kind, body in CASES]
)
@pytest_twisted.ensureDeferred
async def test_a_trickled_request_is_closed_at_the_deadline(make_daemon, log_events, kind, body_only):  # noqa: F811
    daemon = await make_daemon(handshake_timeout=1.0, pusher_apps=["1:key:secretsecretsecret"])
    request = REQUESTS[kind](daemon.port)
    if body_only:  # the headers at once, then the body byte by byte
        head, _, rest = request.partition(b"\r\n\r\n")
        first, request = head + b"\r\n\r\n" + rest[:5], rest[5:]
    else:
        first, request = request[:5], request[5:]
    client = await raw_connect(daemon.port)
    client.transport.write(first)
    # One byte every 0.2 s: the whole request would take 40 s or more.
    for byte in request:
        if client.lost.called:
            break
        client.transport.write(bytes((byte,)))
        await sleep(0.2)
    assert client.lost.called, f"still open after trickling {len(request)} bytes"
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), client.received[:300]
    assert json.loads(body)["error"] == "request_timeout"
    await wait_for(lambda: daemon.hub.limits.pending == 0)
    assert_no_traceback(log_events)


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_has_the_deadline_for_its_next_request(make_daemon):
    daemon = await make_daemon(handshake_timeout=1.0)
    client = await raw_connect(daemon.port)
    client.transport.write(PUBLISH % (len(BODY), BODY))
    await wait_for(lambda: b'"offset":1' in client.received)
    request = PUBLISH % (len(BODY), BODY)
    for byte in request:
        if client.lost.called:
            break
        client.transport.write(bytes((byte,)))
        await sleep(0.2)
    assert client.lost.called
    assert b"HTTP/1.1 408 " in client.received
    # An idle kept-alive connection is closed quietly.
    idle = await raw_connect(daemon.port)
    await wait_for(lambda: idle.lost.called, timeout=10)
    assert idle.received == b""


@pytest_twisted.ensureDeferred
async def test_half_sent_requests_count_against_the_per_address_limit(make_daemon, log_events):  # noqa: F811
    daemon = await make_daemon(handshake_timeout=30.0, max_connections_per_ip=5)
    partial = handshake("/websocket?channel=c", daemon.port)[:40]
    holders = []
    for _ in range(5):
        holder = await raw_connect(daemon.port)
        holder.transport.write(partial)
        holders.append(holder)
    await wait_for(lambda: daemon.hub.limits.pending == 5)
    # The sixth is refused at accept, with a JSON answer, before it sends anything.
    refused = await raw_connect(daemon.port)
    await wait_for(lambda: refused.lost.called)
    head, _, body = refused.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 "), refused.received
    assert json.loads(body)["error"] == "too_many_connections_from_address"
    for holder in holders:
        holder.transport.loseConnection()
    await wait_for(lambda: daemon.hub.limits.pending == 0)
    # Handshakes that finish stop being pending: the Hub counts them as open.
    clients = [await daemon.connect("channel=c") for _ in range(4)]
    assert (daemon.hub.limits.pending, daemon.hub.limits.total) == (0, 4)
    # Open and half-sent ones count together when a handshake is whole.
    holder = await raw_connect(daemon.port)
    holder.transport.write(partial)
    await wait_for(lambda: daemon.hub.limits.pending == 1)
    status, refused = await raw_handshake(daemon.port, "/websocket?channel=c")
    assert status == 429
    holder.transport.loseConnection()
    refused.transport.loseConnection()
    for client in clients:
        client.close()
    await wait_for(lambda: daemon.hub.limits.total == 0)
    assert_no_traceback(log_events)


@pytest_twisted.ensureDeferred
async def test_half_sent_requests_count_against_the_total_limit(make_daemon):
    daemon = await make_daemon(handshake_timeout=30.0, max_connections=3)
    holders = [await raw_connect(daemon.port) for _ in range(3)]
    await wait_for(lambda: daemon.hub.limits.pending == 3)
    status, whole = await raw_handshake(daemon.port, "/websocket?channel=c")
    assert status == 503  # refused at accept: the half-sent ones alone reach the limit
    refused = await raw_connect(daemon.port)
    await wait_for(lambda: refused.lost.called)
    head, _, body = refused.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), refused.received
    assert json.loads(body)["error"] == "too_many_connections"
    for holder in holders:
        holder.transport.loseConnection()
    await wait_for(lambda: daemon.hub.limits.pending == 0)
    status, body, _ = await daemon.publish({"channel": "c", "data": 1})
    assert status == 200
    await wait_for(lambda: daemon.hub.limits.pending == 0)
