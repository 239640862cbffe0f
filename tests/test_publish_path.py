"""
The short path for C{POST /publish} (L{pushie.doors._http.PushieHTTPChannel}): the
same conversations, byte for byte, with and without it.  Raw clients, so
that every byte the server sends is compared (the C{Date} header and the
random epochs aside), on both engines.
"""

from __future__ import annotations

import re

import pytest_twisted

from pushie.doors._http import PushieHTTPChannel
from tests.helpers import raw_connect, sleep, wait_for

KEY = "k" * 32
AUTH = f"Authorization: Bearer {KEY}\r\n"


def post(body: bytes, headers: str = AUTH + "Content-Type: application/json\r\n") -> bytes:
    return (
        b"POST /publish HTTP/1.1\r\nHost: x\r\n" + headers.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


GOOD = post(b'{"channel": "a", "data": 1}')
# Conversations, one connection each: each item is bytes sent in one write
# (several requests in one are pipelined).
CONVERSATIONS = [
    [
        GOOD,
        GOOD + post(b'[{"channel": "b", "data": null}, {"channel": "a", "data": [1]}]') + GOOD,
        post(b"{nope"),
        post(b'{"channel": "a", "data": 1}', AUTH + "Content-Type: text/plain\r\n"),
        post(b'{"channel": "a", "data": 1}', "Content-Type: application/json\r\n"),
        post(b'{"channel": "a", "data": 1}', "Authorization: Bearer wrong-key-wrong-key-wrong-key!!\r\n"),
        post(b'{"channel": "a", "data": 1}', AUTH + "content-type:application/json;charset=utf-8 \r\n"),
        post(b'{"channel": "a", "data": 1}', AUTH + "Content-Type: application/json\r\nX-Folded: a\r\n b\r\n"),
        post(b'{"channel": "a", "data": "' + b"x" * 2000 + b'"}'),  # over max_message_size: 413
        b"POST /publish HTTP/1.1\r\nContent-Type: application/json\r\n" + AUTH.encode() + b"Expect: 100-continue\r\n"
        b'Content-Length: 27\r\n\r\n{"channel": "a", "data": 1}',
        b"POST /publish HTTP/1.1\r\nContent-Type: application/json\r\n"
        + AUTH.encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        b'1b\r\n{"channel": "a", "data": 1}\r\n0\r\n\r\n',
        b"GET /publish HTTP/1.1\r\n\r\n",
        post(b"", AUTH + "Content-Type: application/json\r\n"),
        # The body in pieces, then a request that asks to close the connection.
        GOOD[:-10],
        GOOD[-10:] + GOOD[:30],
        GOOD[30:],
        post(b'{"channel": "a", "data": 2}', AUTH + "Content-Type: application/json\r\nConnection: close\r\n"),
    ],
    [GOOD, post(b'{"channel": "a", "data": 1}', AUTH + "Content-Type: application/json\r\nBad Name: x\r\n"), GOOD],
    [
        b"POST /publish HTTP/1.1\r\nContent-Type: application/json\r\n" + AUTH.encode() + b"Content-Length: 1\r\n"
        b"Content-Length: 1\r\n\r\n{",
        GOOD,
    ],
    [GOOD + b"POST /publish HTTP/1.1\r\nContent-Length: x\r\n\r\n", GOOD],
    [GOOD + b"POST /publish HTTP/1.1\r\nX: \x00\r\n\r\n", GOOD],
    [GOOD + b"POST /publish HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 600 + b"\r\n", GOOD],
    [GOOD + b"POST /publish HTTP/1.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n", GOOD],
]


def normalise(received: bytes) -> bytes:
    received = re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", received)
    return re.sub(rb'"epoch":"[^"]*"', b'"epoch":"-"', received)


async def conversations(make_daemon, fast: bool) -> list[bytes]:
    PushieHTTPChannel.fast_publish = fast
    try:
        daemon = await make_daemon(publisher_keys=[KEY], max_message_size=1024)
        received = []
        for conversation in CONVERSATIONS:
            client = await raw_connect(daemon.port)
            for data in conversation:
                client.transport.write(data)
                await sleep(0.05)
            client.transport.loseConnection()
            await client.lost
            received.append(normalise(client.received))
        return received
    finally:
        PushieHTTPChannel.fast_publish = True


@pytest_twisted.ensureDeferred
async def test_short_path_answers_as_twisted_web(make_daemon, engine, request):
    slow = await conversations(make_daemon, fast=False)
    if engine != "memory":
        request.getfixturevalue("redis_server").cli("FLUSHALL")  # the same offsets again
        if "," in engine:
            request.getfixturevalue("second_redis_server").cli("FLUSHALL")
    fast = await conversations(make_daemon, fast=True)
    assert slow[0].count(b"HTTP/1.1 200 OK") == 11
    for status in (b"400", b"401", b"413", b"415", b"405"):
        assert b"HTTP/1.1 " + status in slow[0]
    assert slow[0].endswith(b'{"channel":"a","offset":11,"epoch":"-"}')  # then closed
    assert [s.count(b"HTTP/1.1 200 OK") for s in slow[1:]] == [1, 0, 1, 1, 1, 1]
    assert fast == slow


@pytest_twisted.ensureDeferred
async def test_short_path_is_taken(make_daemon, monkeypatch):
    taken = []
    original = PushieHTTPChannel._publish_received

    def spy(self, rest):
        taken.append(rest)
        return original(self, rest)

    monkeypatch.setattr(PushieHTTPChannel, "_publish_received", spy)
    daemon = await make_daemon()
    status, body, _ = await daemon.publish({"channel": "a", "data": 1})
    assert (status, body["offset"]) == (200, 1)
    assert len(taken) == 1


@pytest_twisted.ensureDeferred
async def test_client_gone_while_waiting_for_the_engine(make_daemon):
    daemon = await make_daemon()
    client = await raw_connect(daemon.port)
    hub = daemon.hub
    original = hub.publish
    pending = []

    def slow_publish(requests):
        from twisted.internet.defer import Deferred

        d = Deferred()
        pending.append((d, requests))
        return d

    hub.publish = slow_publish
    hub.publish_now = lambda requests: None  # an engine that answers later, as Redis does
    try:
        client.transport.write(post(b'{"channel": "a", "data": 1}', "Content-Type: application/json\r\n") + GOOD)
        await wait_for(lambda: pending)
        client.transport.loseConnection()
        await client.lost
        await sleep(0.1)  # the server's side of the connection is gone too
        d, requests = pending[0]
        d.callback(await original(requests))
        assert len(pending) == 1  # the pipelined request was never started
    finally:
        hub.publish = original
        del hub.publish_now
