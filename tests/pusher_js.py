"""
The real pusher-js client, driven from the tests.

C{tests/js/pusher_driver.js} runs pusher-js's Node build in a child process
(C{reactor.spawnProcess}): it takes one JSON command per line on stdin and
writes one JSON report per line on stdout (see the top of that file for the
commands and reports).  L{PusherJS} sends the commands and collects the
reports in L{PusherJS.reports}, in order.

Needs C{node} and C{npm ci} run in C{tests/js} (which installs pusher-js into
C{tests/js/node_modules}).  Without them the tests are skipped, or fail when
C{PUSHIE_REQUIRE_NODE=1} (as in CI).  C{PUSHIE_NODE} points at another node
binary; C{PUSHIE_PUSHER_JS_DEBUG=1} makes the driver log pusher-js's traffic to
stderr, which failure messages show.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

JS_DIR = Path(__file__).resolve().parent / "js"
DRIVER = JS_DIR / "pusher_driver.js"
PUSHER_JS = JS_DIR / "node_modules" / "pusher-js"

Report = dict[str, Any]
Predicate = Callable[[Report], bool] | Mapping[str, Any]


def node_executable() -> str | None:
    given = os.environ.get("PUSHIE_NODE")
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("node")


def require_pusher_js() -> None:
    """Skip without node and pusher-js, or fail when PUSHIE_REQUIRE_NODE=1 (as in CI)."""
    if node_executable() and (PUSHER_JS / "package.json").is_file():
        return
    reason = "these tests need node and pusher-js (apt-get install nodejs npm; cd tests/js && npm ci)"
    if os.environ.get("PUSHIE_REQUIRE_NODE") == "1":
        pytest.fail(reason + " and PUSHIE_REQUIRE_NODE=1 is set")
    pytest.skip(reason)


def _matcher(predicate: Predicate | None, fields: Mapping[str, Any]) -> Callable[[Report], bool]:
    """A callable from a callable, a mapping of expected fields, or keyword fields."""
    expected: dict[str, Any] = {}
    check: Callable[[Report], bool] | None = None
    if isinstance(predicate, Mapping):
        expected.update(predicate)
    elif predicate is not None:
        check = predicate
    expected.update(fields)

    def match(report: Report) -> bool:
        if any(key not in report or report[key] != value for key, value in expected.items()):
            return False
        return check is None or bool(check(report))

    return match


class _DriverProtocol(ProcessProtocol):
    def __init__(self, owner: PusherJS) -> None:
        self.owner = owner
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for line in complete:
            if line.strip():
                self.owner._line(line)

    def errReceived(self, data: bytes) -> None:
        self.owner.stderr_bytes += data

    def processEnded(self, reason: Any) -> None:
        if self._partial.strip():
            self.owner._line(self._partial)
            self._partial = b""
        value = reason.value
        code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        self.owner._ended(code)


class PusherJS:
    """
    One pusher-js client in a node child process.

    Start it with L{PusherJS.start} (or C{await PusherJS.spawn()}), and always
    C{await stop()} it, also when the test fails, so that the reactor is left
    clean::

        js = PusherJS.spawn()
        try:
            socket_id = await js.connect(KEY, SECRET, daemon.port)
            mark = js.mark()
            js.send(cmd="subscribe", channel="private-a")
            await js.wait(type="event", event="pusher:subscription_succeeded", after=mark)
        finally:
            await js.stop()
    """

    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.bad_lines: list[bytes] = []
        self.stderr_bytes = b""
        self.exit_code: int | None = None
        self.ended: Deferred[int] = Deferred()
        self._protocol = _DriverProtocol(self)
        self._waiters: list[tuple[Callable[[Report], bool], int, Deferred[Report]]] = []
        self._started = False

    # -- process --------------------------------------------------------

    @classmethod
    def spawn(cls, env: Mapping[str, str] | None = None) -> PusherJS:
        """Start a driver (call L{require_pusher_js} first)."""
        driver = cls()
        driver.start(env)
        return driver

    def start(self, env: Mapping[str, str] | None = None) -> None:
        node = node_executable()
        if node is None:
            raise RuntimeError("node not found (call require_pusher_js() first)")
        node = os.path.abspath(node)
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        if os.environ.get("PUSHIE_PUSHER_JS_DEBUG"):
            full_env["PUSHIE_PUSHER_JS_DEBUG"] = os.environ["PUSHIE_PUSHER_JS_DEBUG"]
        full_env.update(env or {})
        reactor.spawnProcess(self._protocol, node, [node, str(DRIVER)], env=full_env, path=str(JS_DIR))
        self._started = True

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self._started and not self.ended.called

    def send(self, **command: Any) -> None:
        """Write one command, e.g. C{send(cmd="subscribe", channel="presence-a", user_id="u2")}."""
        if not self.running:
            raise AssertionError(f"the pusher-js driver is not running; cannot send {command}\n{self.describe()}")
        self._protocol.transport.write(json.dumps(command).encode() + b"\n")

    async def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the driver to exit; kill it after C{timeout} seconds. Returns the exit code."""
        if not self._started:
            return None
        if not self.ended.called:
            transport = self._protocol.transport
            try:
                transport.write(b'{"cmd":"exit"}\n')
                transport.closeStdin()
            except Exception:
                pass
            timer = reactor.callLater(timeout, self._kill)
            try:
                await self.ended
            finally:
                if timer.active():
                    timer.cancel()
        for _, _, d in self._waiters:
            if not d.called:
                d.errback(AssertionError("the pusher-js driver was stopped"))
                d.addErrback(lambda f: None)
        self._waiters.clear()
        return self.exit_code

    def _kill(self) -> None:
        if not self.ended.called:
            try:
                self._protocol.transport.signalProcess("KILL")
            except Exception:
                pass

    # -- reports --------------------------------------------------------

    def _line(self, line: bytes) -> None:
        try:
            report = json.loads(line)
        except ValueError:
            self.bad_lines.append(line)
            return
        if not isinstance(report, dict):
            self.bad_lines.append(line)
            return
        index = len(self.reports)
        self.reports.append(report)
        for waiter in list(self._waiters):
            match, start, d = waiter
            if index >= start and not d.called and match(report):
                self._waiters.remove(waiter)
                d.callback(report)

    def _ended(self, code: int) -> None:
        self.exit_code = code
        self.ended.callback(code)
        # Waiters fail at once: nothing more can come.
        for waiter in list(self._waiters):
            _, _, d = waiter
            self._waiters.remove(waiter)
            if not d.called:
                d.errback(AssertionError(f"the pusher-js driver exited ({code}) while waiting\n{self.describe()}"))

    def mark(self) -> int:
        """The index the next report will have: pass it as C{after=} to wait only for newer reports."""
        return len(self.reports)

    def find(self, predicate: Predicate | None = None, after: int | None = None, **fields: Any) -> list[Report]:
        """All reports so far (from index C{after} on) that match."""
        match = _matcher(predicate, fields)
        return [r for r in self.reports[after or 0 :] if match(r)]

    async def wait(
        self, predicate: Predicate | None = None, timeout: float = 10.0, after: int | None = None, **fields: Any
    ) -> Report:
        """
        The first report (from the start, or from index C{after} on) that
        matches: C{predicate} is a callable or a mapping of expected fields;
        keyword arguments are more expected fields.  Raises AssertionError
        showing the last reports and the driver's stderr after C{timeout}
        seconds.
        """
        match = _matcher(predicate, fields)
        start = after or 0
        for report in self.reports[start:]:
            if match(report):
                return report
        if self.ended.called:
            raise AssertionError(f"the pusher-js driver has exited; no matching report\n{self.describe()}")
        d: Deferred[Report] = Deferred()
        waiter = (match, start, d)
        self._waiters.append(waiter)

        def expire() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not d.called:
                wanted = dict(fields) or predicate
                d.errback(AssertionError(f"no report matching {wanted!r} within {timeout}s\n{self.describe()}"))

        timer = reactor.callLater(timeout, expire)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def describe(self, last: int = 30) -> str:
        """The last reports and stderr, for failure messages."""
        lines = [f"last {min(last, len(self.reports))} of {len(self.reports)} reports:"]
        lines += [f"  [{i}] {json.dumps(r)}" for i, r in enumerate(self.reports) if i >= len(self.reports) - last]
        if self.bad_lines:
            lines.append(f"non-JSON stdout lines: {self.bad_lines[-5:]!r}")
        lines.append("stderr:")
        lines.append(self.stderr[-4000:] or "  (empty)")
        return "\n".join(lines)

    # -- commands -------------------------------------------------------

    async def command(self, timeout: float = 10.0, **command: Any) -> Report:
        """Send a command and wait for its ack; fail if the driver reported an error for it."""
        mark = self.mark()
        self.send(**command)
        ack = await self.wait(type="ack", cmd=command.get("cmd"), after=mark, timeout=timeout)
        if not ack.get("ok", True):
            errors = self.find(type="driver_error", after=mark)
            raise AssertionError(f"command {command} failed: {errors}\n{self.describe()}")
        return ack

    async def connect(
        self, key: str, secret: str, port: int, host: str = "127.0.0.1", timeout: float = 10.0, **options: Any
    ) -> str:
        """
        Create the pusher-js client (options: user_id, user_info,
        activityTimeout, pongTimeout, unavailableTimeout, wsPath) and wait
        until it is connected; returns the socket_id.
        """
        mark = self.mark()
        self.send(cmd="connect", key=key, secret=secret, host=host, port=port, **options)

        def settled(report: Report) -> bool:
            if report.get("type") == "connected":
                return True
            if report.get("type") == "state" and report.get("current") in ("disconnected", "failed"):
                return True
            return report.get("type") == "driver_error"

        report = await self.wait(settled, after=mark, timeout=timeout)
        if report.get("type") != "connected":
            raise AssertionError(f"pusher-js did not connect: {report}\n{self.describe()}")
        return report["socket_id"]

    async def subscribe(self, channel: str, timeout: float = 10.0, **options: Any) -> Report:
        """Subscribe and wait for pusher:subscription_succeeded (or fail on pusher:subscription_error)."""
        mark = self.mark()
        self.send(cmd="subscribe", channel=channel, **options)

        def settled(report: Report) -> bool:
            return (
                report.get("type") == "event"
                and report.get("channel") == channel
                and report.get("event") in ("pusher:subscription_succeeded", "pusher:subscription_error")
            ) or report.get("type") == "driver_error"

        report = await self.wait(settled, after=mark, timeout=timeout)
        if report.get("event") != "pusher:subscription_succeeded":
            raise AssertionError(f"subscribing to {channel} failed: {report}\n{self.describe()}")
        return report


# -- fixtures (import them into a test module) ------------------------------


@pytest.fixture
def pusher_js_installed():
    """Skip without node and pusher-js (fail in CI): outside the async fixture, where a skip is clean."""
    require_pusher_js()


@pytest_twisted.async_yield_fixture
async def browsers(pusher_js_installed):
    """Start pusher-js drivers (C{browsers()}); all are stopped at the end (before the daemons)."""
    started: list[PusherJS] = []

    def spawn() -> PusherJS:
        driver = PusherJS.spawn()
        started.append(driver)
        return driver

    yield spawn
    for driver in started:
        await driver.stop()
