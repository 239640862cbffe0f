"""
Bounded resources under abuse (ISSUE12 B4).

Each test abuses one in-process daemon on port 0 with real sockets (slowloris
on every path, subscribe/unsubscribe storms, ping floods, many channel names,
many presence members, many idempotency keys) and ends, once its clients have
closed, with the daemon's memory (tracemalloc: what was allocated during the
test and is still alive) and its open files (/proc/self/fd) back near where
they started, its connection and channel counts back to the baseline, and no
traceback in its log.  Each is bounded in time (well under 20 s).

Where a test needs time to pass (history and idempotency keys are kept for
minutes by design), the memory engine's clock is moved forward instead of
waiting: the expiry is what is under test, not the wall clock.
"""

from __future__ import annotations

import gc
import json
import socket
import tracemalloc
from collections import Counter
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet import reactor

from pushie.engines.memory import IDEMPOTENCY_WINDOW
from tests.helpers import (
    HANDSHAKE,
    Daemon,
    LogWatcher,
    assert_reactor_clean,
    connect_ws,
    daemon_counts,
    open_fds,
    parse_http_answers,
    raw_connect,
    raw_exchange,
    raw_websocket,
    sleep,
    start_daemon,
    wait_for,
    ws_frame,
)

SECRET = "s" * 40
APP_ID, KEY, APP_SECRET = "3", "278d425bdf160c739803", "7ad3773142a6692b25b8"
NO_MASK = b"\x00\x00\x00\x00"  # a client must mask; a zero mask keeps flood frames cheap to build
LEAK_LIMIT = 1 << 20
"""
What Pushie's code may still hold once a test's clients have gone: a dict
that once held 10,000 channels keeps its table (about 200 KiB); a leak of
what the abuse created (thousands of connections, channels, keys) is more.
"""


def daemon_objects() -> Counter[str]:
    """
    Live objects of the daemon's own classes (Pushie's connections, streams,
    channels, publications, records) and of Twisted's server-side
    connections and requests, by class.  The test's clients are Autobahn
    client protocols and Twisted client connections: not counted.
    """
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__dict__.get("__module__")
        if not isinstance(module, str):
            continue
        if module.startswith("pushie.") or (kind.__name__ in _SERVER_TYPES and module.startswith("twisted.")):
            counts[f"{module}.{kind.__qualname__}"] += 1
    return counts


_SERVER_TYPES = frozenset({"Server", "Request", "HTTPChannel", "_GenericHTTPChannelProtocol"})


def engine_sizes(daemon: Daemon) -> dict[str, int]:
    """
    What the memory engine keeps per channel, key and publication (see
    pushie.engines.memory): its public counts (channels, the bytes of
    history it is accounted for), and the lengths of the key and kept
    publication indexes, which it has no public count for.
    """
    engine = daemon.engine
    engine.sweep()
    return {
        "channels": engine.channel_count(),
        "history_bytes": engine.used,
        "idempotency_keys": len(engine._idempotency),
        "kept_publications": len(engine._kept),
    }


class Footprint:
    """
    The daemon's footprint before and after an abuse: its connection,
    channel and subscriber counts, the memory engine's tables, its live
    objects by class, open file descriptors, and the memory allocated by
    Pushie's own code (tracemalloc, allocations made since L{start} whose
    allocating line is in pushie/ and that are still alive).  The test's own
    clients run in the same process: they are left out of every figure.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.counts = daemon_counts(daemon)
        self.sizes = engine_sizes(daemon)
        self.objects: Counter[str] = Counter()
        self.fds = 0

    def start(self) -> None:
        gc.collect()
        self.objects = daemon_objects()
        self.fds = open_fds()
        tracemalloc.start(1)

    def peak_growth(self) -> int:
        """The most memory allocated at once since L{start} (the daemon's, and the test clients' little)."""
        return tracemalloc.get_traced_memory()[1]

    async def check(self, limit: int = LEAK_LIMIT) -> None:
        daemon = self.daemon
        try:
            await wait_for(lambda: daemon_counts(daemon) == self.counts, timeout=10)
        except AssertionError:
            raise AssertionError(f"left behind: {daemon_counts(daemon)} (before: {self.counts})") from None
        assert engine_sizes(daemon) == self.sizes, f"engine tables: {engine_sizes(daemon)} (before: {self.sizes})"
        await wait_for(lambda: open_fds() <= self.fds, timeout=5)
        await sleep(0.1)
        gc.collect()
        grown = {k: v - self.objects[k] for k, v in daemon_objects().items() if v - self.objects[k] > 2}
        assert not grown, f"daemon objects left after the clients closed: {grown}"
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/pushie/*")])
        tracemalloc.stop()
        stats = snapshot.statistics("lineno")
        held = sum(stat.size for stat in stats)
        top = "\n".join(str(stat) for stat in stats[:8])
        assert held < limit, f"{held} bytes allocated by Pushie still held after the clients closed; largest:\n{top}"


@pytest_twisted.async_yield_fixture
async def abused():
    """Start daemons (memory engine) for one test; stop and check them after, and the log throughout."""
    started: list[Daemon] = []
    watcher = LogWatcher().start()

    async def make(**settings: Any) -> Daemon:
        settings.setdefault("engine", "memory")
        settings.setdefault("subscriber_secrets", [SECRET])
        settings.setdefault("pusher_apps", [f"{APP_ID}:{KEY}:{APP_SECRET}"])
        settings.setdefault("publish_rate", 0)
        daemon = await start_daemon(**settings)
        started.append(daemon)
        return daemon

    try:
        yield make
        watcher.check()
    finally:
        watcher.stop()
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        for daemon in started:
            await daemon.stop()
        await assert_reactor_clean()


class SkewedClock:
    """The reactor's clock, C{skew} seconds ahead: moves the memory engine past its expiry times."""

    def __init__(self) -> None:
        self.skew = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.skew

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return reactor.getDelayedCalls()


def token(sub: str, channels: list[str], info: Any = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(reactor.seconds()) + 600, "channels": channels}
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def drain_writes(client: Any, timeout: float = 2.0) -> bool:
    """Wait until a raw client's transport has handed its buffer to the kernel; False if the peer stopped reading."""
    transport = client.transport
    try:
        await wait_for(lambda: not transport.dataBuffer and not transport._tempDataBuffer, timeout, step=0.005)
    except AssertionError:
        return False
    return True


# -- slowloris ---------------------------------------------------------------


SLOW_REQUESTS = {
    "websocket-handshake": (b"GET /websocket HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200),
    "publish-short-path-headers": (b"POST /publish HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200),
    "publish-short-path-body": (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n",
        b'{"channel": "slow", "data": "' + b"a" * 400,
    ),
    "publish-chunked-body": (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"1\r\na\r\n" * 100,
    ),
    "twisted-web-headers": (b"GET /channels HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200),
    "sse-headers": (b"GET /events?channel=slow HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200),
    "pusher-handshake": (
        b"GET /app/" + KEY.encode() + b"?protocol=7 HTTP/1.1\r\nHost: x\r\n",
        b"X-Slow: " + b"a" * 200,
    ),
}


@pytest_twisted.ensureDeferred
async def test_slowloris_on_every_path(abused):
    """
    A client that trickles its request (one byte every 0.2 s, never
    finishing) is answered C{408 request_timeout} and closed within a few
    times C{handshake_timeout} on every path: the timeout is for the whole
    request (ISSUE12 A9), not for silence.
    """
    daemon = await abused(handshake_timeout=1.0)
    footprint = Footprint(daemon)
    footprint.start()
    clients = {}
    for name, (head, trickle) in SLOW_REQUESTS.items():
        client = await raw_connect(daemon.port)
        client.transport.write(head)
        clients[name] = (client, trickle)
    deadline = reactor.seconds() + 5.0  # 5x handshake_timeout
    position = 0
    while reactor.seconds() < deadline and not all(c.lost.called for c, _ in clients.values()):
        for client, trickle in clients.values():
            if not client.lost.called and position < len(trickle):
                client.transport.write(trickle[position : position + 1])
        position += 1
        await sleep(0.2)
    still_open = [name for name, (client, _) in clients.items() if not client.lost.called]
    answered = {name: parse_http_answers(client.received) for name, (client, _) in clients.items()}
    for client, _ in clients.values():
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost
    clients.clear()
    assert not still_open, f"trickled requests still open after 5x handshake_timeout: {still_open}"
    for name, answers in answered.items():  # README Limits: 408 request_timeout (JSON), then the close
        assert [a.status for a in answers] == [408], (name, answers)
        assert json.loads(answers[0].body)["error"] == "request_timeout", (name, answers[0].body)
    await footprint.check()


@pytest_twisted.ensureDeferred
async def test_half_sent_handshakes_count_against_the_address_limit(abused):
    """
    ISSUE12 A9: handshakes that never finish are connections too; 20 of them
    from one address, with C{max_connections_per_ip=5}, leave at most 5 open
    (the rest refused or closed), and a complete handshake past the limit is refused.
    """
    daemon = await abused(handshake_timeout=3.0, max_connections_per_ip=5)
    footprint = Footprint(daemon)
    footprint.start()
    half = []
    for _ in range(20):
        client = await raw_connect(daemon.port)
        client.transport.write(b"GET /websocket HTTP/1.1\r\nHost: x\r\n")
        half.append(client)
    full = await raw_connect(daemon.port)
    full.transport.write(HANDSHAKE.format(path="/websocket", port=daemon.port, extra="").encode())
    await wait_for(lambda: b"\r\n\r\n" in full.received or full.lost.called)
    await sleep(0.3)
    open_half = sum(1 for c in half if not c.lost.called)
    full_status = full.received.split(b" ", 2)[1] if full.received else b"none"
    for client in [*half, full]:
        if not client.lost.called:
            client.transport.abortConnection()
        await client.lost
    half.clear()
    opened = open_half + (1 if full_status == b"101" else 0)
    assert opened <= 5, f"{open_half} half-sent handshakes open and the complete one got {full_status!r} (limit 5)"
    await footprint.check()


# -- storms and floods ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subscribe_unsubscribe_storm(abused):
    """
    3,000 subscribe/unsubscribe pairs over 300 channel names from each of
    three connections (native, Pusher, and SSE streams opened and closed):
    every frame answered, and nothing held once they close.
    """
    daemon = await abused()
    # A first, small round warms the caches (Autobahn, Twisted, the Hub) that later rounds reuse.
    warm = await connect_ws(daemon.port, "/websocket")
    warm.send({"type": "subscribe", "channel": "warm"})
    await warm.next_of("welcome")
    await warm.next_of("subscribed")
    warm.close()
    await warm.closed
    footprint = Footprint(daemon)
    footprint.start()

    native = await connect_ws(daemon.port, "/websocket")
    await native.next_of("welcome")
    pusher = await connect_ws(daemon.port, f"/app/{KEY}?protocol=7")
    for i in range(3000):
        name = f"storm-{i % 300}"
        native.send({"type": "subscribe", "channel": name})
        native.send({"type": "unsubscribe", "channel": name})
        pusher.send({"event": "pusher:subscribe", "data": {"channel": name}})
        pusher.send({"event": "pusher:unsubscribe", "data": {"channel": name}})
    await wait_for(lambda: len(native.frames.pending) >= 6000, timeout=15)
    kinds = [frame["type"] for frame in native.pending()]
    assert kinds.count("subscribed") == 3000 and kinds.count("unsubscribed") == 3000, set(kinds)
    streams = [
        await raw_exchange(daemon.port, [b"GET /events?channel=storm-%d HTTP/1.1\r\nHost: x\r\n\r\n" % i], timeout=0.05)
        for i in range(100)
    ]
    assert all(answers and answers[0].status == 200 for answers, _, _ in streams)
    streams.clear()
    for client in (native, pusher):
        client.close()
        await client.closed
    native = pusher = None
    await footprint.check()


async def flood(client: Any, frame: bytes, count: int, batch: int = 2000) -> int:
    """Send C{count} copies of C{frame} without reading, as fast as the peer takes them; return how many went."""
    sent = 0
    while sent < count and not client.lost.called:
        client.transport.write(frame * batch)
        sent += batch
        if not await drain_writes(client):
            break  # the server stopped reading from us: backpressure, fine
    return sent


@pytest.mark.parametrize(
    "door, frame, count",
    [
        ("/websocket", ws_frame(0x1, b'{"type":"ping"}', mask=NO_MASK), 40_000),
        ("/websocket", ws_frame(0x9, b"p" * 125, mask=NO_MASK), 10_000),
        (
            f"/app/{KEY}?protocol=7",
            ws_frame(0x1, b'{"event":"pusher:ping","data":{}}', mask=NO_MASK),
            300_000,
        ),
    ],
    ids=["native-ping", "websocket-ping", "pusher-ping"],
)
@pytest_twisted.ensureDeferred
async def test_ping_flood_from_a_client_that_never_reads(abused, door, frame, count):
    """
    Tens of thousands of pings from a client that never reads its pongs:
    what the daemon holds for it stays within C{slow_consumer_buffer} plus
    a margin (the client is dropped as a slow consumer), and it serves others
    throughout (ISSUE12 A4: answers to a client's own frames count too).
    Run with C{slow_consumer_buffer} 64 KiB, so that 2 MiB is a wide margin.
    """
    daemon = await abused(slow_consumer_buffer=65536, slow_consumer_grace=2.0)
    footprint = Footprint(daemon)
    client = await raw_websocket(daemon.port, door)
    # Never read, with a small receive buffer: the answers pile up on the server, not in the kernel.
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.transport.pauseProducing()
    footprint.start()
    await flood(client, frame, count)
    try:  # dropped as a slow consumer once its buffer passed the limit (or after the grace time)
        await wait_for(lambda: client.lost.called, timeout=3)
    except AssertionError:  # the answers fit in the kernel's buffers: nothing for the daemon to hold
        client.transport.abortConnection()
        await client.lost
    growth = footprint.peak_growth()
    answers, _, _ = await raw_exchange(daemon.port, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert answers and answers[0].status == 200
    client = None
    assert growth < 2 * (1 << 20), f"the daemon held {growth} bytes for one client that does not read"
    await footprint.check()


@pytest_twisted.ensureDeferred
async def test_ping_flood_answered(abused):
    """5,000 native pings from a client that reads: every one answered, nothing held after."""
    daemon = await abused()
    footprint = Footprint(daemon)
    footprint.start()
    client = await connect_ws(daemon.port, "/websocket")
    await client.next_of("welcome")
    for _ in range(5_000):
        client.send({"type": "ping"})
    await wait_for(lambda: len(client.frames.pending) >= 5_000, timeout=15)
    assert {frame["type"] for frame in client.pending()} == {"pong"}
    client.close()
    await client.closed
    client = None
    await footprint.check()


# -- many names, members and keys -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_many_channel_names(abused):
    """
    10,000 channel names: published to (kept history), subscribed by 100
    connections of 100 channels each, and named by SSE streams; once the
    clients close and the history expires, the daemon holds none of them.
    """
    daemon = await abused()
    clock = daemon.engine.clock = SkewedClock()
    footprint = Footprint(daemon)
    footprint.start()
    for start in range(0, 10_000, 100):
        body = [{"channel": f"many-{i}", "data": i} for i in range(start, start + 100)]
        status, _, _ = await daemon.publish(body)
        assert status == 200
    clients = []
    for c in range(100):
        query = "&".join(f"channel=many-{c * 100 + i}" for i in range(100))
        clients.append(await connect_ws(daemon.port, "/websocket?" + query))
    for client in clients:
        await wait_for(lambda client=client: len(client.frames.pending) >= 101, timeout=10)
        assert sum(frame["type"] == "subscribed" for frame in client.pending()) == 100
    assert len(daemon.hub.channel_names()) == 10_000
    for client in clients:
        client.close()
    for client in clients:
        await client.closed
    clients.clear()
    daemon.clients.clear()
    clock.skew = 301.0  # past history_ttl (300 s)
    await footprint.check()


@pytest.mark.parametrize(
    "members, info_size, limit",
    [(300, 50, None), (200, 50, 200), (100, 1024, None)],
    ids=["300-past-the-default-limit", "200-limit-raised", "100-wide"],
)
@pytest_twisted.ensureDeferred
async def test_many_presence_members(abused, members, info_size, limit):
    """
    Hundreds of joiners in one presence channel: each admitted one gets its
    C{subscribed} frame with the member list (ISSUE12 A3: not past 64 KiB
    of members), each past C{presence_max_members} (100 by default, README
    Limits) an error C{presence_full} and is neither member nor subscriber,
    its connection left open; once all leave the channel and its members
    are gone.
    """
    settings: dict[str, Any] = {"max_message_size": 65536}
    if limit is not None:
        settings["presence_max_members"] = limit
    daemon = await abused(**settings)
    admitted = min(members, limit or 100)
    footprint = Footprint(daemon)
    footprint.start()
    clients = []
    for i in range(members):
        grant = token(f"user-{i}", ["presence-room"], info={"name": "x" * info_size})
        client = await connect_ws(daemon.port, f"/websocket?channel=presence-room&token={grant}")
        clients.append(client)
        await client.next_of("welcome")
        frame = await client.next(timeout=5)
        if i < admitted:
            assert frame["type"] == "subscribed" and len(frame["members"]) == i + 1, (i, str(frame)[:200])
        else:
            assert frame["type"] == "error" and frame["code"] == "presence_full", (i, str(frame)[:200])
            assert frame["channel"] == "presence-room", frame
    assert len(await daemon.engine.presence("presence-room")) == admitted
    assert daemon.hub.subscriber_count("presence-room") == admitted
    client = clients[-1]
    client.send({"type": "ping"})
    assert (await client.next(timeout=5))["type"] == "pong"  # still open (admitted or refused)
    for client in clients:
        client.close()
    for client in clients:
        await client.closed
    clients.clear()
    daemon.clients.clear()
    assert await daemon.engine.presence("presence-room") == []
    await footprint.check()


@pytest_twisted.ensureDeferred
async def test_many_idempotency_keys(abused):
    """
    20,000 idempotency keys: each answered once and repeated while kept;
    after the idempotency window (moved forward on the engine's clock)
    nothing of them is held.
    """
    daemon = await abused()
    clock = daemon.engine.clock = SkewedClock()
    footprint = Footprint(daemon)
    footprint.start()
    for start in range(0, 20_000, 100):
        body = [{"channel": "keys", "data": None, "idempotency_key": f"k{i}"} for i in range(start, start + 100)]
        status, answer, _ = await daemon.publish(body)
        assert status == 200, answer
    status, answer, _ = await daemon.publish({"channel": "keys", "data": None, "idempotency_key": "k5"})
    assert status == 200 and answer["offset"] == 6, answer  # a repeat: the first offset again
    clock.skew = IDEMPOTENCY_WINDOW + 301.0
    daemon.engine.sweep()
    await footprint.check()
