"""
The real pusher-js (from npm, under Node) against the Pusher door: public,
private and presence channels, client events, user sign-in, termination,
and the ping/pong keep-alive in both directions.  Channel auth is signed in
pusher-js's C{customHandler} with the app's secret, as an app's auth endpoint
would.  Every test runs on both engines.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.helpers import sleep
from tests.pusher_js import browsers, pusher_js_installed  # noqa: F401  (the fixtures)
from tests.test_pusher import APPS, KEY, SDK, SECRET


@pytest.fixture
def pusher_daemon(make_daemon):
    async def make(**settings):
        settings.setdefault("pusher_apps", APPS)
        return await make_daemon(**settings)

    return make


@pytest_twisted.ensureDeferred
async def test_pusher_js_channels_and_client_events(pusher_daemon, browsers):  # noqa: F811
    daemon = await pusher_daemon()
    sdk = SDK(daemon)
    ann, bob = browsers(), browsers()
    await ann.connect(KEY, SECRET, daemon.port, user_id="ann", user_info={"name": "Ann"})
    await bob.connect(KEY, SECRET, daemon.port, user_id="bob", user_info={"name": "Bob"})

    # Public: a native publish and a Pusher trigger both arrive.
    await ann.subscribe("news")
    await daemon.publish({"channel": "news", "data": {"n": 1}})
    assert (await ann.wait(type="event", channel="news", event="message"))["data"] == {"n": 1}
    await sdk("trigger", "news", "headline", {"title": "hi"})
    assert (await ann.wait(type="event", channel="news", event="headline"))["data"] == {"title": "hi"}

    # Private: signed by the customHandler; a wrong secret is refused.
    await ann.subscribe("private-orders")
    await sdk("trigger", "private-orders", "created", {"id": 7})
    assert (await ann.wait(type="event", channel="private-orders", event="created"))["data"] == {"id": 7}
    mark = bob.mark()
    bob.send(cmd="subscribe", channel="private-orders", bad_auth=True)
    refused = await bob.wait(type="event", channel="private-orders", event="pusher:subscription_error", after=mark)
    assert refused["data"]["status"] == 401

    # Presence: members, joins and leaves as pusher-js's Members object sees them.
    joined = await ann.subscribe("presence-room")
    assert joined["data"]["count"] == 1 and joined["data"]["me"]["id"] == "ann"
    mark = ann.mark()
    joined = await bob.subscribe("presence-room")
    assert joined["data"]["count"] == 2
    assert joined["data"]["members"] == {"ann": {"name": "Ann"}, "bob": {"name": "Bob"}}
    added = await ann.wait(type="event", channel="presence-room", event="pusher:member_added", after=mark)
    assert added["data"] == {"id": "bob", "info": {"name": "Bob"}}

    # Client events: to the others, with the sender's user_id; never echoed.
    mark = ann.mark()
    await ann.command(cmd="trigger", channel="presence-room", event="client-typing", data={"on": True})
    typing = await bob.wait(type="event", channel="presence-room", event="client-typing")
    assert typing["data"] == {"on": True} and typing["metadata"] == {"user_id": "ann"}
    # A native subscriber of the same channel sees it too (it needs a token: use the server API).
    status, body, _ = await daemon.get("/channels/presence-room/history")
    assert status == 200 and json.loads(body)["messages"][-1]["event"] == "client-typing"

    mark_bob = bob.mark()
    await bob.command(cmd="unsubscribe", channel="presence-room")
    removed = await ann.wait(type="event", channel="presence-room", event="pusher:member_removed", after=mark)
    assert removed["data"]["id"] == "bob"
    await sleep(0.2)
    assert not ann.find(type="event", event="client-typing", after=mark)
    assert not bob.find(type="event", channel="presence-room", after=mark_bob)


@pytest_twisted.ensureDeferred
async def test_pusher_js_signin_user_events_and_terminate(pusher_daemon, browsers):  # noqa: F811
    daemon = await pusher_daemon()
    sdk = SDK(daemon)
    user = browsers()
    await user.connect(KEY, SECRET, daemon.port, user_id="u1")
    mark = user.mark()
    await user.command(cmd="signin")
    await user.wait(type="global_event", event="pusher:signin_success", after=mark)
    await user.wait(type="message", event="pusher_internal:subscription_succeeded", channel="#server-to-user-u1")

    await sdk("send_to_user", "u1", "notice", {"n": 1})
    assert (await user.wait(type="user_event", event="notice"))["data"] == {"n": 1}

    mark = user.mark()
    await sdk("terminate_user_connections", "u1")
    error = await user.wait(type="connection_error", after=mark)
    assert "4009" in json.dumps(error)
    await user.wait(type="state", current="disconnected", after=mark)
    # 4009 is in the do-not-reconnect class: pusher-js stays disconnected.
    await sleep(1.5)
    assert not user.find(type="state", current="connecting", after=mark)


@pytest_twisted.ensureDeferred
async def test_pusher_js_keeps_alive_with_ping_pong(pusher_daemon, browsers):  # noqa: F811
    daemon = await pusher_daemon(pusher_activity_timeout=0.5, pusher_pong_timeout=0.5)
    client = browsers()
    # pusher-js pings after its own activity timeout too (1 s, the least the server advertises).
    await client.connect(KEY, SECRET, daemon.port, activityTimeout=1000, pongTimeout=1000)
    mark = client.mark()
    await client.wait(type="message", event="pusher:ping", after=mark, timeout=5)
    await sleep(2.0)
    # pusher-js answered the server's pings (no 4201) and the server its pings: still connected.
    assert not client.find(type="state", after=mark)
    status = await client.command(cmd="status")
    assert status["ok"]
    assert client.find(type="status")[-1]["state"] == "connected"
