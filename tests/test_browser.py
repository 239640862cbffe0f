"""
The demo page and pushie.js in a real browser: headless Chromium driven by
Selenium, against a daemon running in this process on the reactor.

Selenium's calls block, so each one runs in a reactor thread
(C{deferToThread}) while the reactor keeps serving the page, the WebSocket and
the publishes.

Needs the C{selenium} package, C{chromium} and C{/usr/bin/chromedriver}
(Debian: C{apt-get install chromium chromium-driver}).  Without them the test
is skipped, or fails when C{PUSHIE_REQUIRE_BROWSER=1} (as in CI).
C{PUSHIE_CHROMIUM} and C{PUSHIE_CHROMEDRIVER} point at other binaries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.helpers import sleep

CONNECTED = "You're connected to Pushie!"
NOT_RECOVERED = "Missed messages could not be recovered"
MESSAGE_LINE = re.compile(r"^bunno #(\d+): (.*)$")

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def _executable(variable: str, default: str, *names: str) -> str | None:
    given = os.environ.get(variable)
    if given:
        return given if os.access(given, os.X_OK) else None
    if os.access(default, os.X_OK):
        return default
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver); skip (or fail with PUSHIE_REQUIRE_BROWSER=1) when missing."""
    chromium = _executable("PUSHIE_CHROMIUM", "/usr/bin/chromium", "chromium", "chromium-browser")
    chromedriver = _executable("PUSHIE_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install selenium)")
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if chromedriver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        if os.environ.get("PUSHIE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " and PUSHIE_REQUIRE_BROWSER=1 is set")
        pytest.skip(reason)
    assert chromium is not None and chromedriver is not None
    return chromium, chromedriver


def start_browser(chromium: str, chromedriver: str, profile: str):
    """A headless Chromium with a fresh profile.  Blocking: run it in a thread."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager looks nothing up and downloads nothing.
    service = Service(executable_path=chromedriver, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(10)
    return driver


def page_log(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "log").get_attribute("value") or ""


def console(driver) -> str:
    try:
        return "\n".join(entry["message"] for entry in driver.get_log("browser"))
    except Exception as e:  # diagnostics only
        return f"(no console log: {e})"


def messages(text: str) -> list[tuple[int, object]]:
    """The message lines the page shows: (offset, data), in order."""
    found = []
    for line in text.splitlines():
        match = MESSAGE_LINE.match(line)
        if match:
            found.append((int(match.group(1)), json.loads(match.group(2))))
    return found


async def page_shows(driver, predicate, what: str, timeout: float) -> str:
    """Poll the page's text area until C{predicate(text)}; fail with what it shows."""
    deadline = time.monotonic() + timeout
    while True:
        text = await threads.deferToThread(page_log, driver)
        if predicate(text):
            return text
        if time.monotonic() >= deadline:
            logs = await threads.deferToThread(console, driver)
            raise AssertionError(f"the page did not show {what} within {timeout}s; it shows:\n{text}\nconsole:\n{logs}")
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_demo_page_reconnects_and_recovers(make_daemon, browser_binaries, tmp_path):
    daemon = await make_daemon(history_size=100)

    code, body, response = await daemon.get("/pushie.js")
    assert code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/javascript; charset=utf-8"]
    assert b"class Pushie" in body

    from selenium.webdriver.common.by import By

    chromium, chromedriver = browser_binaries
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await threads.deferToThread(start_browser, chromium, chromedriver, str(profile))
    try:
        await threads.deferToThread(driver.get, daemon.url + "/")
        await threads.deferToThread(lambda: driver.find_element(By.ID, "subscribe").click())
        await page_shows(driver, lambda text: CONNECTED in text, "the welcome line", 10)
        # Subscribed once the server knows the connection's channel.
        await page_shows(driver, lambda text: daemon.hub.subscriber_count("bunno") == 1, "a subscription", 5)
        # Issue 17: no 404 in the console (the favicon), and a curl line that wraps.
        logs = await threads.deferToThread(console, driver)
        assert "404" not in logs and "favicon" not in logs, logs
        sideways = await threads.deferToThread(
            driver.execute_script, "return document.documentElement.scrollWidth > window.innerWidth"
        )
        assert sideways is False

        sent = [{"text": f"oh hai {n}", "username": "jufisch"} for n in range(1, 6)]
        for data in sent[:2]:
            status, answer, _ = await daemon.publish({"channel": "bunno", "data": data})
            assert status == 200, answer
        await page_shows(driver, lambda text: len(messages(text)) >= 2, "the first two messages", 5)

        # The network drops the browser; three messages go out while it is away.
        connections = list(daemon.hub.connections)
        assert len(connections) == 1
        for connection in connections:
            connection.abort()
        for data in sent[2:]:
            status, answer, _ = await daemon.publish({"channel": "bunno", "data": data})
            assert status == 200, answer
        assert not daemon.hub.connections, "the browser came back before the messages were published"

        text = await page_shows(
            driver,
            lambda text: NOT_RECOVERED in text or (text.count(CONNECTED) >= 2 and len(messages(text)) >= 5),
            "a reconnection and all five messages",
            15,
        )
        await sleep(0.3)  # a duplicate would arrive right behind the replay
        text = await threads.deferToThread(page_log, driver)
        assert messages(text) == list(enumerate(sent, start=1)), text
        assert text.count(CONNECTED) == 2, text
        assert "Connection closed (1006" in text, text
        assert NOT_RECOVERED not in text, text
    finally:
        await threads.deferToThread(driver.quit)


@pytest_twisted.ensureDeferred
async def test_the_favicon_is_served(daemon):
    """Issue 17: browsers ask for /favicon.ico; the page links it, and it is there (no 404)."""
    code, body, response = await daemon.get("/favicon.ico")
    assert code == 200
    assert response.headers.getRawHeaders("content-type") == ["image/svg+xml"]
    assert body.startswith(b"<svg")
    code, page, _ = await daemon.get("/")
    assert b'<link rel="icon" href="/favicon.ico"' in page


# The memory engine forgets a channel with no history as soon as nobody
# follows it; Redis keeps its state for history_ttl, longer than the page is away.
@pytest.mark.parametrize("engine", ["memory"])
@pytest_twisted.ensureDeferred
async def test_demo_page_says_new_epoch_and_shows_the_history(make_daemon, browser_binaries, tmp_path):
    """
    Issue 17: when the channel starts a new epoch while the page is away,
    the page says "new epoch" (else "#1" twice looks like a duplicate) and
    shows what the history API still holds instead of only "reload".
    """
    # No history: the channel is forgotten once nobody follows it, so the
    # page comes back to a new epoch.
    daemon = await make_daemon(history_size=0)
    from selenium.webdriver.common.by import By

    chromium, chromedriver = browser_binaries
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await threads.deferToThread(start_browser, chromium, chromedriver, str(profile))
    try:
        await threads.deferToThread(driver.get, daemon.url + "/")
        await threads.deferToThread(lambda: driver.find_element(By.ID, "subscribe").click())
        await page_shows(driver, lambda text: daemon.hub.subscriber_count("bunno") == 1, "a subscription", 10)
        status, answer, _ = await daemon.publish({"channel": "bunno", "data": "first"})
        assert status == 200, answer
        await page_shows(driver, lambda text: len(messages(text)) == 1, "the first message", 5)

        for connection in list(daemon.hub.connections):
            connection.abort()
        await page_shows(driver, lambda text: daemon.hub.subscriber_count("bunno") == 1, "a resubscription", 15)
        status, answer, _ = await daemon.publish({"channel": "bunno", "data": "second"})
        assert status == 200, answer
        text = await page_shows(driver, lambda text: len(messages(text)) == 2, "the second message", 5)
        assert [offset for offset, _ in messages(text)] == [1, 1], text
        assert "new epoch" in text, text
        assert NOT_RECOVERED + "; the channel's history holds 0" in text, text
    finally:
        await threads.deferToThread(driver.quit)


@pytest_twisted.ensureDeferred
async def test_event_source_receives_and_resumes(make_daemon, browser_binaries, tmp_path):
    """A browser's own EventSource on /events: messages arrive, and after a drop it resumes with Last-Event-ID."""
    daemon = await make_daemon(history_size=100, sse_keepalive=1.0)
    chromium, chromedriver = browser_binaries
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await threads.deferToThread(start_browser, chromium, chromedriver, str(profile))
    script = """
        window.got = []; window.opens = 0;
        const source = new EventSource("/events?channel=bunno");
        source.onopen = () => { window.opens += 1; };
        source.onmessage = (event) => window.got.push(JSON.parse(event.data).data);
    """

    async def received():
        return await threads.deferToThread(driver.execute_script, "return [window.got, window.opens];")

    async def until(predicate, what, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            got, opens = await received()
            if predicate(got, opens):
                return got, opens
            if time.monotonic() >= deadline:
                raise AssertionError(f"EventSource did not get {what}: {got}, opened {opens} times")
            await sleep(0.1)

    try:
        await threads.deferToThread(driver.get, daemon.url + "/")
        await threads.deferToThread(driver.execute_script, script)
        await until(lambda got, opens: daemon.hub.subscriber_count("bunno") == 1, "a subscription")
        await daemon.publish({"channel": "bunno", "data": 1})
        await until(lambda got, opens: got == [1], "the first message")
        for connection in list(daemon.hub.connections):
            if hasattr(connection, "request"):  # the SSE stream, not the page's WebSocket
                connection.abort()
        await daemon.publish([{"channel": "bunno", "data": 2}, {"channel": "bunno", "data": 3}])
        got, opens = await until(lambda got, opens: len(got) >= 3, "the messages sent while it was away")
        await sleep(0.3)
        got, opens = await received()
        assert got == [1, 2, 3] and opens == 2
    finally:
        await threads.deferToThread(driver.quit)
