# -*- test-case-name: tests.test_websocket -*-
"""
The WebSocket front door at C{/websocket}.

A connection subscribes with C{?channel=} in the URL and with C{subscribe}
frames, and receives one JSON text frame per publication.  Publications reach
it through L{PushieServerProtocol.deliver}, which writes the frame bytes that
the publication built once straight to the transport when nothing else is
queued: no per-subscriber encoding or framing.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attr
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.util import wildcards2patterns
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushie.auth import CLOSE_TOKEN_EXPIRED, SubscriberToken
from pushie.channels import Position, check_channel, check_since, is_presence
from pushie.doors._wsbase import DoorProtocol, configure_factory
from pushie.doors.context import Door, DoorContext
from pushie.errors import PushieError, bad_request
from pushie.hub import Subscribed
from pushie.logs import Throttle
from pushie.records import Burst, Member, PresenceEvent, Publication
from pushie.wire import InvalidJSON, dumps, loads

_OPEN = WebSocketProtocol.STATE_OPEN

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_RESUBSCRIBE = 4002
"""Close code: this node lost messages of a subscribed channel; reconnect and resubscribe with since."""

_NO_CHANNELS: list[str] = []

_ID_BYTES = 12
_id_pool = b""
_id_at = 0


def new_client_id() -> str:
    """
    A connection's id: 12 random bytes, URL-safe base64 (as
    C{secrets.token_urlsafe(12)}).  The bytes come from C{os.urandom} 256
    ids at a time: one system call per 256 connections instead of one each.
    """
    global _id_pool, _id_at
    at = _id_at
    if at + _ID_BYTES > len(_id_pool):
        _id_pool, at = os.urandom(_ID_BYTES * 256), 0
    _id_at = at + _ID_BYTES
    return base64.urlsafe_b64encode(_id_pool[at : at + _ID_BYTES]).decode("ascii")


def _forget_ids() -> None:
    """A forked process must not hand out its parent's next ids."""
    global _id_pool, _id_at
    _id_pool, _id_at = b"", 0


os.register_at_fork(after_in_child=_forget_ids)


class PushieServerProtocol(DoorProtocol):
    """One browser's WebSocket connection: a subscriber of any number of channels."""

    factory: PushieServerFactory

    __slots__ = ("client_id", "token", "_expiry", "subscriptions", "_initial_channels", "_opened")
    slow_close_code = CLOSE_TRY_AGAIN_LATER
    shutdown_close = (CLOSE_GOING_AWAY, "server shutting down")
    deny_reasons = frozenset({"server shutting down", "refused"})  # and _DENY_REASONS, below
    fast_handshake = True  # onConnect answers at once

    def __init__(self) -> None:
        super().__init__()
        self.client_id = new_client_id()
        self.token: SubscriberToken | None = None
        self._expiry: Any = None
        self.subscriptions: dict[str, None] = {}
        self._initial_channels: list[str] = []
        self._opened = False

    # -- handshake -------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        factory = self.factory
        if factory.hub.draining:
            raise ConnectionDeny(503, "server shutting down")
        # Autobahn's params drop blank values; `channel=` must be refused, not ignored.
        params = self.__dict__.pop("query_params", None)
        if params is None:
            params = parse_qs(urlsplit(self.http_request_uri).query, keep_blank_values=True)
        channels: list[str] = []
        try:
            factory.hub.admit(self.peer_address())
            if not factory.origin_allowed(request.origin):
                raise PushieError(403, "origin_not_allowed", "origin not allowed")
            tokens = params.get("token", [])
            if tokens:
                self.token = factory.guard.verify_token(tokens[-1])
            for name in params.get("channel", []):
                check_channel(name)
                factory.guard.check_subscribe(name, self.token)
                if name not in channels:
                    channels.append(name)
            if factory.max_subscriptions and len(channels) > factory.max_subscriptions:
                raise bad_request("too_many_subscriptions", "too many channels")
        except PushieError as e:
            factory.metrics.reject(e.code)
            factory.throttle.warn(
                "handshake_" + e.code,
                "Refused a WebSocket handshake from {peer}: {code}",
                peer=self.peer,
                code=e.code,
            )
            # The reason goes out in a bare status line: a fixed text only.
            raise ConnectionDeny(e.status, _DENY_REASONS.get(e.code, "refused")) from None
        self._initial_channels = channels
        return None

    def onOpen(self) -> None:
        self._opened = True
        factory = self.factory
        factory.hub.connection_opened(self, self.peer_address())
        self.watch_writes(factory.clock, factory.slow_consumer_buffer, factory.slow_consumer_grace)
        self.send_json({"type": "welcome", "client": self.client_id})
        for name in self._initial_channels:
            self._subscribe(name)
        self._initial_channels = _NO_CHANNELS
        self._arm_expiry()
        self.shrink()

    # -- delivery (hot path) ---------------------------------------------

    def deliver(self, publication: Publication) -> None:
        """
        Send one publication.  Called once per subscriber per publication.
        """
        if self.state == _OPEN:
            self.send_prepared(publication.envelope, publication.websocket_frame)

    def deliver_burst(self, burst: Burst) -> None:
        """
        Send several publications of one channel: one write of the frames
        the burst joined once for every subscriber.
        """
        if self.state != _OPEN:
            return
        if self.fast_path_open():
            self.write_frames(burst.websocket_frames)
        else:
            for publication in burst.publications:
                self.deliver(publication)

    def lost_continuity(self, channel: str) -> None:
        """Close so that the client reconnects and resubscribes with C{since} (pushie.js does)."""
        self.close_with(CLOSE_RESUBSCRIBE, "messages were lost; resubscribe with since")

    def presence(self, event: PresenceEvent) -> None:
        self.send_text(event.json)

    def send_json(self, frame: dict[str, Any]) -> None:
        """Send an answer of any size; see L{DoorProtocol.send_text}."""
        if self.state == _OPEN:
            self.send_text(dumps(frame))

    # -- client frames ---------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close_with(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text")
            return
        try:
            self._handle(payload)
        except PushieError as e:
            self.factory.metrics.reject(e.code)
            self.send_json(e.to_frame())

    def _handle(self, payload: bytes) -> None:
        try:
            frame = loads(payload)
        except InvalidJSON as e:
            raise bad_request("invalid_json", f'a frame must be a JSON object such as {{"type": "ping"}}: {e}')
        if not isinstance(frame, dict):
            raise bad_request("invalid_frame", 'a frame must be a JSON object with a "type"')
        kind = frame.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise bad_request(
                "unknown_type",
                '"type" must be one of: ' + ", ".join(sorted(self._handlers)),
            )
        handler(self, frame)

    def _frame_channel(self, frame: dict[str, Any]) -> str:
        if "channel" not in frame:
            raise bad_request("missing_channel", f'a {frame["type"]} frame needs a "channel"')
        return check_channel(frame["channel"])

    def _on_subscribe(self, frame: dict[str, Any]) -> None:
        name = self._frame_channel(frame)
        if "token" in frame:
            if not isinstance(frame["token"], str):
                raise bad_request("invalid_token", '"token" must be a string', channel=name)
            # A token that fails verification (or would change a presence
            # member's identity) leaves the connection's token as it was.
            self._adopt_token(frame["token"], channel=name)
        if name in self.subscriptions:
            raise bad_request(
                "already_subscribed",
                "this connection is already subscribed to the channel; unsubscribe first",
                channel=name,
            )
        since = check_since(frame["since"], name) if frame.get("since") is not None else None
        limit = self.factory.max_subscriptions
        if limit and len(self.subscriptions) >= limit:
            raise bad_request(
                "too_many_subscriptions",
                f"a connection may hold {limit} subscriptions; unsubscribe from one first",
                channel=name,
            )
        self.factory.guard.check_subscribe(name, self.token)
        self._subscribe(name, since)
        self._arm_expiry()

    def _on_unsubscribe(self, frame: dict[str, Any]) -> None:
        name = self._frame_channel(frame)
        if name not in self.subscriptions:
            raise bad_request("not_subscribed", "this connection is not subscribed to the channel", channel=name)
        del self.subscriptions[name]
        self.factory.hub.unsubscribe(name, self)
        self.send_json({"type": "unsubscribed", "channel": name})

    def _on_presence(self, frame: dict[str, Any]) -> None:
        name = self._frame_channel(frame)
        if name not in self.subscriptions or not is_presence(name):
            raise bad_request(
                "not_subscribed", "ask for the members of a presence-* channel you are subscribed to", channel=name
            )
        d = self.factory.hub.members(name)
        d.addCallback(
            lambda members: self.send_json(
                {"type": "presence", "channel": name, "members": [m.to_json() for m in members]}
            )
        )
        d.addErrback(lambda f: self._subscribe_failed(name, f, unsubscribe=False))

    def _on_ping(self, frame: dict[str, Any]) -> None:
        self.send_json({"type": "pong"})

    def _on_auth(self, frame: dict[str, Any]) -> None:
        if not isinstance(frame.get("token"), str):
            raise bad_request("invalid_token", 'an auth frame needs a "token" string')
        token = self._adopt_token(frame["token"])
        self.send_json({"type": "authorized", "sub": token.sub, "exp": int(token.exp)})

    def _adopt_token(self, raw: str, channel: str | None = None) -> SubscriberToken:
        """
        Make a token given in an C{auth} or C{subscribe} frame the
        connection's token, re-checking it against every channel held: a
        guarded channel it does not grant is dropped at once (an
        C{unsubscribed} frame with code C{forbidden}), so a refresh can narrow
        what a connection reads but never extends an old grant past the old
        token's expiry.  A token for another C{sub} is refused
        (C{identity_changed}) while the connection is a presence member.

        @raise PushieError: the token is refused; the old one stays.
        """
        guard = self.factory.guard
        token = guard.verify_token(raw, channel=channel)
        try:
            revoked = guard.check_refresh(self.subscriptions, self.token, token)
        except PushieError as e:
            e.channel = channel
            raise
        self.token = token
        for name in revoked:
            del self.subscriptions[name]
            self.factory.hub.unsubscribe(name, self)
            self.send_json(
                {
                    "type": "unsubscribed",
                    "channel": name,
                    "code": "forbidden",
                    "message": "the new subscriber token does not grant this channel",
                }
            )
        self._arm_expiry()
        return token

    # -- token expiry ----------------------------------------------------

    def _holds_guarded(self) -> bool:
        guard = self.factory.guard
        return any(guard.needs_token(name) for name in self.subscriptions)

    def _disarm_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _arm_expiry(self) -> None:
        """
        Watch the connection's token: when it expires (plus leeway) while the
        connection holds token-guarded subscriptions and no fresher token came
        in an C{auth} or C{subscribe} frame, close with 4001.
        """
        self._disarm_expiry()
        if self.token is None or self.state != _OPEN or not self._holds_guarded():
            return
        self._expiry = self.factory.guard.call_at_expiry(self.token, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        if self.token is not None and self.factory.guard.expired(self.token) and self._holds_guarded():
            self.close_with(CLOSE_TOKEN_EXPIRED, "token expired")
        else:
            self._arm_expiry()

    _handlers: dict[str, Callable[[PushieServerProtocol, dict[str, Any]], None]] = {
        "subscribe": _on_subscribe,
        "unsubscribe": _on_unsubscribe,
        "ping": _on_ping,
        "auth": _on_auth,
        "presence": _on_presence,
    }

    # -- subscriptions ---------------------------------------------------

    def _subscribe(self, name: str, since: Position | None = None) -> None:
        self.subscriptions[name] = None
        member = None
        if is_presence(name) and self.token is not None:
            member = Member(self.token.sub, self.token.info)
        hub = self.factory.hub
        if member is None:
            answer = hub.subscribe_now(name, self, since)
            if answer is not None:
                self._subscribed(name, answer)
                return
        d = hub.subscribe(name, self, since, member)
        d.addCallbacks(
            lambda answer: self._subscribed(name, answer),
            lambda failure: self._subscribe_failed(name, failure),
        )

    def _subscribed(self, name: str, answer: Subscribed | None) -> None:
        if answer is None or self.state != _OPEN:
            return  # unsubscribed or closed meanwhile
        try:
            self.send_json(answer.frame(name))
        except Exception:
            # A subscriber that was never told is no subscriber (nor member).
            self._subscribe_failed(name, Failure())
            return
        answer.replay_to(self)

    def _subscribe_failed(self, name: str, failure: Any, unsubscribe: bool = True) -> None:
        if unsubscribe and name in self.subscriptions:
            del self.subscriptions[name]
            self.factory.hub.unsubscribe(name, self)
        error = failure.value if isinstance(failure.value, PushieError) else None
        if error is None:
            self.factory.log.failure("Subscribing to {channel} failed", failure, channel=name)
            error = PushieError(503, "engine_unavailable", "the channel could not be subscribed; retry later")
        error.channel = name
        self.send_json(error.to_frame())

    # -- closing ---------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._disarm_expiry()
        self.closed()
        hub = self.factory.hub
        hub.unsubscribe_all(list(self.subscriptions), self)
        self.subscriptions.clear()
        if self._opened:
            hub.connection_closed(self)


def normalise_origin(origin: str) -> str | None:
    """C{scheme://host:port}, with the default port filled in; None for no usable origin."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return f"{parts.scheme}://{parts.hostname}:{port}"


# Fixed texts by error code: a refusal's status line never carries user input.
_DENY_REASONS = {
    "invalid_channel": "invalid channel name",
    "unauthorized": "token required or invalid",
    "forbidden": "channel not granted",
    "origin_not_allowed": "origin not allowed",
    "too_many_subscriptions": "too many channels",
    "too_many_connections": "server busy",
    "too_many_connections_from_address": "too many connections",
}
PushieServerProtocol.deny_reasons |= frozenset(_DENY_REASONS.values())


@attr.s(frozen=True, auto_attribs=True)
class WebSocketDoorSettings:
    """
    What the native WebSocket door needs from the daemon's settings (built by C{pushie.tap}).

    @ivar max_message_size: largest frame or message a client may send, in bytes.
    @ivar ping_interval: seconds between the server's WebSocket pings; 0: none.
    @ivar ping_timeout: seconds a ping may wait for its pong before the connection is dropped.
    @ivar close_timeout: seconds the closing handshake may take.
    @ivar allowed_origins: the origins a page may come from (C{allowed_origin}); empty: any.
    @ivar max_subscriptions: channels one connection may follow; 0: no limit.
    @ivar slow_consumer_buffer: bytes a connection may have waiting before it counts as slow.
    @ivar slow_consumer_grace: seconds a slow connection may stay slow before it is closed.
    """

    max_message_size: int
    ping_interval: float
    ping_timeout: float
    close_timeout: float = 5.0
    allowed_origins: tuple[str, ...] = ()
    max_subscriptions: int = 0
    slow_consumer_buffer: int = 1 << 20
    slow_consumer_grace: float = 10.0


class PushieServerFactory(WebSocketServerFactory, Door):
    """Builds L{PushieServerProtocol}s that share one L{Hub} and one L{Guard}."""

    protocol = PushieServerProtocol  # type: ignore[assignment]  # Factory's generic protocol type, left unbound by Autobahn's factory
    log = Logger()

    def __init__(self, context: DoorContext, settings: WebSocketDoorSettings) -> None:
        super().__init__()
        self.take(context)
        self.max_subscriptions = settings.max_subscriptions
        self.slow_consumer_buffer = settings.slow_consumer_buffer
        self.slow_consumer_grace = settings.slow_consumer_grace
        self.allowed_origins = list(settings.allowed_origins)
        self._origin_patterns = wildcards2patterns(self.allowed_origins)
        # Its own throttle, in this door's log namespace (not the HTTP doors' one of the context).
        self.throttle = Throttle(self.log, context.clock)
        configure_factory(
            self, settings.max_message_size, settings.ping_interval, settings.ping_timeout, settings.close_timeout
        )

    def origin_allowed(self, origin: str | None) -> bool:
        """
        Whether a page from C{origin} may open a WebSocket.  With no
        C{allowed_origin} configured, any may; a request without an C{Origin}
        header (not a browser) is always allowed, since origins only protect
        browsers' users from other sites' pages.
        """
        if not self.allowed_origins or not origin:
            return True
        normal = normalise_origin(origin)
        if normal is None:
            return False
        return any(pattern.match(normal) for pattern in self._origin_patterns)
