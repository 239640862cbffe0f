"""POST /publish, exactly as docs/PROTOCOL.md §3, against a real daemon."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import succeed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

SEED_BODY = b'{"Channel": "bunno", "Data": {"message": {"text":"oh hai", "username": "jufisch"}}}'


async def subscribed_client(daemon, *channels):
    client = await daemon.connect("&".join(f"channel={c}" for c in channels))
    await client.next_of("welcome")
    for _ in channels:
        await client.next_of("subscribed")
    return client


@pytest_twisted.ensureDeferred
async def test_seed_body_reaches_the_subscriber_unchanged(daemon):
    client = await subscribed_client(daemon, "bunno")
    status, body, response = await daemon.publish(None, raw=SEED_BODY)
    assert status == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert body["channel"] == "bunno" and body["offset"] == 1 and isinstance(body["epoch"], str)
    message = await client.next_of("message")
    assert message == {
        "type": "message",
        "channel": "bunno",
        "event": "message",
        "offset": 1,
        "epoch": body["epoch"],
        "data": {"message": {"text": "oh hai", "username": "jufisch"}},
    }


@pytest_twisted.ensureDeferred
async def test_data_arrives_unchanged(daemon):
    client = await subscribed_client(daemon, "c")
    values = [None, 0, -1.5, 10**30, "ünïcødé ✓", [1, {"a": [True, False]}], {"": {}}]
    for value in values:
        status, body, _ = await daemon.publish({"channel": "c", "data": value})
        assert status == 200
    for value in values:
        assert (await client.next_of("message"))["data"] == value


@pytest_twisted.ensureDeferred
async def test_charset_parameter_is_json(daemon):
    status, body, _ = await daemon.publish({"channel": "c", "data": 1}, content_type="application/json; charset=utf-8")
    assert status == 200, body


@pytest_twisted.ensureDeferred
async def test_multi_channel_answers_results_in_order(daemon):
    a = await subscribed_client(daemon, "a")
    b = await subscribed_client(daemon, "b")
    await daemon.publish({"channel": "b", "data": "first"})
    status, body, _ = await daemon.publish({"channels": ["a", "b"], "data": {"x": 1}, "event": "news"})
    assert status == 200
    assert [(r["channel"], r["offset"]) for r in body["results"]] == [("a", 1), ("b", 2)]
    assert (await a.next_of("message"))["event"] == "news"
    assert (await b.next_of("message"))["data"] == "first"
    second = await b.next_of("message")
    assert (second["offset"], second["data"], second["event"]) == (2, {"x": 1}, "news")


@pytest_twisted.ensureDeferred
async def test_batch_is_applied_in_order(daemon, engine):
    client = await subscribed_client(daemon, "a", "b")
    batch = [{"channel": "a", "data": 1}, {"channel": "b", "data": 2}, {"CHANNEL": "a", "DATA": 3, "Event": "e"}]
    status, body, _ = await daemon.publish(batch)
    assert status == 200
    assert [(r["channel"], r["offset"]) for r in body["results"]] == [("a", 1), ("b", 1), ("a", 2)]
    got = [(m["channel"], m["data"], m["event"]) for m in [await client.next_of("message") for _ in range(3)]]
    expected = [("a", 1, "message"), ("b", 2, "message"), ("a", 3, "e")]
    if "," in engine:
        # On shards a batch is applied per shard (PROTOCOL 3.7): the order holds per channel, not across them.
        assert sorted(got, key=lambda m: m[0]) == sorted(expected, key=lambda m: m[0])
    else:
        assert got == expected
    assert client.pending() == []


@pytest_twisted.ensureDeferred
async def test_idempotency_key_publishes_once(daemon):
    client = await subscribed_client(daemon, "c")
    first = await daemon.publish({"channel": "c", "data": 1, "idempotency_key": "order-17"})
    again = await daemon.publish({"channel": "c", "data": 1, "idempotency_key": "order-17"})
    other = await daemon.publish({"channel": "c", "data": 2, "idempotency_key": "order-18"})
    assert first[0] == again[0] == other[0] == 200
    assert again[1] == first[1]
    assert other[1]["offset"] == 2
    assert [(await client.next_of("message"))["data"] for _ in range(2)] == [1, 2]
    assert client.pending() == []


BAD_BODIES = [
    (b"{not json", 400, "invalid_json"),
    (b'{"channel": "c", "data": NaN}', 400, "invalid_json"),
    (b'{"channel": "c", "data": [Infinity, -Infinity]}', 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b'"just a string"', 400, "invalid_body"),
    (b"{}", 400, "missing_channel"),
    (b'{"data": 1}', 400, "missing_channel"),
    (b'{"channel": "c"}', 400, "missing_data"),
    (b'{"channel": "bad name", "data": 1}', 400, "invalid_channel"),
    (b'{"channel": "", "data": 1}', 400, "invalid_channel"),
    (b'{"channel": 17, "data": 1}', 400, "invalid_channel"),
    (('{"channel": "%s", "data": 1}' % ("x" * 165)).encode(), 400, "invalid_channel"),
    (b'{"channel": "c", "data": 1, "chanel": "d"}', 400, "unknown_field"),
    (b'{"channel": "c", "Channel": "d", "data": 1}', 400, "invalid_body"),
    (b'{"channel": "c", "channels": ["d"], "data": 1}', 400, "invalid_body"),
    (b'{"channels": [], "data": 1}', 400, "invalid_channels"),
    (b'{"channels": "c", "data": 1}', 400, "invalid_channels"),
    (b'{"channels": ["c", "c"], "data": 1}', 400, "invalid_channels"),
    (b'{"channels": ["c", "no way"], "data": 1}', 400, "invalid_channel"),
    (b'{"channel": "c", "data": 1, "event": ""}', 400, "invalid_event"),
    (b'{"channel": "c", "data": 1, "event": 5}', 400, "invalid_event"),
    (b'{"channel": "c", "data": 1, "idempotency_key": 5}', 400, "invalid_idempotency_key"),
    (b"[]", 400, "invalid_batch"),
    (json.dumps([{"channel": "c", "data": i} for i in range(101)]).encode(), 400, "invalid_batch"),
    (b'[{"channel": "c", "data": 1}, 7]', 400, "invalid_batch"),
    (b'[{"channel": "c", "data": 1}, {"channels": ["c"], "data": 1}]', 400, "invalid_batch"),
    (b'[{"channel": "c", "data": 1}, {"channel": "c"}]', 400, "missing_data"),
    (b'[{"channel": "c", "data": 1}, {"channel": "c d", "data": 1}]', 400, "invalid_channel"),
]


@pytest.mark.parametrize("raw,status,code", BAD_BODIES)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_publish_nothing(daemon, raw, status, code):
    client = await subscribed_client(daemon, "c")
    got_status, body, response = await daemon.publish(None, raw=raw)
    assert (got_status, body["error"]) == (status, code), body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert isinstance(body["message"], str) and len(body["message"]) > 10
    # Nothing was published: the next message on the channel is offset 1.
    status, body, _ = await daemon.publish({"channel": "c", "data": "after"})
    assert body["offset"] == 1
    message = await client.next_of("message")
    assert (message["offset"], message["data"]) == (1, "after")


@pytest.mark.parametrize(
    "content_type",
    ["", "application/x-www-form-urlencoded", "text/plain", "application/json; charset=latin-1", "application/jsonx"],
)
@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(daemon, content_type):
    status, body, _ = await daemon.publish({"channel": "c", "data": 1}, content_type=content_type)
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert "application/json" in body["message"]


@pytest_twisted.ensureDeferred
async def test_oversize_body_is_413_and_publishes_nothing(make_daemon):
    daemon = await make_daemon(max_message_size=1000)
    client = await subscribed_client(daemon, "c")
    big = {"channel": "c", "data": "x" * 1000}
    status, body, _ = await daemon.publish(big)
    assert (status, body["error"]) == (413, "payload_too_large")
    assert "1000" in body["message"]

    # Without a Content-Length (chunked), the limit is counted as bytes arrive.
    def chunks():
        yield b'{"channel": "c", "data": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}'

    @implementer(IBodyProducer)
    class Chunked:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer):
            for chunk in chunks():
                consumer.write(chunk)
            return succeed(None)

        def stopProducing(self):
            pass

        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

    response = await treq.post(
        daemon.url + "/publish", data=Chunked(), headers={"Content-Type": "application/json"}, pool=daemon.pool
    )
    assert response.code == 413
    assert json.loads(await response.content())["error"] == "payload_too_large"
    status, body, _ = await daemon.publish({"channel": "c", "data": "small"})
    assert (status, body["offset"]) == (200, 1)
    assert (await client.next_of("message"))["data"] == "small"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(daemon, method):
    response = await treq.request(method, daemon.url + "/publish", pool=daemon.pool)
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["POST"]
    assert json.loads(await response.content())["error"] == "method_not_allowed"


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_json_404(daemon):
    status, body, _ = await daemon.get("/no/such/thing")
    assert status == 404
    assert json.loads(body)["error"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_demo_page(daemon):
    status, body, response = await daemon.get("/")
    assert status == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert b'src="/pushie.js"' in body and b"Subscribe" in body and b"You're connected to Pushie!" in body
    status, script, response = await daemon.get("/pushie.js")
    assert status == 200
    assert response.headers.getRawHeaders("content-type") == ["application/javascript; charset=utf-8"]
    assert b"class Pushie" in script and b"since" in script


@pytest_twisted.ensureDeferred
async def test_refusals_are_logged_readably(daemon):
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        await daemon.publish({"channel": "bad name", "data": 1})
        await daemon.get("/events?channel=bad%20name")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [formatEvent(e) for e in seen if "Refused" in e.get("log_format", "")]
    assert any("400 invalid_channel" in line for line in lines), lines
    assert any("event stream" in line and "invalid_channel" in line for line in lines), lines
    assert not any("Unable to format" in line for line in lines)
