"""
Test helpers: start a daemon in-process, talk to it with real clients.

Everything here crosses a real socket: treq for HTTP, Autobahn's client for
WebSockets, raw TCP for the handshake answers and for peers that misbehave.
"""

from __future__ import annotations

import json
from typing import Any

import attr
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import HTTPConnectionPool

from pushie.config import Settings
from pushie.engines.redis import HEARTBEAT_INTERVAL
from pushie.tap import PushieService


def sleep(seconds: float) -> Deferred[None]:
    return defer.Deferred.fromCoroutine(_sleep(seconds))


async def _sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll C{predicate} until it is true; fail after C{timeout} seconds."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await _sleep(step)
        waited += step


@attr.s(auto_attribs=True)
class Daemon:
    """A running in-process daemon and the clients a test opened to it."""

    service: PushieService
    port: int
    pool: HTTPConnectionPool
    clients: list[WSClient] = attr.ib(factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    @property
    def hub(self):
        return self.service.hub

    @property
    def engine(self):
        """The engine itself, for tests that look behind the Hub (doors never do)."""
        return self.service.engine

    async def publish(
        self,
        body: Any,
        content_type: str = "application/json",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ):
        """POST to /publish; returns (status, parsed JSON body, response)."""
        data = raw if raw is not None else json.dumps(body).encode()
        all_headers = {"Content-Type": content_type} if content_type else {}
        all_headers.update(headers or {})
        response = await treq.post(self.url + "/publish", data=data, headers=all_headers, pool=self.pool)
        text = await response.content()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.code, parsed, response

    async def get(self, path: str, **kwargs):
        response = await treq.get(self.url + path, pool=self.pool, **kwargs)
        return response.code, await response.content(), response

    async def connect(self, query: str = "", **options) -> WSClient:
        client = await connect_ws(self.port, "/websocket" + (("?" + query) if query else ""), **options)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            client.close()
        for client in self.clients:
            await client.closed
        if self.service.running:
            await self.service.stopService()
        await self.pool.closeCachedConnections()


async def start_daemon(**overrides: Any) -> Daemon:
    overrides.setdefault("listen", ["tcp:0:interface=127.0.0.1"])
    settings = Settings.defaults().replace(**overrides)
    service = PushieService(settings, reactor)
    await service.startService()
    await wait_for(service.engine.healthy)  # Redis connects in the background
    port = service.ports()[0].getHost().port
    return Daemon(service, port, HTTPConnectionPool(reactor, persistent=False))


class WSClientProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client.raw.append(payload)
        self.factory.client.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.client._closed(wasClean, code, reason)


@attr.s(auto_attribs=True, eq=False)
class WSClient:
    """An Autobahn WebSocket client that queues the frames it receives."""

    frames: DeferredQueue = attr.ib(factory=DeferredQueue)
    protocol: WSClientProtocol | None = None
    opened: Deferred = attr.ib(factory=Deferred)
    closed: Deferred = attr.ib(factory=Deferred)
    close_code: int | None = None
    raw: list[bytes] = attr.ib(factory=list)
    """Every message received, as the bytes that came (for byte-for-byte checks)."""

    def _opened(self, protocol: WSClientProtocol) -> None:
        self.protocol = protocol
        self.opened.callback(self)

    def _closed(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
            self.opened.addErrback(lambda f: None)
        if not self.closed.called:
            self.closed.callback((code, reason))

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        d = self.frames.get()
        timer = reactor.callLater(timeout, d.cancel)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    async def next_of(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.next(timeout)
        assert frame["type"] == kind, frame
        return frame

    def pending(self) -> list[dict[str, Any]]:
        """Frames received and not read yet."""
        items = list(self.frames.pending)
        self.frames.pending.clear()
        return items

    def send(self, frame: Any) -> None:
        payload = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        self.protocol.sendMessage(payload, isBinary=False)

    def send_binary(self, payload: bytes) -> None:
        self.protocol.sendMessage(payload, isBinary=True)

    def close(self) -> None:
        if self.protocol is not None and self.protocol.state == WebSocketClientProtocol.STATE_OPEN:
            self.protocol.sendClose(1000)
        elif self.protocol is not None and self.protocol.transport is not None and not self.closed.called:
            self.protocol.transport.loseConnection()


async def connect_ws(port: int, path: str, max_size: int = 0) -> WSClient:
    client = WSClient()
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = WSClientProtocol
    factory.client = client
    factory.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=max_size, closeHandshakeTimeout=2)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(factory)
    await client.opened
    return client


class _RawClient(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


async def raw_connect(port: int) -> _RawClient:
    """A plain TCP client that records what it receives and never answers."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await endpoint.connect(Factory.forProtocol(_RawClient))


HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


async def raw_handshake(port: int, path: str, extra: str = "") -> tuple[int, _RawClient]:
    """Send a WebSocket opening handshake by hand; return the HTTP status and the client."""
    client = await raw_connect(port)
    client.transport.write(HANDSHAKE.format(path=path, port=port, extra=extra).encode())
    await wait_for(lambda: b"\r\n\r\n" in client.received or client.lost.called)
    status = int(client.received.split(b" ", 2)[1])
    return status, client


async def assert_reactor_clean() -> None:
    """
    Fail if a test left a connection, a listening port or a delayed call.

    Lets the reactor turn a few times first, so that closes already under way
    can finish.
    """

    def leftovers():
        readers = [r for r in reactor.getReaders() if not _is_reactor_internal(r)]
        writers = [w for w in reactor.getWriters() if not _is_reactor_internal(w)]
        calls = [c for c in reactor.getDelayedCalls() if c.active()]
        return readers, writers, calls

    for _ in range(100):
        readers, writers, calls = leftovers()
        if not (readers or writers or calls):
            return
        await _sleep(0.02)
    readers, writers, calls = leftovers()
    raise AssertionError(f"left behind: readers={readers} writers={writers} delayed calls={calls}")


def _is_reactor_internal(selectable: Any) -> bool:
    name = type(selectable).__name__
    return name in ("_UnixWaker", "_SocketWaker", "_SIGCHLDWaker", "_SignalReactorMixin", "_FDWaker")


# -- hostile clients and leak checks (fuzz and abuse tests) ------------------


def strict_json(data: bytes) -> Any:
    """
    Parse C{data} as RFC 8259 JSON: UTF-8 only (no lone surrogates on the
    wire), no C{NaN}/C{Infinity}, which Python's own parser accepts.

    @raise ValueError: naming what is not JSON.
    """

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data.decode("utf-8"), parse_constant=constant)


@attr.s(auto_attribs=True)
class HTTPAnswer:
    """One HTTP response read off a raw connection."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool


def parse_http_answers(data: bytes) -> list[HTTPAnswer]:
    """
    The HTTP/1.1 responses in C{data}, in order: bodies framed by
    C{Content-Length} or chunked, else running to the end of the data.  The
    last one is C{complete=False} when its body has not all arrived.
    """
    answers = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head, data = data[:end].split(b"\r\n"), data[end + 4 :]
        status = int(head[0].split(b" ", 2)[1])
        if 100 <= status < 200:
            continue  # an interim answer (100 Continue): no body
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            answers.append(HTTPAnswer(status, headers, data[:length], len(data) >= length))
            data = data[length:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body, complete = [], False
            while True:
                line_end = data.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(data[:line_end].split(b";")[0], 16)
                if len(data) < line_end + 2 + size + 2:
                    break
                body.append(data[line_end + 2 : line_end + 2 + size])
                data = data[line_end + 2 + size + 2 :]
                if size == 0:
                    complete = True
                    break
            answers.append(HTTPAnswer(status, headers, b"".join(body), complete))
            if not complete:
                break
        else:
            answers.append(HTTPAnswer(status, headers, data, False))
            data = b""
    return answers


async def raw_exchange(
    port: int, pieces: list[bytes], answers: int = 1, timeout: float = 5.0, gap: float = 0.0
) -> tuple[list[HTTPAnswer], bool, bytes]:
    """
    Send C{pieces} on a new TCP connection (C{gap} seconds apart), wait for
    C{answers} complete HTTP answers or the server's close, then close.

    @return: the answers, whether the server closed the connection, and the raw bytes received.
    """
    client = await raw_connect(port)
    for piece in pieces:
        if client.lost.called:
            break
        client.transport.write(piece)
        if gap:
            await _sleep(gap)

    def done() -> bool:
        if client.lost.called:
            return True
        parsed = parse_http_answers(client.received)
        return len(parsed) >= answers and all(a.complete for a in parsed)

    try:
        await wait_for(done, timeout)
    except AssertionError:
        pass
    closed = client.lost.called
    if not closed:
        client.transport.abortConnection()
        await client.lost
    return parse_http_answers(client.received), closed, client.received


class LogWatcher:
    """
    Records the daemon's log events that show a bug rather than a refused
    client: any event carrying a failure (a traceback), and any text that
    says "Traceback" or "Unhandled" (Twisted's "Unhandled error in
    Deferred").  Events are global: run no other daemon meanwhile.
    """

    def __init__(self) -> None:
        self.bad: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            self.bad.append(f"{text}\n{failure.getTraceback()}")
        elif "Traceback" in text or "Unhandled" in text:
            self.bad.append(text)

    def start(self) -> LogWatcher:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)
        return self

    def stop(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self)

    def take(self) -> list[str]:
        """The bad events so far (C{gc} first: unhandled Deferred failures are logged when collected)."""
        import gc

        gc.collect()
        bad, self.bad = self.bad, []
        return bad

    def check(self, what: str = "") -> None:
        bad = self.take()
        assert not bad, f"the daemon logged a traceback{' after ' + what if what else ''}:\n" + "\n".join(bad)[:4000]


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    import os

    return len(os.listdir("/proc/self/fd"))


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04") -> bytes:
    """One WebSocket frame, masked as a client must (C{mask=None}: unmasked)."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes([first, mask_bit | length])
    elif length < 1 << 16:
        head = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def raw_websocket(port: int, path: str) -> _RawClient:
    """A raw TCP client past a successful WebSocket opening handshake (frames are up to the test)."""
    status, client = await raw_handshake(port, path)
    assert status == 101, client.received[:200]
    client.received = client.received[client.received.find(b"\r\n\r\n") + 4 :]
    return client


def daemon_counts(daemon: Daemon) -> dict[str, int]:
    """What a daemon holds for its clients: connections, local channels, subscribers, engine channels."""
    hub = daemon.hub
    counts = {
        "connections": len(hub.connections),
        "channels": len(hub.channel_names()),
        "subscribers": sum(hub.subscriber_count(n) for n in hub.channel_names()),
        "limits_total": hub.limits.total,
    }
    engine = daemon.engine
    if hasattr(engine, "channel_count"):
        engine.sweep()
        counts["engine_channels"] = engine.channel_count()
    return counts


# -- daemons with webhooks on Redis (the cluster tests) ----------------------

HOOK_SECRET = "webhook-secret-for-the-cluster-tests"
HOOK_DEBOUNCE = 0.6
HOOK_SETTLE = HOOK_DEBOUNCE + HEARTBEAT_INTERVAL + 1.0
"""
A held transition is sent HOOK_DEBOUNCE after it was decided (by the
deciding node's timer, or by any node's heartbeat): quiet for this long,
nothing is left to come.
"""


async def start_hook_daemons(engine: str, webhook_url: str, count: int = 3, **settings: Any) -> list[Daemon]:
    """
    C{count} in-process daemons on C{engine} (a Redis URL, or several: shards),
    webhooks to C{webhook_url} (HOOK_SECRET, HOOK_DEBOUNCE unless C{settings}
    say otherwise), each started once its first heartbeat is in (the cluster
    knows it delivers webhooks).  Stop them all, also when a test fails.
    """
    settings.setdefault("webhook_secret", HOOK_SECRET)
    settings.setdefault("webhook_debounce", HOOK_DEBOUNCE)
    nodes: list[Daemon] = []
    try:
        for _ in range(count):
            nodes.append(await start_daemon(engine=engine, webhook_url=webhook_url, **settings))
            await wait_for(lambda: nodes[-1].engine.cluster is not None)
    except BaseException:
        for node in nodes:
            await node.stop()
        raise
    return nodes


async def join(node: Daemon, query: str) -> WSClient:
    """A native WebSocket client of C{node}, once welcomed and subscribed to each C{channel=} of C{query}."""
    client = await node.connect(query)
    await client.next_of("welcome")
    for _ in range(query.count("channel=")):
        await client.next_of("subscribed")
    return client


async def leave(client: WSClient) -> None:
    client.close()
    await client.closed


async def cluster_gauges(node: Daemon) -> dict[str, float]:
    """The C{pushie_cluster_*} gauges of C{node}'s /metrics (none while a Redis shard is down)."""
    status, body, _ = await node.get("/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line.startswith("pushie_cluster_"):
            name, value = line.split()
            values[name] = float(value)
    return values


# -- daemons as twistd processes on Redis -------------------------------------


async def start_nodes(redis_url: str, count: int, *extra: str, env: dict[str, str] | None = None) -> list[Any]:
    """
    C{count} C{twistd pushie} processes (L{tests.test_daemon.spawn}) on
    C{redis_url}, listening on port 0, with C{extra} arguments and C{env}
    (the subscriber secret SECRET_1 unless given), once each has connected
    to Redis.  Stop them with L{tests.test_daemon.stop}.
    """
    from tests.test_auth import SECRET_1  # here: these test modules import this one
    from tests.test_daemon import spawn

    nodes = []
    for _ in range(count):
        args = ["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1", "--engine", redis_url, *extra]
        nodes.append(spawn(args, {"PUSHIE_SUBSCRIBER_SECRETS": SECRET_1, **(env or {})}))
    for proc in nodes:
        await wait_for(lambda p=proc: p.addresses or p.ended.called, timeout=20)
        assert proc.addresses, proc.output.decode()
        await wait_for(lambda p=proc: b"Redis engine connected" in p.output, timeout=10)
    return nodes


def port_of(proc: Any) -> int:
    """The TCP port of a process started by L{start_nodes}."""
    return int(next(iter(proc.addresses.values())).rsplit(":", 1)[1])


def node_id(proc: Any) -> str:
    """The Redis engine's node id of a process started by L{start_nodes} (from its log)."""
    text = proc.output.decode()
    return text.split("(node ", 1)[1].split(")", 1)[0]
