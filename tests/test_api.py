"""The server API (/channels...), /healthz, and presence, against a real daemon."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.test_auth import KEY_A, SECRET_1, token

AUTH = {"Authorization": f"Bearer {KEY_A}"}


async def get_json(daemon, path, headers=None):
    status, body, response = await daemon.get(path, headers=headers or {})
    return status, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_channels_and_channel_info(daemon):
    a = await daemon.connect("channel=a&channel=b")
    b = await daemon.connect("channel=a")
    for client, count in ((a, 3), (b, 2)):
        for _ in range(count):
            await client.next()
    await daemon.publish({"channel": "a", "data": 1})
    status, body = await get_json(daemon, "/channels")
    assert status == 200
    assert sorted((c["name"], c["subscribers"]) for c in body["channels"]) == [("a", 2), ("b", 1)]
    status, info = await get_json(daemon, "/channels/a")
    assert (status, info["name"], info["subscribers"], info["offset"]) == (200, "a", 2, 1)
    assert isinstance(info["epoch"], str)
    status, empty = await get_json(daemon, "/channels/nobody-here")
    assert (status, empty["subscribers"], empty["offset"]) == (200, 0, 0)


@pytest_twisted.ensureDeferred
async def test_history_api(make_daemon):
    daemon = await make_daemon(history_size=5)
    for i in range(8):
        await daemon.publish({"channel": "h", "data": i, "event": f"e{i}"})
    status, body = await get_json(daemon, "/channels/h/history")
    assert status == 200
    assert (body["channel"], body["offset"], body["complete"]) == ("h", 8, False)
    assert [m["data"] for m in body["messages"]] == [3, 4, 5, 6, 7]
    assert body["messages"][0] == {
        "type": "message",
        "channel": "h",
        "event": "e3",
        "offset": 4,
        "epoch": body["epoch"],
        "data": 3,
    }
    status, body = await get_json(daemon, "/channels/h/history?since=4&limit=2")
    assert ([m["offset"] for m in body["messages"]], body["complete"]) == ([5, 6], True)
    for query in ("since=-1", "limit=0", "since=x"):
        status, error = await get_json(daemon, "/channels/h/history?" + query)
        assert (status, error["error"]) == (400, "invalid_query")


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("/channels/bad%20name", 400, "invalid_channel"),
        ("/channels/a/nope", 404, "not_found"),
        ("/channels/public/presence", 400, "not_presence_channel"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_server_api_errors(daemon, path, status, code):
    got, body = await get_json(daemon, path)
    assert (got, body["error"]) == (status, code)


@pytest_twisted.ensureDeferred
async def test_server_api_needs_the_publisher_key(make_daemon):
    daemon = await make_daemon(publisher_keys=[KEY_A])
    for path in ("/channels", "/channels/a", "/channels/a/history", "/channels/presence-a/presence"):
        status, body = await get_json(daemon, path)
        assert (status, body["error"]) == (401, "unauthorized"), path
        status, body = await get_json(daemon, path, AUTH)
        assert status == 200, (path, body)
    status, body = await get_json(daemon, "/healthz")  # no key needed
    assert (status, body["status"]) == (200, "ok")


@pytest_twisted.ensureDeferred
async def test_healthz_reports_draining(daemon):
    status, body = await get_json(daemon, "/healthz")
    assert (status, body["status"], body["engine"]) == (200, "ok", daemon.engine.name)
    daemon.hub.draining = True
    try:
        status, body = await get_json(daemon, "/healthz")
        assert (status, body["status"]) == (503, "draining")
    finally:
        daemon.hub.draining = False


@pytest_twisted.ensureDeferred
async def test_presence_with_several_tabs_per_user(make_daemon):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1], publisher_keys=[KEY_A])
    room = "presence-room"

    async def tab(sub, info):
        client = await daemon.connect(f"channel={room}&token={token(sub=sub, channels=[room], info=info)}")
        await client.next_of("welcome")
        return client, await client.next_of("subscribed")

    ann1, first = await tab("ann", {"name": "Ann"})
    assert first["members"] == [{"id": "ann", "info": {"name": "Ann"}}]
    bob, subscribed = await tab("bob", {"name": "Bob"})
    assert sorted(m["id"] for m in subscribed["members"]) == ["ann", "bob"]
    assert await ann1.next() == {"type": "join", "channel": room, "member": {"id": "bob", "info": {"name": "Bob"}}}
    ann2, _ = await tab("ann", {"name": "Ann"})  # a second tab: no join for anyone
    status, body = await get_json(daemon, f"/channels/{room}/presence", AUTH)
    assert sorted(m["id"] for m in body["members"]) == ["ann", "bob"]

    ann2.send({"type": "presence", "channel": room})
    answer = await ann2.next_of("presence")
    assert sorted(m["id"] for m in answer["members"]) == ["ann", "bob"]

    ann1.close()  # ann still has a tab: no leave
    await ann1.closed
    bob.send({"type": "ping"})
    assert await bob.next() == {"type": "pong"}
    ann2.close()
    await ann2.closed
    assert await bob.next() == {"type": "leave", "channel": room, "member": {"id": "ann", "info": {"name": "Ann"}}}
    status, body = await get_json(daemon, f"/channels/{room}/presence", AUTH)
    assert [m["id"] for m in body["members"]] == ["bob"]
    assert ann2.pending() == [] and bob.pending() == []


@pytest_twisted.ensureDeferred
async def test_presence_frame_needs_a_subscription(daemon):
    client = await daemon.connect("channel=news")
    await client.next_of("welcome")
    await client.next_of("subscribed")
    for channel in ("news", "presence-x"):
        client.send({"type": "presence", "channel": channel})
        assert (await client.next_of("error"))["code"] == "not_subscribed"
