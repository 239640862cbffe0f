"""
Recovery for pusher-js apps in a real browser: headless Chromium (driven as
in test_browser.py) loads pusher-js and Laravel Echo from tests/js/node_modules
(served by a small static site of the test, no CDN) and the plugin from the
daemon (C{/pushie-pusher.js}), subscribes through both, and the daemon drops
the connections while events are published: each page handler gets every
event once, in order, and C{recovered: false} when the history no longer
holds what was missed.

Needs node's packages (C{npm ci --prefix tests/js}) besides the browser: the
test fails without them when C{PUSHIE_REQUIRE_NODE=1}, and without the
browser when C{PUSHIE_REQUIRE_BROWSER=1} (as in CI).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pusher
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.helpers import sleep
from tests.test_browser import browser_binaries, console, start_browser  # noqa: F401  (a fixture)
from tests.test_pusher import APP_ID, KEY, SDK, SECRET, connect, expect, start

NODE_MODULES = Path(__file__).resolve().parent / "js" / "node_modules"
SCRIPTS = {
    b"pusher.min.js": NODE_MODULES / "pusher-js" / "dist" / "web" / "pusher.min.js",
    b"echo.iife.js": NODE_MODULES / "laravel-echo" / "dist" / "echo.iife.js",
}

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>pusher-js recovery</title>
<script src="/pusher.min.js"></script>
<script src="/echo.iife.js"></script>
<script src="http://127.0.0.1:%(port)d/pushie-pusher.js"></script>
<script>
  window.got = {news: [], orders: [], chat: []};
  window.signals = {news: [], orders: []};
  window.connects = {news: 0, orders: 0};
  var options = {
    wsHost: "127.0.0.1", wsPort: %(port)d, forceTLS: false, enabledTransports: ["ws"],
    cluster: "local", disableStats: true
  };

  // pusher-js, with the plugin.
  var pusher = new Pusher("%(key)s", Object.assign({channelAuthorization: {endpoint: "/auth"}}, options));
  window.recovery = PushieRecovery.enable(pusher, {
    onRecovery: function (name, info) { if (name === "news") window.signals.news.push(info); }
  });
  pusher.connection.bind("connected", function () { window.connects.news += 1; });
  pusher.subscribe("news").bind("headline", function (data) { window.got.news.push(data); });
  // A private channel (signed by the page site's /auth, as an app's endpoint
  // would) where the page sends a client event: never echoed, not even after a drop.
  var chat = pusher.subscribe("private-chat");
  chat.bind("client-note", function (data) { window.got.chat.push(data); });
  chat.bind("said", function (data) { window.got.chat.push(data); });
  window.note = function (n) { chat.trigger("client-note", {n: n}); };

  // Laravel Echo, on a Pusher instance of its own with the plugin.
  var echoPusher = new Pusher("%(key)s", options);
  PushieRecovery.enable(echoPusher);
  echoPusher.connection.bind("connected", function () { window.connects.orders += 1; });
  var echo = new Echo.default({broadcaster: "pusher", client: echoPusher});
  echo.channel("orders")
    .listen(".shipped", function (data) { window.got.orders.push(data); })
    .listen(".pushie:recovery", function (info) { window.signals.orders.push(info); });
</script>
"""


class Served(Resource):
    """A file's bytes with its type (twisted.web.static's File would do, with deprecation warnings)."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: str, code: int = 200) -> None:
        super().__init__()
        self.body, self.content_type, self.code = body, content_type.encode(), code

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.content_type)
        return self.body


class Pages(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return Served(b"not found", "text/plain", 404)


@pytest.fixture
def browser_scripts() -> dict[bytes, Path]:
    """pusher-js and Laravel Echo from tests/js/node_modules; skip (or fail with PUSHIE_REQUIRE_NODE=1) without them."""
    missing = [str(path) for path in SCRIPTS.values() if not path.is_file()]
    if missing:
        reason = f"run `npm ci --prefix tests/js` first: {', '.join(missing)} missing"
        if os.environ.get("PUSHIE_REQUIRE_NODE") == "1":
            pytest.fail(reason + " and PUSHIE_REQUIRE_NODE=1 is set")
        pytest.skip(reason)
    return SCRIPTS


class ChannelAuth(Resource):
    """An app's channel auth endpoint (pusher-js POSTs socket_id and channel_name), signing with the SDK."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        socket_id = request.args[b"socket_id"][0].decode()
        channel = request.args[b"channel_name"][0].decode()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(SDK_SIGNER.authenticate(channel, socket_id)).encode()


SDK_SIGNER = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)


@pytest_twisted.async_yield_fixture
async def page_site(browser_scripts):
    """Serve a page (given later), the scripts and /auth on a port of their own: another origin than the daemon's."""
    root = Pages()
    for name, path in browser_scripts.items():
        root.putChild(name, Served(path.read_bytes(), "application/javascript"))
    root.putChild(b"auth", ChannelAuth())
    site = Site(root)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    def serve(html: str) -> str:
        root.putChild(b"", Served(html.encode(), "text/html; charset=utf-8"))
        return f"http://127.0.0.1:{port.getHost().port}/"

    yield serve
    await port.stopListening()


async def page_state(driver) -> dict[str, Any]:
    return await threads.deferToThread(
        driver.execute_script,
        "return {got: window.got, signals: window.signals, connects: window.connects,"
        " chat_position: window.recovery.position('private-chat')};",
    )


async def until(driver, predicate, what: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await page_state(driver)
        if predicate(state):
            return state
        if time.monotonic() >= deadline:
            logs = await threads.deferToThread(console, driver)
            raise AssertionError(f"the page did not get {what} within {timeout}s: {state}\nconsole:\n{logs}")
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_pusher_js_and_echo_get_every_missed_event_once(
    make_daemon,
    browser_binaries,  # noqa: F811  (the fixture imported above)
    page_site,
    tmp_path,
):
    daemon = await start(make_daemon, history_size=10)
    sdk = SDK(daemon)
    code, body, _ = await daemon.get("/pushie-pusher.js")
    assert code == 200 and b"PushieRecovery" in body

    chromium, chromedriver = browser_binaries
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    url = page_site(PAGE % {"port": daemon.port, "key": KEY})
    driver = await threads.deferToThread(start_browser, chromium, chromedriver, str(profile))
    hub = daemon.hub

    async def publish(first: int, last: int) -> None:
        for n in range(first, last + 1):
            await sdk("trigger", "news", "headline", {"n": n})
            await sdk("trigger", "orders", "shipped", {"n": n})

    def subscribed(state: Any) -> bool:
        return all(hub.subscriber_count(name) == 1 for name in ("news", "orders", "private-chat"))

    async def drop() -> None:
        """Close every browser connection from the daemon's side (no close frame: as a network drop)."""
        await until(driver, subscribed, "the subscriptions")
        connections = list(hub.connections)
        assert len(connections) == 2
        for connection in connections:
            connection.abort()

    try:
        await threads.deferToThread(driver.get, url)
        await until(driver, subscribed, "the subscriptions")
        await publish(1, 2)
        await until(driver, lambda s: len(s["got"]["news"]) == len(s["got"]["orders"]) == 2, "the first events")

        # The page sends a client event; another client gets it (with its position).
        other = await connect(daemon)
        auth = sdk.authenticate("private-chat", other.socket_id)
        other.send({"event": "pusher:subscribe", "data": {"channel": "private-chat", "pushie": {}, **auth}})
        await expect(other, "pusher_internal:subscription_succeeded")
        await threads.deferToThread(driver.execute_script, "window.note(1);")
        note = await expect(other, "client-note")
        assert note["data"] == {"n": 1}
        # The page's plugin took the position of its own event (from the skip frame).
        await until(
            driver,
            lambda s: s["chat_position"] is not None and s["chat_position"]["offset"] == note["pushie"]["offset"],
            "the position of its own client event",
        )
        other.close()
        await other.closed

        # Dropped; five events on each channel while the page is away.
        await drop()
        await publish(3, 7)
        await sdk("trigger", "private-chat", "said", {"n": 2})
        assert not hub.connections, "the page came back before the events were published"
        state = await until(
            driver,
            lambda s: len(s["got"]["news"]) >= 7 and len(s["got"]["orders"]) >= 7 and s["got"]["chat"],
            "the five events published while it was away",
        )
        await sleep(0.5)  # a duplicate would come right behind
        state = await page_state(driver)
        expected = [{"n": n} for n in range(1, 8)]
        assert state["got"] == {"news": expected, "orders": expected, "chat": [{"n": 2}]}
        assert state["connects"] == {"news": 2, "orders": 2}
        for channel in ("news", "orders"):
            assert [s["recovered"] for s in state["signals"][channel]] == [True]

        # Dropped again, and more is published than the history holds (10):
        # the app is told, and carries on from the live events.
        await drop()
        await publish(8, 20)
        state = await until(
            driver,
            lambda s: len(s["signals"]["news"]) == len(s["signals"]["orders"]) == 2,
            "the recovered: false signal",
        )
        for channel in ("news", "orders"):
            assert [s["recovered"] for s in state["signals"][channel]] == [True, False]
        await publish(21, 21)
        state = await until(
            driver, lambda s: s["got"]["news"][-1:] == s["got"]["orders"][-1:] == [{"n": 21}], "a live event"
        )
        assert state["got"]["news"] == state["got"]["orders"] == expected + [{"n": 21}]

        # The safety net: a frame at or before the channel's position never
        # reaches the app (one after it does: the way in is the right one).
        inject = """
            var position = window.recovery.position("news");
            function frame(offset, n) {
              pusher.connection.connection.transport.emit("message", {data: JSON.stringify({
                event: "headline", channel: "news", data: JSON.stringify({n: n}),
                pushie: {offset: offset, epoch: position.epoch}})});
            }
            frame(position.offset, 21);
            frame(position.offset - 1, 20);
            frame(position.offset + 1, 22);
        """
        await threads.deferToThread(driver.execute_script, inject)
        state = await page_state(driver)
        assert state["got"]["news"] == expected + [{"n": 21}, {"n": 22}]

        # An app that leaves a channel starts afresh there if it comes back.
        left = await threads.deferToThread(
            driver.execute_script, 'pusher.unsubscribe("news"); return window.recovery.position("news");'
        )
        assert left is None
        await until(driver, lambda s: hub.subscriber_count("news") == 0, "the unsubscription")
    finally:
        await threads.deferToThread(driver.quit)
