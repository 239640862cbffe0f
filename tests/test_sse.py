"""Server-Sent Events at /events: subscribe, receive, resume with Last-Event-ID, keep-alive, shutdown."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.python.failure import Failure

from pushie.doors.sse import parse_event_id
from pushie.errors import PushieError
from tests.helpers import sleep, wait_for
from tests.test_auth import SECRET_1, token


class EventReader:
    """Reads an event stream chunk by chunk and queues parsed events."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: DeferredQueue = DeferredQueue()
        self.raw = b""
        self.done: Deferred = Deferred()

    def feed(self, chunk: bytes) -> None:
        self.raw += chunk
        self.buffer += chunk
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            event = {"comments": []}
            for line in block.decode().split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "":
                    event["comments"].append(value)
                else:
                    event[field] = value
            self.events.put(event)

    async def next(self, kind: str | None = None, timeout: float = 5.0) -> dict:
        from twisted.internet import reactor

        while True:
            d = self.events.get()
            timer = reactor.callLater(timeout, d.cancel)
            try:
                event = await d
            finally:
                if timer.active():
                    timer.cancel()
            if "data" not in event and "retry" not in event and event["comments"]:
                continue  # keep-alive
            if kind is None or event.get("event", "message") == kind:
                return event
            raise AssertionError(f"expected {kind}, got {event}")


async def open_stream(daemon, query: str, headers=None):
    response = await treq.get(daemon.url + "/events?" + query, headers=headers or {}, pool=daemon.pool, unbuffered=True)
    reader = EventReader()
    if response.code == 200:
        # `done` fires with "clean" when the stream ends properly, "dropped" otherwise.
        treq.collect(response, reader.feed).addBoth(
            lambda result: reader.done.callback("dropped" if isinstance(result, Failure) else "clean")
        )
        retry = await reader.next()
        assert retry.get("retry") == "2000"
    return response, reader


@pytest_twisted.ensureDeferred
async def test_stream_receives_the_envelope(daemon):
    response, reader = await open_stream(daemon, "channel=news&channel=sport")
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    first = await reader.next("subscribed")
    second = await reader.next("subscribed")
    assert {json.loads(first["data"])["channel"], json.loads(second["data"])["channel"]} == {"news", "sport"}
    status, published, _ = await daemon.publish({"channel": "news", "data": {"text": "oh hai"}})
    event = await reader.next("message")
    envelope = json.loads(event["data"])
    assert envelope == {
        "type": "message",
        "channel": "news",
        "event": "message",
        "offset": 1,
        "epoch": published["epoch"],
        "data": {"text": "oh hai"},
    }
    positions = parse_event_id(event["id"])
    assert positions["news"].offset == 1 and positions["sport"].offset == 0
    await daemon.service.stopService()
    assert await reader.done == "clean"  # the stream ends cleanly on shutdown
    assert reader.raw.endswith(b"\n\n")


@pytest_twisted.ensureDeferred
async def test_last_event_id_resumes_every_channel(daemon):
    response, reader = await open_stream(daemon, "channel=a&channel=b")
    await reader.next("subscribed")
    await reader.next("subscribed")
    await daemon.publish([{"channel": "a", "data": 1}, {"channel": "b", "data": 2}])
    await reader.next("message")
    last = await reader.next("message")
    for connection in list(daemon.hub.connections):
        connection.abort()  # the network drops the stream
    await reader.done
    await daemon.publish([{"channel": "a", "data": 3}, {"channel": "b", "data": 4}, {"channel": "a", "data": 5}])
    response, reader = await open_stream(daemon, "channel=a&channel=b", {"Last-Event-ID": last["id"]})
    events = [await reader.next() for _ in range(5)]
    subscribed = [json.loads(e["data"]) for e in events if e.get("event") == "subscribed"]
    messages = [json.loads(e["data"]) for e in events if "event" not in e]
    assert len(subscribed) == 2 and all(s["recovered"] for s in subscribed)
    assert sorted(m["data"] for m in messages) == [3, 4, 5]
    assert [m["data"] for m in messages if m["channel"] == "a"] == [3, 5]


@pytest_twisted.ensureDeferred
async def test_last_event_id_query_parameter_and_failed_recovery(make_daemon):
    daemon = await make_daemon(history_size=1)
    for i in range(3):
        status, state, _ = await daemon.publish({"channel": "a", "data": i})
    response, reader = await open_stream(daemon, f"channel=a&last_event_id=1.{state['epoch']}.a")
    answer = json.loads((await reader.next("subscribed"))["data"])
    assert (answer["recovered"], answer["offset"]) == (False, 3)
    await daemon.publish({"channel": "a", "data": "new"})
    event = await reader.next("message")
    assert json.loads(event["data"])["offset"] == 4


@pytest_twisted.ensureDeferred
async def test_keep_alive_comments_and_no_idle_timeout(make_daemon):
    daemon = await make_daemon(sse_keepalive=1.0, handshake_timeout=1.0)
    response, reader = await open_stream(daemon, "channel=a")
    await reader.next("subscribed")
    await sleep(2.5)
    assert reader.raw.count(b": keep-alive\n\n") >= 2
    assert not reader.done.called
    await daemon.publish({"channel": "a", "data": 1})
    assert json.loads((await reader.next("message"))["data"])["data"] == 1


@pytest.mark.parametrize(
    "query,status,code",
    [
        ("", 400, "missing_channel"),
        ("channel=bad%20name", 400, "invalid_channel"),
        ("channel=private-a", 401, "unauthorized"),
        ("channel=a&last_event_id=garbage", 400, "invalid_last_event_id"),
        ("channel=a&token=nope", 401, "unauthorized"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_are_json(daemon, query, status, code):
    response, _ = await open_stream(daemon, query)
    assert response.code == status
    assert json.loads(await response.content())["error"] == code


@pytest_twisted.ensureDeferred
async def test_private_channel_with_token_and_presence(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    grant = token(sub="ann", channels=["private-*", "presence-*"], info={"n": "Ann"})
    response, reader = await open_stream(daemon, f"channel=private-a&channel=presence-r&token={grant}")
    answers = {}
    for _ in range(2):
        data = json.loads((await reader.next("subscribed"))["data"])
        answers[data["channel"]] = data
    assert answers["presence-r"]["members"] == [{"id": "ann", "info": {"n": "Ann"}}]
    bob = await daemon.connect(f"channel=presence-r&token={token(sub='bob', channels=['presence-r'])}")
    join = await reader.next("join")
    assert json.loads(join["data"])["member"]["id"] == "bob"
    await bob.next_of("welcome")


@pytest_twisted.ensureDeferred
async def test_stream_ends_when_its_token_expires(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], token_leeway=0.0)
    response, reader = await open_stream(daemon, f"channel=private-a&token={token(ttl=1.2)}")
    await reader.next("subscribed")
    error = await reader.next("error", timeout=4)
    assert json.loads(error["data"])["code"] == "token_expired"
    assert await reader.done == "clean"
    await wait_for(lambda: not daemon.hub.connections)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_unsubscribes(daemon):
    response, reader = await open_stream(daemon, "channel=a")
    await reader.next("subscribed")
    assert daemon.hub.subscriber_count("a") == 1
    response.original._transport.stopProducing()  # the client goes away
    await reader.done
    await wait_for(lambda: daemon.hub.subscriber_count("a") == 0 and not daemon.hub.connections)


def test_parse_event_id():
    positions = parse_event_id("5.abc.news 0.x-y.a.b.c")
    assert positions["news"].offset == 5 and positions["a.b.c"].epoch == "x-y"
    for bad in ("x.y.z", "5..a", "5.e", "5.e.bad name"):
        with pytest.raises(PushieError):
            parse_event_id(bad)
