# -*- test-case-name: tests.test_websocket -*-
"""
What every WebSocket door shares: Autobahn's options set on purpose, the
fan-out write path, the slow-consumer guard, closes with any code, and a
quiet Autobahn log.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol

from pushie.fastwrite import write_now
from pushie.limits import SlowConsumerGuard, address_of

OPEN = WebSocketProtocol.STATE_OPEN
CLOSED = WebSocketProtocol.STATE_CLOSED
_GROUND = WebSocketProtocol.SEND_STATE_GROUND

# Autobahn logs every failed connection as a warning.  Those failures are
# client errors; the doors report them themselves through a throttled log.
QUIET_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009})


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
    call L{guard_writes} once open.
    """

    slow_close_code = 1013
    _guard: SlowConsumerGuard | None = None

    def peer_address(self) -> str:
        return address_of(self.transport.getPeer())

    def guard_writes(self, hub: Any, limit: int, grace: float) -> None:
        """Watch the outgoing buffer: a client that stops reading is dropped, nobody else waits."""
        self._guard = SlowConsumerGuard(hub.reactor, limit, grace, self._slow_consumer)
        transport = self.transport
        # Behind WebSocketResource the HTTP channel is still the transport's
        # producer: we take its place to learn when the buffer is full.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self._guard, True)

    def fast_path_open(self) -> bool:
        """Whether frames may go straight to the socket: no compression, nothing queued in Autobahn."""
        return self._perMessageCompress is None and self.send_state == _GROUND and not self.send_queue

    def send_prepared(self, payload: bytes, frame: bytes) -> None:
        """
        Send one text message whose unmasked frame is C{frame}: straight to
        the socket when nothing else is queued, through Autobahn otherwise.
        """
        if self.fast_path_open():
            self.write_frames(frame)
        else:
            self.sendMessage(payload, isBinary=False)

    def write_frames(self, frames: bytes) -> None:
        """Write ready frames (one or several) on the fast path; see L{fast_path_open}."""
        write_now(self.transport, frames)
        guard = self._guard
        if guard is not None and guard.paused:
            guard.wrote(len(frames))

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Every frame but the fan-out's goes through here: what the Hub
        # dispatched before it (and holds until the end of the turn) must
        # leave before it.
        self.factory.hub.flush()
        super().sendData(data, sync, chopsize)

    def _slow_consumer(self) -> None:
        """Too much is waiting for this client: close and drop it."""
        self.factory.hub.metrics.slow_consumers.inc()
        self.factory.throttle.warn(
            "slow_consumer", "Dropped a slow consumer at {peer} ({code})", peer=self.peer, code=self.slow_close_code
        )
        self.close_with(self.slow_close_code, "slow consumer: too much data waiting")
        self.abort()

    def close_with(self, code: int, reason: str) -> None:
        """Send a close frame with any code (Autobahn's sendClose allows only 1000 and 3000-4999)."""
        if self.state == OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        # Autobahn leaves the closing-handshake timer running when the TCP
        # connection goes first (after a protocol error, say); it would keep
        # this protocol alive for close_timeout seconds.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None

    def closed(self) -> None:
        """Common bookkeeping once the connection is closed (call from onClose)."""
        if self._guard is not None:
            self._guard.cancel()
        if self.failedByMe and self.localCloseCode in QUIET_CLOSE_CODES:
            self.factory.hub.metrics.reject(f"websocket_close_{self.localCloseCode}")
            self.factory.throttle.warn(
                "ws_protocol_error",
                "Closed a WebSocket connection from {peer} with {code}: {reason}",
                peer=self.peer,
                code=self.localCloseCode,
                reason=(self.localCloseReason or b"").decode("utf-8", "replace"),
            )


DoorProtocol.log = _QuietLog(DoorProtocol.log)


def configure_factory(
    factory: WebSocketServerFactory,
    max_message_size: int,
    ping_interval: float,
    ping_timeout: float,
    handshake_timeout: float,
    close_timeout: float,
) -> None:
    """
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
        openHandshakeTimeout=handshake_timeout,
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
