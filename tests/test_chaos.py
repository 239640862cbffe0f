"""
Chaos runs that count (issue 12 B3): real redis-servers, several daemons as
twistd processes, publishers and WebSocket subscribers running flat out, and
faults: the pub/sub connections cut (C{CLIENT KILL TYPE pubsub}), Redis
stopped and started (with and without an append-only file), a daemon killed
with SIGKILL, the whole set restarted.

At the end, for every subscriber and channel, what it received is checked
against what was acknowledged: each run of messages between two
C{subscribed} frames follows on without a gap, a duplicate or a reordering
(the next offset, or offset 1 of a new epoch); a resubscription with C{since}
answered C{recovered: true} continues the run, C{recovered: false} (the
documented way to say "reload") starts a new one; every message delivered at
an offset is the one acknowledged at that offset; no message whose publish
was refused appears (a C{503 engine_unavailable} is a refusal: certainly not
published; only C{503 outcome_unknown} and a request cut by a killed daemon
may or may not have published); and after the faults every subscriber reaches the last
acknowledged message of every channel.

The quick profile runs in the default suite; C{PUSHIE_CHAOS_LONG=1} runs a
longer one (more daemons, clients and rounds of faults).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import attr
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import HTTPConnectionPool

from tests.helpers import sleep, wait_for
from tests.redis_server import RedisServer, require_redis
from tests.test_daemon import spawn, stop

LONG = os.environ.get("PUSHIE_CHAOS_LONG") == "1"
REDIS_TIMEOUT = 1.0


@attr.s(auto_attribs=True)
class Profile:
    daemons: int
    channels: int
    subscribers: int
    publishers: int
    rounds: int
    pubsub_kills: int


QUICK = Profile(daemons=2, channels=3, subscribers=6, publishers=2, rounds=1, pubsub_kills=3)
FULL = Profile(daemons=3, channels=5, subscribers=30, publishers=3, rounds=4, pubsub_kills=8)


# -- the cluster --------------------------------------------------------------


class Cluster:
    """A redis-server and daemons as twistd processes, which the run may kill and start again."""

    def __init__(self, redis: RedisServer, count: int) -> None:
        self.redis = redis
        self.count = count
        self.nodes: list[Any] = []
        self.ports: list[int] = []  # of the nodes that are up
        self.gone: list[Any] = []  # nodes killed or stopped, for their logs

    async def start_node(self) -> None:
        args = ["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1", "--engine", self.redis.url]
        args += ["--history-size", "100000", "--publish-rate", "0", "--redis-timeout", str(REDIS_TIMEOUT)]
        proc = spawn(args)
        await wait_for(lambda: proc.addresses or proc.ended.called, timeout=30)
        assert proc.addresses, proc.output.decode()
        await wait_for(lambda: b"Redis engine connected" in proc.output, timeout=20)
        self.nodes.append(proc)
        self.ports.append(int(next(iter(proc.addresses.values())).rsplit(":", 1)[1]))

    async def start(self) -> None:
        for _ in range(self.count):
            await self.start_node()

    async def kill_node(self, index: int) -> None:
        proc = self.nodes.pop(index)
        self.ports.pop(index)
        self.gone.append(proc)
        proc.transport.signalProcess("KILL")
        await proc.ended

    async def stop_all(self) -> None:
        nodes, self.nodes, self.ports = self.nodes, [], []
        self.gone += nodes
        for proc in nodes:
            await stop(proc)

    def logs(self) -> str:
        return "\n".join(p.output.decode(errors="replace") for p in self.gone + self.nodes)


# -- subscribers --------------------------------------------------------------


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.subscriber.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.subscriber.frame(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.subscriber.closed(self, code)


class Subscriber:
    """
    A WebSocket client that follows some channels, reconnects to any live
    daemon when its connection ends, resubscribes with C{since}, and checks
    every frame as it comes.
    """

    def __init__(self, name: str, channels: list[str], run: Run) -> None:
        self.name = name
        self.channels = channels
        self.run = run
        self.position: dict[str, tuple[int, str]] = {}  # channel -> last (offset, epoch) received
        self.received: dict[tuple[str, str, int], str] = {}  # (channel, epoch, offset) -> data id
        self.segments = 0
        self.protocol: _Protocol | None = None
        self.connecting = False
        self.stopped = False
        self.retry: Any = None

    def connect(self) -> None:
        if self.stopped or self.connecting or self.protocol is not None:
            return
        if not self.run.cluster.ports:
            self.later(0.3)
            return
        self.connecting = True
        port = random.choice(self.run.cluster.ports)
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/websocket")
        factory.protocol = _Protocol
        factory.subscriber = self
        factory.setProtocolOptions(failByDrop=False, closeHandshakeTimeout=2, openHandshakeTimeout=5)
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)

        def failed(_: Any) -> None:
            self.connecting = False
            self.later(0.2)

        d.addErrback(failed)

    def later(self, delay: float) -> None:
        if not self.stopped and (self.retry is None or not self.retry.active()):
            self.retry = reactor.callLater(delay, self.connect)

    def opened(self, protocol: _Protocol) -> None:
        self.connecting = False
        self.protocol = protocol
        for channel in self.channels:
            self.subscribe(channel)

    def subscribe(self, channel: str) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if channel in self.position:
            offset, epoch = self.position[channel]
            frame["since"] = {"offset": offset, "epoch": epoch}
        if self.protocol is not None and self.protocol.state == WebSocketClientProtocol.STATE_OPEN:
            self.protocol.sendMessage(json.dumps(frame).encode(), isBinary=False)

    def closed(self, protocol: _Protocol, code: int | None) -> None:
        self.connecting = False
        if self.protocol is protocol or self.protocol is None:
            self.protocol = None
            self.run.closes[code] = self.run.closes.get(code, 0) + 1
            self.later(0.1 + random.random() * 0.3)

    def frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "subscribed":
            channel = frame["channel"]
            if frame.get("recovered") is False:
                self.run.recovered_false += 1
            if channel not in self.position or frame.get("recovered") is False:
                self.position[channel] = (frame["offset"], frame["epoch"])
                self.segments += 1
        elif kind == "message":
            self.message(frame)
        elif kind == "error":
            self.run.subscribe_errors += 1
            channel = frame.get("channel")
            if channel:
                reactor.callLater(0.3, self.subscribe, channel)

    def message(self, frame: dict[str, Any]) -> None:
        run = self.run
        run.delivered += 1
        channel, offset, epoch = frame["channel"], frame["offset"], frame["epoch"]
        data_id = frame["data"]["id"]
        last = self.position.get(channel)
        follows = last is not None and (
            (epoch == last[1] and offset == last[0] + 1) or (epoch != last[1] and offset == 1)
        )
        if not follows:
            run.violations.append(f"{self.name} {channel}: after {last} got {offset} {epoch} ({data_id})")
        self.position[channel] = (offset, epoch)
        if (channel, epoch, offset) in self.received:
            run.violations.append(f"{self.name} {channel}: {offset} {epoch} twice")
        self.received[(channel, epoch, offset)] = data_id
        acked = run.acked.get(data_id)
        if data_id in run.refused:
            run.violations.append(f"{self.name}: {data_id} was refused ({run.refused[data_id]}) yet delivered")
        elif acked is not None and acked != (channel, epoch, offset):
            run.violations.append(f"{self.name}: {data_id} acknowledged at {acked}, delivered at {channel} {offset}")
        elif acked is None and data_id not in run.unknown:
            run.late.append((self.name, data_id, channel, epoch, offset))

    def stop(self) -> None:
        self.stopped = True
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        if self.protocol is not None:
            self.protocol.sendClose(1000)


# -- the run ----------------------------------------------------------------------


@attr.s(auto_attribs=True, eq=False)
class Run:
    cluster: Cluster
    channels: list[str]
    published: int = 0
    acked: dict[str, tuple[str, str, int]] = attr.ib(factory=dict)  # data id -> (channel, epoch, offset)
    refused: dict[str, Any] = attr.ib(factory=dict)  # data id -> status or error code (never published)
    # 503 outcome_unknown, or no answer (a daemon killed): may or may not be published
    unknown: set[str] = attr.ib(factory=set)
    codes_503: dict[str, int] = attr.ib(factory=dict)  # error code -> count
    delivered: int = 0
    recovered_false: int = 0
    subscribe_errors: int = 0
    closes: dict[int | None, int] = attr.ib(factory=dict)
    violations: list[str] = attr.ib(factory=list)
    late: list[tuple] = attr.ib(factory=list)  # delivered before its 200 was read: checked at the end
    publishing: bool = True

    async def publisher(self, name: str, pool: HTTPConnectionPool, limit: int) -> None:
        for n in range(limit):
            if not self.publishing:
                return
            if not self.cluster.ports:
                await sleep(0.05)
                continue
            channel = self.channels[n % len(self.channels)]
            data_id = f"{name}-{n}"
            port = random.choice(self.cluster.ports)
            self.published += 1
            try:
                response = await treq.post(
                    f"http://127.0.0.1:{port}/publish",
                    json={"channel": channel, "data": {"id": data_id}},
                    pool=pool,
                    timeout=5,
                )
                body = json.loads(await response.content())
            except Exception:  # noqa: BLE001  a daemon killed mid-request: the outcome is unknown
                self.unknown.add(data_id)
                await sleep(0.05)
                continue
            if response.code == 200:
                self.acked[data_id] = (channel, body["epoch"], body["offset"])
                continue
            code = body.get("error") if isinstance(body, dict) else None
            if response.code == 503:
                self.codes_503[code] = self.codes_503.get(code, 0) + 1
            if (response.code, code) == (503, "outcome_unknown"):
                # Redis's answer was lost and could not be settled in time:
                # it may have published (README: retry with the same
                # idempotency_key).  The only uncertain answer.
                self.unknown.add(data_id)
            else:
                # engine_unavailable, shutting_down and any other error:
                # certainly not published, so it must never be delivered.
                self.refused[data_id] = f"{response.code} {code}"
            await sleep(0.05)

    def report(self) -> str:
        return (
            f"published {self.published}, acknowledged {len(self.acked)}, refused {len(self.refused)} "
            f"(503 by code: {self.codes_503}), "
            f"unknown outcome {len(self.unknown)}, delivered {self.delivered}, "
            f"recovered:false {self.recovered_false}, subscribe errors {self.subscribe_errors}, closes {self.closes}, "
            f"lost Redis answers settled {self.cluster.logs().count('asked again, settled')}"
        )


async def chaos(tmp_path, profile: Profile, appendonly: bool, faults: list[str]) -> Run:
    require_redis()
    redis = RedisServer(str(tmp_path), appendonly=appendonly)
    redis.start()
    cluster = Cluster(redis, profile.daemons)
    pool = HTTPConnectionPool(reactor, persistent=False)
    subscribers: list[Subscriber] = []
    try:
        await cluster.start()
        channels = [f"chaos-{i}" for i in range(profile.channels)]
        run = Run(cluster, channels)
        for i in range(profile.subscribers):
            mine = [c for j, c in enumerate(channels) if (i + j) % 2 == 0 or profile.channels == 1]
            subscriber = Subscriber(f"s{i}", mine, run)
            subscribers.append(subscriber)
            subscriber.connect()
        await wait_for(lambda: all(len(s.position) == len(s.channels) for s in subscribers), timeout=20)
        publishers = [run.publisher(f"p{i}", pool, 10**9) for i in range(profile.publishers)]
        running = gatherResults([Deferred.fromCoroutine(p) for p in publishers])
        await sleep(0.5)
        for _ in range(profile.rounds):
            for fault in faults:
                await inject(fault, cluster, profile)
                await sleep(0.5)
        await sleep(0.5)
        run.publishing = False
        await running
        await settle(run, subscribers)
        check(run, subscribers)
        return run
    finally:
        for subscriber in subscribers:
            subscriber.stop()
        await cluster.stop_all()
        redis.stop()
        await pool.closeCachedConnections()
        await sleep(0.2)


async def inject(fault: str, cluster: Cluster, profile: Profile) -> None:
    redis = cluster.redis
    if fault == "pubsub":
        for _ in range(profile.pubsub_kills):
            redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            await sleep(1.5)
    elif fault == "redis":
        redis.stop()
        await sleep(0.5)
        redis.start()
        await sleep(1.0)
    elif fault == "kill":
        await cluster.kill_node(random.randrange(len(cluster.nodes)))
        await sleep(0.5)
        await cluster.start_node()
    elif fault == "restart":
        await cluster.stop_all()
        redis.stop()
        redis.start()
        await cluster.start()
    else:
        raise ValueError(fault)


async def settle(run: Run, subscribers: list[Subscriber]) -> None:
    """Wait until every subscriber has the last message of each of its channels."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    final: dict[str, tuple[int, str]] = {}
    try:
        port = run.cluster.ports[0]
        for channel in run.channels:
            response = await treq.get(f"http://127.0.0.1:{port}/channels/{channel}", pool=pool)
            info = json.loads(await response.content())
            final[channel] = (info["offset"], info["epoch"])
    finally:
        await pool.closeCachedConnections()

    def done() -> bool:
        return all(s.position.get(c) == final[c] for s in subscribers for c in s.channels)

    try:
        await wait_for(done, timeout=30)
    except AssertionError:
        behind = [(s.name, c, s.position.get(c), final[c]) for s in subscribers for c in s.channels]
        behind = [b for b in behind if b[2] != b[3]]
        raise AssertionError(f"subscribers did not catch up: {behind[:10]}; {run.report()}") from None


def check(run: Run, subscribers: list[Subscriber]) -> None:
    for name, data_id, channel, epoch, offset in run.late:
        acked = run.acked.get(data_id)
        if data_id in run.refused:
            run.violations.append(f"{name}: {data_id} was refused yet delivered")
        elif acked is not None and acked != (channel, epoch, offset):
            run.violations.append(f"{name}: {data_id} acknowledged at {acked}, delivered at {channel} {offset}")
        elif acked is None and data_id not in run.unknown:
            run.violations.append(f"{name}: {data_id} delivered, never published")
    # Runs are gap-free (checked per message) and end at each channel's last
    # message (settle), so every acknowledged message after a subscriber's
    # first subscription reached it, unless a recovered:false excused it.
    matched = 0
    for subscriber in subscribers:
        for data_id, (channel, epoch, offset) in run.acked.items():
            if channel in subscriber.channels and (channel, epoch, offset) in subscriber.received:
                matched += 1
                if subscriber.received[(channel, epoch, offset)] != data_id:
                    run.violations.append(f"{subscriber.name}: {channel} {offset} is not {data_id}")
    assert not run.violations, "\n".join(run.violations[:20]) + "\n" + run.report()
    assert matched > 0, run.report()


def tell(run: Run, label: str) -> None:
    print(f"chaos {label}: {run.report()}")  # noqa: T201  the counts, for the report (pytest -s)


@pytest_twisted.ensureDeferred
async def test_chaos_with_aof(tmp_path):
    """Pub/sub cuts, a Redis restart, a daemon killed with SIGKILL, the whole set restarted; Redis with AOF."""
    profile = FULL if LONG else QUICK
    run = await chaos(tmp_path, profile, appendonly=True, faults=["pubsub", "redis", "kill", "restart"])
    tell(run, "aof")
    assert run.acked and run.delivered


@pytest_twisted.ensureDeferred
async def test_chaos_without_persistence(tmp_path):
    """A Redis restart that loses everything: subscribers are told (4002, then recovered: false)."""
    profile = FULL if LONG else attr.evolve(QUICK, pubsub_kills=1)
    run = await chaos(tmp_path, profile, appendonly=False, faults=["pubsub", "redis"])
    tell(run, "no-aof")
    assert run.recovered_false > 0, run.report()
