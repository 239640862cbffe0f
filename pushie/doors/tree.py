# -*- test-case-name: tests.test_publish -*-
"""
The resource tree, built in one readable place.

  /            the demo page (static/index.html)
  /pushie.js   the browser client
  /publish     L{pushie.doors.api.PublishResource}
  /channels/   L{pushie.doors.api.ChannelsResource}: state, history, presence
  /healthz     L{pushie.doors.api.HealthResource}
  /events      Server-Sent Events (L{pushie.doors.sse.EventsResource})
  /websocket   the WebSocket door (Autobahn's WebSocketResource)
  /metrics     Prometheus metrics, when they are served on the main port
  /app/<key>   the Pusher WebSocket door (L{pushie.doors.pusher.door})
  /apps/<id>/  the Pusher HTTP API (L{pushie.doors.pusher.http})

The site itself, with its hand-written HTTP channel, is L{pushie.doors._http.PushieSite}.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushie.doors._http import PushieSite
from pushie.doors.api import ChannelsResource, ErrorResource, HealthResource, PublishResource, write_error
from pushie.doors.pusher.http import PusherAPIResource
from pushie.doors.sse import EventsResource
from pushie.errors import PushieError
from pushie.limits import ConnectionLimits, RateLimiter
from pushie.metrics import Metrics, MetricsResource

STATIC = files("pushie") / "static"


class StaticFile(Resource):
    """One packaged file, served from memory with a fixed content type."""

    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()
        self.body = (STATIC / name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class Root(Resource):
    """The top of the tree: known children, the demo page at /, JSON 404 elsewhere."""

    def __init__(self, index: Resource) -> None:
        super().__init__()
        self.index = index

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self.index
        return ErrorResource(PushieError(404, "not_found", "no such path; see the README for the endpoints"))

    def render(self, request: Request) -> Any:
        write_error(request, PushieError(404, "not_found", "no such path"))
        return NOT_DONE_YET


def build_site(
    hub: Any,
    guard: Any,
    websocket_factory: Any,
    throttle: Any,
    settings: Any,
    rate_limiter: RateLimiter,
    serve_metrics: bool,
    clock: IReactorTime,
    metrics: Metrics,
    limits: ConnectionLimits,
    pusher_factory: Any = None,
) -> PushieSite:
    """Assemble the resource tree for one daemon; C{clock}, C{metrics} and C{limits} come from the wiring."""
    root = Root(StaticFile("index.html", b"text/html; charset=utf-8"))
    root.putChild(b"pushie.js", StaticFile("pushie.js", b"application/javascript; charset=utf-8"))
    publish = PublishResource(hub, guard, throttle, clock, metrics, rate_limiter)
    root.putChild(b"publish", publish)
    root.putChild(b"websocket", WebSocketResource(websocket_factory))
    root.putChild(b"channels", ChannelsResource(hub, guard))
    root.putChild(b"healthz", HealthResource(hub))
    events = EventsResource(
        hub,
        guard,
        throttle,
        clock,
        metrics,
        settings.sse_keepalive,
        settings.max_subscriptions,
        settings.slow_consumer_buffer,
        settings.slow_consumer_grace,
    )
    root.putChild(b"events", events)
    if serve_metrics:
        root.putChild(b"metrics", MetricsResource(metrics))
    if pusher_factory is not None:
        # /app/<key>: the key is read from the path by the protocol.
        root.putChild(b"app", WebSocketResource(pusher_factory))
        for path, users_root in ((b"apps", False), (b"users", True)):
            api = PusherAPIResource(
                hub,
                pusher_factory.apps,
                settings.pusher_max_data_size,
                throttle,
                rate_limiter,
                clock,
                metrics,
                users_root,
            )
            root.putChild(path, api)
    site = PushieSite(
        root, settings.max_message_size, settings.handshake_timeout, clock, websocket_factory=websocket_factory
    )
    site.publish_resource = publish  # POST /publish: PushieHTTPChannel's short path
    site.limits = limits
    site.metrics = metrics
    site.throttle = throttle
    return site


def build_metrics_site(metrics: Metrics, settings: Any, clock: IReactorTime) -> PushieSite:
    """A site that serves only C{/metrics}, for C{--metrics-listen}."""
    root = Root(ErrorResource(PushieError(404, "not_found", "this endpoint serves /metrics only")))
    root.putChild(b"metrics", MetricsResource(metrics))
    return PushieSite(root, 0, settings.handshake_timeout, clock)
