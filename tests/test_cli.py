"""
The C{pushie} command (publish, listen) and L{pushie.client}, against a real
daemon in this process.

The command runs as a child process (C{reactor.spawnProcess}) and the client's
blocking calls in a thread (C{deferToThread}), so that the reactor keeps
serving the daemon meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol

from pushie import client
from pushie.client import PushieClientError
from tests.helpers import wait_for
from tests.test_auth import SECRET_1, token

ROOT = Path(__file__).resolve().parent.parent
KEY = "publisher-key-aaaaaaaaaaaaaaaa"


class CLI(ProcessProtocol):
    """A C{pushie} child process: its stdout as JSON lines, its stderr as text."""

    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.lines: DeferredQueue = DeferredQueue()
        self.ended: Deferred[int] = Deferred()
        self._partial = b""

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for line in complete:
            self.lines.put(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        value = reason.value
        self.ended.callback(value.exitCode if value.exitCode is not None else -value.signal)

    @property
    def stderr(self) -> str:
        return self.err.decode()

    async def line(self, timeout: float = 10.0) -> dict:
        """The next JSON line on stdout."""
        d = self.lines.get()
        timer = reactor.callLater(timeout, d.cancel)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    async def exit_code(self, timeout: float = 15.0) -> int:
        await wait_for(lambda: self.ended.called, timeout=timeout)
        return await self.ended


class Runner:
    """Starts C{python -m pushie.cli} children; kills any left at the end of the test."""

    def __init__(self) -> None:
        self.started: list[CLI] = []

    def spawn(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> CLI:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHIE_")}
        full_env.update({"PYTHONPATH": str(ROOT), "NO_PROXY": "*", "no_proxy": "*"})
        full_env.update(env or {})
        proc = CLI(stdin)
        reactor.spawnProcess(proc, sys.executable, [sys.executable, "-m", "pushie.cli", *args], env=full_env)
        self.started.append(proc)
        return proc

    async def run(self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None):
        """Run to the end; return (exit code, stdout, stderr)."""
        proc = self.spawn(*args, env=env, stdin=stdin)
        code = await proc.exit_code()
        return code, proc.out.decode(), proc.stderr

    async def cleanup(self) -> None:
        for proc in self.started:
            if not proc.ended.called:
                proc.transport.signalProcess("KILL")
            await proc.ended


@pytest_twisted.async_yield_fixture
async def cli(make_daemon):
    """Depends on make_daemon so that its children are gone before the daemons stop."""
    runner = Runner()
    yield runner
    await runner.cleanup()


def closed_port() -> int:
    """A local port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def history(daemon, channel: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, body, _ = await daemon.get(f"/channels/{channel}/history", headers=headers)
    assert status == 200, body
    return json.loads(body)


# -- pushie publish -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_publish_prints_the_answer_and_subscribers_get_it(make_daemon, cli):
    daemon = await make_daemon()
    ws = await daemon.connect("channel=news")
    await ws.next_of("welcome")
    await ws.next_of("subscribed")
    args = ("publish", "--url", daemon.url, "news", '{"text": "oh hai", "n": [1, 2.5, null]}', "--event", "greeting")
    code, out, err = await cli.run(*args, "--idempotency-key", "k-1")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["channel"] == "news" and answer["offset"] == 1 and answer["epoch"]
    message = await ws.next_of("message")
    assert message["data"] == {"text": "oh hai", "n": [1, 2.5, None]}
    assert message["event"] == "greeting" and message["offset"] == 1 and message["epoch"] == answer["epoch"]

    # The same idempotency key publishes nothing new and answers the first offset.
    code, out, err = await cli.run(*args, "--idempotency-key", "k-1")
    assert code == 0 and json.loads(out) == answer, err
    code, out, err = await cli.run(*args, "--idempotency-key", "k-2")
    assert code == 0 and json.loads(out)["offset"] == 2, err
    assert (await ws.next_of("message"))["offset"] == 2
    assert ws.pending() == []


@pytest_twisted.ensureDeferred
async def test_publish_reads_stdin_and_pushie_url(make_daemon, cli):
    daemon = await make_daemon()
    env = {"PUSHIE_URL": daemon.url}
    code, out, err = await cli.run("publish", "news", env=env, stdin='{"text": "héllo ☃"}\n'.encode())
    assert code == 0, err
    assert json.loads(out)["offset"] == 1
    code, out, err = await cli.run("publish", "news", "-", env=env, stdin=b"[1, 2, 3]")
    assert code == 0 and json.loads(out)["offset"] == 2, err
    code, out, err = await cli.run("publish", "news", "null", env=env)
    assert code == 0 and json.loads(out)["offset"] == 3, err
    kept = await history(daemon, "news")
    assert [m["data"] for m in kept["messages"]] == [{"text": "héllo ☃"}, [1, 2, 3], None]


@pytest_twisted.ensureDeferred
async def test_publish_usage_errors_exit_2_and_publish_nothing(make_daemon, cli):
    daemon = await make_daemon()
    url = ("--url", daemon.url)
    for args, stdin, expected in [
        (("news", "{not json"), None, "must be JSON"),
        (("news", "NaN"), None, "NaN is not JSON"),
        (("news", '{"x": Infinity}'), None, "Infinity is not JSON"),
        (("news",), b"", "empty"),
        (("news", "-"), b"{'single': 'quotes'}", "must be JSON"),
    ]:
        code, out, err = await cli.run("publish", *url, *args, stdin=stdin)
        assert (code, out) == (2, ""), (args, err)
        assert expected in err and err.startswith("pushie publish: "), err
    code, out, err = await cli.run("publish", "--url", "ftp://example.com", "news", "1")
    assert code == 2 and "http://host:port" in err, err
    code, out, err = await cli.run("publish", *url)
    assert code == 2 and "usage:" in err, err
    status, body, _ = await daemon.get("/channels/news")
    assert json.loads(body)["offset"] == 0


@pytest_twisted.ensureDeferred
async def test_publish_with_publisher_keys(make_daemon, cli):
    daemon = await make_daemon(publisher_keys=[KEY])
    url = ("--url", daemon.url)
    code, out, err = await cli.run("publish", *url, "news", "1")
    assert code == 1 and out == "", err
    assert "401 unauthorized" in err and "PUSHIE_PUBLISHER_KEY" in err
    code, out, err = await cli.run("publish", *url, "news", "2", env={"PUSHIE_PUBLISHER_KEY": "wrong-key-" + "x" * 20})
    assert code == 1 and "401 unauthorized" in err and "not valid" in err, err

    code, out, err = await cli.run("publish", *url, "--key", KEY, "news", "3")
    assert code == 0 and json.loads(out)["offset"] == 1, err
    code, out, err = await cli.run("publish", *url, "news", "4", env={"PUSHIE_PUBLISHER_KEY": KEY})
    assert code == 0 and json.loads(out)["offset"] == 2, err
    # --key wins over the environment.
    code, out, err = await cli.run("publish", *url, "--key", KEY, "news", "5", env={"PUSHIE_PUBLISHER_KEY": "nope"})
    assert code == 0 and json.loads(out)["offset"] == 3, err
    assert [m["data"] for m in (await history(daemon, "news", KEY))["messages"]] == [3, 4, 5]


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon_exits_1(make_daemon, cli):
    url = f"http://127.0.0.1:{closed_port()}"
    code, out, err = await cli.run("publish", "--url", url, "news", "1")
    assert code == 1 and out == "", err
    assert "unreachable" in err and f"cannot reach {url}" in err
    code, out, err = await cli.run("listen", "--url", url, "news")
    assert code == 1 and out == "", err
    assert "unreachable" in err and f"cannot reach {url}" in err


# -- pushie.client ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_publish_and_errors_carry_the_code(make_daemon):
    daemon = await make_daemon(publisher_keys=[KEY], max_message_size=4096)

    def call(function, *args, **kwargs):
        return threads.deferToThread(function, *args, url=daemon.url, **kwargs)

    async def error_of(function, *args, **kwargs) -> PushieClientError:
        with pytest.raises(PushieClientError) as caught:
            await call(function, *args, **kwargs)
        return caught.value

    e = await error_of(client.publish, "news", 1)
    assert (e.status, e.code) == (401, "unauthorized") and e.message
    e = await error_of(client.publish, "bad channel!", 1, key=KEY)
    assert (e.status, e.code) == (400, "invalid_channel") and "A-Z a-z 0-9" in e.message
    assert str(e).startswith("400 invalid_channel: ")
    e = await error_of(client.publish, "news", "x" * 5000, key=KEY)
    assert (e.status, e.code) == (413, "payload_too_large")
    e = await error_of(client.publish, "news", 1, key=KEY, event="")
    assert (e.status, e.code) == (400, "invalid_event")
    e = await error_of(client.publish_batch, [{"channel": "a", "data": 1}, {"channel": "b", "dta": 2}], key=KEY)
    assert (e.status, e.code) == (400, "unknown_field") and "publication 1" in e.message
    with pytest.raises(ValueError):
        await call(client.publish, "news", float("nan"), key=KEY)

    answer = await call(client.publish, "news", {"n": 1}, key=KEY, event="greeting", idempotency_key="i1")
    assert answer["channel"] == "news" and answer["offset"] == 1 and answer["epoch"]
    assert await call(client.publish, "news", {"n": 1}, key=KEY, idempotency_key="i1") == answer
    results = await call(client.publish_batch, [{"channel": "news", "data": 2}, {"channel": "b", "data": 3}], key=KEY)
    assert [(r["channel"], r["offset"]) for r in results] == [("news", 2), ("b", 1)]
    kept = await history(daemon, "news", KEY)
    assert [(m["event"], m["data"]) for m in kept["messages"]] == [("greeting", {"n": 1}), ("message", 2)]

    # 503 with Retry-After, as while the daemon drains.
    daemon.hub.draining = True
    try:
        e = await error_of(client.publish, "news", 1, key=KEY)
    finally:
        daemon.hub.draining = False
    assert (e.status, e.code, e.retry_after) == (503, "shutting_down", 1.0)

    e = await threads.deferToThread(_error, client.publish, "news", 1, url=f"http://127.0.0.1:{closed_port()}")
    assert (e.status, e.code) == (None, "unreachable")


class _Silent(Protocol):
    """Accepts the connection, never answers."""


class _NotPushie(Protocol):
    """Answers like a proxy in front of a dead upstream."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\n<h1>502 "
        )
        self.transport.write(b"</h1>")
        self.transport.loseConnection()


def _error(function, *args, **kwargs) -> PushieClientError:
    try:
        function(*args, **kwargs)
    except PushieClientError as e:
        return e
    raise AssertionError("no error")


@pytest_twisted.ensureDeferred
async def test_client_timeout_and_answers_that_are_not_pushie(make_daemon):
    silent = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
    proxy = reactor.listenTCP(0, Factory.forProtocol(_NotPushie), interface="127.0.0.1")
    try:
        started = time.monotonic()
        url = f"http://127.0.0.1:{silent.getHost().port}"
        e = await threads.deferToThread(_error, client.publish, "news", 1, url=url, timeout=0.5)
        assert (e.status, e.code) == (None, "timeout") and time.monotonic() - started < 5
        url = f"http://127.0.0.1:{proxy.getHost().port}"
        e = await threads.deferToThread(_error, client.publish, "news", 1, url=url)
        assert (e.status, e.code) == (502, "invalid_response") and "502" in e.message
    finally:
        await silent.stopListening()
        await proxy.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_listen_resumes_from_a_saved_event_id(make_daemon):
    daemon = await make_daemon()

    subscribed = threading.Event()

    def take(messages: int, **kwargs) -> list:
        """Read events until C{messages} messages came; give up after 10 s."""
        deadline = time.monotonic() + 10

        def on_retry(error, delay):
            if time.monotonic() > deadline:
                raise AssertionError(f"still retrying: {error}")

        events = client.listen(["news", "sport"], url=daemon.url, read_timeout=2, on_retry=on_retry, **kwargs)
        taken = []
        try:
            for event in events:
                taken.append(event)
                if sum(e.type == "subscribed" for e in taken) == 2:
                    subscribed.set()
                if sum(e.type == "message" for e in taken) == messages:
                    return taken
                if time.monotonic() > deadline:
                    raise AssertionError(f"only {taken}")
        finally:
            events.close()

    first = threads.deferToThread(take, 2)
    await wait_for(lambda: subscribed.is_set() or first.called, timeout=10)
    await daemon.publish([{"channel": "news", "data": 1}, {"channel": "sport", "data": 2}])
    events = await first
    assert [e.type for e in events] == ["subscribed", "subscribed", "message", "message"]
    assert [e.data["data"] for e in events[2:]] == [1, 2]
    saved = events[-1].id

    await wait_for(lambda: not daemon.hub.connections)
    await daemon.publish([{"channel": "sport", "data": 3}, {"channel": "news", "data": 4}])
    events = await threads.deferToThread(take, 2, last_event_id=saved)
    answers = [e.data for e in events if e.type == "subscribed"]
    assert len(answers) == 2 and all(s["recovered"] is True for s in answers)
    messages = [e.data for e in events if e.type == "message"]
    assert sorted((m["channel"], m["offset"], m["data"]) for m in messages) == [("news", 2, 4), ("sport", 2, 3)]
    await wait_for(lambda: not daemon.hub.connections)


# -- pushie listen ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listen_prints_json_lines_and_resumes_after_a_drop(make_daemon, cli):
    daemon = await make_daemon()
    proc = cli.spawn("listen", "--url", daemon.url, "news", "sport", "--once", "6")
    await wait_for(lambda: proc.err.count(b"subscribed to") == 2 or proc.ended.called, timeout=10)
    assert proc.err.count(b"subscribed to") == 2, proc.stderr
    await daemon.publish({"channel": "news", "data": {"n": 1}})
    await daemon.publish({"channel": "sport", "data": {"n": 2}})
    lines = [await proc.line(), await proc.line()]

    # The network drops the stream; the daemon refuses the first reconnection
    # with 503 and Retry-After (as it does while draining); then it comes back.
    daemon.hub.draining = True
    for connection in list(daemon.hub.connections):
        connection.abort()
    await wait_for(lambda: b"503 shutting_down" in proc.err or proc.ended.called, timeout=10)
    daemon.hub.draining = False
    assert "lost the event stream" in proc.stderr and "503 shutting_down" in proc.stderr
    assert "reconnecting in 1.0 s" in proc.stderr.split("503 shutting_down")[1]  # Retry-After: 1
    assert not daemon.hub.connections
    await daemon.publish(
        [{"channel": "news", "data": {"n": 3}}, {"channel": "sport", "data": {"n": 4}}, {"channel": "news", "data": 5}]
    )
    lines += [await proc.line() for _ in range(3)]
    # stderr is another pipe: its lines may come in after stdout's.
    await wait_for(lambda: proc.stderr.count("resumed") == 2, timeout=5)
    await daemon.publish({"channel": "sport", "data": "live"})
    lines.append(await proc.line())
    assert await proc.exit_code() == 0, proc.stderr

    assert all(set(line) == {"type", "channel", "event", "offset", "epoch", "data"} for line in lines)
    assert [line["type"] for line in lines] == ["message"] * 6
    by_channel = {
        name: [(line["offset"], line["data"]) for line in lines if line["channel"] == name]
        for name in ("news", "sport")
    }
    assert by_channel == {
        "news": [(1, {"n": 1}), (2, {"n": 3}), (3, 5)],
        "sport": [(1, {"n": 2}), (2, {"n": 4}), (3, "live")],
    }
    assert lines[-1]["data"] == "live"
    assert len(proc.out.splitlines()) == 6  # nothing printed twice


@pytest_twisted.ensureDeferred
async def test_listen_warns_when_missed_messages_cannot_be_recovered(make_daemon, cli):
    daemon = await make_daemon(history_size=0)
    proc = cli.spawn("listen", "--url", daemon.url, "--all", "--once", "2", "news")
    subscribed = await proc.line()
    assert subscribed["type"] == "subscribed" and subscribed["channel"] == "news" and "recovered" not in subscribed
    await daemon.publish({"channel": "news", "data": 1})
    assert (await proc.line())["data"] == 1
    for connection in list(daemon.hub.connections):
        connection.abort()
    await wait_for(lambda: not daemon.hub.connections)
    await daemon.publish({"channel": "news", "data": 2})  # lost: no history
    again = await proc.line()
    # (With no history, the channel may even have been forgotten and restarted in a new epoch.)
    assert again["type"] == "subscribed" and again["recovered"] is False
    await wait_for(lambda: b"WARNING: messages of news" in proc.err)
    assert "recovered: false" in proc.stderr
    await daemon.publish({"channel": "news", "data": 3})
    last = await proc.line()
    assert (last["offset"], last["epoch"], last["data"]) == (again["offset"] + 1, again["epoch"], 3)
    assert await proc.exit_code() == 0, proc.stderr


@pytest_twisted.ensureDeferred
async def test_listen_refusals_exit_1_with_the_reason(make_daemon, cli):
    daemon = await make_daemon(subscriber_secrets=[SECRET_1])
    url = ("--url", daemon.url)
    for args, expected in [
        (("private-a",), "401 unauthorized"),
        (("--token", "not-a-token", "private-a"), "401 "),
        (("--token", token(channels=["private-b"]), "private-a"), "403 forbidden"),
        (("bad channel!",), "400 invalid_channel"),
    ]:
        code, out, err = await cli.run("listen", *url, *args)
        assert (code, out) == (1, ""), (args, err)
        assert err.startswith("pushie listen: " + expected), (args, err)
    code, out, err = await cli.run("listen", *url, "private-a", env={"PUSHIE_TOKEN": token(channels=["private-b"])})
    assert code == 1 and "403 forbidden" in err and "--token" in err, err
    code, out, err = await cli.run("listen", *url, "--once", "0", "news")
    assert code == 2 and "--once" in err, err
    assert not daemon.hub.connections

    # A token that grants the channel works, from the environment too.
    proc = cli.spawn("listen", *url, "--once", "1", "private-a", env={"PUSHIE_TOKEN": token(channels=["private-a"])})
    await wait_for(lambda: b"subscribed to private-a" in proc.err or proc.ended.called, timeout=10)
    await daemon.publish({"channel": "private-a", "data": "secret"})
    assert (await proc.line())["data"] == "secret"
    assert await proc.exit_code() == 0, proc.stderr


@pytest_twisted.ensureDeferred
async def test_listen_stops_cleanly_on_ctrl_c_and_sigterm(make_daemon, cli):
    daemon = await make_daemon()
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = cli.spawn("listen", "--url", daemon.url, "news")
        await wait_for(lambda p=proc: b"subscribed to news" in p.err or p.ended.called, timeout=10)
        await daemon.publish({"channel": "news", "data": sig.name})
        assert (await proc.line())["data"] == sig.name
        proc.transport.signalProcess(sig)
        assert await proc.exit_code() == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    await wait_for(lambda: not daemon.hub.connections)
