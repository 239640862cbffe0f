"""Webhooks from a running daemon: occupancy and presence events reach a real receiver, signed."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import pytest_twisted

from pushie.config import ConfigError, load_settings
from tests.helpers import sleep, start_daemon, wait_for
from tests.test_auth import SECRET_1, token
from tests.test_webhooks import receiver  # noqa: F401  (the fixture)

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
    with pytest.raises(ConfigError, match="memory engine only"):
        load_settings(
            {"webhook_url": "https://app.example.com/hooks", "engine": "redis://127.0.0.1:6379/0"},
            {"PUSHIE_WEBHOOK_SECRET": "s"},
        )
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
