# -*- test-case-name: tests.test_fastpath -*-
"""
What every WebSocket door (Pushie's own, the Pusher door) shares: Autobahn's
options set on purpose, the fan-out write path, the slow-consumer guard,
closes with any code, a quiet Autobahn log, and the per-connection memory
savings.

Private internals used (checked against Autobahn 26.11.1 and Twisted 26.10.0,
the versions the test suite runs on; pyproject.toml allows autobahn>=24.4,<27):
  - Autobahn's protocol state: C{send_state}, C{send_queue}, C{triggered},
    C{_perMessageCompress}, C{trackedTimings}, C{current_frame} and the ~30
    other per-connection attributes listed in C{_IDLE_DEFAULTS}, which are
    taken out of each instance's C{__dict__} and read from class attributes
    while they keep their idle values;
  - its options, read from a per-factory subclass (L{configure_factory})
    instead of being copied onto every protocol;
  - the write path of L{pushie._fastwrite} (twisted.internet.tcp internals);
  - C{autobahn.util._HAS_CLICK}, turned off (see below);
  - C{WebSocketServerProtocol._connectionLost}, replaced by its two lines of
    work without the debug line (L{DoorProtocol._connectionLost}).
tests/test_fastpath.py, tests/test_wsframes.py and the Autobahn|Testsuite run
(tests/test_conformance.py) check the doors' frames and closes against
Autobahn's own.
"""

from __future__ import annotations

from collections import deque
from types import FunctionType
from typing import Any, cast

import autobahn.util
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from pushie._fastwrite import write_now
from pushie.limits import SlowConsumerWatch, address_of
from pushie.wire import text_frame

OPEN = WebSocketProtocol.STATE_OPEN
CLOSING = WebSocketProtocol.STATE_CLOSING
CLOSED = WebSocketProtocol.STATE_CLOSED

SERVER_NAME = "Pushie"
"""The C{Server} header of every answer: no library names or versions (they help only an attacker)."""
_GROUND = WebSocketProtocol.SEND_STATE_GROUND

# Autobahn logs every failed connection as a warning.  Those failures are
# client errors; the doors report them themselves through a throttled log.
QUIET_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009})

# Per-connection memory.  Autobahn keeps ~90 attributes in each protocol's
# __dict__ (a 3.3 KB hash table alone).  Its options live on a per-factory
# subclass instead (configure_factory), what only the opening handshake
# needs is dropped once open, and the state that is the same for every idle
# connection is read from these class attributes until it changes: an
# attribute is only left out of an instance when its value is this very
# object, so reads see exactly what Autobahn set.
_IDLE_DEFAULTS: dict[str, Any] = {
    name: None
    for name in (
        "wasNotCleanReason", "localCloseCode", "localCloseReason", "remoteCloseCode", "remoteCloseReason",
        "openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending",
        "autoPingPendingSent", "trackedTimings", "current_frame", "websocket_protocol_in_use",
        "_perMessageCompress",
    )
}  # fmt: skip
_IDLE_DEFAULTS.update(
    {
        name: False
        for name in (
            "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded", "closedByMe", "failedByMe",
            "droppedByMe", "wasClean", "wasServerConnectionDropTimeout", "wasOpenHandshakeTimeout",
            "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile", "triggered", "inside_message",
        )
    }
)  # fmt: skip
_IDLE_DEFAULTS.update(autoPingPendingSeq=0, send_state=_GROUND, data=b"")
_HANDSHAKE_ONLY = (
    "http_request_data", "http_status_line", "http_headers", "http_request_params", "http_response_data",
    "_wskey", "websocket_protocols", "websocket_extensions",
)  # fmt: skip
_NO_QUEUE: Any = ()  # Autobahn's send queue while nothing is queued (see sendData)


class _QuietLog:
    """
    Autobahn's per-protocol logger, with its warnings about failed
    connections turned into debug messages (we log those, throttled).
    """

    def __init__(self, log: Any) -> None:
        self._log = log

    def warn(self, *args: Any, **kwargs: Any) -> None:
        self._log.debug(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class DoorProtocol(WebSocketServerProtocol):
    """
    A server connection of a door.  Subclasses set C{slow_close_code} and
    C{shutdown_close}, call L{watch_writes} and then L{shrink} once open, and
    L{closed} from onClose.
    The factory must have C{hub}, C{throttle}, C{clock} and C{metrics}.
    """

    __slots__ = ("_guard",)
    slow_close_code = 1013
    shutdown_close: tuple[int, str] = (1001, "server shutting down")
    """The close code and reason a connection gets when the daemon stops."""
    deny_reasons: frozenset[str] = frozenset()
    """The fixed texts a door's onConnect refuses with; any other refusal gets the status's standard phrase."""
    _drain_call: Any = None
    closeHandshakeTimeout: float | None  # one of Autobahn's options, copied from the factory

    def __init__(self) -> None:
        super().__init__()
        self._guard: SlowConsumerWatch | None = None

    def peer_address(self) -> str:
        assert self.transport is not None  # asked only while connected
        return address_of(self.transport.getPeer())

    def watch_writes(self, clock: Any, limit: int, grace: float) -> None:
        """Watch the outgoing buffer: a client that stops reading is dropped, nobody else waits."""
        self._guard = SlowConsumerWatch(clock, limit, grace, self._slow_consumer)
        transport = cast(IConsumer, self.transport)  # tcp.Server or TLS: both are consumers
        # Behind WebSocketResource the HTTP channel is still the transport's
        # producer: we take its place to learn when the buffer is full.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self._guard, True)

    def shrink(self) -> None:
        """Leave out of this connection's __dict__ what an idle open connection need not hold (see _IDLE_DEFAULTS)."""
        state = self.__dict__
        for name in _HANDSHAKE_ONLY:
            state.pop(name, None)
        for name, value in _IDLE_DEFAULTS.items():
            if state.get(name, state) is value:
                del state[name]
        if self.send_queue is not None and not self.send_queue and not self.triggered:
            self.send_queue = _NO_QUEUE  # a deque is 600 bytes; sendData makes one when needed
        # A dict never shrinks by itself: a copy is sized for what is left.
        self.__dict__ = dict(state.items())

    # -- sending ---------------------------------------------------------

    def fast_path_open(self) -> bool:
        """Whether frames may go straight to the socket: no compression, nothing queued in Autobahn."""
        return self._perMessageCompress is None and self.send_state == _GROUND and not self.send_queue

    def send_text(self, payload: bytes) -> None:
        """
        Send one server text message (an answer, an error, a C{subscribed}
        frame with its member list), of any size.

        Not Autobahn's sendMessage: that applies C{maxMessagePayloadSize},
        the limit on what a I{client} may send, to outgoing messages too, and
        raises past it.  What the server sends is bounded by what it builds
        (presence by C{presence_max_members}); what waits for a client that
        does not read is bounded by the slow-consumer guard, which counts
        every byte written here.
        """
        if self.state != OPEN:
            return
        # What the Hub dispatched before (and holds until the end of the
        # turn) must leave first.
        self.factory.hub.flush()
        if self.state == OPEN:
            self.send_prepared(payload, text_frame(payload))

    def send_prepared(self, payload: bytes, frame: bytes) -> None:
        """
        Send one text message whose unmasked frame is C{frame}: straight to
        the socket when nothing else is queued, behind Autobahn's queue
        otherwise (as its sendFrame would, with no size check).
        """
        if self._perMessageCompress is None and self.send_state == _GROUND and not self.send_queue:
            guard = self._guard
            if guard is None or not guard.paused:
                write_now(self.transport, frame)  # write_frames, with nothing to count
            else:
                self.write_frames(frame)
        else:
            self.sendData(frame)

    def write_frames(self, frames: bytes) -> None:
        """Write ready frames (one or several) on the fast path; see L{fast_path_open}."""
        guard = self._guard
        # Only what is written once the buffer is already full counts: the
        # write that fills it (one frame, however large) is the transport's
        # own share, the 64 KiB it buffers before pausing us.
        counted = guard is not None and guard.paused
        write_now(self.transport, frames)
        if counted:
            guard.wrote(len(frames))  # type: ignore[union-attr]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Every frame but the fan-out's goes through here (answers, errors,
        # pongs, closes): what the Hub dispatched before it (and holds until
        # the end of the turn) must leave before it, and it counts against
        # the slow-consumer budget like a publication.
        self.factory.hub.flush()
        if (sync or chopsize) and self.send_queue is _NO_QUEUE:
            self.send_queue = deque()
        guard = self._guard
        counted = guard is not None and guard.paused
        super().sendData(data, sync, chopsize)
        if counted:
            guard.wrote(len(data))  # type: ignore[union-attr]

    def _slow_consumer(self) -> None:
        """Too much is waiting for this client: close and drop it."""
        self.factory.metrics.slow_consumers.inc()
        self.factory.throttle.warn(
            "slow_consumer", "Dropped a slow consumer at {peer} ({code})", peer=self.peer, code=self.slow_close_code
        )
        self.close_with(self.slow_close_code, "slow consumer: too much data waiting")
        self.abort()

    # -- handshake refusals ----------------------------------------------

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """
        Refuse the opening handshake with a status line that carries no
        client input: Autobahn's own refusals quote the request line or the
        C{Upgrade} value, and an unexpected error its exception text.
        """
        if reason not in self.deny_reasons:
            self.log.debug("Refused a WebSocket handshake: {reason}", reason=reason)
            reason = RESPONSES.get(code, b"Refused").decode("ascii")
        super().failHandshake(reason, code, responseHeaders)

    # -- closing ---------------------------------------------------------

    def close_with(self, code: int, reason: str) -> None:
        """Send a close frame with any code (Autobahn's sendClose allows only 1000 and 3000-4999)."""
        if self.state == OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def close_for_shutdown(self) -> None:
        """Close with C{shutdown_close} (the Hub drains the doors on stop); a connection not yet open is dropped."""
        if self.state == OPEN:
            self.close_with(*self.shutdown_close)
        elif self.state != CLOSED:
            self.dropConnection(abort=True)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport's; TLS has it too

    def dropConnection(self, abort: bool = False) -> None:
        """
        As Autobahn's, except right after a protocol error found in a
        client's close frame (an invalid code, a 1-byte payload).

        Autobahn then answers with a 1002 close frame and, taking the
        client's frame for the reply to it, aborts at once: the abort
        throws away the 1002 frame still in the transport's buffer and the
        client sees a TCP reset.  Here the buffer is flushed first (a
        normal close), within C{closeHandshakeTimeout} seconds.
        """
        if abort and self.wasClean and self.failedByMe and self.state == CLOSING and self.transport is not None:
            super().dropConnection(abort=False)
            if self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]  # tcp's
                delay = self.closeHandshakeTimeout or 5.0
                self._drain_call = self.factory.clock.callLater(delay, self.abort)
            return
        super().dropConnection(abort)

    def _connectionLost(self, reason: Failure) -> None:  # type: ignore[override]  # Autobahn annotates str
        # As WebSocketServerProtocol's, without its debug line: that formats
        # the Failure (str(), the class's qualified name) for every closed
        # connection whether or not debug is logged, ~3.5 % of a handshake's
        # CPU in py-spy (bench/PROFILES.md).
        WebSocketProtocol._connectionLost(self, reason)  # type: ignore[arg-type]
        self.factory.countConnections -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        # Autobahn leaves the closing-handshake timer running when the TCP
        # connection goes first (after a protocol error, say); it would keep
        # this protocol alive for close_timeout seconds.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if self._drain_call is not None:
            if self._drain_call.active():
                self._drain_call.cancel()
            self._drain_call = None

    def closed(self) -> None:
        """Common bookkeeping once the connection is closed (call from onClose)."""
        if self._guard is not None:
            self._guard.cancel()
        if self.failedByMe and self.localCloseCode in QUIET_CLOSE_CODES:
            self.factory.metrics.reject(f"websocket_close_{self.localCloseCode}")
            self.factory.throttle.warn(
                "ws_protocol_error",
                "Closed a WebSocket connection from {peer} with {code}: {reason}",
                peer=self.peer,
                code=self.localCloseCode,
                reason=(self.localCloseReason or b"").decode("utf-8", "replace"),
            )


DoorProtocol.log = _QuietLog(DoorProtocol.log)

# Autobahn builds the arguments of its debug lines whether or not debug is
# logged: on every connection made and lost, every frame sent outside the
# fan-out path (answers, pings) and every handshake, hltype()/hlval() colour
# names with click.style when click happens to be importable (a development
# dependency pulls it in).  That was ~5 % of a handshake's CPU in py-spy
# (bench/PROFILES.md).  Plain text does for a log nobody reads in colour.
if getattr(autobahn.util, "_HAS_CLICK", False):
    autobahn.util._HAS_CLICK = False
for _name, _value in _IDLE_DEFAULTS.items():
    setattr(DoorProtocol, _name, _value)
for _name in _HANDSHAKE_ONLY:
    setattr(DoorProtocol, _name, None)


def configure_factory(
    factory: WebSocketServerFactory,
    max_message_size: int,
    ping_interval: float,
    ping_timeout: float,
    close_timeout: float,
) -> None:
    """
    Set a door factory's Autobahn options, and give it a protocol subclass
    that holds them.

    Autobahn's defaults are unlimited sizes, no heartbeats, an HTML status
    page on plain GETs and failing by dropping TCP without a close frame.
    Every one of them is set here on purpose.
    """
    factory.setProtocolOptions(
        webStatus=False,
        maxFramePayloadSize=max_message_size,
        maxMessagePayloadSize=max_message_size,
        autoFragmentSize=0,
        failByDrop=False,
        # The whole opening request has arrived (within the site's
        # handshake_timeout) before Autobahn sees it, and onConnect answers
        # at once: Autobahn's own timer would be armed and cancelled in the
        # same call, for every connection.
        openHandshakeTimeout=0,
        closeHandshakeTimeout=close_timeout,
        autoPingInterval=ping_interval,
        autoPingTimeout=ping_timeout,
        autoPingSize=12,
        requireMaskedClientFrames=True,
        maskServerFrames=False,
        utf8validateIncoming=True,
        echoCloseCodeReason=False,
        tcpNoDelay=True,
        perMessageCompressionAccept=lambda offers: None,
        # Origins are checked by the doors (403, and "null" only when no
        # allow-list is set); Autobahn's own check would answer 400.
        allowedOrigins=["*"],
        allowNullOrigin=True,
    )
    # Autobahn's default is "AutobahnPython/<version>", in every 101 answer.
    factory.server = SERVER_NAME
    # Autobahn copies each of its ~30 options from the factory onto every
    # connection (and pretty-prints them for a debug log): as class
    # attributes of a subclass made for this factory they are shared.
    base = factory.protocol
    options = {name: getattr(factory, name) for name in base.CONFIG_ATTRS}
    for name, value in options.items():
        if isinstance(value, FunctionType):  # a callable option must not become a method
            options[name] = staticmethod(value)
    shared = type(base.__name__, (base,), {**options, "CONFIG_ATTRS": ()})
    factory.protocol = cast(type[WebSocketServerProtocol], shared)
