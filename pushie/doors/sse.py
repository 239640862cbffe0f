# -*- test-case-name: tests.test_sse -*-
"""
Server-Sent Events at C{GET /events}: the same channels, tokens, envelope and
recovery as the WebSocket door, for C{EventSource} and C{curl -N}.

Each message is one unnamed event whose C{data:} line is the envelope (shared
bytes, built once per publication) and whose C{id:} names the stream's
position in I{every} channel it follows, so that an C{EventSource} that
reconnects with C{Last-Event-ID} resumes all of them.  The id is a list of
C{<offset>.<epoch>.<channel>} separated by spaces (epochs hold no dot;
channel names may, which is why the channel comes last).  Control information
comes as named events: C{subscribed}, C{join}, C{leave}, C{error}.  A comment
line every C{sse_keepalive} seconds keeps proxies from closing idle streams.
"""

from __future__ import annotations

import secrets
from typing import Any

import attr
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

from pushie.auth import SubscriberToken
from pushie.channels import Position, check_channel, is_presence, parse_offset
from pushie.doors.api import JSONResource, refuse
from pushie.doors.context import Door, DoorContext
from pushie.errors import EngineUnavailable, PushieError, bad_request
from pushie.hub import Subscribed
from pushie.limits import SlowConsumerWatch, address_of
from pushie.records import Burst, Member, PresenceEvent, Publication
from pushie.wire import dumps

log = Logger()

MAX_LAST_EVENT_ID = 8192


def parse_event_id(value: str) -> dict[str, Position]:
    """
    Read a C{Last-Event-ID} (or C{last_event_id} query value) into positions by channel.

    @raise PushieError: 400 C{invalid_last_event_id}.
    """
    positions: dict[str, Position] = {}
    if len(value) > MAX_LAST_EVENT_ID:
        raise bad_request("invalid_last_event_id", "the Last-Event-ID is too long")
    for entry in value.split():
        parts = entry.split(".", 2)
        offset = parse_offset(parts[0])
        if len(parts) != 3 or offset is None or not parts[1]:
            raise bad_request(
                "invalid_last_event_id", "the Last-Event-ID must be an id this server sent (offset.epoch.channel ...)"
            )
        positions[check_channel(parts[2])] = Position(offset, parts[1])
    return positions


@attr.s(frozen=True, auto_attribs=True)
class SSESettings:
    """
    What the SSE door needs from the daemon's settings (built by C{pushie.tap}).

    @ivar keepalive: seconds between comment lines on an idle stream (C{sse_keepalive}); 0: none.
    @ivar max_subscriptions: channels one stream may follow (C{max_subscriptions}); 0: no limit.
    @ivar slow_consumer_buffer: bytes a stream may have waiting before it counts as slow.
    @ivar slow_consumer_grace: seconds a slow stream may stay slow before it is closed.
    """

    keepalive: float
    max_subscriptions: int = 0
    slow_consumer_buffer: int = 1 << 20
    slow_consumer_grace: float = 10.0


class EventStream:
    """One SSE response: a subscriber of its channels and a connection of the Hub."""

    def __init__(
        self, request: Request, context: DoorContext, settings: SSESettings, token: SubscriberToken | None
    ) -> None:
        self.request = request
        self.hub = context.hub
        self.clock = clock = context.clock
        self.metrics = context.metrics
        self.guard = context.guard
        self.token = token
        keepalive = settings.keepalive
        self.client_id = secrets.token_urlsafe(12)
        self.channels: list[str] = []
        self.positions: dict[str, tuple[int, str]] = {}
        self._event_id: bytes | None = None
        self.finished = False
        self._keepalive = clock.callLater(keepalive, self._keep_alive, keepalive) if keepalive > 0 else None
        self._expiry: IDelayedCall | None = None
        self.backpressure = SlowConsumerWatch(
            clock, settings.slow_consumer_buffer, settings.slow_consumer_grace, self._slow_consumer
        )

    # -- output ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        # What the Hub dispatched before this must leave before it.
        self.hub.flush()
        if not self.finished:
            self.request.write(data)
            if self.backpressure.paused:
                self.backpressure.wrote(len(data))

    def _slow_consumer(self) -> None:
        self.metrics.slow_consumers.inc()
        self.abort()

    def _event(self, name: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self._write(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n")

    def deliver(self, publication: Publication) -> None:
        self.positions[publication.channel] = (publication.offset, publication.epoch)
        self._event_id = None
        self._write(b"id: " + self.event_id() + b"\n" + publication.sse_data)

    def deliver_burst(self, burst: Burst) -> None:
        for publication in burst.publications:
            self.deliver(publication)

    def lost_continuity(self, channel: str) -> None:
        """End the stream: the EventSource reconnects with Last-Event-ID and learns what was lost."""
        self.close_for_shutdown()

    def presence(self, event: PresenceEvent) -> None:
        self._event(event.kind, event.json)

    def event_id(self) -> bytes:
        if self._event_id is None:
            self._event_id = " ".join(
                f"{offset}.{epoch}.{channel}" for channel, (offset, epoch) in self.positions.items()
            ).encode()
        return self._event_id

    def _keep_alive(self, interval: float) -> None:
        self._write(b": keep-alive\n\n")
        self._keepalive = self.clock.callLater(interval, self._keep_alive, interval)

    # -- subscribing -----------------------------------------------------

    def start(self, channels: list[str], since: dict[str, Position], address: str) -> None:
        self.hub.connection_opened(self, address)
        self.request.notifyFinish().addBoth(self._gone)
        self.request.registerProducer(self.backpressure, True)
        self._write(b"retry: 2000\n\n")
        for name in channels:
            self.channels.append(name)
            member = Member(self.token.sub, self.token.info) if is_presence(name) and self.token else None
            position = since.get(name)
            d = self.hub.subscribe(name, self, position, member)
            d.addCallbacks(
                lambda answer, n=name, p=position: self._subscribed(n, answer, p),
                lambda failure, n=name: self._failed(n, failure),
            )
        self._arm_expiry()

    def _subscribed(self, name: str, answer: Subscribed | None, since: Position | None) -> None:
        if answer is None or self.finished:
            return
        if answer.recovered and since is not None:
            self.positions[name] = (since.offset, since.epoch)
        else:
            self.positions[name] = (answer.state.offset, answer.state.epoch)
        self._event_id = None
        frame = dumps(answer.frame(name))
        self._write(b"id: " + self.event_id() + b"\nevent: subscribed\ndata: " + frame + b"\n\n")
        answer.replay_to(self)

    def _failed(self, name: str, failure: Any) -> None:
        error = failure.value
        if isinstance(error, PushieError) and not isinstance(error, EngineUnavailable):
            # A refusal of this one channel (presence_full): say so and keep
            # the stream for its other channels, as a WebSocket keeps its
            # connection; ending it would only make the EventSource come back.
            if name in self.channels:
                self.channels.remove(name)
            self._event("error", PushieError(error.status, error.code, error.message, channel=name).to_frame())
            return
        if not failure.check(EngineUnavailable):
            log.failure("An SSE subscription failed", failure)
        self._event("error", {"type": "error", "code": "engine_unavailable", "message": "retry later"})
        self.close_for_shutdown()

    # -- token expiry ----------------------------------------------------

    def _arm_expiry(self) -> None:
        if self.token is None or not any(self.guard.needs_token(c) for c in self.channels):
            return
        self._expiry = self.guard.call_at_expiry(self.token, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        self._event(
            "error",
            {"type": "error", "code": "token_expired", "message": "the token expired; reconnect with a new one"},
        )
        self.close_for_shutdown()

    # -- ending ----------------------------------------------------------

    def close_for_shutdown(self) -> None:
        """End the stream cleanly (the chunked response's last chunk)."""
        if not self.finished:
            self.hub.flush()
            self.finished = True
            self.request.unregisterProducer()
            self.request.finish()
            self._cleanup()

    def abort(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport's; TLS has it too

    def _gone(self, _: object) -> None:
        self.finished = True
        self._cleanup()

    def _cleanup(self) -> None:
        self.backpressure.cancel()
        for timer in (self._keepalive, self._expiry):
            if timer is not None and timer.active():
                timer.cancel()
        self._keepalive = self._expiry = None
        if self.channels:
            self.hub.unsubscribe_all(self.channels, self)
            self.channels = []
        self.hub.connection_closed(self)


class EventsResource(JSONResource, Door):
    """C{GET /events?channel=a&channel=b&token=...}: a Server-Sent Events stream."""

    allowed_methods = (b"GET",)

    def __init__(self, context: DoorContext, settings: SSESettings) -> None:
        super().__init__()
        self.take(context)
        self.settings = settings
        self.max_subscriptions = settings.max_subscriptions

    def render_GET(self, request: Request) -> Any:
        try:
            channels, token, since = self._validate(request)
        except PushieError as e:
            refuse(self, request, e, "an event stream")
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer the stream
        # The site's idle timeout protects request reading; a stream is
        # kept alive by its own comments instead.
        request.channel.setTimeout(None)
        stream = EventStream(request, self.context, self.settings, token)
        stream.start(channels, since, address_of(request.getClientAddress()))
        return NOT_DONE_YET

    def _validate(self, request: Request) -> tuple[list[str], SubscriberToken | None, dict[str, Position]]:
        if self.hub.draining:
            raise PushieError(503, "shutting_down", "the server is shutting down; reconnect", {"Retry-After": "1"})
        self.hub.admit(address_of(request.getClientAddress()))
        args: dict[bytes, list[bytes]] = request.args or {}  # Twisted declares `args = None`
        names: list[str] = []
        for raw in args.get(b"channel", []):
            name = check_channel(raw.decode("utf-8", "replace"))
            if name not in names:
                names.append(name)
        if not names:
            raise bad_request("missing_channel", "name at least one channel: /events?channel=news")
        if self.max_subscriptions and len(names) > self.max_subscriptions:
            raise bad_request(
                "too_many_subscriptions", f"a stream may follow at most {self.max_subscriptions} channels"
            )
        token = None
        tokens = args.get(b"token")
        if tokens:
            token = self.guard.verify_token(tokens[-1].decode("utf-8", "replace"))
        for name in names:
            self.guard.check_subscribe(name, token)
        header = request.getHeader(b"last-event-id")
        query = args.get(b"last_event_id")
        raw_id = header if header is not None else (query[-1] if query else None)
        since = parse_event_id(raw_id.decode("utf-8", "replace")) if raw_id else {}
        return names, token, since
