"""
The operator's dashboard at /admin (pushie/doors/admin.py): off unless an
admin token is set, refused without it, and with it the API, the live
stream and the page in headless Chromium show what real clients do.

The browser test takes a screenshot of the dashboard with live data when
C{PUSHIE_ADMIN_SCREENSHOT} names a file (that is how docs/admin.png is made).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import threads
from twisted.python.failure import Failure

from pushie.config import ConfigError, load_settings
from tests.helpers import Daemon, raw_connect, sleep, wait_for
from tests.test_auth import SECRET_1, token
from tests.test_browser import browser_binaries, console, start_browser  # noqa: F401  (a fixture)
from tests.test_sse import EventReader, open_stream

ADMIN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


# The API and the stream run on both engines (the conftest's engine
# fixture); the other tests check the dashboard's own bounds, on memory.
MEMORY_ONLY = pytest.mark.parametrize("engine", ["memory"])


async def call(daemon: Daemon, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None):
    """(status, parsed JSON, response) of one request."""
    kwargs: dict[str, Any] = {"headers": dict(headers or {}), "pool": daemon.pool}
    if body is not None:
        kwargs["headers"]["Content-Type"] = "application/json"
        kwargs["data"] = json.dumps(body).encode()
    response = await treq.request(method, daemon.url + path, **kwargs)
    return response.code, json.loads(await response.content()), response


async def admin_stream(daemon: Daemon, headers: dict[str, str] | None = None):
    """Open /admin/stream; (response, reader) as tests/test_sse.open_stream."""
    response = await treq.get(
        daemon.url + "/admin/stream", headers=AUTH if headers is None else headers, pool=daemon.pool, unbuffered=True
    )
    reader = EventReader()
    if response.code == 200:
        treq.collect(response, reader.feed).addBoth(
            lambda result: reader.done.callback("dropped" if isinstance(result, Failure) else "clean")
        )
        assert (await reader.next()).get("retry") == "2000"
    return response, reader


async def next_message(ws) -> dict[str, Any]:
    """The next C{message} frame, past welcome and subscribed frames."""
    while True:
        frame = await ws.next()
        if frame["type"] == "message":
            return frame
        assert frame["type"] in ("welcome", "subscribed"), frame


# -- off by default, and refused without the token --------------------------


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_the_dashboard_is_off_without_an_admin_token(daemon):
    for method, path in [
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/api/overview"),
        ("GET", "/admin/stream"),
        ("POST", "/admin/api/publish"),
    ]:
        status, body, _ = await call(daemon, method, path, AUTH)
        assert (status, body["error"]) == (403, "admin_disabled"), (method, path)
        assert "PUSHIE_ADMIN_TOKEN" in body["message"]
    assert daemon.service.admin is None  # no sampler either


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_refused_without_the_right_token(make_daemon, log_events):
    daemon = await make_daemon(admin_token=ADMIN)
    # The page itself holds no secret: it loads, then asks for the token.
    status, page, response = await daemon.get("/admin")
    assert status == 200 and b"<title>Pushie admin</title>" in page
    assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
    policy = response.headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy  # the browser test runs under it
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Basic {ADMIN}"},
        {"Authorization": f"Bearer {ADMIN}x"},
        {"Authorization": "Bearer"},
    ):
        for method, path in [
            ("GET", "/admin/api/overview"),
            ("GET", "/admin/stream"),
            ("GET", "/admin/api/channels/a"),
        ]:
            status, body, response = await call(daemon, method, path, headers)
            assert (status, body["error"]) == (401, "unauthorized"), (headers, path)
            assert response.headers.getRawHeaders("www-authenticate")[0].startswith('Bearer realm="pushie-admin"')
        status, body, _ = await call(daemon, "POST", "/admin/api/publish", headers, {"channel": "a", "data": 1})
        assert (status, body["error"]) == (401, "unauthorized")
    assert not daemon.service.admin.streams
    assert daemon.hub.channel_names() == []  # nothing was published
    # Counted apart from publishers' refusals, and logged with the throttle: one line, not twenty.
    assert daemon.service.site.metrics.rejected.labels(reason="admin_unauthorized")._value.get() == 20
    refused = [e for e in log_events if "Refused an admin request" in e.get("log_format", "")]
    assert len(refused) == 1, refused
    status, body, _ = await call(daemon, "GET", "/admin/api/nothing", AUTH)
    assert (status, body["error"]) == (404, "not_found")
    status, body, response = await call(daemon, "POST", "/admin/api/overview", AUTH)
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert response.headers.getRawHeaders("allow") == ["GET"]
    response = await treq.head(daemon.url + "/admin/stream", headers=AUTH, pool=daemon.pool)
    await response.content()
    assert response.code == 405 and not daemon.service.admin.streams


def test_admin_token_settings():
    settings = load_settings({}, {"PUSHIE_ADMIN_TOKEN": ADMIN})
    assert settings.admin_token == ADMIN
    assert (settings.admin_max_streams, settings.admin_top_channels, settings.admin_chart_seconds) == (4, 20, 300)
    assert load_settings({}, {}).admin_token is None
    with pytest.raises(ConfigError, match="admin_token.*at least 16"):
        load_settings({}, {"PUSHIE_ADMIN_TOKEN": "short"})
    with pytest.raises(ConfigError, match="secret"):
        load_settings({"admin_token": ADMIN}, {})  # never on argv
    with pytest.raises(ConfigError, match="admin_chart_seconds.*3600"):
        load_settings({}, {"PUSHIE_ADMIN_CHART_SECONDS": "3601"})
    with pytest.raises(ConfigError, match="admin_max_streams"):
        load_settings({}, {"PUSHIE_ADMIN_MAX_STREAMS": "0"})


# -- what it shows --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_api_shows_connections_channels_presence_and_history(make_daemon, engine):
    daemon = await make_daemon(admin_token=ADMIN, subscriber_secrets=[SECRET_1])
    ws = await daemon.connect("channel=news&channel=sport")
    await ws.next_of("welcome")
    room = "presence-room"
    member = await daemon.connect(f"channel={room}&token={token(sub='ann', channels=[room], info={'name': 'Ann'})}")
    response, events = await open_stream(daemon, "channel=news")
    await events.next("subscribed")
    await wait_for(lambda: daemon.hub.subscriber_count("news") == 2 and daemon.hub.subscriber_count(room) == 1)

    status, body, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert status == 200
    assert body["doors"]["websocket"] == {"connections": 2, "subscriptions": 3}
    assert body["doors"]["sse"] == {"connections": 1, "subscriptions": 1}
    assert body["doors"]["pusher"] == {"connections": 0, "subscriptions": 0}
    assert body["connections"] == 3 and body["channel_count"] == 3
    assert {c["name"]: c["subscribers"] for c in body["channels"]} == {"news": 2, "sport": 1, room: 1}
    assert body["engine"] == {"name": engine, "healthy": True, "draining": False}  # memory, or the Redis URL
    assert body["webhooks"] is None
    assert body["chart"]["seconds"] == 300

    # A test publication through the admin API: validated as /publish is, delivered as any.
    status, answer, _ = await call(daemon, "POST", "/admin/api/publish", AUTH, {"channel": "bad name", "data": 1})
    assert (status, answer["error"]) == (400, "invalid_channel")
    status, answer, _ = await call(daemon, "POST", "/admin/api/publish", AUTH, {"channel": "news"})
    assert (status, answer["error"]) == (400, "missing_data")
    status, answer, _ = await call(daemon, "POST", "/admin/api/publish", AUTH, {"channel": "news", "data": {"n": 1}})
    assert status == 200 and answer["offset"] == 1
    message = await next_message(ws)
    assert (message["channel"], message["data"]) == ("news", {"n": 1})
    status, answer, _ = await call(
        daemon, "POST", "/admin/api/publish", AUTH, [{"channel": "news", "data": n} for n in range(2, 26)]
    )
    assert status == 200 and [r["offset"] for r in answer["results"]] == list(range(2, 26))

    status, channel, _ = await call(daemon, "GET", "/admin/api/channels/news", AUTH)
    assert status == 200
    assert (channel["subscribers"], channel["offset"], channel["members"]) == (2, 25, None)
    assert [m["offset"] for m in channel["history"]] == list(range(6, 26))  # the newest 20
    status, channel, _ = await call(daemon, "GET", f"/admin/api/channels/{room}", AUTH)
    assert channel["members"] == [{"id": "ann", "info": {"name": "Ann"}}]
    status, channel, _ = await call(daemon, "GET", "/admin/api/channels/no%20such", AUTH)
    assert (status, channel["error"]) == (400, "invalid_channel")
    member.close()
    await member.closed
    response.original._transport.stopProducing()
    await events.done


@pytest_twisted.ensureDeferred
async def test_the_stream_pushes_live_figures(make_daemon):
    daemon = await make_daemon(admin_token=ADMIN)
    response, reader = await admin_stream(daemon)
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    chart = await reader.next("chart")
    assert json.loads(chart["data"])["seconds"] == 300
    first = json.loads((await reader.next("stats"))["data"])
    assert first["streams"] == 1 and first["channels"] == []

    ws = await daemon.connect("channel=busy&channel=quiet")
    await wait_for(lambda: daemon.hub.subscriber_count("quiet") == 1)
    for n in range(5):
        status, _, _ = await daemon.publish({"channel": "busy", "data": n})
        assert status == 200

    # Within a few seconds a snapshot shows the connection and the messages.
    deadline = time.monotonic() + 5
    while True:
        stats = json.loads((await reader.next("stats"))["data"])
        if stats["totals"]["publications"] == 5 and stats["rates"]["deliveries"] > 0:
            break
        assert time.monotonic() < deadline, stats
    assert stats["doors"]["websocket"] == {"connections": 1, "subscriptions": 2}
    # busy had messages since the last snapshot (or the one before): listed first, with a rate.
    names = [c["name"] for c in stats["channels"]]
    assert set(names) == {"busy", "quiet"}
    assert stats["totals"]["deliveries"] == 5
    ws.close()
    await ws.closed

    # Stopping the daemon ends the stream cleanly.
    await daemon.service.stopService()
    assert await reader.done == "clean"
    assert not daemon.service.admin.streams


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_the_busiest_channels_come_first_and_only_the_top_n(make_daemon):
    """admin_top_channels bounds what a snapshot lists, whatever the number of channels."""
    daemon = await make_daemon(admin_token=ADMIN, admin_top_channels=2)
    monitor = daemon.service.admin
    ws = await daemon.connect("channel=a&channel=b&channel=c&channel=d")
    await wait_for(lambda: daemon.hub.subscriber_count("d") == 1)
    # Polled, with no stream open: each overview counts from the one before.
    status, before, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert status == 200 and len(before["channels"]) == 2
    for channel, count in (("a", 1), ("b", 5), ("c", 3)):
        for n in range(count):
            status, _, _ = await daemon.publish({"channel": channel, "data": n})
            assert status == 200
    await wait_for(
        lambda: daemon.hub.channel_positions() and dict((p[0], p[3]) for p in daemon.hub.channel_positions())["b"] == 5
    )
    await sleep(0.05)
    status, after, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    top = after["channels"]
    assert [c["name"] for c in top] == ["b", "c"]
    assert top[0]["rate"] > top[1]["rate"] > 0
    assert after["channel_count"] == 4
    assert not monitor.streams
    ws.close()
    await ws.closed


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_the_chart_keeps_admin_chart_seconds_samples(make_daemon):
    daemon = await make_daemon(admin_token=ADMIN, admin_chart_seconds=3)
    monitor = daemon.service.admin
    for _ in range(10):
        await sleep(0.01)
        monitor.tick()
    assert len(monitor.chart) == 3
    status, body, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert body["chart"]["seconds"] == 3 and len(body["chart"]["samples"]) == 3


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_streams_past_admin_max_streams_are_refused(make_daemon):
    daemon = await make_daemon(admin_token=ADMIN, admin_max_streams=1)
    response, reader = await admin_stream(daemon)
    assert response.code == 200
    status, body, refused = await call(daemon, "GET", "/admin/stream", AUTH)
    assert (status, body["error"]) == (429, "too_many_admin_streams")
    assert "admin_max_streams" in body["message"]
    response.original._transport.stopProducing()
    await reader.done
    await wait_for(lambda: not daemon.service.admin.streams)
    response, reader = await admin_stream(daemon)  # the slot is free again
    assert response.code == 200
    response.original._transport.stopProducing()
    await reader.done


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_a_stream_that_does_not_read_is_dropped(make_daemon):
    """An admin stream whose reader stalls is a slow consumer: dropped, counted, its slot freed."""
    daemon = await make_daemon(admin_token=ADMIN, slow_consumer_buffer=16384, slow_consumer_grace=30.0)
    monitor = daemon.service.admin
    response, reader = await admin_stream(daemon)  # one that reads, for contrast
    client = await raw_connect(daemon.port)
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.transport.write(f"GET /admin/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n".encode())
    await wait_for(lambda: len(monitor.streams) == 2)
    client.transport.pauseProducing()  # never reads again
    for n in range(40_000):
        if len(monitor.streams) < 2:
            break
        monitor.tick()
        if n % 100 == 0:
            await sleep(0)
    assert len(monitor.streams) == 1, "the daemon kept writing to an admin stream that does not read"
    assert [stream.request.channel.transport for stream in monitor.streams] != [None]
    assert not reader.done.called, "the stream that reads was dropped"
    assert daemon.service.site.metrics.slow_consumers._value.get() == 1
    written = n
    client.transport.resumeProducing()  # the client learns it was dropped
    await client.lost
    assert written > 10, "dropped before its buffer could fill"
    print(f"dropped after {written} snapshots; the reading stream got {len(reader.raw)} bytes")
    response.original._transport.stopProducing()
    await reader.done


# -- the page, in a browser -------------------------------------------------


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


async def page_has(driver, element_id: str, predicate, what: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await threads.deferToThread(text_of, driver, element_id)
        if predicate(text):
            return text
        if time.monotonic() >= deadline:
            logs = await threads.deferToThread(console, driver)
            raise AssertionError(f"#{element_id} did not show {what} within {timeout}s: {text!r}\nconsole:\n{logs}")
        await sleep(0.1)


def log_in(driver, token_text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "token").send_keys(token_text)
    driver.find_element(By.ID, "connect").click()


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_the_page_in_a_browser(make_daemon, browser_binaries, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    shot = os.environ.get("PUSHIE_ADMIN_SCREENSHOT")
    # For the screenshot, a chart of one minute that the traffic below fills in part.
    daemon = await make_daemon(
        admin_token=ADMIN, subscriber_secrets=[SECRET_1], admin_chart_seconds=60 if shot else 300
    )
    chromium, chromedriver = browser_binaries
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await threads.deferToThread(start_browser, chromium, chromedriver, str(profile))
    clients = []
    try:
        await threads.deferToThread(driver.set_window_size, 1200, 800)
        await threads.deferToThread(driver.get, daemon.url + "/admin")
        # A wrong token: refused, and nothing shows.
        await threads.deferToThread(log_in, driver, "not-the-admin-token-at-all")
        await page_has(driver, "refused", lambda t: "401 unauthorized" in t, "the refusal")
        assert await threads.deferToThread(text_of, driver, "connections") == "-"
        assert not daemon.service.admin.streams

        await threads.deferToThread(log_in, driver, ADMIN)
        await page_has(driver, "status", lambda t: t == "Live", "a live stream")
        await wait_for(lambda: len(daemon.service.admin.streams) == 1)
        # A subscriber the test opens shows up in the channel list with its count.
        ws = await daemon.connect("channel=bunno")
        await ws.next_of("welcome")
        await page_has(driver, "channels", lambda t: "bunno 1" in t, "the subscriber of bunno")
        await page_has(driver, "doors", lambda t: "websocket 1 1" in t, "one WebSocket connection")
        if shot:
            clients.extend(await busy_daemon(daemon))

        # A message the test publishes shows in the channel's history.
        status, _, _ = await daemon.publish({"channel": "bunno", "data": {"text": "oh hai admin"}})
        assert status == 200
        await threads.deferToThread(lambda: driver.find_element(By.CSS_SELECTOR, 'tr[data-channel="bunno"]').click())
        await page_has(driver, "history", lambda t: '"oh hai admin"' in t, "the published message")

        # The page's publish form goes through the admin API to the subscriber.
        def publish_from_the_page() -> None:
            driver.find_element(By.ID, "publish-channel").send_keys("bunno")
            driver.find_element(By.ID, "publish").click()

        await threads.deferToThread(publish_from_the_page)
        await page_has(driver, "publish-result", lambda t: t.startswith("published: offset 2"), "the publish result")
        logs = await threads.deferToThread(console, driver)
        assert "Content Security Policy" not in logs, logs
        assert (await next_message(ws))["data"] == {"text": "oh hai admin"}
        assert (await next_message(ws))["data"] == {"text": "hello from the admin page"}

        if shot:
            height = await threads.deferToThread(driver.execute_script, "return window.innerHeight")
            await threads.deferToThread(driver.set_window_size, 1200, 800 + 800 - height)
            room = "presence-room"
            await threads.deferToThread(lambda: driver.find_element(By.ID, "channel").clear())
            await threads.deferToThread(lambda: driver.find_element(By.ID, "channel").send_keys(room + "\n"))
            await page_has(driver, "members", lambda t: "ann" in t, "the members")
            await sleep(20)
            await threads.deferToThread(driver.save_screenshot, shot)
    finally:
        for client in clients:
            client.close()
        await threads.deferToThread(driver.quit)


async def busy_daemon(daemon: Daemon) -> list:
    """Some traffic for the screenshot: subscribers on two doors, presence, a publisher (stopped by close())."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall

    for name in ("orders", "chat", "chat", "chat", "prices", "prices"):
        await daemon.connect(f"channel={name}")
    room = "presence-room"
    for sub, name in (("ann", "Ann"), ("bob", "Bob")):
        await daemon.connect(f"channel={room}&token={token(sub=sub, channels=[room], info={'name': name})}")
    streams = [await open_stream(daemon, "channel=prices") for _ in range(2)]
    counter = {"n": 0}

    def publish() -> None:
        counter["n"] += 1
        body = [{"channel": "prices", "data": {"tick": counter["n"]}}] * (counter["n"] % 7 + 3)
        body += [{"channel": "chat", "data": {"text": f"hi {counter['n']}"}}] * (counter["n"] % 3)
        if counter["n"] % 5 == 0:
            body.append({"channel": room, "data": {"text": f"ann says {counter['n'] // 5}"}})
        Deferred.fromCoroutine(daemon.publish(body))

    loop = LoopingCall(publish)
    loop.start(0.2)

    class Stopper:
        def close(self) -> None:
            loop.stop()
            for response, _ in streams:
                response.original._transport.stopProducing()

    await sleep(6)
    return [Stopper()]


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_the_webhooks_health(make_daemon):
    """With webhooks on, the overview says what they did: here a receiver that refuses connections."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    daemon = await make_daemon(
        admin_token=ADMIN,
        webhook_url=f"http://127.0.0.1:{port}/hooks",
        webhook_secret="webhook-secret-0123456789",
        webhook_retry_for=0.0,
    )
    status, body, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert body["webhooks"] == {"queued": 0, "in_flight": 0, "held": 0, "delivered": 0, "failed": 0, "dropped": 0}
    ws = await daemon.connect("channel=hooked")  # channel_occupied, which cannot be delivered
    await ws.next_of("welcome")
    await wait_for(lambda: daemon.hub.webhooks.failed >= 1, timeout=10)
    status, body, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert body["webhooks"]["failed"] == 1 and body["webhooks"]["delivered"] == 0


@MEMORY_ONLY
@pytest_twisted.ensureDeferred
async def test_pusher_connections_count_under_their_door(make_daemon):
    from tests.test_pusher import APPS, connect, subscribe

    daemon = await make_daemon(admin_token=ADMIN, pusher_apps=APPS)
    client = await connect(daemon)
    await subscribe(client, "news")
    await subscribe(client, "sport")
    status, body, _ = await call(daemon, "GET", "/admin/api/overview", AUTH)
    assert body["doors"] == {
        "websocket": {"connections": 0, "subscriptions": 0},
        "sse": {"connections": 0, "subscriptions": 0},
        "pusher": {"connections": 1, "subscriptions": 2},
    }
    assert {c["name"] for c in body["channels"]} == {"news", "sport"}  # the first app shares the native channels
