# -*- test-case-name: tests.test_pusher -*-
"""
The Pusher WebSocket door at C{/app/<key>}: Pusher Channels protocol 7, and
5 and 6 for older clients (L{PROTOCOL_VERSIONS} says what differs).

A connection gets a C{socket_id} (also its client id in the Hub, so
publications sent with that C{socket_id} skip it), subscribes with
C{pusher:subscribe} (private and presence channels with an C{auth} signed by
the app's secret), sends client events on the private and presence channels
it has joined, and may sign in (C{pusher:signin}) to receive events on
C{#server-to-user-<id>}.  With C{require_token}, the public channels of the
first app (the native doors' channels, where every channel then needs a
token) are refused with C{pusher:subscription_error}: a Pusher client has no
token, only signatures for private and presence channels.  Frames for a publication are built once and shared
by every Pusher subscriber, like the native door's.

A subscription may opt in to Pushie's recovery extension (docs/PROTOCOL.md
§13.1; the plugin C{static/pushie-pusher.js} does it for pusher-js): a
C{pushie} field in C{pusher:subscribe}, and its frames then carry each
event's position (L{positioned_frame}; L{skip_frame} for an event that
leaves it out), and a C{since} in that field resumes through the Hub's
recovery, as the native doors do.  Connections that never opt in are served
Pusher's frames, byte for byte and shared as before.

The apps may change while connections are open (L{PusherFactory.take_apps}:
the apps file is reloaded on change and on C{SIGHUP}); each app may be
disabled, hold a quota of connections and a client event rate of its own.

Close codes follow Pusher's classes: 4000-4099 the client must not reconnect
(4001 unknown or removed app key, 4003 app disabled, 4004 app over its
connection quota, 4006/4007 bad or unsupported protocol version, 4009 user
terminated), 4100-4199 reconnect with backoff
(4100 over capacity or slow consumer), 4200-4299 reconnect now (4200
shutdown or lost messages, 4201 no pong).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attr
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushie.channels import Position, check_since
from pushie.doors._wsbase import OPEN, DoorProtocol, configure_factory
from pushie.doors.context import Door, DoorContext
from pushie.doors.pusher.apps import (
    USER_CHANNEL_PREFIX,
    App,
    Apps,
    AppsFile,
    channel_auth_string,
    is_cache,
    is_encrypted,
    is_pusher_channel,
    is_pusher_presence,
    is_pusher_private,
    is_valid_user_id,
    signin_string,
)
from pushie.doors.pusher.hooks import PusherWebhooks, SubscriptionCounts
from pushie.errors import PushieError
from pushie.hub import Subscribed
from pushie.logs import Throttle
from pushie.records import NO_META, Burst, Member, PresenceEvent, Publication, PublishRequest
from pushie.webhooks import WebhookEvent
from pushie.wire import InvalidJSON, dumps, json_string, loads, text_frame

CLOSE_UNKNOWN_APP = 4001
CLOSE_APP_DISABLED = 4003
CLOSE_OVER_QUOTA = 4004
CLOSE_INVALID_VERSION = 4006
CLOSE_UNSUPPORTED_PROTOCOL = 4007
CLOSE_TERMINATED = 4009
CLOSE_OVER_CAPACITY = 4100
CLOSE_RECONNECT = 4200
CLOSE_NO_PONG = 4201
ERROR_CLIENT_EVENT_RATE = 4301

PROTOCOL_VERSION = 7
PROTOCOL_VERSIONS = (5, 6, 7)
"""
The protocol versions served.  What differs, and what the door does:

  - 5 brought C{pusher:ping}/C{pusher:pong} and
    C{pusher_internal:subscription_succeeded} on public channels (the door
    always sends both); clients of 5 and 6 (the Java/Android SDK, Pysher) read
    the code of a refusal from C{pusher:error}, whose C{data} they expect as a
    JSON object: they get one (protocol 7 keeps the JSON string pusher-js
    has always been sent, and which it reads either way).
  - 6: close codes are sent once, in the close frame, and C{pusher:error}
    only where the transport has no close codes: the door sends both to every
    version (each client reads the one it knows).
  - 7: C{connection_established} carries C{activity_timeout}; sent to every
    version (older clients ignore the extra field).
"""
APPS_FILE_INTERVAL = 1.0
"""Seconds between two looks at the apps file (as for the publisher keys file)."""
TERMINATE_EVENT = "pusher_internal:terminate"
"""Published on C{#server-to-user-<id>} by C{terminate_connections}; never sent to a client."""


def event_frame(event: str, data: Any, channel: str | None = None) -> bytes:
    """A server-to-client Pusher frame; C{data} is encoded to a JSON string, as Pusher does."""
    frame: dict[str, Any] = {"event": event}
    if channel is not None:
        frame["channel"] = channel
    frame["data"] = data if isinstance(data, str) else dumps(data).decode("utf-8")
    return dumps(frame)


EXCLUDE = "exclude"
"""The key of a publication's metadata (L{PublishRequest.meta}) naming the socket id to leave out."""


def excluding(socket_id: str | None) -> Mapping[str, str]:
    """The metadata of a publication that socket C{socket_id} (if any) must not receive."""
    return NO_META if socket_id is None else {EXCLUDE: socket_id}


def publication_frame(publication: Publication, app: App) -> tuple[bytes, bytes]:
    """
    The Pusher message for a publication and its WebSocket frame.

    Pusher's C{data} is a string: a publication whose data is a JSON string
    (what the Pusher SDKs send) goes as that string; any other JSON value
    (from C{POST /publish}) goes as its JSON text, which pusher-js parses back.
    """
    data = publication.data
    if not data.startswith(b'"'):
        data = dumps(data.decode("utf-8"))
    parts = [
        b'{"event":',
        json_string(publication.event),
        b',"channel":',
        json_string(app.channel_name(publication.channel)),
        b',"data":',
        data,
    ]
    if publication.user_id is not None:
        parts += [b',"user_id":', dumps(publication.user_id)]
    parts.append(b"}")
    payload = b"".join(parts)
    return payload, text_frame(payload)


RECOVERY_FIELD = "pushie"
"""
The Pushie extension's key (docs/PROTOCOL.md §13.1, recovery for Pusher
clients): in C{pusher:subscribe} data to opt in, in the event frames of a
subscription that opted in (the event's position), and in its
C{subscription_succeeded} data.  Connections that never send it see Pusher's
frames byte for byte.
"""
SKIP_EVENT = "pusher_internal:pushie_skip"
"""
What an opted-in subscription gets in place of a publication that leaves it
out (its own client event, a trigger with its C{socket_id}): only the position,
so that a resubscribe after a drop does not replay it.  pusher-js ignores
C{pusher_internal:} events it does not know.
"""


def position_field(publication: Publication) -> bytes:
    """C{,"pushie":{"offset":N,"epoch":"E"}}: the position appended to an opted-in subscription's frames."""
    return b"".join(
        [b',"pushie":{"offset":', str(publication.offset).encode(), b',"epoch":', json_string(publication.epoch), b"}"]
    )


def positioned_frame(publication: Publication, app: App) -> tuple[bytes, bytes]:
    """L{publication_frame} with the publication's position as a last top-level field."""
    payload = publication_frame(publication, app)[0]
    payload = payload[:-1] + position_field(publication) + b"}"
    return payload, text_frame(payload)


def skip_frame(publication: Publication, app: App) -> bytes:
    """The L{SKIP_EVENT} frame for a publication that leaves an opted-in subscription out."""
    payload = b"".join(
        [
            b'{"event":"' + SKIP_EVENT.encode() + b'","channel":',
            json_string(app.channel_name(publication.channel)),
            b',"data":"{}"',
            position_field(publication),
            b"}",
        ]
    )
    return text_frame(payload)


class FrameCache:
    """
    The Pusher frames of the publications and bursts that the Hub dispatches
    in one reactor turn, built for the first Pusher subscriber and shared by
    the others (the Hub hands a publication to all its subscribers in one
    turn), then forgotten at the next turn: the shared records carry nothing
    of Pusher, and the cache keeps no publication alive.  A publication handed
    over again later (a recovery) has its frames built again.
    """

    __slots__ = ("_clock", "_frames", "_bursts", "_positioned", "_positioned_bursts")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # Keyed by the records themselves: they compare by identity.
        self._frames: dict[Publication, tuple[bytes, bytes]] = {}
        self._bursts: dict[Burst, bytes] = {}
        # The same with positions, for the subscriptions that opted in to recovery.
        self._positioned: dict[Publication, tuple[bytes, bytes]] = {}
        self._positioned_bursts: dict[Burst, bytes] = {}

    def _forget_next_turn(self) -> None:
        if not (self._frames or self._bursts or self._positioned or self._positioned_bursts):
            self._clock.callLater(0, self._forget)

    def _forget(self) -> None:
        self._frames.clear()
        self._bursts.clear()
        self._positioned.clear()
        self._positioned_bursts.clear()

    def positioned(self, publication: Publication, app: App) -> tuple[bytes, bytes]:
        """L{positioned_frame}, built once per turn."""
        cached = self._positioned.get(publication)
        if cached is None:
            self._forget_next_turn()
            cached = self._positioned[publication] = positioned_frame(publication, app)
        return cached

    def positioned_burst(self, burst: Burst, app: App) -> bytes:
        """The positioned frames of every publication of C{burst}, joined once per turn."""
        frames = self._positioned_bursts.get(burst)
        if frames is None:
            frames = b"".join([self.positioned(p, app)[1] for p in burst.publications])
            self._forget_next_turn()
            self._positioned_bursts[burst] = frames
        return frames

    def publication(self, publication: Publication, app: App) -> tuple[bytes, bytes]:
        """L{publication_frame}, built once per turn."""
        cached = self._frames.get(publication)
        if cached is None:
            self._forget_next_turn()
            cached = self._frames[publication] = publication_frame(publication, app)
        return cached

    def burst(self, burst: Burst, app: App) -> bytes:
        """The frames of every publication of C{burst}, joined once per turn."""
        frames = self._bursts.get(burst)
        if frames is None:
            frames = b"".join([self.publication(p, app)[1] for p in burst.publications])
            self._forget_next_turn()
            self._bursts[burst] = frames
        return frames


@attr.s(slots=True, auto_attribs=True, eq=False)
class _Subscription:
    member: Member | None = None
    live: bool = False
    recovery: bool = False
    """Whether it opted in to the recovery extension (a C{pushie} field in C{pusher:subscribe})."""
    since: Position | None = None
    """The position the client resumes from (C{pushie.since}), if it gave one."""


class _UserChannel:
    """
    A signed-in connection's subscription to C{#server-to-user-<id>}: events
    for the user, and the terminate signal of C{terminate_connections}.
    """

    __slots__ = ("protocol", "client_id", "name")

    def __init__(self, protocol: PusherProtocol, name: str) -> None:
        self.protocol = protocol
        self.client_id = protocol.client_id
        self.name = name

    def deliver(self, publication: Publication) -> None:
        if publication.event == TERMINATE_EVENT:
            self.protocol.terminate()
        else:
            self.protocol.deliver(publication)

    def deliver_burst(self, burst: Burst) -> None:
        for publication in burst.publications:
            self.deliver(publication)

    def presence(self, event: PresenceEvent) -> None:
        pass

    def lost_continuity(self, channel: str) -> None:
        self.protocol.lost_continuity(channel)


class PusherError(Exception):
    """A refusal sent as C{pusher:error} (and C{pusher:subscription_error} for a channel)."""

    def __init__(
        self,
        message: str,
        code: int | None = None,
        status: int = 400,
        channel: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.channel = channel
        self.kind = kind or ("AuthError" if status in (401, 403) else "SubscriptionError")


class PusherProtocol(DoorProtocol):
    """One pusher-js (or Laravel Echo) connection."""

    factory: PusherFactory
    slow_close_code = CLOSE_OVER_CAPACITY
    shutdown_close = (CLOSE_RECONNECT, "Server shutting down; reconnect")
    deny_reasons = frozenset({"origin not allowed"})
    __slots__ = (
        "client_id", "app", "_refusal", "subscriptions", "user_id", "_user_channel", "_opened",
        "last_seen", "pinged_at", "_event_window", "_event_count", "_outbox", "version", "_counted", "_positioned",
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.client_id = f"{secrets.randbelow(10**9)}.{secrets.randbelow(10**9)}"
        self.app: App | None = None
        self._refusal: tuple[int, str] | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self.user_id: str | None = None
        self._user_channel: _UserChannel | None = None
        self._opened = False
        self.last_seen = 0.0
        self.pinged_at: float | None = None
        self._event_window = 0.0
        self._event_count = 0
        self._outbox: list[PublishRequest] | None = None
        self.version = PROTOCOL_VERSION
        self._counted: str | None = None  # the app id this connection counts against
        # The Hub names of the channels subscribed with the recovery extension
        # (their frames carry positions); None while there is none, so that
        # the hot path of every other connection tests one attribute.
        self._positioned: set[str] | None = None

    @property
    def socket_id(self) -> str:
        return self.client_id

    # -- handshake -------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        factory = self.factory
        if not factory.origin_allowed(request.origin):
            factory.metrics.reject("origin_not_allowed")
            raise ConnectionDeny(403, "origin not allowed")
        key = self.http_request_path.rstrip("/").rpartition("/")[2]
        params = parse_qs(urlsplit(self.http_request_uri).query, keep_blank_values=True)
        version = (params.get("protocol") or [str(PROTOCOL_VERSION)])[-1]
        self.app = factory.apps.by_key(key)
        if version.isdigit() and len(version) <= 3 and int(version) in PROTOCOL_VERSIONS:
            self.version = int(version)  # also for the refusals below: old clients read them their way
        # Pusher refuses after the handshake, with an error event and a close
        # code that tells pusher-js whether to try again.
        if self.app is None:
            self._refusal = (CLOSE_UNKNOWN_APP, f"App key {key[:64]} does not exist on this server")
        elif not (version.isdigit() and len(version) <= 3):
            self._refusal = (
                CLOSE_INVALID_VERSION,
                f"Invalid protocol version {version[:16]!r}: give protocol=7 (5 and 6 are accepted too)",
            )
        elif int(version) not in PROTOCOL_VERSIONS:
            self._refusal = (
                CLOSE_UNSUPPORTED_PROTOCOL,
                f"Unsupported protocol version {int(version)}: this server speaks 5, 6 and 7; use 7",
            )
        elif factory.hub.draining:
            self._refusal = (CLOSE_RECONNECT, "Server shutting down; reconnect")
        else:
            self._refusal = factory.app_refusal(self.app)
            if self._refusal is None:
                try:
                    factory.hub.admit(self.peer_address())
                except PushieError as e:
                    self._refusal = (CLOSE_OVER_CAPACITY, f"Over capacity ({e.code}); reconnect later")
        if self._refusal is not None:
            factory.metrics.reject(f"pusher_close_{self._refusal[0]}")
            factory.throttle.warn(
                f"pusher_refused_{self._refusal[0]}",
                "Refused a Pusher connection from {peer}: {reason}",
                peer=self.peer,
                reason=self._refusal[1],
            )

    def onOpen(self) -> None:
        if self._refusal is None and self.app is not None:
            # The apps may have been reloaded since the handshake began.
            self.app = self.factory.apps.by_key(self.app.key)
            if self.app is None:
                self._refusal = (CLOSE_UNKNOWN_APP, "This app key no longer exists on this server")
            else:
                self._refusal = self.factory.app_refusal(self.app)
        if self._refusal is not None:
            self.refuse(*self._refusal)
            return
        self._opened = True
        factory = self.factory
        factory.hub.connection_opened(self, self.peer_address())
        factory.connections[self] = None
        assert self.app is not None
        self._counted = self.app.id
        factory.app_connections[self._counted] = factory.app_connections.get(self._counted, 0) + 1
        self.watch_writes(factory.clock, factory.settings.slow_consumer_buffer, factory.settings.slow_consumer_grace)
        self.last_seen = factory.clock.seconds()
        self.send_event(
            "pusher:connection_established",
            {"socket_id": self.socket_id, "activity_timeout": max(1, round(factory.settings.activity_timeout))},
        )
        self.shrink()

    # -- sending ---------------------------------------------------------

    def send_event(self, event: str, data: Any, channel: str | None = None) -> None:
        """Send a Pusher event of any size (a member list too); see L{DoorProtocol.send_text}."""
        if self.state == OPEN:
            if self.version < 7 and event in _OBJECT_DATA_EVENTS:
                # Clients of protocols 5 and 6 index the error's data as an object.
                self.send_text(dumps({"event": event, **({"channel": channel} if channel else {}), "data": data}))
            else:
                self.send_text(event_frame(event, data, channel))

    def deliver(self, publication: Publication) -> None:
        """Send one publication (hot path), unless this socket is the one to leave out."""
        if self.state != OPEN:
            return
        positioned = self._positioned is not None and publication.channel in self._positioned
        assert self.app is not None
        if publication.meta and publication.meta.get(EXCLUDE) == self.client_id:
            if positioned:
                self.send_prepared(b"", skip_frame(publication, self.app))
            return
        if positioned:
            payload, frame = self.factory.frames.positioned(publication, self.app)
        else:
            payload, frame = self.factory.frames.publication(publication, self.app)
        self.send_prepared(payload, frame)

    def deliver_burst(self, burst: Burst) -> None:
        """
        Send several publications of one channel in one write.  The joined
        frames are shared by every Pusher subscriber of the burst, except
        by a connection that some of them leave out.
        """
        if self.state != OPEN:
            return
        app = self.app
        assert app is not None
        me = self.client_id
        publications = burst.publications
        if not self.fast_path_open():
            for publication in publications:
                self.deliver(publication)
            return
        cache = self.factory.frames
        if self._positioned is not None and publications[0].channel in self._positioned:
            if any(p.meta and p.meta.get(EXCLUDE) == me for p in publications):
                frames = b"".join(
                    [
                        skip_frame(p, app) if p.meta and p.meta.get(EXCLUDE) == me else cache.positioned(p, app)[1]
                        for p in publications
                    ]
                )
            else:
                frames = cache.positioned_burst(burst, app)
        elif any(p.meta and p.meta.get(EXCLUDE) == me for p in publications):
            frames = b"".join(
                [cache.publication(p, app)[1] for p in publications if not p.meta or p.meta.get(EXCLUDE) != me]
            )
        else:
            frames = cache.burst(burst, app)
        if frames:
            self.write_frames(frames)

    def presence(self, event: PresenceEvent) -> None:
        assert self.app is not None
        channel = self.app.channel_name(event.channel)
        if event.kind == "join":
            data: dict[str, Any] = {"user_id": event.member.id}
            if event.member.info is not None:
                data["user_info"] = event.member.info
            self.send_event("pusher_internal:member_added", data, channel)
        else:
            self.send_event("pusher_internal:member_removed", {"user_id": event.member.id}, channel)

    def lost_continuity(self, channel: str) -> None:
        """
        Pusher clients cannot recover missed messages: reconnecting tells
        pusher-js (and apps listening for C{connected}) to refetch state.
        """
        self.close_with(CLOSE_RECONNECT, "messages were lost on this server; reconnect")

    def refuse(self, code: int, message: str) -> None:
        """Close with a Pusher code, told first in a C{pusher:error} (clients of every version read one of them)."""
        self.send_event("pusher:error", {"code": code, "message": message})
        self.close_with(code, message)

    def terminate(self) -> None:
        """C{terminate_connections} for this connection's user: tell it and close for good."""
        self.send_event("pusher:error", {"code": CLOSE_TERMINATED, "message": "Connection terminated by the app"})
        self.close_with(CLOSE_TERMINATED, "terminated")

    def _error(self, error: PusherError) -> None:
        self.factory.metrics.reject("pusher_error")
        self.send_event("pusher:error", {"code": error.code, "message": error.message})
        if error.channel is not None:
            self.send_event(
                "pusher:subscription_error",
                {
                    "type": error.kind,
                    "error": error.message,
                    "status": error.status,
                },
                error.channel,
            )

    # -- client frames ---------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close_with(1003, "binary frames are not accepted; send JSON text")
            return
        if not self._opened:
            return
        self.last_seen = self.factory.clock.seconds()
        self.pinged_at = None
        try:
            self._handle(payload)
        except PusherError as e:
            self._error(e)

    def _handle(self, payload: bytes) -> None:
        try:
            frame = loads(payload)
        except InvalidJSON as e:
            raise PusherError(f"Invalid JSON: send one JSON object per message ({e})") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("event"), str):
            raise PusherError('A message must be a JSON object with an "event" string')
        event = frame["event"]
        data = frame.get("data")
        if event in ("pusher:ping", "pusher:pong"):
            # Whatever their data: Pysher sends "", the Java SDK none, pusher-js {}.
            self._handlers[event](self, None)
            return
        if isinstance(data, str) and event.startswith("pusher:"):
            # Some clients send the data of pusher:* events as a JSON string.
            try:
                data = loads(data)
            except InvalidJSON:
                raise PusherError(f"Invalid data for {event}") from None
        handler = self._handlers.get(event)
        if handler is not None:
            handler(self, data)
        elif event.startswith("client-"):
            self._client_event(frame)
        elif not event.startswith("pusher:"):
            raise PusherError(f"Unknown event {event[:64]!r}: client events start with client-")
        # Unknown pusher:* events are ignored, as by Pusher, for newer clients.

    def _on_ping(self, data: Any) -> None:
        self.send_event("pusher:pong", {})

    def _on_pong(self, data: Any) -> None:
        pass  # the activity was noted in onMessage

    def _on_subscribe(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise PusherError('pusher:subscribe needs data {"channel": ...}')
        channel = data.get("channel")
        if isinstance(channel, str) and channel.startswith(USER_CHANNEL_PREFIX):
            self._subscribe_user_channel(channel)
            return
        if not is_pusher_channel(channel):
            shown = channel[:200] if isinstance(channel, str) else None
            raise PusherError("Invalid channel name: 1 to 164 characters of A-Z a-z 0-9 _ - = @ , . ;", channel=shown)
        assert isinstance(channel, str) and self.app is not None
        existing = self.subscriptions.get(channel)
        if existing is not None:
            if existing.live:
                self._resend_succeeded(channel)
            return  # the pending subscribe will answer
        limit = self.factory.settings.max_subscriptions
        if limit and len(self.subscriptions) >= limit:
            raise PusherError(f"A connection may hold {limit} subscriptions", channel=channel, status=400)
        member = None
        if is_pusher_private(channel) or is_pusher_presence(channel):
            channel_data = data.get("channel_data") if is_pusher_presence(channel) else None
            if is_pusher_presence(channel) and not isinstance(channel_data, str):
                raise PusherError("A presence channel needs channel_data", channel=channel, status=400)
            if not self.app.check_auth(data.get("auth"), channel_auth_string(self.socket_id, channel, channel_data)):
                raise PusherError(f"Invalid signature for {channel}", channel=channel, status=401)
            if channel_data is not None:
                member = _member(channel_data, channel)
        elif self.app.primary and self.factory.settings.require_token:
            # The first app's channels are the native doors' channels, where
            # require_token wants a granting token for every one; a Pusher
            # client has no token, only signatures for private and presence.
            raise PusherError(
                "This server requires authorization for every channel of this app: use a private- or presence- channel",
                channel=channel,
                status=401,
            )
        recovery, since = _recovery_request(data.get(RECOVERY_FIELD), channel)
        self.subscriptions[channel] = _Subscription(member, recovery=recovery, since=since)
        if recovery:
            if self._positioned is None:
                self._positioned = set()
            self._positioned.add(self.app.hub_name(channel))
        if is_cache(channel):
            name = self.app.hub_name(channel)
            if since is not None:
                # Whether the client's position can be resumed (else it
                # gets the cached event): the one after it is still kept.
                read: Deferred[None] = self.factory.hub.history(name, since.offset, 1).addCallback(
                    lambda history: self._subscribe(channel, member, history.state, history.complete)
                )
            else:
                read = self.factory.hub.state(name).addCallback(lambda state: self._subscribe(channel, member, state))
            read.addErrback(lambda failure: self._subscribe_failed(channel, failure))
        else:
            self._subscribe(channel, member)

    def _subscribe(self, channel: str, member: Member | None, cache_state: Any = None, resumable: bool = False) -> None:
        assert self.app is not None
        subscription = self.subscriptions.get(channel)
        if subscription is None or self.state != OPEN:
            return
        since = subscription.since
        if cache_state is not None:
            # A cache- channel sends its last event on subscribe: from the
            # position before it, unless the client resumes from a position
            # that can be resumed (then it has that event, or gets it among
            # the ones it missed).
            if not (
                resumable
                and since is not None
                and since.epoch == cache_state.epoch
                and since.offset <= cache_state.offset
            ):
                since = Position(cache_state.offset - 1, cache_state.epoch) if cache_state.offset > 0 else None
        d = self.factory.hub.subscribe(self.app.hub_name(channel), self, since, member)
        d.addCallbacks(
            lambda answer: self._subscribed(channel, answer, cache_state is not None, since),
            lambda failure: self._subscribe_failed(channel, failure),
        )

    def _subscribed(self, channel: str, answer: Subscribed | None, cache: bool, since: Position | None) -> None:
        subscription = self.subscriptions.get(channel)
        if answer is None or subscription is None or self.state != OPEN:
            return
        data = _succeeded_data(answer.members)
        if subscription.recovery:
            data[RECOVERY_FIELD] = _recovery_answer(answer, since, subscription.since)
        try:
            self.send_event("pusher_internal:subscription_succeeded", data, channel)
        except Exception:
            # A subscriber that was never told is no subscriber (nor member).
            self._subscribe_failed(channel, Failure())
            return
        subscription.live = True
        assert self.app is not None
        factory = self.factory
        if cache and not answer.recovered:
            self.send_event("pusher:cache_miss", {}, channel)
            if factory.webhooks is not None:
                factory.webhooks.send(self.app, WebhookEvent("cache_miss", channel))
        answer.replay_to(self)
        if factory.counts.wanted(self.app, channel):
            factory.counts.subscribed(self.app, channel, self.app.hub_name(channel), self)

    def _resend_succeeded(self, channel: str) -> None:
        assert self.app is not None
        if not is_pusher_presence(channel):
            self.send_event("pusher_internal:subscription_succeeded", {}, channel)
            return
        d = self.factory.hub.members(self.app.hub_name(channel))
        d.addCallback(
            lambda members: self.send_event("pusher_internal:subscription_succeeded", _succeeded_data(members), channel)
        )
        d.addErrback(lambda failure: self._subscribe_failed(channel, failure, unsubscribe=False))

    def _subscribe_failed(self, channel: str, failure: Any, unsubscribe: bool = True) -> None:
        assert self.app is not None
        if unsubscribe and self.subscriptions.pop(channel, None) is not None:
            self._forget_position(channel)
            self.factory.hub.unsubscribe(self.app.hub_name(channel), self)
            self.factory.counts.unsubscribed(self.app.hub_name(channel), self)
        error = failure.value
        if isinstance(error, PushieError) and error.code == "presence_full":
            # As Soketi: pusher-js reports it with the type and status.
            self._error(
                PusherError(
                    "The maximum members per presence channel limit was reached",
                    code=CLOSE_OVER_CAPACITY,
                    status=CLOSE_OVER_CAPACITY,
                    channel=channel,
                    kind="LimitReached",
                )
            )
            return
        if not isinstance(error, PushieError):
            self.factory.log.failure("Pusher subscribe to {channel} failed", failure, channel=channel)
        self._error(PusherError("The channel could not be subscribed; retry later", channel=channel, status=503))

    def _on_unsubscribe(self, data: Any) -> None:
        channel = data.get("channel") if isinstance(data, dict) else None
        assert self.app is not None
        if isinstance(channel, str) and self.subscriptions.pop(channel, None) is not None:
            self._forget_position(channel)
            self.factory.hub.unsubscribe(self.app.hub_name(channel), self)
            self.factory.counts.unsubscribed(self.app.hub_name(channel), self)

    def _forget_position(self, channel: str) -> None:
        """The subscription to C{channel} ended: its frames need no position any more."""
        assert self.app is not None
        if self._positioned is not None:
            self._positioned.discard(self.app.hub_name(channel))
            if not self._positioned:
                self._positioned = None

    # -- user sign-in ----------------------------------------------------

    def _on_signin(self, data: Any) -> None:
        assert self.app is not None
        if not isinstance(data, dict) or not isinstance(data.get("user_data"), str):
            raise PusherError('pusher:signin needs data {"auth": ..., "user_data": "<JSON string>"}')
        user_data = data["user_data"]
        if not self.app.check_auth(data.get("auth"), signin_string(self.socket_id, user_data)):
            raise PusherError("Invalid signature for pusher:signin", code=4009, status=401)
        try:
            user = loads(user_data)
        except ValueError:
            user = None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str) or not is_valid_user_id(user_id):
            raise PusherError('user_data must be a JSON object with an "id" string')
        if self.user_id is not None and self.user_id != user_id:
            raise PusherError("This connection is signed in as another user")
        if self.user_id is None:
            self.user_id = user_id
            name = self.app.hub_name(USER_CHANNEL_PREFIX + user_id)
            self._user_channel = _UserChannel(self, name)
            d = self.factory.hub.subscribe(name, self._user_channel)
            d.addCallbacks(lambda answer: self._signed_in(user_data, answer), self._signin_failed)
        else:
            self.send_event("pusher:signin_success", {"user_data": user_data})

    def _signed_in(self, user_data: str, answer: Subscribed | None) -> None:
        """The user channel is live (on every node): only now is the sign-in confirmed."""
        if answer is None or self._user_channel is None or self.state != OPEN:
            return
        self.send_event("pusher:signin_success", {"user_data": user_data})
        answer.replay_to(self._user_channel)

    def _signin_failed(self, failure: Any) -> None:
        self.user_id = None
        self._user_channel = None
        if not isinstance(failure.value, PushieError):
            self.factory.log.failure("Pusher sign-in failed", failure)
        self._error(PusherError("Sign-in failed; retry later", status=503))

    def _subscribe_user_channel(self, channel: str) -> None:
        """pusher-js subscribes to its user's channel after sign-in; the door already delivers it."""
        if self.user_id is None or channel != USER_CHANNEL_PREFIX + self.user_id:
            raise PusherError("Sign in as this user first", channel=channel[:200], status=403)
        self.send_event("pusher_internal:subscription_succeeded", {}, channel)

    # -- client events ---------------------------------------------------

    def _client_event(self, frame: dict[str, Any]) -> None:
        assert self.app is not None
        factory = self.factory
        event, channel = frame["event"], frame.get("channel")
        rate = self.app.client_event_rate
        if rate is None:
            rate = factory.settings.client_event_rate
        if not rate:
            raise PusherError("Client events are disabled for this app on this server")
        subscription = self.subscriptions.get(channel) if isinstance(channel, str) else None
        if subscription is None or not subscription.live:
            raise PusherError("Client events need a channel this connection has joined")
        assert isinstance(channel, str)
        if not (is_pusher_private(channel) or is_pusher_presence(channel)) or is_encrypted(channel):
            raise PusherError("Client events are allowed on private- and presence- channels only (not encrypted)")
        if len(event) > 200:
            raise PusherError("Event names are at most 200 characters")
        now = factory.clock.seconds()
        if now - self._event_window >= 1.0:
            self._event_window = now
            self._event_count = 0
        self._event_count += 1
        if self._event_count > rate:
            factory.metrics.reject("pusher_client_event_rate")
            raise PusherError(
                f"Client event rejected - only {rate:g} accepted per second",
                code=ERROR_CLIENT_EVENT_RATE,
            )
        data = dumps(frame.get("data"))
        if len(data) > factory.settings.max_data_size:
            raise PusherError(f"Client event data is over {factory.settings.max_data_size} bytes")
        user_id = subscription.member.id if subscription.member is not None else None
        request = PublishRequest(
            self.app.hub_name(channel), data, event, user_id=user_id, meta=excluding(self.client_id)
        )
        if self._outbox is not None:
            self._outbox.append(request)  # sent, in order, when the one in flight is stored
        else:
            self._outbox = []
            self._send_client_events([request])

    def _send_client_events(self, requests: list[PublishRequest]) -> None:
        """
        Publish client events one batch at a time: two publishes in flight
        at once may be stored in either order (the Redis engine has several
        connections), and a client's events must keep their order.
        """
        hub = self.factory.hub
        d = hub.publish(requests)
        d.addCallback(lambda publications: self.factory.metrics.publications.inc(len(publications)))
        if self.factory.webhooks is not None and self.app is not None:
            d.addCallback(lambda _: self._client_event_webhooks(requests))
        d.addErrback(lambda failure: self._error(PusherError("The client event could not be sent; retry later")))

        def next_batch(_: object) -> None:
            waiting, self._outbox = self._outbox, None
            if waiting:
                self._outbox = []
                self._send_client_events(waiting)

        d.addCallback(next_batch)

    def _client_event_webhooks(self, requests: list[PublishRequest]) -> None:
        """The app's C{client_event} webhooks, once the events are published (a refused one sends none)."""
        app, webhooks = self.app, self.factory.webhooks
        if app is None or webhooks is None:
            return
        for request in requests:
            extra = (
                ("event", request.event),
                ("data", request.data.decode("utf-8", "surrogatepass")),
                ("socket_id", self.socket_id),
            )
            webhooks.send(app, WebhookEvent("client_event", app.channel_name(request.channel), request.user_id, extra))

    _handlers: dict[str, Callable[[PusherProtocol, Any], None]] = {
        "pusher:ping": _on_ping,
        "pusher:pong": _on_pong,
        "pusher:subscribe": _on_subscribe,
        "pusher:unsubscribe": _on_unsubscribe,
        "pusher:signin": _on_signin,
    }

    # -- activity and closing ----------------------------------------------

    def check_activity(self, now: float) -> None:
        """Ping a silent client after the activity timeout; close with 4201 when no pong comes."""
        factory = self.factory
        if self.pinged_at is not None:
            if now - self.pinged_at >= factory.settings.pong_timeout:
                self.close_with(CLOSE_NO_PONG, "Pong reply not received")
                self.pinged_at = None
        elif now - self.last_seen >= factory.settings.activity_timeout:
            self.pinged_at = now
            self.send_event("pusher:ping", {})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed()
        factory = self.factory
        factory.connections.pop(self, None)
        hub = factory.hub
        if self.app is not None:
            for channel in list(self.subscriptions):
                hub.unsubscribe(self.app.hub_name(channel), self)
                factory.counts.unsubscribed(self.app.hub_name(channel), self)
        self.subscriptions.clear()
        self._positioned = None
        if self._user_channel is not None:
            hub.unsubscribe(self._user_channel.name, self._user_channel)
            self._user_channel = None
        if self._counted is not None:
            left = factory.app_connections.get(self._counted, 1) - 1
            if left > 0:
                factory.app_connections[self._counted] = left
            else:
                factory.app_connections.pop(self._counted, None)
            self._counted = None
        if self._opened:
            self._opened = False
            hub.connection_closed(self)


_OBJECT_DATA_EVENTS = frozenset({"pusher:error", "pusher:subscription_error"})


def _member(channel_data: str, channel: str) -> Member:
    try:
        parsed = loads(channel_data)
    except ValueError:
        parsed = None
    user_id = parsed.get("user_id") if isinstance(parsed, dict) else None
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)) or not is_valid_user_id(str(user_id)):
        raise PusherError('channel_data must be a JSON object with a "user_id"', channel=channel, status=400)
    return Member(str(user_id), parsed.get("user_info"))


def _recovery_request(value: Any, channel: str) -> tuple[bool, Position | None]:
    """
    The recovery extension's field of a C{pusher:subscribe}: absent (no
    recovery), C{{}} (opt in: positions from now on) or
    C{{"since": {"offset": N, "epoch": "E"}}} (opt in and resume after N).

    @return: whether the subscription opted in, and where it resumes.
    @raise PusherError: a field of another shape.
    """
    if value is None:
        return False, None
    if not isinstance(value, dict):
        raise PusherError(
            '"pushie" must be an object: {} or {"since": {"offset": N, "epoch": "E"}}', channel=channel, status=400
        )
    if value.get("since") is None:
        return True, None
    try:
        return True, check_since(value["since"], channel)
    except PushieError as e:
        raise PusherError(f"pushie.since: {e.message}", channel=channel, status=400) from None


def _recovery_answer(answer: Subscribed, used: Position | None, asked: Position | None) -> dict[str, Any]:
    """
    The C{pushie} field of an opted-in C{subscription_succeeded}: the
    position right before the next event this subscription receives (the one
    resumed from, when the Hub could recover it; else the channel's current
    one), and, when the client asked to resume, whether it was recovered.
    """
    if used is not None and answer.recovered:
        field: dict[str, Any] = {"offset": used.offset, "epoch": used.epoch}
    else:
        field = {"offset": answer.state.offset, "epoch": answer.state.epoch}
    if asked is not None:
        field["recovered"] = bool(answer.recovered) and used == asked
    return field


def _succeeded_data(members: list[Member] | None) -> Any:
    if members is None:
        return {}
    return {
        "presence": {
            "ids": [m.id for m in members],
            "hash": {m.id: m.info for m in members},
            "count": len(members),
        }
    }


@attr.s(frozen=True, auto_attribs=True)
class PusherDoorSettings:
    """
    What the Pusher door (WebSocket and HTTP API) needs from the daemon's
    settings (built by C{pushie.tap}).

    @ivar activity_timeout: seconds of silence before the server sends C{pusher:ping}
        (C{pusher_activity_timeout}; also told to the client).
    @ivar pong_timeout: seconds a C{pusher:ping} may wait for its pong (C{pusher_pong_timeout}).
    @ivar client_event_rate: client events a connection may send per second (C{pusher_client_event_rate}).
    @ivar max_data_size: largest event data, in bytes (C{pusher_max_data_size}).
    @ivar max_message_size: largest WebSocket message a client may send, in bytes.
    @ivar max_subscriptions: channels one connection may follow; 0: no limit.
    @ivar require_token: whether every channel needs authorisation (C{require_token}).
    @ivar slow_consumer_buffer: bytes a connection may have waiting before it counts as slow.
    @ivar slow_consumer_grace: seconds a slow connection may stay slow before it is closed.
    """

    activity_timeout: float
    pong_timeout: float
    client_event_rate: float
    max_data_size: int
    max_message_size: int
    max_subscriptions: int = 0
    require_token: bool = False
    slow_consumer_buffer: int = 1 << 20
    slow_consumer_grace: float = 10.0
    subscription_count_interval: float = 5.0
    """Seconds between two C{pusher_internal:subscription_count} of a channel (setting of the same name)."""


class PusherFactory(WebSocketServerFactory, Door):
    """Builds L{PusherProtocol}s; one for every app (the key in the path picks the app)."""

    protocol = PusherProtocol  # type: ignore[assignment]  # Factory's generic protocol type, left unbound by Autobahn's factory
    log = Logger()

    def __init__(
        self,
        context: DoorContext,
        apps: Apps,
        settings: PusherDoorSettings,
        origin_allowed: Callable[[str | None], bool],
        apps_file: AppsFile | None = None,
        webhooks: PusherWebhooks | None = None,
    ) -> None:
        """
        @param apps_file: where C{apps} come from, re-read by L{reload_apps}
            (C{pusher_apps_file}); None: the apps never change.
        @param webhooks: the apps' Pusher-format webhooks (the caller also
            adds them to the Hub's C{webhook_routes}); None: no app has any.
        """
        super().__init__()
        self.take(context)
        self.apps = apps
        self.apps_file = apps_file
        self.app_connections: dict[str, int] = {}
        """Open connections per app id, for C{max_connections}."""
        self.settings = settings
        self.origin_allowed = origin_allowed
        self.connections: dict[PusherProtocol, None] = {}
        # Its own throttle, in this door's log namespace (not the HTTP doors' one of the context).
        self.throttle = Throttle(self.log, context.clock)
        self.webhooks = webhooks
        self.counts = SubscriptionCounts(
            self.hub.subscription_counts, context.clock, settings.subscription_count_interval, webhooks
        )
        # Pusher clients keep connections alive with pusher:ping/pong (see
        # PusherDoor), not with WebSocket pings.
        configure_factory(
            self, max_message_size=settings.max_message_size, ping_interval=0, ping_timeout=0, close_timeout=5.0
        )

    @functools.cached_property
    def frames(self) -> FrameCache:
        """The frames of this turn's publications, shared by every Pusher subscriber."""
        return FrameCache(self.clock)

    def app_refusal(self, app: App) -> tuple[int, str] | None:
        """Why a new connection to C{app} is refused now (disabled, over its quota), if it is."""
        if not app.enabled:
            return (CLOSE_APP_DISABLED, f"App {app.id} is disabled on this server")
        if app.max_connections and self.app_connections.get(app.id, 0) >= app.max_connections:
            return (
                CLOSE_OVER_QUOTA,
                f"App {app.id} is over its connection quota ({app.max_connections} on this server)",
            )
        return None

    def reload_apps(self, force: bool = False) -> bool:
        """
        Look at the apps file (at once with C{force}, as on C{SIGHUP}) and,
        when it holds a new valid list, take it (L{take_apps}).  A bad file
        keeps the apps as they are (L{pushie.files.WatchedFile} logs why).

        @return: whether new apps were taken.
        """
        if self.apps_file is None or not self.apps_file.refresh(force):
            return False
        self.take_apps(self.apps_file.apps)
        return True

    def take_apps(self, apps: list[App]) -> None:
        """
        Serve C{apps} from now on (the HTTP API shares the same L{Apps}).
        Open connections follow their app: those of a removed app (or one
        whose key changed) are closed with 4001, of a disabled one with 4003,
        of one whose channels moved (it became or stopped being the first
        app) with 4200 so that they subscribe again at once; the others see
        the app's new settings (a new secret, rate or quota) from now on.
        Connections over a lowered quota stay; new ones wait below it.
        """
        self.apps.replace(apps)
        if self.webhooks is not None:
            self.webhooks.sync()
        closed: dict[int, int] = {}
        for protocol in list(self.connections):
            old = protocol.app
            if old is None:
                continue
            new = self.apps.by_id(old.id)
            if new is None or new.key != old.key:
                refusal = (CLOSE_UNKNOWN_APP, f"App {old.id} was removed from this server")
            elif not new.enabled:
                refusal = (CLOSE_APP_DISABLED, f"App {old.id} is disabled on this server")
            elif new.primary != old.primary:
                refusal = (CLOSE_RECONNECT, "The app's channels moved on this server; reconnect")
            else:
                protocol.app = new
                continue
            closed[refusal[0]] = closed.get(refusal[0], 0) + 1
            protocol.refuse(*refusal)
        self.log.info(
            "Pusher apps now: {ids}; connections closed: {closed}",
            ids=", ".join(f"{a.id}{'' if a.enabled else ' (disabled)'}" for a in apps) or "none",
            closed=", ".join(f"{n} with {code}" for code, n in sorted(closed.items())) or "none",
        )

    def check_activity(self) -> None:
        now = self.clock.seconds()
        for protocol in list(self.connections):
            protocol.check_activity(now)


class PusherDoor(Service):
    """
    Runs the activity sweep of every Pusher connection while the daemon
    runs, and looks at the apps file (one C{stat}) every second.
    """

    name = "pusher"  # type: ignore[assignment]  # Twisted's Service says `name = None`, documented as str

    def __init__(self, factory: PusherFactory) -> None:
        self.factory = factory
        self._sweep: LoopingCall | None = None
        self._watch: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        factory = self.factory
        interval = max(0.05, min(factory.settings.activity_timeout, factory.settings.pong_timeout) / 4)
        self._sweep = LoopingCall(factory.check_activity)
        self._sweep.clock = factory.clock
        self._sweep.start(interval, now=False)
        if factory.apps_file is not None:
            self._watch = LoopingCall(self._look_at_apps_file)
            self._watch.clock = factory.clock
            self._watch.start(APPS_FILE_INTERVAL, now=False)

    def _look_at_apps_file(self) -> None:
        """One look a second; a failure is logged and the next look happens all the same."""
        try:
            self.factory.reload_apps()
        except Exception:
            self.factory.log.failure("Taking the reloaded Pusher apps failed")

    def stopService(self) -> None:
        super().stopService()
        for call in (self._sweep, self._watch):
            if call is not None and call.running:
                call.stop()
        self._sweep = self._watch = None
        self.factory.counts.stop()
