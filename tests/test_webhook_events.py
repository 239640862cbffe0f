"""Webhooks from a running daemon: occupancy and presence events reach a real receiver, signed."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import pytest_twisted
from twisted.logger import formatEvent

from pushie.config import ConfigError, load_settings
from tests.helpers import raw_connect, sleep, start_daemon, wait_for
from tests.test_auth import SECRET_1, token
from tests.test_webhooks import logged, receiver  # noqa: F401  (the fixtures)

HOOK_SECRET = "webhook-secret-for-the-tests"


@pytest_twisted.ensureDeferred
async def test_daemon_sends_occupancy_and_presence_webhooks(receiver):  # noqa: F811
    daemon = await start_daemon(
        engine="memory",
        subscriber_secrets=[SECRET_1],
        webhook_url=receiver.url,
        webhook_secret=HOOK_SECRET,
        webhook_debounce=0.3,
    )
    try:
        room = "presence-room"
        ann = await daemon.connect(f"channel=news&channel={room}&token={token(sub='ann', channels=[room])}")
        await ann.next_of("welcome")

        def names():
            return [event for request in receiver.events for event in request]

        await wait_for(lambda: len(names()) >= 3)
        assert sorted(names()) == sorted(
            [("channel_occupied", "news"), ("channel_occupied", room), ("member_added", room, "ann")]
        )
        request = receiver.requests[0]
        expected = hmac.new(HOOK_SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-pushie-signature"] == expected
        assert request.json["time_ms"] > 0

        ann.close()
        await ann.closed
        await wait_for(lambda: len(names()) >= 6)
        assert sorted(names()[3:]) == sorted(
            [("channel_vacated", "news"), ("channel_vacated", room), ("member_removed", room, "ann")]
        )
    finally:
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_page_reload_sends_no_webhook(receiver):  # noqa: F811
    daemon = await start_daemon(
        engine="memory", webhook_url=receiver.url, webhook_secret=HOOK_SECRET, webhook_debounce=0.5
    )
    try:
        first = await daemon.connect("channel=news")
        await first.next_of("welcome")
        await wait_for(lambda: receiver.requests)
        first.close()
        await first.closed
        again = await daemon.connect("channel=news")  # the reloaded page
        await again.next_of("welcome")
        await again.next_of("subscribed")
        await sleep(1.0)
        assert [e for r in receiver.events for e in r] == [("channel_occupied", "news")]
    finally:
        await daemon.stop()


def test_webhook_settings_are_checked():
    with pytest.raises(ConfigError, match="needs webhook_secret"):
        load_settings({"webhook_url": "https://app.example.com/hooks"})
    # With Redis, webhooks are cluster-wide (tests/test_cluster.py): no longer refused.
    clustered = load_settings(
        {"webhook_url": "https://app.example.com/hooks", "engine": "redis://127.0.0.1:6379/0"},
        {"PUSHIE_WEBHOOK_SECRET": "s"},
    )
    assert clustered.webhook_url == "https://app.example.com/hooks"
    with pytest.raises(ConfigError, match="webhook_url"):
        load_settings({"webhook_url": "ftp://x"}, {"PUSHIE_WEBHOOK_SECRET": "s"})
    with pytest.raises(ConfigError, match="under 300"):
        load_settings(environ={"PUSHIE_WEBHOOK_RETRY_FOR": "600"})
    settings = load_settings({"webhook_url": "https://app.example.com/hooks"}, {"PUSHIE_WEBHOOK_SECRET": "s"})
    assert settings.webhook_secret == "s"


@pytest_twisted.ensureDeferred
async def test_webhooks_tell_only_about_the_native_channel_space(receiver):  # noqa: F811
    from tests.test_pusher import APPS, OTHER_KEY, SDK, connect, expect, subscribe

    daemon = await start_daemon(
        engine="memory", webhook_url=receiver.url, webhook_secret=HOOK_SECRET, webhook_debounce=0.1, pusher_apps=APPS
    )
    try:
        other_app = await connect(daemon, key=OTHER_KEY)
        await subscribe(other_app, "hidden")
        first_app = await connect(daemon)
        signin = SDK(daemon).client.authenticate_user(first_app.socket_id, {"id": "u1"})
        first_app.send({"event": "pusher:signin", "data": signin})
        await expect(first_app, "pusher:signin_success")
        await subscribe(first_app, "shared")
        await wait_for(lambda: receiver.events)
        await sleep(0.3)
        assert [event for request in receiver.events for event in request] == [("channel_occupied", "shared")]
        # The server API lists the same space.
        status, body, _ = await daemon.get("/channels")
        assert status == 200 and json.loads(body)["channels"] == [{"name": "shared", "subscribers": 1}]
    finally:
        await daemon.stop()


async def _open_stream(daemon, channels):
    """An SSE request naming C{channels}, over raw TCP; returns once the stream's headers arrived."""
    client = await raw_connect(daemon.port)
    query = "&".join(f"channel={name}" for name in channels)
    client.transport.write(f"GET /events?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await wait_for(lambda: b"\r\n\r\n" in client.received)
    assert client.received.startswith(b"HTTP/1.1 200"), client.received[:200]
    return client


async def _close_stream(client):
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_a_flood_of_streams_cannot_push_legitimate_events_out_of_the_queue(receiver, logged):  # noqa: F811
    """
    Unauthenticated SSE requests naming 100 new channels each, against a
    receiver that does not answer yet and a small queue: the streams that
    close cost nothing (their occupied/vacated pairs cancel while queued),
    the ones held open lose their own occupancy events first, and the
    legitimate member_added and channel_occupied events are delivered.
    Everything dropped is counted, by event, in /metrics, and logged.
    """
    receiver.default = "hang"
    daemon = await start_daemon(
        engine="memory",
        subscriber_secrets=[SECRET_1],
        webhook_url=receiver.url,
        webhook_secret=HOOK_SECRET,
        webhook_debounce=0.1,
        webhook_timeout=60.0,
        webhook_max_queue=250,
    )
    webhooks = daemon.hub.webhooks
    held = []
    try:
        # Seven streams stay open: four fill every delivery slot (one batch each, unanswered),
        # three overfill the queue with their own channel_occupied events.
        for n in range(7):
            held.append(await _open_stream(daemon, [f"held-{n}-{i}" for i in range(100)]))
            if n < 4:
                await wait_for(lambda n=n: len(receiver.requests) == n + 1)
        assert webhooks.in_flight == 4 and webhooks.queued == 250

        room = "presence-room"
        ann = await daemon.connect(f"channel=news&channel={room}&token={token(sub='ann', channels=[room])}")
        await ann.next_of("welcome")
        await wait_for(lambda: ("member_added", room, "ann") in _waiting(webhooks))

        # Twenty short-lived streams, 2,000 new channels: 4,000 events before, none now.
        for n in range(20):
            await _close_stream(await _open_stream(daemon, [f"flood-{n}-{i}" for i in range(100)]))
        await wait_for(lambda: not any(name.startswith("flood-") for name in daemon.hub.channel_names()))
        await sleep(0.3)  # past the debounce: nothing is held back
        assert webhooks.held == 0 and not any(e[1].startswith("flood-") for e in _waiting(webhooks))

        receiver.default = 200
        for request in receiver.hung:
            request.setResponseCode(200)
            request.finish()
        await wait_for(lambda: webhooks.queued == 0 and webhooks.in_flight == 0)

        received = [event for request in receiver.events for event in request]
        assert ("member_added", room, "ann") in received
        assert ("channel_occupied", "news") in received and ("channel_occupied", room) in received
        assert not [e for e in received if e[1].startswith("flood-")]
        dropped = webhooks.dropped_by_event
        assert set(dropped) == {"channel_occupied"} and dropped["channel_occupied"] > 0
        # Every held channel's channel_occupied was either delivered or counted as dropped.
        delivered_held = [e for e in received if e[0] == "channel_occupied" and e[1].startswith("held-")]
        assert len(delivered_held) + dropped["channel_occupied"] == 700

        status, body, _ = await daemon.get("/metrics")
        assert f'pushie_webhook_events_dropped_total{{event="channel_occupied"}} {dropped["channel_occupied"]}.0' in (
            body.decode()
        )
        queue_full = [formatEvent(e) for e in logged if "queue full" in formatEvent(e)]
        assert len(queue_full) == 1 and "dropped channel_occupied" in queue_full[0]  # throttled
    finally:
        for client in held:
            await _close_stream(client)
        await daemon.stop()


def _waiting(webhooks):
    """The events waiting in the queue (white-box: the test needs to know they are queued, not sent)."""
    return [tuple(e.to_json().values()) for e in [*webhooks._cheap.values(), *webhooks._dear.values()]]
