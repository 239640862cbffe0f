"""
Pusher-format webhooks per app and subscription counts (issue 16, items 1
and 2), with real daemons (memory and Redis), a real twisted.web receiver on
port 0, Autobahn clients speaking protocol 7 and pusher-js under Node.

Every Pusher-format POST is checked with the official SDKs' own webhook
validation, not with Pushie's code: C{pusher} from PyPI
(C{Pusher.validate_webhook}) and C{pusher} from npm
(C{new Pusher(...).webhook({headers, rawBody}).isValid()}, in
tests/js/validate_webhook.js).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from typing import Any

import pusher
import pytest
import pytest_twisted
from twisted.internet import threads

from pushie.doors.pusher.apps import Apps, parse_apps
from pushie.doors.pusher.hooks import PusherWebhooks
from pushie.hub import NativeWebhookRoute, RoutedTransitionSink
from pushie.records import Transition
from tests.helpers import Daemon, sleep, start_daemon, wait_for
from tests.pusher_js import browsers, node_executable, pusher_js_installed, require_pusher_js  # noqa: F401  (the fixtures)
from tests.redis_server import RedisServer
from tests.test_pusher import (
    APP_ID,
    KEY,
    OTHER_ID,
    OTHER_KEY,
    OTHER_SECRET,
    SDK,
    SECRET,
    connect,
    next_event,
    subscribe,
)
from tests.test_webhooks import Received, Receiver, Stubbed, clean_reactor, receiver  # noqa: F401  (the fixtures)

JS_DIR = os.path.join(os.path.dirname(__file__), "js")
NATIVE_SECRET = "native-webhook-secret-for-these-tests"
DEBOUNCE = 0.3
INTERVAL = 0.3
SECRETS = {KEY: (APP_ID, SECRET), OTHER_KEY: (OTHER_ID, OTHER_SECRET)}


def hooked_apps(url: str, counted: bool = True) -> list[str]:
    """App 3 (the first: it shares the native space) and app 4, both with webhooks to C{url}."""
    count = " subscription_count=true" if counted else ""
    return [
        f"{APP_ID}:{KEY}:{SECRET} webhook_url={url}{count}",
        f"{OTHER_ID}:{OTHER_KEY}:{OTHER_SECRET} webhook_url={url}",
    ]


def pusher_posts(receiver: Receiver, key: str | None = None) -> list[Received]:  # noqa: F811
    return [
        r
        for r in receiver.requests
        if "x-pusher-key" in r.headers and (key is None or r.headers["x-pusher-key"] == key)
    ]


def pusher_events(receiver: Receiver, key: str) -> list[dict[str, Any]]:  # noqa: F811
    return [event for r in pusher_posts(receiver, key) for event in r.json["events"]]


def native_events(receiver: Receiver) -> list[dict[str, Any]]:  # noqa: F811
    return [event for r in receiver.requests if "x-pushie-signature" in r.headers for event in r.json["events"]]


def validate_with_python_sdk(posts: list[Received]) -> list[Any]:
    answers = []
    for post in posts:
        app_id, secret = SECRETS[post.headers["x-pusher-key"]]
        client = pusher.Pusher(app_id=app_id, key=post.headers["x-pusher-key"], secret=secret)
        answers.append(
            client.validate_webhook(
                post.headers["x-pusher-key"], post.headers["x-pusher-signature"], post.body.decode()
            )
        )
    return answers


def validate_with_node_sdk(posts: list[Received], tamper: bool = False) -> list[Any]:
    require_pusher_js()  # node itself: skips, or fails with PUSHIE_REQUIRE_NODE=1
    node = node_executable()
    assert node is not None
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "pusher")):
        reason = "the npm pusher SDK is not installed: npm ci --prefix tests/js"
        if os.environ.get("PUSHIE_REQUIRE_NODE") == "1":
            pytest.fail(reason + " and PUSHIE_REQUIRE_NODE=1 is set")
        pytest.skip(reason)
    items = []
    for post in posts:
        app_id, secret = SECRETS[post.headers["x-pusher-key"]]
        body = post.body.decode()
        if tamper:
            body = body.replace('"events"', '"events" ')
        items.append(
            {
                "appId": app_id,
                "key": post.headers["x-pusher-key"],
                "secret": secret,
                "headers": post.headers,
                "body": body,
            }
        )
    out = subprocess.run(
        [node, os.path.join(JS_DIR, "validate_webhook.js")],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        check=True,
        cwd=JS_DIR,
        timeout=60,
    )
    return json.loads(out.stdout)


async def both_sdks_accept(posts: list[Received]) -> None:
    assert posts
    python = await threads.deferToThread(validate_with_python_sdk, posts)
    assert all(answer is not None for answer in python), python
    assert [a["events"] for a in python] == [p.json["events"] for p in posts]
    node = await threads.deferToThread(validate_with_node_sdk, posts)
    assert [a["valid"] for a in node] == [True] * len(posts)
    assert [a["events"] for a in node] == [p.json["events"] for p in posts]
    assert [a["time_ms"] for a in node] == [p.json["time_ms"] for p in posts]
    # The SDKs' check can fail: a body changed by one byte is refused by both.
    tampered = await threads.deferToThread(validate_with_node_sdk, posts[:1], True)
    assert tampered[0]["valid"] is False
    changed = Received(posts[0].headers, posts[0].body.replace(b'"events"', b'"events" '))
    assert (await threads.deferToThread(validate_with_python_sdk, [changed])) == [None]


async def hooks_ready(daemon: Daemon) -> None:
    """With Redis, the cluster knows this daemon delivers webhooks once its first heartbeat is in."""
    if getattr(daemon.engine, "cluster", False) is None:
        await wait_for(lambda: daemon.engine.cluster is not None)


def streams_settled(servers: list[RedisServer], prefix: str, added: int) -> bool:
    """Whether C{added} transitions went to the Redis streams and all are settled (the streams are empty)."""
    total = 0
    for server in servers:
        lines = server.cli("XINFO", "STREAM", prefix + "hookq").split()
        fields = dict(zip(lines[::2], lines[1::2], strict=False))
        if fields.get("length", "0") != "0":
            return False
        total += int(fields.get("entries-added", 0))
    return total >= added


async def expect_past_counts(client: Any, event: str) -> dict[str, Any]:
    """The next frame but C{pusher_internal:subscription_count} ones (they are not part of the point here)."""
    while True:
        frame = await next_event(client)
        if frame["event"] != "pusher_internal:subscription_count":
            assert frame["event"] == event, frame
            return frame


async def subscribe_past_counts(client: Any, channel: str, **data: Any) -> dict[str, Any]:
    client.send({"event": "pusher:subscribe", "data": {"channel": channel, **data}})
    return await expect_past_counts(client, "pusher_internal:subscription_succeeded")


# -- the apps file options -----------------------------------------------------


def test_app_options_webhook_url_and_subscription_count():
    first, second = parse_apps(
        [
            "1:k1:0123456789abcdef0 webhook_url=https://app.example/hooks subscription_count=true",
            "2:k2:0123456789abcdef0",
        ],
        "apps",
    )
    assert first.webhook_url == "https://app.example/hooks" and first.subscription_count is True
    assert second.webhook_url is None and second.subscription_count is False
    with pytest.raises(ValueError, match="webhook_url: expected an http:// or https:// URL"):
        parse_apps(["1:k1:0123456789abcdef0 webhook_url=ftp://x/y"], "apps")
    with pytest.raises(ValueError, match="subscription_count must be true or false"):
        parse_apps(["1:k1:0123456789abcdef0 subscription_count=sometimes"], "apps")


def test_a_transition_for_two_routes_is_settled_once_both_delivered_it():
    """The engine's transitions go to the native webhooks and to the owning app's, renamed; settled once, at the end."""
    native, app3, app4 = Stubbed(debounce=0), Stubbed(debounce=0), Stubbed(debounce=0)
    apps = Apps(
        parse_apps(
            ["3:k3:0123456789abcdef0 webhook_url=http://app.example/", "4:k4:0123456789abcdef0 webhook_url=http://x/"],
            "apps",
        )
    )
    pusher_route = PusherWebhooks(apps, lambda url, app: {"3": app3, "4": app4}[app.id].webhooks)
    sink = RoutedTransitionSink(lambda: [NativeWebhookRoute(native.webhooks), pusher_route])
    settled: list[str] = []
    sink.take(
        [
            Transition("channel_occupied", "news", None, "both"),  # app 3's channel is a native one too
            Transition("channel_occupied", "4|news", None, "app-4"),
            Transition("channel_occupied", "4|#server-to-user-9", None, "a-user"),  # nobody's webhook
        ],
        lambda ts: settled.extend(t.token for t in ts),
    )
    assert settled == ["a-user"]  # the unwanted one at once
    native.advance(0)
    assert settled == ["a-user"]  # "both" waits for app 3's delivery too
    app3.advance(0)
    assert settled == ["a-user", "both"]
    app4.advance(0)
    assert settled == ["a-user", "both", "app-4"]
    assert native.receiver.events == [[("channel_occupied", "news")]]
    assert app3.receiver.events == [[("channel_occupied", "news")]]
    assert app4.receiver.events == [[("channel_occupied", "news")]]  # app 4's name, not 4|news
    assert sink.room() == min(s.webhooks.room() for s in (native, app3, app4))
    for stubbed in (native, app3, app4):
        stubbed.stop()


# -- webhooks, one daemon ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_kind_of_pusher_webhook_per_app_validated_by_both_sdks(make_daemon, receiver):  # noqa: F811
    daemon = await make_daemon(
        pusher_apps=hooked_apps(receiver.url),
        webhook_url=receiver.url,
        webhook_secret=NATIVE_SECRET,
        webhook_debounce=DEBOUNCE,
        pusher_subscription_count_interval=INTERVAL,
    )
    await hooks_ready(daemon)
    sdk = SDK(daemon)
    ann = await connect(daemon)
    presence = sdk.authenticate("presence-room", ann.socket_id, {"user_id": "ann", "user_info": {"n": 1}})
    await subscribe_past_counts(ann, "presence-room", **presence)
    await subscribe_past_counts(ann, "private-chat", auth=sdk.authenticate("private-chat", ann.socket_id)["auth"])
    ann.send({"event": "client-typing", "channel": "private-chat", "data": {"t": 1}})
    ann.send({"event": "client-wave", "channel": "presence-room", "data": "hi"})
    await subscribe_past_counts(ann, "cache-news")
    await expect_past_counts(ann, "pusher:cache_miss")
    await subscribe_past_counts(ann, "counted")
    while True:
        frame = await next_event(ann)
        if frame["event"] == "pusher_internal:subscription_count" and frame["channel"] == "counted":
            assert frame["data"] == {"subscription_count": 1}
            break
    other = await connect(daemon, key=OTHER_KEY)
    await subscribe(other, "news")
    other.send({"event": "pusher:subscribe", "data": {"channel": "cache-other"}})

    def names(key: str) -> Counter[tuple[str, str]]:
        return Counter((e["name"], e["channel"]) for e in pusher_events(receiver, key))

    try:
        await wait_for(lambda: len(names(KEY)) >= 8 and len(names(OTHER_KEY)) >= 3, timeout=10)
    except AssertionError:
        raise AssertionError((names(KEY), names(OTHER_KEY))) from None
    for client in (ann, other):
        client.close()
        await client.closed
    await wait_for(lambda: names(KEY)[("channel_vacated", "counted")] == 1, timeout=10)
    await wait_for(lambda: names(OTHER_KEY)[("channel_vacated", "cache-other")] == 1, timeout=10)
    await wait_for(lambda: names(KEY)[("member_removed", "presence-room")] == 1, timeout=10)
    await wait_for(
        lambda: all(names(KEY)[("subscription_count", c)] == 2 for c in ("private-chat", "cache-news", "counted")),
        timeout=10,
    )
    await sleep(DEBOUNCE + 0.3)

    events = pusher_events(receiver, KEY)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_name.setdefault(event["name"], []).append(event)
    channels = {"presence-room", "private-chat", "cache-news", "counted"}
    assert sorted(e["channel"] for e in by_name["channel_occupied"]) == sorted(channels)
    assert sorted(e["channel"] for e in by_name["channel_vacated"]) == sorted(channels)
    assert by_name["member_added"] == [{"name": "member_added", "channel": "presence-room", "user_id": "ann"}]
    assert by_name["member_removed"] == [{"name": "member_removed", "channel": "presence-room", "user_id": "ann"}]
    assert by_name["client_event"] == [
        {
            "name": "client_event",
            "channel": "private-chat",
            "event": "client-typing",
            "data": '{"t":1}',
            "socket_id": ann.socket_id,
        },
        {
            "name": "client_event",
            "channel": "presence-room",
            "event": "client-wave",
            "data": '"hi"',
            "socket_id": ann.socket_id,
            "user_id": "ann",
        },
    ]
    assert by_name["cache_miss"] == [{"name": "cache_miss", "channel": "cache-news"}]
    # Every channel but the presence one: its count when it was joined, then when it was left.
    counts: dict[str, list[int]] = {}
    for event in by_name["subscription_count"]:
        counts.setdefault(event["channel"], []).append(event["subscription_count"])
    assert counts == {"private-chat": [1, 0], "cache-news": [1, 0], "counted": [1, 0]}
    # App 4 hears of its own channels only, by its names; no subscription counts (not enabled for it).
    assert sorted((e["name"], e["channel"]) for e in pusher_events(receiver, OTHER_KEY)) == [
        ("cache_miss", "cache-other"),
        ("channel_occupied", "cache-other"),
        ("channel_occupied", "news"),
        ("channel_vacated", "cache-other"),
        ("channel_vacated", "news"),
    ]
    # The native webhooks still work, for the native space only (app 3's channels are in it, app 4's not).
    native = Counter((e["name"], e["channel"]) for e in native_events(receiver))
    assert {c for (n, c) in native if n == "channel_occupied"} == channels
    assert not any(name in ("client_event", "cache_miss", "subscription_count") for name, _ in native)
    for post in receiver.requests:
        assert ("x-pusher-key" in post.headers) != ("x-pushie-signature" in post.headers)
    await both_sdks_accept(pusher_posts(receiver))


@pytest_twisted.ensureDeferred
async def test_a_reload_gives_an_app_webhooks(make_daemon, receiver, tmp_path, engine, request):  # noqa: F811
    apps_file = tmp_path / "apps"
    apps_file.write_text(f"{APP_ID}:{KEY}:{SECRET}\n")
    daemon = await make_daemon(pusher_apps_file=str(apps_file), webhook_debounce=DEBOUNCE)
    await hooks_ready(daemon)
    client = await connect(daemon)
    await subscribe(client, "before")
    if engine != "memory":
        # The transition was read from the Redis stream and settled (with no webhook
        # to go to) before the reload: not read late and sent to the new URL.
        servers = [request.getfixturevalue("redis_server")]
        prefix = "pushie:0:"
        if "," in engine:
            servers.append(request.getfixturevalue("second_redis_server"))
            prefix = f"pushie:0:shards-{daemon.engine.fingerprint}:"
        await wait_for(lambda: streams_settled(servers, prefix, added=1))
    await sleep(0.2)
    assert pusher_posts(receiver) == []
    apps_file.write_text(f"{APP_ID}:{KEY}:{SECRET} webhook_url={receiver.url}\n")
    daemon.service.reload()
    await subscribe(client, "after")
    await wait_for(lambda: pusher_posts(receiver), timeout=10)
    assert [e["channel"] for e in pusher_events(receiver, KEY)] == ["after"]
    await both_sdks_accept(pusher_posts(receiver))


# -- webhooks, a cluster -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_daemons_on_one_redis_send_one_channel_occupied(clean_reactor, own_redis, receiver):  # noqa: F811
    nodes: list[Daemon] = []
    try:
        for _ in range(2):
            nodes.append(
                await start_daemon(
                    engine=own_redis.url,
                    pusher_apps=hooked_apps(receiver.url, counted=False),
                    webhook_debounce=DEBOUNCE,
                )
            )
            await wait_for(lambda: nodes[-1].engine.cluster is not None)
        clients = []
        for node in nodes:
            for key in (KEY, OTHER_KEY):
                client = await connect(node, key=key)
                await subscribe(client, "room")
                clients.append(client)

        def counted() -> Counter[tuple[str, str, str]]:
            return Counter(
                (r.headers["x-pusher-key"], e["name"], e["channel"])
                for r in pusher_posts(receiver)
                for e in r.json["events"]
            )

        await wait_for(lambda: counted()[(OTHER_KEY, "channel_occupied", "room")] >= 1, timeout=10)
        await sleep(DEBOUNCE + 1.5)
        for client in clients:
            client.close()
            await client.closed
        await wait_for(lambda: counted()[(OTHER_KEY, "channel_vacated", "room")] >= 1, timeout=15)
        await sleep(DEBOUNCE + 1.5)
        assert counted() == Counter(
            {
                (KEY, "channel_occupied", "room"): 1,
                (KEY, "channel_vacated", "room"): 1,
                (OTHER_KEY, "channel_occupied", "room"): 1,
                (OTHER_KEY, "channel_vacated", "room"): 1,
            }
        )
        await both_sdks_accept(pusher_posts(receiver))
    finally:
        for node in nodes:
            await node.stop()


# -- subscription counts to clients ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pusher_js_sees_the_subscription_count_but_not_on_presence(make_daemon, browsers):  # noqa: F811
    daemon = await make_daemon(
        pusher_apps=[f"{APP_ID}:{KEY}:{SECRET} subscription_count=true", f"{OTHER_ID}:{OTHER_KEY}:{OTHER_SECRET}"],
        pusher_subscription_count_interval=INTERVAL,
    )
    ann, bob, carl = browsers(), browsers(), browsers()
    await ann.connect(KEY, SECRET, daemon.port, user_id="ann", user_info={})
    await bob.connect(KEY, SECRET, daemon.port, user_id="bob", user_info={})
    await carl.connect(OTHER_KEY, OTHER_SECRET, daemon.port)
    await ann.subscribe("news")
    first = await ann.wait(type="event", channel="news", event="pusher:subscription_count")
    assert first["data"] == {"subscription_count": 1}
    await ann.subscribe("presence-room")
    await bob.subscribe("presence-room")
    mark = ann.mark()
    await bob.subscribe("news")
    second = await ann.wait(type="event", channel="news", event="pusher:subscription_count", after=mark)
    assert second["data"] == {"subscription_count": 2}
    assert (await bob.wait(type="event", channel="news", event="pusher:subscription_count"))["data"] == {
        "subscription_count": 2
    }
    # pusher-js keeps it as channel.subscriptionCount too.
    mark = ann.mark()
    ann.send(cmd="status")
    assert (await ann.wait(type="status", after=mark))["channels"]["news"]["subscription_count"] == 2
    # One leaves: the other sees 1 again.
    mark = ann.mark()
    await bob.command(cmd="unsubscribe", channel="news")
    third = await ann.wait(type="event", channel="news", event="pusher:subscription_count", after=mark)
    assert third["data"] == {"subscription_count": 1}
    # No count on a presence channel, nor for an app that did not enable them.
    await carl.subscribe("news")
    await sleep(INTERVAL * 3)
    assert ann.find(type="event", channel="presence-room", event="pusher:subscription_count") == []
    assert bob.find(type="event", channel="presence-room", event="pusher:subscription_count") == []
    assert carl.find(type="event", event="pusher:subscription_count") == []


async def count_of(client: Any) -> Any:
    frame = await next_event(client)
    assert (frame["event"], frame["channel"]) == ("pusher_internal:subscription_count", "counted"), frame
    return frame["data"]


@pytest_twisted.ensureDeferred
async def test_subscription_counts_are_the_clusters(clean_reactor, own_redis):  # noqa: F811
    """A subscriber on another daemon counts: the first daemon's subscriber sees 2, then 1 again."""
    nodes: list[Daemon] = []
    try:
        for _ in range(2):
            nodes.append(
                await start_daemon(
                    engine=own_redis.url,
                    pusher_apps=[f"{APP_ID}:{KEY}:{SECRET} subscription_count=true"],
                    pusher_subscription_count_interval=INTERVAL,
                )
            )
            await hooks_ready(nodes[-1])
        ann = await connect(nodes[0])
        await subscribe(ann, "counted")
        assert await count_of(ann) == {"subscription_count": 1}
        bob = await connect(nodes[1])
        await subscribe(bob, "counted")
        assert await count_of(ann) == {"subscription_count": 2}
        assert await count_of(bob) == {"subscription_count": 2}
        bob.close()
        await bob.closed
        assert await count_of(ann) == {"subscription_count": 1}
        ann.close()
        await ann.closed
    finally:
        for node in nodes:
            await node.stop()
