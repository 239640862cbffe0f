# -*- test-case-name: tests.test_publish -*-
"""
The resource tree and the HTTP site, built in one readable place.

  /            the demo page (static/index.html)
  /publish     L{pushie.api.PublishResource}
  /websocket   the WebSocket door (Autobahn's WebSocketResource)
  /app/<key>   the Pusher WebSocket door (L{pushie.pusher.door})
  /apps/<id>/  the Pusher HTTP API (L{pushie.pusher.http})

L{PushieRequest} enforces the body size limit while the body arrives:
twisted.web would otherwise buffer any body whole before a resource runs.
"""

from __future__ import annotations

import io
from importlib.resources import files
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pushie.api import ChannelsResource, ErrorResource, HealthResource, PublishResource, write_error
from pushie.errors import PushieError
from pushie.limits import RateLimiter
from pushie.metrics import MetricsResource
from pushie.pusher.http import PusherAPIResource
from pushie.sse import EventsResource

STATIC = files("pushie") / "static"


class PushieRequest(Request):
    """
    A request that refuses bodies over the site's C{max_body_size} with a JSON
    413, counting bytes as they arrive and keeping none past the limit.
    """

    body_too_large = False
    _body_size = 0

    def _limit(self) -> int:
        return self.channel.site.max_body_size  # type: ignore[no-any-return]

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.body_too_large = True
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_size += len(data)
        if self._body_size > self._limit():
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def process(self) -> None:
        if self.body_too_large:
            self.site = self.channel.site
            write_error(
                self,
                PushieError(
                    413,
                    "payload_too_large",
                    f"the body is over the limit of {self._limit()} bytes (max_message_size)",
                ),
            )
            return
        super().process()


_HEADER_NEEDS_TWISTED = (b" ", b"\t")  # a folded header line
_BODY_HEADERS = (b"content-length:", b"transfer-encoding:")


class PushieHTTPChannel(HTTPChannel):
    """
    twisted.web's HTTP channel, with a short way for WebSocket opening
    handshakes: a C{GET /websocket} request goes to the site's WebSocket
    factory as the bytes that arrived, before twisted.web builds a Request
    out of it (which WebSocketResource would turn back into bytes for
    Autobahn to parse again).  The request line and headers are still
    capped at C{totalHeadersSize} and must arrive within the site's timeout;
    a request with a body or folded headers takes twisted.web's way, through
    the same WebSocketResource.
    """

    _upgrade: list[bytes] | None = None
    _upgrade_size = 0

    def lineReceived(self, line: bytes) -> Any:
        upgrade = self._upgrade
        if upgrade is None:
            if (
                not self.requests  # a request line, not a header
                and line.startswith(b"GET /websocket")
                and line.endswith(b" HTTP/1.1")
                and line[14:15] in (b" ", b"?")
                and getattr(self.site, "websocket_factory", None) is not None
            ):
                self._upgrade = [line]
                self._upgrade_size = len(line)
                return None
            return super().lineReceived(line)
        if not line:
            self._hand_over()
            return None
        self._upgrade_size += len(line)
        if (
            self._upgrade_size > self.totalHeadersSize
            or line[:1] in _HEADER_NEEDS_TWISTED
            or line[:18].lower().startswith(_BODY_HEADERS)
        ):
            # twisted.web's way after all: it sees the lines as they came.
            self._upgrade = None
            for earlier in [*upgrade, line]:
                super().lineReceived(earlier)
                if self.transport is None or self.transport.disconnecting:
                    break
            return None
        upgrade.append(line)
        return None

    def _hand_over(self) -> None:
        """Give the connection to a WebSocket protocol, as WebSocketResource does."""
        assert self._upgrade is not None
        data = b"\r\n".join(self._upgrade) + b"\r\n\r\n" + self.clearLineBuffer()
        self._upgrade = None
        self.setTimeout(None)
        transport = self.transport
        assert transport is not None
        protocol = self.site.websocket_factory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.loseConnection()
            return
        if isinstance(transport, ProtocolWrapper):  # TLS
            transport.wrappedProtocol = protocol
        elif isinstance(transport.protocol, ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(data)


def _channel(site: Site) -> _GenericHTTPChannelProtocol:
    # As twisted.web's own factory (which also negotiates HTTP/2 over TLS), with our channel.
    return _GenericHTTPChannelProtocol(PushieHTTPChannel())


class PushieSite(Site):
    """A L{Site} with Pushie's request class and no access log by default."""

    requestFactory = PushieRequest
    protocol = _channel
    noisy = False

    def __init__(
        self, root: Resource, max_body_size: int, timeout: float, reactor: Any, websocket_factory: Any = None
    ) -> None:
        # `timeout` drops connections that stay silent that long: a request
        # (or a WebSocket handshake) must arrive in time, and idle keep-alive
        # connections do not pile up.
        super().__init__(root, timeout=timeout, reactor=reactor, parsePOSTFormSubmission=False)
        self.max_body_size = max_body_size
        self.websocket_factory = websocket_factory

    def log(self, request: Request) -> None:
        """No per-request access log: a push server sees too many."""


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
    pusher_factory: Any = None,
) -> PushieSite:
    """Assemble the resource tree for one daemon."""
    root = Root(StaticFile("index.html", b"text/html; charset=utf-8"))
    root.putChild(b"pushie.js", StaticFile("pushie.js", b"application/javascript; charset=utf-8"))
    root.putChild(b"publish", PublishResource(hub, guard, throttle, rate_limiter))
    root.putChild(b"websocket", WebSocketResource(websocket_factory))
    root.putChild(b"channels", ChannelsResource(hub, guard))
    root.putChild(b"healthz", HealthResource(hub))
    events = EventsResource(
        hub,
        guard,
        throttle,
        settings.sse_keepalive,
        settings.max_subscriptions,
        settings.slow_consumer_buffer,
        settings.slow_consumer_grace,
    )
    root.putChild(b"events", events)
    if serve_metrics:
        root.putChild(b"metrics", MetricsResource(hub.metrics))
    if pusher_factory is not None:
        # /app/<key>: the key is read from the path by the protocol.
        root.putChild(b"app", WebSocketResource(pusher_factory))
        for path, users_root in ((b"apps", False), (b"users", True)):
            api = PusherAPIResource(
                hub, pusher_factory.apps, settings.pusher_max_data_size, throttle, rate_limiter, users_root
            )
            root.putChild(path, api)
    return PushieSite(
        root, settings.max_message_size, settings.handshake_timeout, hub.reactor, websocket_factory=websocket_factory
    )


def build_metrics_site(hub: Any, settings: Any) -> PushieSite:
    """A site that serves only C{/metrics}, for C{--metrics-listen}."""
    root = Root(ErrorResource(PushieError(404, "not_found", "this endpoint serves /metrics only")))
    root.putChild(b"metrics", MetricsResource(hub.metrics))
    return PushieSite(root, 0, settings.handshake_timeout, hub.reactor)
