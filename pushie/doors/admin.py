# -*- test-case-name: tests.test_admin -*-
"""
The operator's dashboard at C{/admin}: a static page (C{static/admin.html})
and the authenticated endpoints it reads.

  GET  /admin                      the page (no secret in it; it asks for the token)
  GET  /admin/api/overview         one snapshot, JSON (what the stream sends each second, plus the chart)
  GET  /admin/api/channels/<name>  a channel: state, the last messages of its history, presence members
  POST /admin/api/publish          a test publication: the body, validation and Hub path of C{/publish}
  GET  /admin/stream               text/event-stream: C{chart} once, then C{stats} every second

Everything but the page needs C{Authorization: Bearer <admin_token>},
compared in constant time.  The token travels in a header, never in a URL
(URLs end up in access logs and browser history): the page reads the stream
with C{fetch()}, which can send headers, not with C{EventSource}, which
cannot.  Without an C{admin_token} the dashboard is off and every path
answers 403 C{admin_disabled}, saying how to turn it on.

L{AdminMonitor} samples once a second: totals from the metrics (publications
and deliveries, for the chart's ring buffer of C{admin_chart_seconds}
samples), and, only while a stream is open, the connections by door and the
channels' offsets from the Hub (a channel's messages per second is the
difference of its offsets, so the dispatch path pays nothing).  What a
stream sends is bounded: the C{admin_top_channels} busiest channels, not
every channel; at most C{admin_max_streams} streams; and a stream that does
not read is dropped like any slow consumer (C{slow_consumer_buffer},
C{slow_consumer_grace}).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
from collections import deque
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushie.channels import check_channel, is_presence, is_valid_channel
from pushie.doors.api import error_of, publish_answer, read_publish_body, refuse, write_json
from pushie.doors.context import Door, DoorContext
from pushie.doors.pusher.door import PusherProtocol
from pushie.doors.sse import EventStream
from pushie.doors.websocket import PushieServerProtocol
from pushie.errors import PushieError
from pushie.limits import SlowConsumerWatch
from pushie.metrics import Metrics
from pushie.wire import dumps

log = Logger()

#: Messages of a channel's history the channel view shows (the newest).
HISTORY_SHOWN = 20

#: Seconds the channels' offsets are kept after a snapshot when no stream is
#: open, so that polling the overview still tells messages per second.
OFFSETS_KEPT = 60.0

DISABLED_MESSAGE = (
    "the admin dashboard is off: set PUSHIE_ADMIN_TOKEN (or admin_token in the settings file) "
    "to a secret of 16 or more characters and restart the daemon"
)

#: The doors a client connection can come through, as the dashboard names them.
DOORS = ("websocket", "sse", "pusher")


@attr.s(frozen=True, auto_attribs=True)
class AdminSettings:
    """
    What the dashboard needs from the daemon's settings (built by C{pushie.tap}).

    @ivar token: the admin token; C{None}: the dashboard is off.
    @ivar max_streams: live streams open at once (C{admin_max_streams}).
    @ivar top_channels: channels listed in each snapshot (C{admin_top_channels}).
    @ivar chart_seconds: samples kept for the chart, one a second (C{admin_chart_seconds}).
    @ivar slow_consumer_buffer: bytes a stream may have waiting before it counts as slow.
    @ivar slow_consumer_grace: seconds a slow stream may stay slow before it is dropped.
    """

    token: str | None
    max_streams: int = 4
    top_channels: int = 20
    chart_seconds: int = 300
    slow_consumer_buffer: int = 1 << 20
    slow_consumer_grace: float = 10.0


def _total(counter: Any) -> float:
    """A prometheus_client counter's value, through its public C{collect()}."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


class AdminMonitor(Service):
    """
    The dashboard's sampler and its live streams.

    @ivar chart: C{(time, publications/s, deliveries/s)} samples, oldest
        first, at most C{chart_seconds} of them.
    """

    name = "admin"  # type: ignore[assignment]  # Twisted's Service says `name = None`

    def __init__(self, context: DoorContext, settings: AdminSettings) -> None:
        self.context = context
        self.hub = context.hub
        self.metrics: Metrics = context.metrics
        self.clock = context.clock
        self.settings = settings
        self.chart: deque[tuple[float, float, float]] = deque(maxlen=settings.chart_seconds)
        self.streams: dict[AdminStream, None] = {}
        self._totals: tuple[float, float, float] | None = None
        self._offsets: dict[str, tuple[str | None, int]] = {}
        self._offsets_at: float | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(1.0, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for stream in list(self.streams):
            stream.close()

    # -- sampling --------------------------------------------------------

    def tick(self) -> None:
        """Take one sample for the chart; send a snapshot to every open stream."""
        now = self.clock.seconds()
        publications = _total(self.metrics.publications)
        deliveries = _total(self.metrics.deliveries)
        previous, self._totals = self._totals, (now, publications, deliveries)
        if previous is not None and now > previous[0]:
            elapsed = now - previous[0]
            self.chart.append(
                (round(now, 3), (publications - previous[1]) / elapsed, (deliveries - previous[2]) / elapsed)
            )
        if not self.streams:
            # Nobody streams: keep no per-channel bookkeeping, unless a script
            # polls /admin/api/overview (its rates count from its last call).
            if self._offsets_at is None or now - self._offsets_at > OFFSETS_KEPT:
                self._offsets.clear()
                self._offsets_at = None
            return
        event = b"event: stats\ndata: " + dumps(self.snapshot()) + b"\n\n"
        for stream in list(self.streams):
            stream.write(event)

    def channel_rates(self) -> list[dict[str, Any]]:
        """
        The C{top_channels} busiest channels: messages per second since the
        last call (from their offsets), then subscribers.  The offsets kept
        between calls are those of the channels the Hub holds now, no more.
        """
        now = self.clock.seconds()
        elapsed = now - self._offsets_at if self._offsets_at is not None and now > self._offsets_at else 0.0
        before = self._offsets
        offsets: dict[str, tuple[str | None, int]] = {}
        rows = []
        for name, subscribers, epoch, offset in self.hub.channel_positions():
            offsets[name] = (epoch, offset)
            rate = 0.0
            seen = before.get(name)
            if elapsed and seen is not None:
                # A new epoch starts again at offset 1: what it holds is new.
                rate = (offset - seen[1] if seen[0] == epoch else offset) / elapsed
            rows.append((rate, subscribers, name))
        self._offsets, self._offsets_at = offsets, now
        top = heapq.nlargest(self.settings.top_channels, rows)
        return [{"name": name, "subscribers": subscribers, "rate": round(rate, 2)} for rate, subscribers, name in top]

    def doors(self) -> dict[str, dict[str, int]]:
        """Open connections and their subscriptions, by door."""
        counts = {door: {"connections": 0, "subscriptions": 0} for door in DOORS}
        for connection in self.hub.connections:
            if isinstance(connection, PushieServerProtocol):
                door, held = "websocket", len(connection.subscriptions)
            elif isinstance(connection, PusherProtocol):
                door, held = "pusher", len(connection.subscriptions)
            elif isinstance(connection, EventStream):
                door, held = "sse", len(connection.channels)
            else:
                continue
            counts[door]["connections"] += 1
            counts[door]["subscriptions"] += held
        return counts

    def snapshot(self) -> dict[str, Any]:
        """What the dashboard shows, now (bounded: the top channels only)."""
        hub = self.hub
        metrics = self.metrics
        webhooks = hub.webhooks
        last = self.chart[-1] if self.chart else (self.clock.seconds(), 0.0, 0.0)
        return {
            "time": round(self.clock.seconds(), 3),
            "engine": {"name": hub.engine_name, "healthy": hub.healthy(), "draining": hub.draining},
            "connections": len(hub.connections),
            "doors": self.doors(),
            "channel_count": len(hub.channel_names()),
            "channels": self.channel_rates(),
            "rates": {"publications": round(last[1], 2), "deliveries": round(last[2], 2)},
            "totals": {
                "publications": int(_total(metrics.publications)),
                "deliveries": int(_total(metrics.deliveries)),
                "slow_consumer_disconnects": int(_total(metrics.slow_consumers)),
                "engine_errors": int(_total(metrics.engine_errors)),
            },
            "webhooks": None
            if webhooks is None
            else {
                "queued": webhooks.queued,
                "in_flight": webhooks.in_flight,
                "held": webhooks.held,
                "delivered": webhooks.delivered,
                "failed": webhooks.failed,
                "dropped": webhooks.dropped,
            },
            "streams": len(self.streams),
        }

    def chart_json(self) -> dict[str, Any]:
        return {
            "seconds": self.settings.chart_seconds,
            "samples": [[t, round(p, 2), round(d, 2)] for t, p, d in self.chart],
        }

    # -- streams ---------------------------------------------------------

    def admit_stream(self) -> None:
        """
        Refuse a new stream past C{max_streams}.

        @raise PushieError: 429 C{too_many_admin_streams}.
        """
        if len(self.streams) >= self.settings.max_streams:
            raise PushieError(
                429,
                "too_many_admin_streams",
                f"{self.settings.max_streams} dashboards are open already (admin_max_streams); close one",
                {"Retry-After": "5"},
            )

    def open_stream(self, request: Request) -> AdminStream:
        """Start a live stream on C{request} (authorised, admitted, its headers set): the chart, then stats."""
        stream = AdminStream(request, self)
        self.streams[stream] = None
        stream.write(b"retry: 2000\n\nevent: chart\ndata: " + dumps(self.chart_json()) + b"\n\n")
        return stream


class AdminStream:
    """One live C{/admin/stream} response."""

    def __init__(self, request: Request, monitor: AdminMonitor) -> None:
        self.request = request
        self.monitor = monitor
        self.finished = False
        settings = monitor.settings
        self.backpressure = SlowConsumerWatch(
            monitor.clock, settings.slow_consumer_buffer, settings.slow_consumer_grace, self._slow_consumer
        )
        request.notifyFinish().addBoth(self._gone)
        request.registerProducer(self.backpressure, True)

    def write(self, data: bytes) -> None:
        if self.finished:
            return
        self.request.write(data)
        if self.backpressure.paused:
            self.backpressure.wrote(len(data))

    def _slow_consumer(self) -> None:
        self.monitor.metrics.slow_consumers.inc()
        self.monitor.context.throttle.warn(
            "admin_slow", "Dropped an admin stream to {peer}: it did not read", peer=self.request.getClientAddress()
        )
        transport = self.request.channel.transport if self.request.channel else None
        self._gone(None)
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """End the stream cleanly (on shutdown)."""
        if not self.finished:
            self._gone(None)
            self.request.unregisterProducer()
            self.request.finish()

    def _gone(self, _: object) -> None:
        self.finished = True
        self.backpressure.cancel()
        self.monitor.streams.pop(self, None)


def page_policy(page: bytes) -> bytes:
    """
    The page's C{Content-Security-Policy}: its own inline script (by hash)
    and nothing else runs, and it talks to this origin only, so that even an
    injected script could not send the token elsewhere.
    """
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts)
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ).encode()


class AdminResource(Resource, Door):
    """Everything under C{/admin} (see the module docstring)."""

    isLeaf = True

    def __init__(self, context: DoorContext, settings: AdminSettings, monitor: AdminMonitor | None) -> None:
        super().__init__()
        self.take(context)
        self.settings = settings
        self.monitor = monitor
        self.token = settings.token.encode("utf-8") if settings.token is not None else None
        self.page = (files("pushie") / "static" / "admin.html").read_bytes()
        self.content_security_policy = page_policy(self.page)

    def render(self, request: Request) -> Any:
        try:
            return self._route(request)
        except PushieError as e:
            refuse(self, request, e, "an admin request", "admin_" if e.code == "unauthorized" else "")
            return NOT_DONE_YET

    def _route(self, request: Request) -> Any:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath or []]
        while len(path) > 1 and path[-1] == "":
            path.pop()
        if path in ([], [""]):
            route: tuple[bytes, Callable[[Request], Any] | None] = (b"GET", None)
        elif path == ["stream"]:
            route = (b"GET", self._stream)
        elif path == ["api", "overview"]:
            route = (b"GET", self._overview)
        elif path == ["api", "publish"]:
            route = (b"POST", self._publish)
        elif len(path) >= 3 and path[:2] == ["api", "channels"]:
            route = (b"GET", lambda request: self._channel(request, "/".join(path[2:])))
        else:
            if self.token is None:
                raise PushieError(403, "admin_disabled", DISABLED_MESSAGE)
            raise PushieError(
                404,
                "not_found",
                "use /admin, /admin/stream, /admin/api/overview, /admin/api/channels/<name> or /admin/api/publish",
            )
        allowed, handler = route
        # The method first: a method a path never takes is a 405, on or off.
        self._only(request.method, allowed)
        if self.token is None or self.monitor is None:
            raise PushieError(403, "admin_disabled", DISABLED_MESSAGE)
        if handler is None:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-cache")
            # The page holds the token in memory: no framing by other sites.
            request.setHeader(b"x-frame-options", b"DENY")
            request.setHeader(b"referrer-policy", b"no-referrer")
            request.setHeader(b"content-security-policy", self.content_security_policy)
            return b"" if request.method == b"HEAD" else self.page
        self._check_token(request)
        return handler(request)

    def _overview(self, request: Request) -> Any:
        assert self.monitor is not None
        body = {**self.monitor.snapshot(), "chart": self.monitor.chart_json()}
        write_json(request, 200, dumps(body))
        return NOT_DONE_YET

    @staticmethod
    def _only(method: bytes, allowed: bytes) -> None:
        if method != allowed and not (method == b"HEAD" and allowed == b"GET"):
            allow = allowed.decode()
            raise PushieError(405, "method_not_allowed", f"use {allow} on this path", headers={"Allow": allow})

    def _check_token(self, request: Request) -> None:
        """
        Allow the request only with C{Authorization: Bearer <admin_token>},
        compared in constant time (C{hmac.compare_digest}).

        @raise PushieError: 401 C{unauthorized} with a C{WWW-Authenticate} header.
        """
        assert self.token is not None
        challenge = {"WWW-Authenticate": 'Bearer realm="pushie-admin"'}
        authorization = request.getHeader(b"authorization")
        scheme, _, presented = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            raise PushieError(401, "unauthorized", "send Authorization: Bearer <admin token>", challenge)
        if not hmac.compare_digest(presented.strip(), self.token):
            challenge["WWW-Authenticate"] += ', error="invalid_token"'
            raise PushieError(401, "unauthorized", "the admin token is not valid", challenge)

    # -- the endpoints -----------------------------------------------------

    def _stream(self, request: Request) -> Any:
        assert self.monitor is not None
        if request.method == b"HEAD":  # a stream has no headers-only form
            raise PushieError(405, "method_not_allowed", "use GET on this path", headers={"Allow": "GET"})
        self.monitor.admit_stream()
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        # The site's idle timeout guards request reading; a stream speaks every second.
        request.channel.setTimeout(None)
        self.monitor.open_stream(request)
        return NOT_DONE_YET

    def _publish(self, request: Request) -> Any:
        requests, single = read_publish_body(request, self.hub.draining)
        log.info("Admin test publication to {channels}", channels=", ".join(sorted({r.channel for r in requests})))

        def answer(publications: list[Any]) -> None:
            self.metrics.publications.inc(len(publications))
            write_json(request, 200, publish_answer(publications, single))

        self.hub.publish(requests).addCallbacks(answer, self._failed(request, "An admin publication failed"))
        return NOT_DONE_YET

    def _channel(self, request: Request, name: str) -> Any:
        if not (is_valid_channel(name) or name in self.hub.channel_names()):
            check_channel(name)  # raises invalid_channel, saying why
        hub = self.hub

        async def look() -> bytes:
            state = await hub.state(name)
            history = await hub.history(name, max(0, state.offset - HISTORY_SHOWN), HISTORY_SHOWN)
            members = [m.to_json() for m in await hub.members(name)] if is_presence(name) else None
            return b"".join(
                (
                    b'{"name":',
                    dumps(name),
                    b',"subscribers":%d,"offset":%d,"epoch":' % (hub.subscriber_count(name), state.offset),
                    dumps(state.epoch),
                    b',"members":',
                    dumps(members),
                    b',"history":[',
                    b",".join(p.envelope for p in history.publications),
                    b"]}",
                )
            )

        d = Deferred.fromCoroutine(look())
        d.addCallbacks(lambda body: write_json(request, 200, body), self._failed(request, "An admin lookup failed"))
        return NOT_DONE_YET

    def _failed(self, request: Request, what: str) -> Callable[[Failure], None]:
        def failed(failure: Failure) -> None:
            error = error_of(failure, log, what, self.metrics)
            refuse(self, request, error, "an admin request")

        return failed
