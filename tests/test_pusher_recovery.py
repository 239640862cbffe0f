"""
Recovery for Pusher clients (the Pushie extension of docs/PROTOCOL.md §13.1),
spoken frame by frame by Autobahn clients: a subscription that opts in gets
positions in its frames and, resubscribing with C{since} after a drop,
exactly the events it missed, or C{recovered: false}.  Clients that do not
opt in get Pusher's frames byte for byte.  Publishing goes through the
official C{pusher} SDK (the Pusher HTTP API) and C{POST /publish}.  Every
test runs on both engines.  The plugin in a browser: test_pusher_browser.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.helpers import WSClient, sleep
from tests.test_pusher import SDK, connect, expect, next_event, start


async def subscribe_with(client: WSClient, channel: str, pushie: Any, **data: Any) -> dict[str, Any]:
    client.send({"event": "pusher:subscribe", "data": {"channel": channel, "pushie": pushie, **data}})
    return await expect(client, "pusher_internal:subscription_succeeded")


async def events(client: WSClient, count: int) -> list[dict[str, Any]]:
    return [await next_event(client) for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_resubscribing_with_since_replays_exactly_what_was_missed(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    client = await connect(daemon)
    succeeded = await subscribe_with(client, "news", {})
    position = succeeded["data"]["pushie"]
    assert position["offset"] == 0 and "recovered" not in position
    epoch = position["epoch"]

    await sdk("trigger", "news", "headline", {"n": 1})
    await daemon.publish({"channel": "news", "event": "headline", "data": {"n": 2}})
    got = await events(client, 2)
    assert [(e["data"], e["pushie"]) for e in got] == [
        ({"n": 1}, {"offset": 1, "epoch": epoch}),
        ({"n": 2}, {"offset": 2, "epoch": epoch}),
    ]

    # The connection drops; three events go out while it is away.
    client.protocol.transport.abortConnection()
    await client.closed
    for n in (3, 4, 5):
        await sdk("trigger", "news", "headline", {"n": n})

    again = await connect(daemon)
    succeeded = await subscribe_with(again, "news", {"since": {"offset": 2, "epoch": epoch}})
    assert succeeded["data"] == {"pushie": {"offset": 2, "epoch": epoch, "recovered": True}}
    replayed = await events(again, 3)
    assert [(e["event"], e["data"], e["pushie"]["offset"]) for e in replayed] == [
        ("headline", {"n": 3}, 3),
        ("headline", {"n": 4}, 4),
        ("headline", {"n": 5}, 5),
    ]
    # Then live, right after, and nothing twice.
    await daemon.publish([{"channel": "news", "data": 6}, {"channel": "news", "data": 7}])
    live = await events(again, 2)
    assert [(e["data"], e["pushie"]["offset"]) for e in live] == [(6, 6), (7, 7)]
    await sleep(0.1)
    assert again.pending() == []

    # Resuming from the channel's current position: nothing to replay, recovered.
    third = await connect(daemon)
    succeeded = await subscribe_with(third, "news", {"since": {"offset": 7, "epoch": epoch}})
    assert succeeded["data"]["pushie"] == {"offset": 7, "epoch": epoch, "recovered": True}
    await sleep(0.1)
    assert third.pending() == []


@pytest_twisted.ensureDeferred
async def test_private_and_presence_channels_recover_too(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    client = await connect(daemon)
    auth = sdk.authenticate("private-orders", client.socket_id)
    await subscribe_with(client, "private-orders", {}, **auth)
    member = {"user_id": "ann", "user_info": {"name": "Ann"}}
    presence_auth = sdk.authenticate("presence-room", client.socket_id, member)
    succeeded = await subscribe_with(client, "presence-room", {}, **presence_auth)
    assert succeeded["data"]["presence"]["ids"] == ["ann"]
    assert succeeded["data"]["pushie"]["offset"] == 0
    # (A channel that never had an event has no lasting epoch, §2.3: give both one.)
    await sdk("trigger", ["private-orders", "presence-room"], "created", {"id": 1})
    first = await events(client, 2)
    positions = {e["channel"]: e["pushie"] for e in first}
    assert [p["offset"] for p in positions.values()] == [1, 1]
    client.protocol.transport.abortConnection()
    await client.closed

    await sdk("trigger", ["private-orders", "presence-room"], "created", {"id": 2})
    again = await connect(daemon)
    auth = sdk.authenticate("private-orders", again.socket_id)
    since = {"since": positions["private-orders"]}
    succeeded = await subscribe_with(again, "private-orders", since, **auth)
    assert succeeded["data"]["pushie"] == {**positions["private-orders"], "recovered": True}
    created = await expect(again, "created")
    assert created["data"] == {"id": 2} and created["pushie"]["offset"] == 2
    presence_auth = sdk.authenticate("presence-room", again.socket_id, member)
    since = {"since": positions["presence-room"]}
    succeeded = await subscribe_with(again, "presence-room", since, **presence_auth)
    assert succeeded["data"]["presence"]["ids"] == ["ann"]
    assert succeeded["data"]["pushie"]["recovered"] is True
    created = await expect(again, "created")
    assert created["channel"] == "presence-room" and created["pushie"]["offset"] == 2


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_recovered_is_said(make_daemon):
    daemon = await start(make_daemon, history_size=2)
    sdk = SDK(daemon)
    client = await connect(daemon)
    epoch = (await subscribe_with(client, "news", {}))["data"]["pushie"]["epoch"]
    await sdk("trigger", "news", "e", "1")
    assert (await expect(client, "e"))["pushie"]["offset"] == 1
    client.close()
    await client.closed
    for n in range(2, 7):
        await sdk("trigger", "news", "e", str(n))

    # Offsets 2 to 6 were published; the history keeps two: too old.
    again = await connect(daemon)
    succeeded = await subscribe_with(again, "news", {"since": {"offset": 1, "epoch": epoch}})
    assert succeeded["data"]["pushie"] == {"offset": 6, "epoch": epoch, "recovered": False}
    # No replay; the next event follows the announced position.
    await sdk("trigger", "news", "e", "7")
    following = await expect(again, "e")
    assert following["data"] == 7 and following["pushie"] == {"offset": 7, "epoch": epoch}

    # Another epoch, or an offset the channel never reached: not recovered either.
    for since in ({"offset": 5, "epoch": "another-epoch"}, {"offset": 99, "epoch": epoch}):
        other = await connect(daemon)
        succeeded = await subscribe_with(other, "news", {"since": since})
        assert succeeded["data"]["pushie"] == {"offset": 7, "epoch": epoch, "recovered": False}
        await sleep(0.1)
        assert other.pending() == []


@pytest_twisted.ensureDeferred
async def test_a_cache_channel_resumes_or_sends_its_last_event(make_daemon):
    daemon = await start(make_daemon, history_size=2)
    sdk = SDK(daemon)
    await sdk("trigger", "cache-prices", "price", {"p": 1})
    client = await connect(daemon)
    succeeded = await subscribe_with(client, "cache-prices", {})
    # The cached event follows: the announced position is the one before it.
    epoch = succeeded["data"]["pushie"]["epoch"]
    assert succeeded["data"]["pushie"]["offset"] == 0
    assert (await expect(client, "price"))["pushie"]["offset"] == 1
    client.close()
    await client.closed
    await sdk("trigger", "cache-prices", "price", {"p": 2})

    # Resuming gives what was missed (not the last event again).
    again = await connect(daemon)
    succeeded = await subscribe_with(again, "cache-prices", {"since": {"offset": 1, "epoch": epoch}})
    assert succeeded["data"]["pushie"] == {"offset": 1, "epoch": epoch, "recovered": True}
    missed = await expect(again, "price")
    assert missed["data"] == {"p": 2} and missed["pushie"]["offset"] == 2
    # A position of another epoch: not recovered, and the cache's last event instead.
    other = await connect(daemon)
    succeeded = await subscribe_with(other, "cache-prices", {"since": {"offset": 1, "epoch": "gone"}})
    assert succeeded["data"]["pushie"] == {"offset": 1, "epoch": epoch, "recovered": False}
    assert (await expect(other, "price"))["data"] == {"p": 2}
    await sleep(0.1)
    assert again.pending() == [] and other.pending() == []
    # A position the history no longer reaches (it keeps two): the same.
    for p in (3, 4, 5):
        await sdk("trigger", "cache-prices", "price", {"p": p})
        await expect(again, "price")
    late = await connect(daemon)
    succeeded = await subscribe_with(late, "cache-prices", {"since": {"offset": 2, "epoch": epoch}})
    assert succeeded["data"]["pushie"] == {"offset": 4, "epoch": epoch, "recovered": False}
    cached = await expect(late, "price")
    assert cached["data"] == {"p": 5} and cached["pushie"]["offset"] == 5


@pytest_twisted.ensureDeferred
async def test_events_left_out_for_a_socket_advance_its_position(make_daemon):
    """
    Pusher never echoes a client event to its sender, nor sends a trigger to
    the socket_id it names: an opted-in sender gets only the position (so
    that a resubscribe does not replay it), which pusher-js ignores.
    """
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    ann, bob = await connect(daemon), await connect(daemon)
    for client in (ann, bob):
        auth = sdk.authenticate("private-chat", client.socket_id)
        epoch = (await subscribe_with(client, "private-chat", {}, **auth))["data"]["pushie"]["epoch"]
    ann.send({"event": "client-typing", "channel": "private-chat", "data": {"on": True}})
    typing = await expect(bob, "client-typing")
    assert typing["pushie"] == {"offset": 1, "epoch": epoch}
    skip = await next_event(ann)
    assert skip == {
        "event": "pusher_internal:pushie_skip",
        "channel": "private-chat",
        "data": {},
        "pushie": {"offset": 1, "epoch": epoch},
    }
    # A trigger that leaves Bob out, in a batch with one for everybody (one burst).
    await sdk("trigger_batch", [
        {"channel": "private-chat", "name": "saved", "data": "1", "socket_id": bob.socket_id},
        {"channel": "private-chat", "name": "saved", "data": "2"},
    ])  # fmt: skip
    assert [(e["event"], e["pushie"]["offset"]) for e in await events(bob, 2)] == [
        ("pusher_internal:pushie_skip", 2),
        ("saved", 3),
    ]
    assert [(e["data"], e["pushie"]["offset"]) for e in await events(ann, 2)] == [(1, 2), (2, 3)]


@pytest_twisted.ensureDeferred
async def test_clients_that_do_not_opt_in_see_pusher_frames_unchanged(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    plain, opted = await connect(daemon), await connect(daemon)
    plain.send({"event": "pusher:subscribe", "data": {"channel": "news"}})
    await expect(plain, "pusher_internal:subscription_succeeded")
    await subscribe_with(opted, "news", {})
    auth = sdk.authenticate("private-chat", plain.socket_id)
    plain.send({"event": "pusher:subscribe", "data": {"channel": "private-chat", **auth}})
    await expect(plain, "pusher_internal:subscription_succeeded")
    mark = len(plain.raw)

    # One event, then two in one turn (one burst): the opted-in subscriber
    # of the same channel gets positions, the plain one the frames it always had.
    await sdk("trigger", "news", "one", {"n": 1}, socket_id=opted.socket_id)
    await daemon.publish([{"channel": "news", "data": 2}, {"channel": "news", "event": "three", "data": "3"}])
    await sdk("trigger", "private-chat", "excluded", "x", socket_id=plain.socket_id)
    await sdk("trigger", "private-chat", "included", "y")
    for _ in range(4):
        await next_event(plain)
    assert plain.raw[mark:] == [
        b'{"event":"one","channel":"news","data":"{\\"n\\": 1}"}',  # the SDK's JSON, as it sent it
        b'{"event":"message","channel":"news","data":"2"}',
        b'{"event":"three","channel":"news","data":"3"}',
        b'{"event":"included","channel":"private-chat","data":"y"}',
    ]
    assert (
        plain.raw[mark - 1]
        == b'{"event":"pusher_internal:subscription_succeeded","channel":"private-chat","data":"{}"}'
    )
    opted_events = await events(opted, 3)
    assert [(e["event"], e["pushie"]["offset"]) for e in opted_events] == [
        ("pusher_internal:pushie_skip", 1),
        ("message", 2),
        ("three", 3),
    ]
    await sleep(0.1)
    assert plain.pending() == [] and opted.pending() == []


@pytest_twisted.ensureDeferred
async def test_a_bad_recovery_field_is_refused_with_what_to_send(make_daemon):
    daemon = await start(make_daemon)
    client = await connect(daemon)
    for pushie in ("yes", {"since": {"offset": -1, "epoch": "e"}}, {"since": {"offset": 1}}):
        client.send({"event": "pusher:subscribe", "data": {"channel": "news", "pushie": pushie}})
        error = await expect(client, "pusher:error")
        assert "pushie" in error["data"]["message"]
        refused = await expect(client, "pusher:subscription_error")
        assert refused["channel"] == "news" and refused["data"]["status"] == 400
    # The connection is still good, and the channel can be subscribed.
    succeeded = await subscribe_with(client, "news", {})
    assert json.dumps(succeeded["data"]).startswith('{"pushie"')
