"""
Webhooks: signing, debounce, batching, retries, bounds and stopping.

The pure parts run without a reactor; the debounce and the backoff also run on
a L{Clock} against C{StubTreq}.  Everything else POSTs with real treq to a
real twisted.web receiver on 127.0.0.1, which answers what a test tells it
(200, 500, 400, or nothing at all), and every such test ends with no
connection, port or delayed call left behind.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import time
from collections import deque
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from pushie import __version__
from pushie.records import Transition
from pushie.webhooks import MAX_BATCH, Webhooks, check_url, encode_body, sign, verify
from tests.helpers import assert_reactor_clean, wait_for

SECRET = b"s3cret-shared-with-the-app"


# -- a receiver ---------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def events(self) -> list[tuple[str, ...]]:
        """(name, channel[, user_id]) of each event, in order."""
        return [tuple(e.values()) for e in self.json["events"]]


class Receiver(Resource):
    """
    Records every POST and answers from a script: a status code, or
    C{"hang"} to never answer.  With the script empty it answers C{default}.
    C{answered} pairs each POST with its answer (in arrival order).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Received] = []
        self.script: deque[int | str] = deque()
        self.default: int | str = 200
        self.hung: list[Any] = []
        self.answered: list[tuple[int | str, Received]] = []

    def render_POST(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append(Received(headers, request.content.read()))
        answer = self.script.popleft() if self.script else self.default
        self.answered.append((answer, self.requests[-1]))
        if answer == "hang":
            self.hung.append(request)
            request.notifyFinish().addErrback(lambda f: None)
            return NOT_DONE_YET
        request.setResponseCode(answer)
        return b"thanks"

    @property
    def events(self) -> list[list[tuple[str, ...]]]:
        return [r.events for r in self.requests]

    def delivered(self) -> list[tuple[str, ...]]:
        """Every event of every POST that was answered 2xx, in arrival order."""
        return [
            event
            for answer, received in self.answered
            if isinstance(answer, int) and 200 <= answer < 300
            for event in received.events
        ]


class _QuietSite(Site):
    """A Site without an access log that remembers its connections."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    def log(self, request: Any) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def receiver():
    resource = Receiver()
    site = _QuietSite(resource)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    resource.url = f"http://127.0.0.1:{port.getHost().port}/pushie/hooks"
    yield resource
    for protocol in site.connections:
        transport = getattr(protocol, "transport", None)
        if transport is not None and transport.connected:
            transport.abortConnection()
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def make_webhooks(receiver):
    """Build Webhooks POSTing to the receiver (test-sized times); all are stopped, then the reactor checked."""
    made: list[Webhooks] = []

    def make(**options: Any) -> Webhooks:
        options.setdefault("url", receiver.url)
        options.setdefault("secret", SECRET)
        options.setdefault("reactor", reactor)
        options.setdefault("debounce", 0.3)
        options.setdefault("retry_for", 5.0)
        options.setdefault("timeout", 5.0)
        options.setdefault("backoff", 0.05)
        options.setdefault("stop_timeout", 0.5)
        webhooks = Webhooks(**options)
        made.append(webhooks)
        return webhooks

    yield make
    for webhooks in made:
        await webhooks.stop()
    # The receiver fixture is torn down after this one; check once both are.
    await _after(receiver)


async def _after(receiver: Receiver) -> None:
    for request in receiver.hung:
        if not request.finished and not request._disconnected:
            request.setResponseCode(200)
            request.finish()


@pytest_twisted.async_yield_fixture
async def clean_reactor():
    """Requested first by real-network tests: checks the reactor after every other fixture is done."""
    yield
    await assert_reactor_clean()


@pytest.fixture
def logged():
    """Warnings and errors logged by pushie.webhooks during the test, as text."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "pushie.webhooks" and event["log_level"] in (
            LogLevel.warn,
            LogLevel.error,
            LogLevel.critical,
        ):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# -- pure parts -----------------------------------------------------------------


def test_sign_is_hex_hmac_sha256_of_the_raw_body():
    body = b'{"time_ms":1,"events":[]}'
    assert sign(SECRET, body) == hmac.new(SECRET, body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    "signature,ok",
    [
        (sign(SECRET, b"body"), True),
        (sign(SECRET, b"body").upper(), True),
        (" " + sign(SECRET, b"body") + "\n", True),
        (sign(SECRET, b"body").encode(), True),
        (sign(SECRET, b"Body"), False),
        (sign(b"another secret", b"body"), False),
        (sign(SECRET, b"body")[:-1], False),
        ("é" * 64, False),
        ("", False),
        (None, False),
        (42, False),
    ],
)
def test_verify(signature, ok):
    assert verify(SECRET, b"body", signature) is ok


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hooks", "https://app.example.com/pushie?x=1"])
def test_good_urls(url):
    assert check_url(url) == url


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "example.com/hooks", "http:///path", "http://h:99999/", "", None]
)
def test_bad_urls(url):
    with pytest.raises(ValueError):
        check_url(url)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        Webhooks("http://127.0.0.1/", b"", Clock(), http_client=StubTreq(Receiver()))
    with pytest.raises(ValueError):
        Webhooks("nope", SECRET, Clock(), http_client=StubTreq(Receiver()))


def _contrib():
    path = Path(__file__).parent.parent / "contrib" / "verify_webhook.py"
    spec = importlib.util.spec_from_file_location("verify_webhook", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contrib_receiver_example_accepts_fresh_signed_bodies_only():
    contrib = _contrib()
    now = 1_700_000_000.0
    body = encode_body(int(now * 1000), [])
    assert contrib.verify_webhook(body, sign(SECRET, body), SECRET, now=now + 299) == []
    for signature, at in [(sign(SECRET, body), now + 301), (sign(SECRET, body), now - 301), ("00" * 32, now)]:
        with pytest.raises(contrib.WebhookRejected) as raised:
            contrib.verify_webhook(body, signature, SECRET, now=at)
        assert raised.value.status == 401
    garbage = b"not json"
    with pytest.raises(contrib.WebhookRejected) as raised:
        contrib.verify_webhook(garbage, sign(SECRET, garbage), SECRET)
    assert raised.value.status == 400


# -- on a Clock, against StubTreq -------------------------------------------------


class Stubbed:
    """Webhooks on a Clock whose POSTs go to an in-memory Receiver."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.receiver = Receiver()
        self.stub = StubTreq(self.receiver)
        options.setdefault("debounce", 3.0)
        self.webhooks = Webhooks("http://app.example/hooks", SECRET, self.clock, http_client=self.stub, **options)

    def advance(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)
        for _ in range(3):  # requests, answers, and the requests that follow
            self.stub.flush()
            self.clock.advance(0)

    def stop(self) -> None:
        d = self.webhooks.stop()
        self.advance(0)
        assert d.called
        assert self.clock.getDelayedCalls() == []


def test_events_are_sent_in_the_turn_they_are_due_with_the_clocks_time():
    s = Stubbed()
    s.webhooks.channel_occupied("news")
    s.webhooks.member_added("presence-room", "42")
    assert s.receiver.requests == []  # nothing happens inside the caller's call
    s.advance(0)
    [request] = s.receiver.requests
    assert request.json == {
        "time_ms": 1_700_000_000_000,
        "events": [
            {"name": "channel_occupied", "channel": "news"},
            {"name": "member_added", "channel": "presence-room", "user_id": "42"},
        ],
    }
    s.stop()


def test_vacated_is_held_for_the_debounce_time():
    s = Stubbed(debounce=3.0)
    s.webhooks.channel_vacated("news")
    s.advance(2.9)
    assert s.receiver.requests == []
    s.advance(0.1)
    assert s.receiver.events == [[("channel_vacated", "news")]]
    assert s.receiver.requests[0].json["time_ms"] == 1_700_000_003_000
    s.stop()


def test_a_reload_within_the_window_is_no_webhook_at_all():
    s = Stubbed(debounce=3.0)
    s.webhooks.channel_vacated("news")
    s.webhooks.member_removed("presence-room", "42")
    s.advance(2)
    s.webhooks.channel_occupied("news")
    s.webhooks.member_added("presence-room", "42")
    s.webhooks.member_removed("presence-room", "7")  # someone else really leaves
    s.advance(60)
    assert s.receiver.events == [[("member_removed", "presence-room", "7")]]
    assert s.webhooks.held == 0
    s.stop()


def test_a_reload_after_the_window_is_two_webhooks():
    s = Stubbed(debounce=3.0)
    s.webhooks.channel_vacated("news")
    s.advance(3)
    s.webhooks.channel_occupied("news")
    s.advance(0)
    assert s.receiver.events == [[("channel_vacated", "news")], [("channel_occupied", "news")]]
    s.stop()


def test_a_turn_with_many_events_is_sent_in_batches_of_100():
    s = Stubbed()
    for i in range(MAX_BATCH + 50):
        s.webhooks.member_added("presence-room", f"user-{i}")
    s.advance(0)
    assert [len(events) for events in s.receiver.events] == [MAX_BATCH, 50]
    ids = [event[2] for events in s.receiver.events for event in events]
    assert ids == [f"user-{i}" for i in range(MAX_BATCH + 50)]
    s.stop()


def test_backoff_doubles_with_jitter_until_retry_for_runs_out(logged):
    s = Stubbed(retry_for=60.0)
    s.receiver.default = 503
    s.webhooks.channel_occupied("news")
    attempts: list[float] = []
    for _ in range(1000):
        if len(s.receiver.requests) > len(attempts):
            attempts.append(s.clock.seconds())
        s.advance(0.25)
    waits = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    ceilings = [min(2**i, 30) for i in range(len(waits))]
    assert all(ceiling / 2 - 0.25 <= wait <= ceiling + 0.25 for wait, ceiling in zip(waits, ceilings, strict=True))
    assert attempts[-1] - attempts[0] <= 60.25
    assert len(set(r.body for r in s.receiver.requests)) == 1  # a retry sends the very same bytes
    assert s.webhooks.failed == 1 and s.webhooks.in_flight == 0
    [warning] = logged
    assert "failed" in formatEvent(warning) and "HTTP 503" in formatEvent(warning)
    s.stop()


def test_stop_while_a_retry_waits_gives_up_at_once():
    s = Stubbed()
    s.receiver.default = 500
    s.webhooks.channel_occupied("news")
    s.advance(0)
    assert s.webhooks.in_flight == 1 and len(s.receiver.requests) == 1
    s.stop()  # fires at once, with no timer left on the clock
    assert s.webhooks.failed == 1


def test_stop_gives_a_hung_request_stop_timeout_then_drops_it():
    s = Stubbed(stop_timeout=2.0)
    s.receiver.default = "hang"
    s.webhooks.channel_occupied("news")
    s.advance(0)
    d = s.webhooks.stop()
    s.advance(1.9)
    assert not d.called
    s.advance(0.1)
    assert d.called and s.webhooks.failed == 1
    assert s.clock.getDelayedCalls() == []


def test_the_queue_is_bounded_and_drops_the_oldest(logged):
    s = Stubbed(max_queue=3, concurrency=1)
    s.receiver.default = "hang"
    s.webhooks.member_added("presence-room", "first")
    s.advance(0)
    assert s.webhooks.in_flight == 1
    for i in range(6):
        s.webhooks.member_added("presence-room", str(i))
    assert s.webhooks.queued == 3 and s.webhooks.dropped == 3
    [warning] = logged  # one line, the other two are counted
    assert "queue full" in formatEvent(warning)
    s.receiver.default = 200
    request = s.receiver.hung.pop()
    request.finish()
    s.advance(0)
    assert s.receiver.events[-1] == [("member_added", "presence-room", str(i)) for i in (3, 4, 5)]
    s.stop()


def test_an_event_cancels_its_opposite_while_it_still_waits():
    s = Stubbed(debounce=3.0, concurrency=1)
    s.receiver.default = "hang"
    s.webhooks.channel_occupied("busy")
    s.advance(0)
    assert s.webhooks.in_flight == 1  # every slot taken: what follows waits in the queue
    s.webhooks.channel_occupied("a")
    s.webhooks.member_added("presence-r", "42")
    s.webhooks.channel_occupied("b")
    assert s.webhooks.queued == 3
    s.webhooks.channel_vacated("a")  # not held for the debounce: its occupied was never sent
    s.webhooks.member_removed("presence-r", "42")
    assert (s.webhooks.queued, s.webhooks.held, s.webhooks.cancelled) == (1, 0, 4)
    s.receiver.default = 200
    s.receiver.hung.pop().finish()
    s.advance(0)
    assert s.receiver.events[-1] == [("channel_occupied", "b")]
    assert s.webhooks.dropped == 0
    s.stop()


def test_a_full_queue_drops_occupancy_events_before_member_events(logged):
    dropped: list[str] = []
    s = Stubbed(max_queue=3, concurrency=1, on_drop=dropped.append)
    s.receiver.default = "hang"
    s.webhooks.channel_occupied("busy")
    s.advance(0)
    s.webhooks.member_added("presence-r", "1")
    s.webhooks.channel_occupied("a")
    s.webhooks.channel_occupied("b")
    s.webhooks.member_added("presence-r", "2")  # full: the oldest occupancy event ("a") goes
    s.webhooks.channel_occupied("c")  # "b" goes
    s.webhooks.member_added("presence-r", "3")  # "c" goes
    s.webhooks.member_added("presence-r", "4")  # only member events wait: the oldest of them goes
    assert dropped == ["channel_occupied"] * 3 + ["member_added"]
    assert s.webhooks.dropped_by_event == {"channel_occupied": 3, "member_added": 1}
    assert s.webhooks.dropped == 4
    [warning] = logged  # throttled: one line, the rest are counted
    text = formatEvent(warning)
    assert "queue full" in text and "dropped channel_occupied of a" in text
    s.receiver.default = 200
    s.receiver.hung.pop().finish()
    s.advance(0)
    assert s.receiver.events[-1] == [("member_added", "presence-r", str(i)) for i in (2, 3, 4)]
    s.stop()


def test_the_queue_keeps_arrival_order_across_kinds():
    s = Stubbed(concurrency=1)
    s.receiver.default = "hang"
    s.webhooks.channel_occupied("busy")
    s.advance(0)
    s.webhooks.member_added("presence-r", "1")
    s.webhooks.channel_occupied("a")
    s.webhooks.member_added("presence-r", "2")
    s.webhooks.channel_occupied("b")
    s.receiver.default = 200
    s.receiver.hung.pop().finish()
    s.advance(0)
    assert s.receiver.events[-1] == [
        ("member_added", "presence-r", "1"),
        ("channel_occupied", "a"),
        ("member_added", "presence-r", "2"),
        ("channel_occupied", "b"),
    ]
    s.stop()


# -- transitions decided by the engine (Redis: cluster-wide) -----------------------


def _decided(*events: tuple[str, ...], at: int | None = None) -> list[Transition]:
    return [
        Transition(e[0], e[1], e[2] if len(e) > 2 else None, token=f"id-{n}", time_ms=at) for n, e in enumerate(events)
    ]


def test_decided_transitions_are_sent_at_once_and_settled_once_delivered():
    s = Stubbed(debounce=3.0)
    settled: list[str] = []
    s.webhooks.take(
        _decided(("channel_vacated", "news"), ("member_removed", "presence-r", "7")),
        lambda ts: settled.extend(t.token for t in ts),
    )
    s.advance(0)  # already debounced by the engine: not held again
    assert s.receiver.events == [[("channel_vacated", "news"), ("member_removed", "presence-r", "7")]]
    assert settled == ["id-0", "id-1"]
    s.stop()


def test_decided_transitions_carry_when_they_were_decided_and_a_post_never_mixes_two_reads():
    s = Stubbed(concurrency=1)
    s.receiver.default = "hang"
    s.webhooks.take(_decided(("channel_occupied", "busy"), at=1_600_000_000_000), lambda ts: None)
    s.advance(0)
    # Two reads of the stream wait together; the second was decided earlier (another node's run).
    s.webhooks.take(_decided(("channel_occupied", "a"), ("channel_occupied", "b"), at=1_600_000_000_500), len)
    s.webhooks.take(_decided(("channel_occupied", "c"), at=1_600_000_000_200), lambda ts: None)
    s.receiver.default = 200
    s.receiver.hung.pop().finish()
    s.advance(0)
    s.advance(0)
    assert s.receiver.events == [
        [("channel_occupied", "busy")],
        [("channel_occupied", "a"), ("channel_occupied", "b")],
        [("channel_occupied", "c")],
    ]
    # time_ms is the decision time (not the POST's), so a receiver that orders by it orders as decided.
    assert [r.json["time_ms"] for r in s.receiver.requests] == [1_600_000_000_000, 1_600_000_000_500, 1_600_000_000_200]
    s.stop()


def test_decided_transitions_are_settled_when_given_up_but_not_when_stopped_first():
    s = Stubbed(retry_for=2.0, backoff=1.0)
    s.receiver.default = 400  # refused: given up at once
    settled: list[str] = []
    s.webhooks.take(_decided(("channel_occupied", "refused")), lambda ts: settled.extend(t.token for t in ts))
    s.advance(0)
    assert settled == ["id-0"] and s.webhooks.failed == 1
    s.receiver.default = 503  # retried: still being delivered when the daemon stops
    s.webhooks.take(
        [Transition("channel_occupied", "retried", None, "id-9")], lambda ts: settled.extend(t.token for t in ts)
    )
    s.advance(0)
    assert s.webhooks.in_flight == 1
    s.stop()
    assert settled == ["id-0"]  # id-9 stays the engine's: another node delivers it


def test_decided_transitions_leave_with_their_opposite_and_the_room_bounds_what_is_taken():
    s = Stubbed(max_queue=4, concurrency=1)
    s.receiver.default = "hang"
    settled: list[str] = []

    def settle(ts: Any) -> None:
        settled.extend(t.token for t in ts)

    s.webhooks.take([Transition("channel_occupied", "busy", None, "b")], settle)
    s.advance(0)
    assert s.webhooks.in_flight == 1 and s.webhooks.room() == 4
    s.webhooks.take([Transition("channel_occupied", "x", None, "o"), Transition("member_added", "p", "1", "a")], settle)
    assert s.webhooks.room() == 2
    # The opposite of a waiting event cancels it: both are settled, neither is sent.
    s.webhooks.take([Transition("channel_vacated", "x", None, "v")], settle)
    assert s.webhooks.room() == 3 and sorted(settled) == ["o", "v"]
    s.receiver.default = 200
    s.receiver.hung.pop().finish()
    s.advance(0)
    assert s.receiver.events[-1] == [("member_added", "p", "1")]
    assert sorted(settled) == ["a", "b", "o", "v"]
    s.stop()
    assert s.webhooks.room() == 0  # stopped: takes nothing more


# -- against a real receiver -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_signed_json_body_reaches_the_receiver(clean_reactor, receiver, make_webhooks):
    webhooks = make_webhooks()
    webhooks.channel_occupied("news")
    webhooks.member_added("presence-room", "42")
    await wait_for(lambda: receiver.requests)
    [request] = receiver.requests
    expected = hmac.new(SECRET, request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-pushie-signature"] == expected
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"Pushie/{__version__}"
    body = request.json
    assert isinstance(body["time_ms"], int) and abs(body["time_ms"] / 1000 - time.time()) < 60
    assert body["events"] == [
        {"name": "channel_occupied", "channel": "news"},
        {"name": "member_added", "channel": "presence-room", "user_id": "42"},
    ]
    assert _contrib().verify_webhook(request.body, request.headers["x-pushie-signature"], SECRET)
    await webhooks.stop()
    assert webhooks.delivered == 2


@pytest_twisted.ensureDeferred
async def test_vacated_is_debounced_and_a_reload_sends_nothing(clean_reactor, receiver, make_webhooks):
    webhooks = make_webhooks(debounce=0.3)
    webhooks.channel_occupied("news")
    await wait_for(lambda: len(receiver.requests) == 1)
    webhooks.channel_vacated("news")
    webhooks.channel_occupied("news")  # a page reload
    assert webhooks.held == 0 and webhooks.queued == 0
    webhooks.channel_vacated("news")  # the page is closed for good
    assert webhooks.held == 1
    await wait_for(lambda: len(receiver.requests) == 2)
    assert receiver.events == [[("channel_occupied", "news")], [("channel_vacated", "news")]]
    await webhooks.stop()
    assert len(receiver.requests) == 2


@pytest_twisted.ensureDeferred
async def test_members_added_and_removed(clean_reactor, receiver, make_webhooks):
    webhooks = make_webhooks(debounce=0.3)
    webhooks.member_added("presence-room", "42")
    await wait_for(lambda: len(receiver.requests) == 1)
    webhooks.member_removed("presence-room", "42")
    webhooks.member_added("presence-room", "42")  # a reload: nothing
    webhooks.member_removed("presence-room", "42")
    await wait_for(lambda: len(receiver.requests) == 2)
    assert receiver.events == [
        [("member_added", "presence-room", "42")],
        [("member_removed", "presence-room", "42")],
    ]


@pytest_twisted.ensureDeferred
async def test_500_and_429_are_retried_with_the_same_body(clean_reactor, receiver, make_webhooks, logged):
    receiver.script.extend([500, 429, 200])
    webhooks = make_webhooks(backoff=0.05)
    webhooks.channel_occupied("news")
    await wait_for(lambda: webhooks.delivered == 1)
    assert len(receiver.requests) == 3
    assert len({(r.body, r.headers["x-pushie-signature"]) for r in receiver.requests}) == 1
    assert logged == []


@pytest_twisted.ensureDeferred
async def test_gives_up_after_retry_for_and_logs_once(clean_reactor, receiver, make_webhooks, logged):
    receiver.default = 500
    failures: list[int] = []
    webhooks = make_webhooks(backoff=0.05, retry_for=0.3, on_failure=failures.append)
    webhooks.channel_occupied("a")
    await wait_for(lambda: receiver.requests)
    webhooks.channel_occupied("b")  # a later turn: a second batch
    await wait_for(lambda: webhooks.failed == 2)
    assert len(receiver.requests) >= 4  # each batch was tried more than once
    [warning] = logged  # the second failure is only counted
    assert "HTTP 500" in formatEvent(warning) and "gave up" in formatEvent(warning)
    assert warning.get("log_failure") is None  # never a traceback
    assert webhooks.in_flight == 0 and webhooks.queued == 0
    assert failures == [1, 1]  # one call per POST given up, with its number of events


@pytest_twisted.ensureDeferred
async def test_a_dead_receiver_is_retried_then_given_up(clean_reactor, make_webhooks, logged):
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(Resource()))
    url = f"http://127.0.0.1:{port.getHost().port}/hooks"
    await port.stopListening()
    webhooks = make_webhooks(url=url, backoff=0.05, retry_for=0.3)
    assert webhooks.channel_occupied("news") is None
    await wait_for(lambda: webhooks.failed == 1)
    [warning] = logged
    assert "ConnectionRefused" in formatEvent(warning) or "refused" in formatEvent(warning).lower()


@pytest_twisted.ensureDeferred
async def test_4xx_is_not_retried(clean_reactor, receiver, make_webhooks, logged):
    receiver.script.append(400)
    webhooks = make_webhooks(backoff=0.05)
    webhooks.channel_occupied("news")
    await wait_for(lambda: webhooks.failed == 1)
    webhooks.channel_vacated("news")
    await wait_for(lambda: webhooks.delivered == 1)
    assert receiver.events == [[("channel_occupied", "news")], [("channel_vacated", "news")]]
    [warning] = logged
    assert "HTTP 400" in formatEvent(warning)


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_answers_holds_up_nothing(clean_reactor, receiver, make_webhooks):
    receiver.script.append("hang")
    webhooks = make_webhooks(timeout=30.0, concurrency=2)
    webhooks.channel_occupied("slow")
    await wait_for(lambda: receiver.hung)
    # The caller's calls are plain bookkeeping: they return None at once,
    # with the event already queued, while a request hangs.
    assert webhooks.channel_occupied("a") is None
    assert webhooks.queued == 1
    await wait_for(lambda: webhooks.delivered == 1)
    assert webhooks.member_added("presence-room", "42") is None
    await wait_for(lambda: webhooks.delivered == 2)
    assert receiver.events[1:] == [[("channel_occupied", "a")], [("member_added", "presence-room", "42")]]
    assert not receiver.hung[0].finished
    # Stopping gives the hung request stop_timeout, then drops it.
    await webhooks.stop()
    assert webhooks.failed == 1 and webhooks.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_request_that_times_out_is_retried(clean_reactor, receiver, make_webhooks):
    receiver.script.append("hang")
    webhooks = make_webhooks(timeout=0.3, backoff=0.05)
    webhooks.channel_occupied("news")
    await wait_for(lambda: webhooks.delivered == 1)
    assert len(receiver.requests) == 2 and receiver.requests[0].body == receiver.requests[1].body
    await wait_for(lambda: receiver.hung[0]._disconnected)  # the timed-out connection was closed


@pytest_twisted.ensureDeferred
async def test_the_queue_bound_with_a_stuck_receiver(clean_reactor, receiver, make_webhooks, logged):
    receiver.script.append("hang")
    webhooks = make_webhooks(concurrency=1, max_queue=3, timeout=30.0)
    webhooks.member_added("presence-room", "first")
    await wait_for(lambda: receiver.hung)
    for i in range(6):
        webhooks.member_added("presence-room", str(i))
    assert webhooks.queued == 3 and webhooks.dropped == 3
    receiver.hung[0].setResponseCode(200)
    receiver.hung[0].finish()
    await wait_for(lambda: webhooks.delivered == 4)
    assert receiver.events[1] == [("member_added", "presence-room", str(i)) for i in (3, 4, 5)]
    assert len(logged) == 1 and "queue full" in formatEvent(logged[0])


@pytest_twisted.ensureDeferred
async def test_stop_sends_held_events_then_ignores_calls(clean_reactor, receiver, make_webhooks):
    webhooks = make_webhooks(debounce=30.0)
    webhooks.channel_vacated("news")
    webhooks.member_removed("presence-room", "42")
    assert receiver.requests == []
    await webhooks.stop()
    assert receiver.events == [[("channel_vacated", "news"), ("member_removed", "presence-room", "42")]]
    webhooks.channel_occupied("news")
    webhooks.channel_vacated("news")
    assert webhooks.queued == 0 and webhooks.held == 0
    await webhooks.stop()  # twice is fine


@pytest_twisted.ensureDeferred
async def test_stop_drops_a_retry_that_waits(clean_reactor, receiver, make_webhooks):
    receiver.default = 500
    webhooks = make_webhooks(backoff=10.0, retry_for=60.0)
    webhooks.channel_occupied("news")
    await wait_for(lambda: webhooks._sleeping)  # waiting to retry
    await webhooks.stop()
    assert webhooks.failed == 1 and len(receiver.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_given_client_and_its_pool_stay_the_callers(clean_reactor, receiver, make_webhooks):
    pool = HTTPConnectionPool(reactor, persistent=True)
    webhooks = make_webhooks(http_client=HTTPClient(Agent(reactor, pool=pool)))
    webhooks.channel_occupied("news")
    await wait_for(lambda: webhooks.delivered == 1)
    await webhooks.stop()
    assert pool._connections  # still cached: the pool is not Webhooks' to close
    await pool.closeCachedConnections()
