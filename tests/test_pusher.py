"""
The Pusher door, driven by real clients: the official C{pusher} server SDK
from PyPI (in a thread: it is synchronous) for the HTTP API and channel
auth, and Autobahn WebSocket clients speaking protocol 7 frame by frame.
pusher-js itself is in test_pusher_js.py.  Every test runs on both engines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pusher
import pytest_twisted
import treq
from twisted.internet import threads

from tests.helpers import Daemon, WSClient, connect_ws, sleep, wait_for
from tests.test_operations import metric

APP_ID, KEY, SECRET = "3", "278d425bdf160c739803", "7ad3773142a6692b25b8"
OTHER_ID, OTHER_KEY, OTHER_SECRET = "4", "otherkey0001", "0123456789abcdef0123"
APPS = [f"{APP_ID}:{KEY}:{SECRET}", f"{OTHER_ID}:{OTHER_KEY}:{OTHER_SECRET}"]
MASTER_KEY = base64.b64encode(b"k" * 32).decode()


async def start(make_daemon, **settings) -> Daemon:
    settings.setdefault("pusher_apps", APPS)
    return await make_daemon(**settings)


class SDK:
    """The official SDK, called from a thread so that the reactor keeps serving."""

    def __init__(self, daemon: Daemon, app_id: str = APP_ID, key: str = KEY, secret: str = SECRET) -> None:
        self.client = pusher.Pusher(
            app_id=app_id,
            key=key,
            secret=secret,
            host="127.0.0.1",
            port=daemon.port,
            ssl=False,
            encryption_master_key_base64=MASTER_KEY,
        )
        # requests keeps connections alive; the suite checks none is left.
        self.client._pusher_client.http.session.headers["Connection"] = "close"

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await threads.deferToThread(getattr(self.client, method), *args, **kwargs)

    def authenticate(self, channel: str, socket_id: str, custom_data: Any = None) -> dict[str, Any]:
        return self.client.authenticate(channel, socket_id, custom_data)


async def connect(daemon: Daemon, key: str = KEY, query: str = "protocol=7&client=js&version=8.4.0") -> WSClient:
    client = await connect_ws(daemon.port, f"/app/{key}?{query}")
    daemon.clients.append(client)
    first = await next_event(client)
    assert first["event"] == "pusher:connection_established", first
    client.socket_id = first["data"]["socket_id"]
    return client


async def next_event(client: WSClient, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, with a JSON-string C{data} decoded (as pusher-js does)."""
    frame = await client.next(timeout)
    if isinstance(frame.get("data"), str):
        try:
            frame["data"] = json.loads(frame["data"])
        except ValueError:
            pass
    return frame


async def expect(client: WSClient, event: str, timeout: float = 5.0) -> dict[str, Any]:
    frame = await next_event(client, timeout)
    assert frame["event"] == event, frame
    return frame


async def subscribe(client: WSClient, channel: str, **data: Any) -> dict[str, Any]:
    client.send({"event": "pusher:subscribe", "data": {"channel": channel, **data}})
    return await expect(client, "pusher_internal:subscription_succeeded")


def signed_query(method: str, path: str, body: bytes, key: str = KEY, secret: str = SECRET, **extra: str) -> str:
    """Sign a Pusher API request by hand, following PUSHER.md (independently of the SDK)."""
    params = {"auth_key": key, "auth_timestamp": str(int(time.time())), "auth_version": "1.0", **extra}
    if body:
        params["body_md5"] = hashlib.md5(body).hexdigest()
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    signature = hmac.new(secret.encode(), f"{method}\n{path}\n{text}".encode(), hashlib.sha256).hexdigest()
    params["auth_signature"] = signature
    return "&".join(f"{k}={v}" for k, v in params.items())


async def api(daemon: Daemon, method: str, path: str, body: Any = None, query: str | None = None) -> tuple[int, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    query = signed_query(method, path, raw) if query is None else query
    response = await treq.request(
        method,
        f"{daemon.url}{path}?{query}",
        data=raw or None,
        headers={"Content-Type": "application/json"},
        pool=daemon.pool,
    )
    text = await response.content()
    return response.code, json.loads(text) if text else None


# -- connecting --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_established_ping_and_unknown_key(make_daemon):
    daemon = await start(make_daemon)
    client = await connect(daemon)
    assert client.socket_id.count(".") == 1 and client.socket_id.replace(".", "").isdigit()
    client.send({"event": "pusher:ping", "data": {}})
    assert (await expect(client, "pusher:pong"))["data"] == {}

    stranger = await connect_ws(daemon.port, "/app/nosuchkey?protocol=7")
    daemon.clients.append(stranger)
    error = await expect(stranger, "pusher:error")
    assert error["data"]["code"] == 4001
    assert (await stranger.closed)[0] == 4001

    # Protocols 5 to 7 are spoken (test_pysher.py); others are refused with a
    # message naming the ones that are, 4006 when the version is no number.
    for version, code in (("4", 4007), ("8", 4007), ("7.1", 4006)):
        old = await connect_ws(daemon.port, f"/app/{KEY}?protocol={version}")
        daemon.clients.append(old)
        error = await expect(old, "pusher:error")
        assert error["data"]["code"] == code
        assert "7" in error["data"]["message"]
        assert (await old.closed)[0] == code


@pytest_twisted.ensureDeferred
async def test_no_pusher_door_without_apps(make_daemon):
    daemon = await make_daemon()
    code, body, _ = await daemon.get(f"/apps/{APP_ID}/channels")
    assert code == 404


# -- both doors, one Hub -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_native_publish_and_pusher_trigger_cross_doors(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    pusher_client = await connect(daemon)
    await subscribe(pusher_client, "bunno")
    native = await daemon.connect("channel=bunno")
    await native.next_of("welcome")
    await native.next_of("subscribed")

    status, _, _ = await daemon.publish({"channel": "bunno", "data": {"n": 1}})
    assert status == 200
    frame = await expect(pusher_client, "message")
    assert frame == {"event": "message", "channel": "bunno", "data": {"n": 1}}
    assert (await native.next_of("message"))["data"] == {"n": 1}

    status, _, _ = await daemon.publish({"channel": "bunno", "event": "order-shipped", "data": "plain text"})
    frame = await expect(pusher_client, "order-shipped")
    assert frame["data"] == "plain text"
    await native.next_of("message")

    assert await sdk("trigger", "bunno", "my-event", {"message": "hello"}) == {}
    frame = await expect(pusher_client, "my-event")
    assert frame["data"] == {"message": "hello"}
    # Native subscribers get Pusher's data as the string the SDK sent, in offset order.
    message = await native.next_of("message")
    assert message["event"] == "my-event"
    assert json.loads(message["data"]) == {"message": "hello"}
    assert message["offset"] == 3


@pytest_twisted.ensureDeferred
async def test_apps_have_their_own_channel_spaces(make_daemon):
    daemon = await start(make_daemon)
    first = await connect(daemon)
    other = await connect(daemon, key=OTHER_KEY)
    await subscribe(first, "news")
    await subscribe(other, "news")
    await SDK(daemon, OTHER_ID, OTHER_KEY, OTHER_SECRET)("trigger", "news", "for-other", "2")
    await daemon.publish({"channel": "news", "data": 1})
    await SDK(daemon)("trigger", "news", "for-first", "3")
    assert (await expect(other, "for-other"))["data"] == 2
    assert (await expect(first, "message"))["data"] == 1
    assert (await expect(first, "for-first"))["data"] == 3
    await sleep(0.1)
    assert other.pending() == [] and first.pending() == []
    # Each app lists only its own channels.
    occupied = await SDK(daemon, OTHER_ID, OTHER_KEY, OTHER_SECRET)("channels_info")
    assert occupied == {"channels": {"news": {}}}


# -- HTTP API through the official SDK ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_sdk_trigger_batch_and_channel_info(make_daemon, engine):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    a = await connect(daemon)
    b = await connect(daemon)
    await subscribe(a, "a-channel")
    await subscribe(b, "b-channel")
    await subscribe(a, "presence-room", **sdk.authenticate("presence-room", a.socket_id, {"user_id": "ann"}))

    assert await sdk("trigger", ["a-channel", "b-channel"], "both", {"x": 1}) == {}
    assert (await expect(a, "both"))["channel"] == "a-channel"
    assert (await expect(b, "both"))["channel"] == "b-channel"

    batch = [
        {"channel": "a-channel", "name": "first", "data": "1"},
        {"channel": "b-channel", "name": "second", "data": json.dumps({"y": 2})},
    ]
    assert await sdk("trigger_batch", batch) == {}
    assert (await expect(a, "first"))["data"] == 1
    assert (await expect(b, "second"))["data"] == {"y": 2}

    info = await sdk("channels_info")
    assert set(info["channels"]) == {"a-channel", "b-channel", "presence-room"}
    presence = await sdk("channels_info", "presence-", ["user_count"])
    assert presence == {"channels": {"presence-room": {"user_count": 1}}}
    assert await sdk("channel_info", "presence-room", ["user_count"]) == {"occupied": True, "user_count": 1}
    assert await sdk("channel_info", "nobody-here") == {"occupied": False}
    assert await sdk("users_info", "presence-room") == {"users": [{"id": "ann"}]}

    # Both engines count (with Redis, every node's subscriptions: see test_cluster).
    counted = await sdk("channel_info", "a-channel", ["subscription_count"])
    assert counted == {"occupied": True, "subscription_count": 1}


@pytest_twisted.ensureDeferred
async def test_trigger_answers_info_after_publishing(make_daemon, engine):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    a = await connect(daemon)
    await subscribe(a, "presence-lobby", **sdk.authenticate("presence-lobby", a.socket_id, {"user_id": "u1"}))
    status, body = await api(
        daemon,
        "POST",
        f"/apps/{APP_ID}/events",
        {"name": "e", "data": "{}", "channels": ["presence-lobby", "presence-empty"], "info": "user_count"},
    )
    assert status == 200
    assert body == {"channels": {"presence-lobby": {"user_count": 1}, "presence-empty": {"user_count": 0}}}
    status, body = await api(
        daemon,
        "POST",
        f"/apps/{APP_ID}/batch_events",
        {"batch": [{"name": "e", "data": "{}", "channel": "presence-lobby", "info": "user_count"}]},
    )
    assert (status, body) == (200, {"batch": [{"user_count": 1}]})


@pytest_twisted.ensureDeferred
async def test_api_signature_is_checked_exactly(make_daemon):
    daemon = await start(make_daemon)
    path = f"/apps/{APP_ID}/events"
    body = {"name": "e", "channel": "c", "data": "{}"}
    raw = json.dumps(body).encode()
    good = signed_query("POST", path, raw)
    assert (await api(daemon, "POST", path, body, good))[0] == 200

    tampered = good.replace("auth_signature=", "auth_signature=0")
    assert (await api(daemon, "POST", path, body, tampered))[0] == 401
    other_body = {"name": "e", "channel": "c", "data": "{}", "socket_id": "1.1"}
    assert (await api(daemon, "POST", path, other_body, good))[0] == 401  # body_md5 no longer matches
    wrong_secret = signed_query("POST", path, raw, secret="f" * 20)
    assert (await api(daemon, "POST", path, body, wrong_secret))[0] == 401
    wrong_key = signed_query("POST", path, raw, key=OTHER_KEY, secret=OTHER_SECRET)
    assert (await api(daemon, "POST", path, body, wrong_key))[0] == 401
    stale = signed_query("POST", path, raw, auth_timestamp=str(int(time.time()) - 601))
    status, answer = await api(daemon, "POST", path, body, stale)
    assert status == 401 and "auth_timestamp" in answer["message"]
    assert (await api(daemon, "POST", "/apps/99/events", body))[0] == 401  # as a wrong key: no app-id oracle
    # A GET has no body and no body_md5; extra parameters are signed too.
    listing = signed_query("GET", f"/apps/{APP_ID}/channels", b"", filter_by_prefix="presence-")
    assert (await api(daemon, "GET", f"/apps/{APP_ID}/channels", query=listing))[0] == 200
    changed = listing.replace("filter_by_prefix=presence-", "filter_by_prefix=private-")
    assert (await api(daemon, "GET", f"/apps/{APP_ID}/channels", query=changed))[0] == 401


@pytest_twisted.ensureDeferred
async def test_api_refuses_bad_triggers_and_publishes_nothing(make_daemon):
    daemon = await start(make_daemon)
    watcher = await connect(daemon)
    await subscribe(watcher, "c")
    path = f"/apps/{APP_ID}/events"
    cases = [
        ({"name": "e", "channel": "c", "data": "x" * 10241}, 413, "payload_too_large"),
        ({"name": "pusher:x", "channel": "c", "data": "{}"}, 400, "invalid_event"),
        ({"name": "e", "channel": "a:b", "data": "{}"}, 400, "invalid_channel"),
        ({"name": "e", "channels": ["c", "c"], "data": "{}"}, 400, "invalid_channels"),
        ({"name": "e", "channels": [f"c{i}" for i in range(101)], "data": "{}"}, 400, "invalid_channels"),
        ({"name": "e", "channel": "c", "data": "{}", "socket_id": "abc"}, 400, "invalid_socket_id"),
        ({"name": "e", "channel": "c", "data": "{}", "info": "user_count"}, 400, "invalid_info"),
        ({"name": "e", "channel": "c", "data": "{}", "colour": "red"}, 400, "unknown_field"),
        ({"name": "e", "channel": "c"}, 400, "missing_data"),
    ]
    for body, status, code in cases:
        answer = await api(daemon, "POST", path, body)
        assert answer[0] == status and answer[1]["error"] == code, (body, answer)
    batch = {"batch": [{"name": "e", "channel": "c", "data": "{}"}] * 11}
    assert (await api(daemon, "POST", f"/apps/{APP_ID}/batch_events", batch))[1]["error"] == "invalid_batch"
    # One bad event in a batch: none of them is published.
    half = {"batch": [{"name": "ok", "channel": "c", "data": "{}"}, {"name": "e", "channel": "#x", "data": "{}"}]}
    assert (await api(daemon, "POST", f"/apps/{APP_ID}/batch_events", half))[0] == 400
    listing = signed_query("GET", f"/apps/{APP_ID}/channels", b"", info="user_count")
    assert (await api(daemon, "GET", f"/apps/{APP_ID}/channels", query=listing))[0] == 400
    assert (await api(daemon, "GET", f"/apps/{APP_ID}/channels/c/users"))[0] == 400
    await sleep(0.1)
    assert watcher.pending() == []


@pytest_twisted.ensureDeferred
async def test_api_a_method_an_endpoint_does_not_take_is_a_405_with_its_own_allow(make_daemon):
    """
    Found by schemathesis (signed requests, tests/schemathesis_hooks.py):
    every Pusher API path answered C{Allow: GET, POST}, and a signed GET on
    C{events} a 404. Each endpoint names its own method, signed or not.
    """
    daemon = await start(make_daemon)
    endpoints = {
        f"/apps/{APP_ID}/events": "POST",
        f"/apps/{APP_ID}/batch_events": "POST",
        f"/apps/{APP_ID}/channels": "GET",
        f"/apps/{APP_ID}/channels/presence-x": "GET",
        f"/apps/{APP_ID}/channels/presence-x/users/": "GET",
        f"/apps/{APP_ID}/users/u1/terminate_connections": "POST",
        "/users/u1/terminate_connections": "POST",
    }
    for path, allowed in endpoints.items():
        for method in ("GET", "POST", "OPTIONS", "DELETE"):
            if method == allowed:
                continue
            for query in ("", signed_query(method, path, b"")):
                response = await treq.request(method, f"{daemon.url}{path}?{query}", pool=daemon.pool)
                body = json.loads(await response.content())
                assert (response.code, body["error"]) == (405, "method_not_allowed"), (method, path, body)
                assert response.headers.getRawHeaders(b"allow") == [allowed.encode()], (method, path)
    # HEAD goes with GET; an unknown path is still a 404 once signed.
    head = await treq.request("HEAD", f"{daemon.url}/apps/{APP_ID}/channels", pool=daemon.pool)
    assert head.code == 401
    await head.content()
    assert (await api(daemon, "GET", f"/apps/{APP_ID}/nothing"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_api_socket_ids_are_ascii_digits(make_daemon):
    """Python's \\d takes any script's digits; a socket id is ASCII digits, as the daemon issues them."""
    daemon = await start(make_daemon)
    for socket_id in ("\u0661\u0662.\u0663", "1.\uff11"):
        body = {"name": "e", "channel": "c", "data": "{}", "socket_id": socket_id}
        status, answer = await api(daemon, "POST", f"/apps/{APP_ID}/events", body)
        assert (status, answer["error"]) == (400, "invalid_socket_id"), socket_id


# -- channels and auth -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_private_channel_needs_a_valid_signature(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    client = await connect(daemon)
    client.send({"event": "pusher:subscribe", "data": {"channel": "private-orders"}})
    error = await expect(client, "pusher:error")
    assert "signature" in error["data"]["message"]
    refused = await expect(client, "pusher:subscription_error")
    assert refused["channel"] == "private-orders" and refused["data"]["status"] == 401
    # A signature made for another socket is refused too.
    other = await connect(daemon)
    stolen = sdk.authenticate("private-orders", other.socket_id)
    client.send({"event": "pusher:subscribe", "data": {"channel": "private-orders", **stolen}})
    await expect(client, "pusher:error")
    await expect(client, "pusher:subscription_error")

    await subscribe(client, "private-orders", **sdk.authenticate("private-orders", client.socket_id))
    await sdk("trigger", "private-orders", "created", {"id": 7})
    assert (await expect(client, "created"))["data"] == {"id": 7}


@pytest_twisted.ensureDeferred
async def test_presence_members_join_and_leave(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    ann = await connect(daemon)
    answer = await subscribe(
        ann,
        "presence-room",
        **sdk.authenticate("presence-room", ann.socket_id, {"user_id": "ann", "user_info": {"n": 1}}),
    )
    assert answer["data"] == {"presence": {"ids": ["ann"], "hash": {"ann": {"n": 1}}, "count": 1}}

    bob = await connect(daemon)
    answer = await subscribe(bob, "presence-room", **sdk.authenticate("presence-room", bob.socket_id, {"user_id": 42}))
    assert sorted(answer["data"]["presence"]["ids"]) == ["42", "ann"]
    added = await expect(ann, "pusher_internal:member_added")
    assert added == {"event": "pusher_internal:member_added", "channel": "presence-room", "data": {"user_id": "42"}}

    # Bob's second tab is no new member; closing one of two is no leave.
    bob2 = await connect(daemon)
    await subscribe(bob2, "presence-room", **sdk.authenticate("presence-room", bob2.socket_id, {"user_id": 42}))
    bob2.close()
    await bob2.closed
    bob.send({"event": "pusher:unsubscribe", "data": {"channel": "presence-room"}})
    removed = await expect(ann, "pusher_internal:member_removed")
    assert removed["data"] == {"user_id": "42"}
    assert ann.pending() == []

    # Without channel_data, or with one that is not what was signed: refused.
    carl = await connect(daemon)
    auth = sdk.authenticate("presence-room", carl.socket_id, {"user_id": "carl"})
    carl.send({"event": "pusher:subscribe", "data": {"channel": "presence-room", "auth": auth["auth"]}})
    await expect(carl, "pusher:error")
    assert (await expect(carl, "pusher:subscription_error"))["data"]["status"] == 400
    forged = {"auth": auth["auth"], "channel_data": json.dumps({"user_id": "admin"})}
    carl.send({"event": "pusher:subscribe", "data": {"channel": "presence-room", **forged}})
    await expect(carl, "pusher:error")
    assert (await expect(carl, "pusher:subscription_error"))["data"]["status"] == 401


@pytest_twisted.ensureDeferred
async def test_socket_id_excludes_the_sender(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    a = await connect(daemon)
    b = await connect(daemon)
    await subscribe(a, "chat")
    await subscribe(b, "chat")
    await sdk("trigger", "chat", "said", "hi", socket_id=a.socket_id)
    assert (await expect(b, "said"))["data"] == "hi"
    await sdk("trigger", "chat", "said", "again")
    assert (await expect(a, "said"))["data"] == "again"  # "hi" never came to a
    assert (await expect(b, "said"))["data"] == "again"


@pytest_twisted.ensureDeferred
async def test_client_events(make_daemon):
    daemon = await start(make_daemon, pusher_client_event_rate=5)
    sdk = SDK(daemon)
    a = await connect(daemon)
    b = await connect(daemon)
    native = await daemon.connect()
    await native.next_of("welcome")
    await subscribe(a, "public")
    a.send({"event": "client-typing", "channel": "public", "data": {}})
    assert "private- and presence-" in (await expect(a, "pusher:error"))["data"]["message"]
    a.send({"event": "client-typing", "channel": "private-x", "data": {}})
    assert "joined" in (await expect(a, "pusher:error"))["data"]["message"]

    for client, user in ((a, "ann"), (b, "bob")):
        await subscribe(
            client, "presence-chat", **sdk.authenticate("presence-chat", client.socket_id, {"user_id": user})
        )
    await expect(a, "pusher_internal:member_added")
    a.send({"event": "client-typing", "channel": "presence-chat", "data": {"on": True}})
    frame = await expect(b, "client-typing")
    assert frame == {"event": "client-typing", "channel": "presence-chat", "data": {"on": True}, "user_id": "ann"}

    # The rate: 5 a second here (client-typing was the first); past it, 4301.
    for n in range(6):
        a.send({"event": "client-n", "channel": "presence-chat", "data": n})
    for _ in range(2):
        assert (await expect(a, "pusher:error"))["data"]["code"] == 4301
    received = [(await expect(b, "client-n"))["data"] for _ in range(4)]
    assert received == [0, 1, 2, 3]
    await sleep(0.1)
    assert a.pending() == [] and b.pending() == []

    encrypted = "private-encrypted-x"
    await subscribe(a, encrypted, auth=sdk.authenticate(encrypted, a.socket_id)["auth"])
    a.send({"event": "client-x", "channel": encrypted, "data": {}})
    await expect(a, "pusher:error")


@pytest_twisted.ensureDeferred
async def test_client_events_off(make_daemon):
    daemon = await start(make_daemon, pusher_client_event_rate=0)
    sdk = SDK(daemon)
    a = await connect(daemon)
    await subscribe(a, "private-x", **sdk.authenticate("private-x", a.socket_id))
    a.send({"event": "client-x", "channel": "private-x", "data": {}})
    assert "disabled" in (await expect(a, "pusher:error"))["data"]["message"]


@pytest_twisted.ensureDeferred
async def test_encrypted_channel_is_relayed_untouched(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    a = await connect(daemon)
    auth = sdk.authenticate("private-encrypted-vault", a.socket_id)
    assert "shared_secret" in auth
    await subscribe(a, "private-encrypted-vault", auth=auth["auth"])
    await sdk("trigger", "private-encrypted-vault", "secret", {"pin": 1234})
    frame = await expect(a, "secret")
    assert set(frame["data"]) == {"nonce", "ciphertext"}
    assert "1234" not in json.dumps(frame)


@pytest_twisted.ensureDeferred
async def test_cache_channels_send_the_last_event(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    a = await connect(daemon)
    await subscribe(a, "cache-prices")
    await expect(a, "pusher:cache_miss")
    await sdk("trigger", "cache-prices", "price", "1")
    await sdk("trigger", "cache-prices", "price", "2")
    b = await connect(daemon)
    await subscribe(b, "cache-prices")
    assert (await expect(b, "price"))["data"] == 2
    await sleep(0.1)
    assert b.pending() == []


# -- users -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signin_send_to_user_and_terminate(make_daemon):
    daemon = await start(make_daemon)
    sdk = SDK(daemon)
    tab1 = await connect(daemon)
    tab2 = await connect(daemon)
    other = await connect(daemon)
    for client, user in ((tab1, "u1"), (tab2, "u1"), (other, "u2")):
        signin = sdk.client.authenticate_user(client.socket_id, {"id": user})
        client.send({"event": "pusher:signin", "data": signin})
        success = await expect(client, "pusher:signin_success")
        assert json.loads(success["data"]["user_data"])["id"] == user
        # pusher-js subscribes to its user channel after signing in.
        await subscribe(client, f"#server-to-user-{user}")

    await sdk("send_to_user", "u1", "notice", {"n": 1})
    for client in (tab1, tab2):
        frame = await expect(client, "notice")
        assert frame["channel"] == "#server-to-user-u1" and frame["data"] == {"n": 1}

    await sdk("terminate_user_connections", "u1")
    for client in (tab1, tab2):
        assert (await expect(client, "pusher:error"))["data"]["code"] == 4009
        assert (await client.closed)[0] == 4009
    other.send({"event": "pusher:ping"})
    await expect(other, "pusher:pong")

    # Another user's channel, or a forged sign-in: refused.
    other.send({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-u1"}})
    await expect(other, "pusher:error")
    await expect(other, "pusher:subscription_error")
    forged = sdk.client.authenticate_user(tab1.socket_id, {"id": "admin"})
    other.send({"event": "pusher:signin", "data": forged})
    await expect(other, "pusher:error")


# -- connection life ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_activity_timeout_ping_then_4201(make_daemon):
    daemon = await start(make_daemon, pusher_activity_timeout=0.3, pusher_pong_timeout=0.3)
    quiet = await connect(daemon)
    lively = await connect(daemon)
    await expect(quiet, "pusher:ping")
    await expect(lively, "pusher:ping")
    lively.send({"event": "pusher:pong", "data": {}})
    assert (await quiet.closed)[0] == 4201
    # lively answered: pinged again later, not closed.
    await expect(lively, "pusher:ping")
    assert not lively.closed.called


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_with_4200(make_daemon):
    daemon = await start(make_daemon)
    client = await connect(daemon)
    await subscribe(client, "x")
    await daemon.service.stopService()
    assert (await client.closed)[0] == 4200


@pytest_twisted.ensureDeferred
async def test_over_capacity_closes_with_4100(make_daemon):
    daemon = await start(make_daemon, max_connections=1)
    await connect(daemon)
    extra = await connect_ws(daemon.port, f"/app/{KEY}?protocol=7")
    daemon.clients.append(extra)
    assert (await expect(extra, "pusher:error"))["data"]["code"] == 4100
    assert (await extra.closed)[0] == 4100
    await wait_for(lambda: len(daemon.hub.connections) == 1)


@pytest_twisted.ensureDeferred
async def test_bad_frames_get_errors_not_closes(make_daemon):
    daemon = await start(make_daemon)
    client = await connect(daemon)
    for payload in (b"not json", b"[]", b'{"event": 5}', b'{"event": "hello"}'):
        client.send(payload)
        await expect(client, "pusher:error")
    client.send({"event": "pusher:subscribe", "data": {"channel": "bad name!"}})
    await expect(client, "pusher:error")
    await expect(client, "pusher:subscription_error")
    client.send({"event": "pusher:some_future_event", "data": {}})
    client.send({"event": "pusher:ping", "data": {}})
    await expect(client, "pusher:pong")


# -- several daemons, one Redis ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_exclusion_presence_and_termination(redis_server):
    """The socket to leave out, members and terminations travel between daemons through Redis."""
    from tests.helpers import assert_reactor_clean, start_daemon

    redis_server.cli("FLUSHALL")
    nodes = [await start_daemon(engine=redis_server.url, pusher_apps=APPS) for _ in range(2)]
    try:
        one, two = nodes
        sdk_two = SDK(two)
        ann = await connect(one)
        bob = await connect(two)
        for client, user in ((ann, "ann"), (bob, "bob")):
            auth = sdk_two.authenticate("presence-team", client.socket_id, {"user_id": user})
            await subscribe(client, "presence-team", **auth)
        assert (await expect(ann, "pusher_internal:member_added"))["data"]["user_id"] == "bob"

        ann.send({"event": "client-hello", "channel": "presence-team", "data": {"from": "one"}})
        hello = await expect(bob, "client-hello")
        assert hello["user_id"] == "ann" and hello["data"] == {"from": "one"}
        await sdk_two("trigger", "presence-team", "update", "1", socket_id=ann.socket_id)
        await sdk_two("trigger", "presence-team", "update", "2")
        assert (await expect(bob, "update"))["data"] == 1
        assert (await expect(bob, "update"))["data"] == 2
        assert (await expect(ann, "update"))["data"] == 2  # the first one left ann out, on another node

        signin = sdk_two.client.authenticate_user(ann.socket_id, {"id": "ann"})
        ann.send({"event": "pusher:signin", "data": signin})
        await expect(ann, "pusher:signin_success")  # sent once the user channel is live on every node
        await sdk_two("terminate_user_connections", "ann")
        assert (await ann.closed)[0] == 4009
        assert (await expect(bob, "pusher_internal:member_removed"))["data"]["user_id"] == "ann"
    finally:
        for node in nodes:
            await node.stop()
    await assert_reactor_clean()


@pytest_twisted.ensureDeferred
async def test_slow_pusher_consumer_is_dropped_and_others_keep_up(make_daemon):
    daemon = await start(make_daemon, slow_consumer_buffer=300 * 1024, slow_consumer_grace=30)
    slow = await connect(daemon)
    await subscribe(slow, "flood")
    slow.protocol.transport.pauseProducing()  # it stops reading
    fast = await connect(daemon)
    await subscribe(fast, "flood")
    sent = 0
    while len(daemon.hub.connections) == 2 and sent < 2000:
        status, _, _ = await daemon.publish({"channel": "flood", "data": "x" * 30_000})
        assert status == 200
        sent += 1
        await expect(fast, "message")
    assert len(daemon.hub.connections) == 1, "the slow consumer was never dropped"
    assert sent > 10  # for its buffer, not at once
    slow.protocol.transport.resumeProducing()
    await slow.closed
    status, body, _ = await daemon.get("/metrics")
    assert metric(body.decode(), "pushie_slow_consumer_disconnects_total") == 1


@pytest_twisted.ensureDeferred
async def test_a_burst_leaves_out_only_the_excluded_socket(make_daemon):
    """A batch dispatched in one reactor turn goes out as one write, each socket_id still left out."""
    daemon = await start(make_daemon)
    a = await connect(daemon)
    b = await connect(daemon)
    await subscribe(a, "c")
    await subscribe(b, "c")
    batch = [
        {"name": "e", "channel": "c", "data": "1", "socket_id": a.socket_id},
        {"name": "e", "channel": "c", "data": "2"},
        {"name": "e", "channel": "c", "data": "3", "socket_id": a.socket_id},
        {"name": "e", "channel": "c", "data": "4"},
    ]
    assert await SDK(daemon)("trigger_batch", batch) == {}
    assert [(await expect(b, "e"))["data"] for _ in range(4)] == [1, 2, 3, 4]
    assert [(await expect(a, "e"))["data"] for _ in range(2)] == [2, 4]
    await sleep(0.1)
    assert a.pending() == [] and b.pending() == []


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_serves_the_pusher_door_from_the_environment(tmp_path):
    from tests.test_daemon import spawn, stop

    tcp = "tcp:0:interface=127.0.0.1"
    proc = spawn(["-n", "--pidfile=", "pushie", "--listen", tcp], {"PUSHIE_PUSHER_APPS": ",".join(APPS)})
    try:
        await wait_for(lambda: proc.addresses or proc.ended.called, timeout=20)
        assert proc.addresses, proc.output.decode()
        port = proc.port_of(tcp)
        assert "Pusher door: 2 apps" in proc.output.decode()
        client = await connect_ws(port, f"/app/{KEY}?protocol=7")
        await expect(client, "pusher:connection_established")
        client.send({"event": "pusher:subscribe", "data": {"channel": "bunno"}})
        await expect(client, "pusher_internal:subscription_succeeded")
        sdk = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=port, ssl=False)
        sdk._pusher_client.http.session.headers["Connection"] = "close"
        await threads.deferToThread(sdk.trigger, "bunno", "hello", {"from": "rails"})
        assert (await expect(client, "hello"))["data"] == {"from": "rails"}
        assert await stop(proc) == 0
        assert (await client.closed)[0] == 4200  # SIGTERM drains: pusher-js reconnects at once elsewhere
    finally:
        await stop(proc)


def test_the_door_builds_a_publications_frames_once_per_turn():
    """
    The Pusher door's frames are its own (no field on the shared records):
    built for the first subscriber of a publication or burst, shared by the
    others in that reactor turn, forgotten at the next (issue 13 item 4).
    """
    from twisted.internet.task import Clock

    from pushie.doors.pusher.apps import App
    from pushie.doors.pusher.door import FrameCache
    from pushie.records import Burst, Publication

    clock = Clock()
    cache = FrameCache(clock)
    app = App("2", "key2", "secret2")
    first, second = Publication("2|chat", 1, "e", b'"hi"', "said"), Publication("2|chat", 2, "e", b"{}", "said")
    payload, frame = cache.publication(first, app)
    assert json.loads(payload) == {"event": "said", "channel": "chat", "data": "hi"}
    assert cache.publication(first, app) == (payload, frame) and cache.publication(first, app)[1] is frame
    burst = Burst([first, second])
    frames = cache.burst(burst, app)
    assert frames.startswith(frame) and cache.burst(burst, app) is frames
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert cache.publication(first, app)[1] is not frame  # built again in a later turn
