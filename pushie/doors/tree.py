# -*- test-case-name: tests.test_publish -*-
"""
The resource tree, built in one readable place.

  /            the demo page (static/index.html)
  /pushie.js   the browser client
  /pushie-pusher.js  the recovery plugin for pusher-js apps (docs/PROTOCOL.md §13.1)
  /favicon.ico the demo page's icon (an SVG): browsers ask for it, a 404 would litter their console
  /openapi.json  the OpenAPI 3.1 description of the HTTP API (static/openapi.json; public)
  /publish     L{pushie.doors.api.PublishResource}
  /channels/   L{pushie.doors.api.ChannelsResource}: state, history, presence
  /healthz     L{pushie.doors.api.HealthResource}
  /events      Server-Sent Events (L{pushie.doors.sse.EventsResource})
  /websocket   the WebSocket door (Autobahn's WebSocketResource)
  /metrics     Prometheus metrics, when they are served on the main port
  /admin/      the operator's dashboard and its API (L{pushie.doors.admin}); 403 unless admin_token is set
  /app/<key>   the Pusher WebSocket door (L{pushie.doors.pusher.door})
  /apps/<id>/  the Pusher HTTP API (L{pushie.doors.pusher.http})

The site itself, with its hand-written HTTP channel, is L{pushie.doors._http.PushieSite}.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import attr
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pushie.doors._http import PushieSite
from pushie.doors.admin import AdminMonitor, AdminResource, AdminSettings
from pushie.doors.api import (
    ChannelsResource,
    ErrorResource,
    HealthResource,
    JSONResource,
    PublishResource,
    write_error,
)
from pushie.doors.context import DoorContext
from pushie.doors.pusher.door import PusherFactory
from pushie.doors.pusher.http import PusherAPIResource
from pushie.doors.sse import EventsResource, SSESettings
from pushie.doors.websocket import PushieServerFactory
from pushie.errors import PushieError
from pushie.limits import ConnectionLimits, RateLimiter
from pushie.metrics import Metrics, MetricsResource

STATIC = files("pushie") / "static"


class StaticFile(JSONResource):
    """
    One packaged file, served from memory with a fixed content type.  Other
    methods than GET and HEAD get the JSON 405 of every path (Twisted's own
    answer to an unknown method such as TRACE is an HTML 501).
    """

    isLeaf = True
    allowed_methods = (b"GET",)

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


class GetOnly(JSONResource):
    """A GET-only leaf (C{/metrics}) that answers other methods with the JSON 405, not Twisted's HTML 501."""

    isLeaf = True
    allowed_methods = (b"GET",)

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner

    def render_GET(self, request: Request) -> Any:
        return self.inner.render(request)


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


@attr.s(frozen=True, auto_attribs=True)
class SiteSettings:
    """
    What the HTTP site needs from the daemon's settings (built by C{pushie.tap}).

    @ivar max_body_size: largest request body, in bytes (C{max_message_size}).
    @ivar handshake_timeout: seconds a connection may stay silent before its
        request (or WebSocket handshake) is whole; idle keep-alive connections
        are dropped after it too.
    @ivar serve_metrics: whether C{/metrics} is on this site (no C{metrics_listen} of its own).
    """

    max_body_size: int
    handshake_timeout: float
    serve_metrics: bool = True


def build_site(
    context: DoorContext,
    settings: SiteSettings,
    sse: SSESettings,
    websocket_factory: PushieServerFactory,
    rate_limiter: RateLimiter,
    limits: ConnectionLimits,
    pusher_factory: PusherFactory | None = None,
    admin: AdminSettings | None = None,
    admin_monitor: AdminMonitor | None = None,
) -> PushieSite:
    """
    Assemble the resource tree for one daemon.  Every door gets the same
    C{context} (hub, guard, clock, metrics, throttle) from the wiring, and
    its own settings.  C{/admin} is always there, and answers 403 unless
    C{admin} has a token and C{admin_monitor} samples for it.
    """
    root = Root(StaticFile("index.html", b"text/html; charset=utf-8"))
    root.putChild(b"pushie.js", StaticFile("pushie.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"pushie-pusher.js", StaticFile("pushie-pusher.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"favicon.ico", StaticFile("favicon.svg", b"image/svg+xml"))
    # Public documentation, as the README is: no key, whatever publisher_keys says.
    root.putChild(b"openapi.json", StaticFile("openapi.json", b"application/json"))
    publish = PublishResource(context, rate_limiter)
    root.putChild(b"publish", publish)
    root.putChild(b"websocket", WebSocketResource(websocket_factory))
    root.putChild(b"channels", ChannelsResource(context))
    root.putChild(b"healthz", HealthResource(context))
    root.putChild(b"events", EventsResource(context, sse))
    root.putChild(b"admin", AdminResource(context, admin or AdminSettings(token=None), admin_monitor))
    if settings.serve_metrics:
        root.putChild(b"metrics", GetOnly(MetricsResource(context.metrics)))
    if pusher_factory is not None:
        # /app/<key>: the key is read from the path by the protocol.
        root.putChild(b"app", WebSocketResource(pusher_factory))
        for path, users_root in ((b"apps", False), (b"users", True)):
            api = PusherAPIResource(context, pusher_factory.apps, pusher_factory.settings, rate_limiter, users_root)
            root.putChild(path, api)
    site = PushieSite(
        root, settings.max_body_size, settings.handshake_timeout, context.clock, websocket_factory=websocket_factory
    )
    site.publish_resource = publish  # POST /publish: PushieHTTPChannel's short path
    site.limits = limits
    site.metrics = context.metrics
    site.throttle = context.throttle
    return site


def build_metrics_site(metrics: Metrics, settings: SiteSettings, clock: IReactorTime) -> PushieSite:
    """A site that serves only C{/metrics}, for C{--metrics-listen}."""
    root = Root(ErrorResource(PushieError(404, "not_found", "this endpoint serves /metrics only")))
    root.putChild(b"metrics", GetOnly(MetricsResource(metrics)))
    return PushieSite(root, 0, settings.handshake_timeout, clock)
