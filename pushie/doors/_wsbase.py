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
  - C{autobahn.util._HAS_CLICK}, turned off, and the names C{hltype},
    C{hlval} and C{pformat} in C{autobahn.websocket.protocol} and
    C{autobahn.twisted.websocket}, made lazy (see below);
  - C{WebSocketServerProtocol._connectionLost}, replaced by its two lines of
    work without the debug line (L{DoorProtocol._connectionLost});
  - the opening handshake's state that C{processHandshake} and
    C{succeedHandshake} set (C{http_*}, C{websocket_*}, C{_wskey},
    C{autoPingPendingCall}, C{is_open}, C{_onOpen}), and the helpers
    C{_url_to_origin}, C{_is_same_origin}, C{_parseExtensionsHeader} and
    C{PERMESSAGE_COMPRESSION_EXTENSION}: L{DoorProtocol.open_handshake}
    answers plain opening handshakes itself (same in Autobahn 24.4.2 and
    26.11.1).
tests/test_fastpath.py, tests/test_wsframes.py and the Autobahn|Testsuite run
(tests/test_conformance.py) check the doors' frames and closes against
Autobahn's own.
"""

from __future__ import annotations

import base64
import hashlib
import pprint
import re
import weakref
from collections import deque
from types import FunctionType
from typing import Any, cast
from urllib.parse import parse_qs

import autobahn.twisted.websocket
import autobahn.util
import autobahn.websocket.protocol
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PERMESSAGE_COMPRESSION_EXTENSION
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol, _is_same_origin, _url_to_origin
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from pushie._fastwrite import write_now
from pushie.limits import SlowConsumerWatch, address_of
from pushie.wire import text_frame

CONNECTING = WebSocketProtocol.STATE_CONNECTING
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

# What DoorProtocol.open_handshake takes as it is.  Anything else (a header
# line that is not a token, a colon and printable ASCII; control characters
# or bytes past ASCII anywhere; a fragment) goes to Autobahn's own
# processHandshake, whose parser differs between Autobahn versions on such
# input: its answer stays the one of the version installed.
_PLAIN_HEADER = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e]*?)[ \t]*")
_PLAIN_TARGET = re.compile(r"[\x21-\x22\x24-\x7e]+")  # printable, no "#"
_KEY_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
_WS_MAGIC = WebSocketProtocol._WS_MAGIC


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
    _corked: list[bytes] | None = None  # writes held back while opening (see _open)
    query_params: dict[str, list[str]] | None = None
    """The request's query, blank values kept, when L{open_handshake} parsed it (for C{onConnect})."""
    # Autobahn's options, read from the per-factory subclass (configure_factory):
    closeHandshakeTimeout: float | None
    maxConnections: int
    versions: list[int]
    trustXForwardedFor: int
    allowedOriginsPatterns: list[Any]
    perMessageCompressionAccept: Any
    autoPingInterval: float
    openHandshakeTimeout: float
    fast_handshake = False
    """
    Whether L{open_handshake} may answer plain opening handshakes without
    Autobahn's C{processHandshake}.  Only for doors whose C{onConnect}
    answers synchronously (returns or raises, never a Deferred).
    """

    def __init__(self) -> None:
        super().__init__()
        self._guard: SlowConsumerWatch | None = None

    def _connectionMade(self) -> None:
        """
        As Autobahn's (C{WebSocketServerProtocol._connectionMade} and
        C{WebSocketProtocol._connectionMade}, the same from 24.4.2 to
        26.11.1), for a protocol whose options are class attributes
        (L{configure_factory}), without setting the ~35 attributes whose
        value is the class's own here (L{_IDLE_DEFAULTS}: L{shrink} would
        take them out again) and without its debug lines.  The UTF-8
        validator is made when the client's first text frame needs it.
        tests/test_handshake.py compares the result with Autobahn's.
        """
        if self.CONFIG_ATTRS or self.trackTimings or not self.factory.isServer:
            super()._connectionMade()  # not configured by configure_factory: Autobahn's own
            return
        self.trafficStats = TrafficStats()
        self.state = CONNECTING
        self.send_queue = deque()
        self.autoPingPendingCall = None
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )
        self.factory.countConnections += 1

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

    # -- the opening handshake, answered here --------------------------------

    def open_handshake(self, lines: list[bytes], rest: bytes) -> bool:
        """
        Answer an opening handshake whose request line and header lines
        (C{lines}, without their CRLFs) the HTTP channel has already read,
        as Autobahn's C{processHandshake} and C{succeedHandshake} would, and
        open the connection; C{rest} is what came after the header block
        (frames the client sent at once).

        Only a plain request is taken: C{GET}, HTTP/1.1, printable ASCII,
        no repeated header, C{Sec-WebSocket-Version: 13}, a well-formed
        C{Sec-WebSocket-Key}, an Origin Autobahn accepts, no compression
        accepted, and a factory with none of Autobahn's options this path
        leaves out (C{externalPort}, extra C{headers}, C{maxConnections},
        a trusted C{X-Forwarded-For}).  Everything else, every refusal of a
        bad request included, is left untouched for Autobahn (C{False}:
        hand the bytes to C{dataReceived}), so its answers stay exactly its
        own.  Refusals by C{onConnect} are answered here the way Autobahn
        answers them.

        @return: whether the handshake was handled (answered or refused).
        """
        if not self.fast_handshake or self.state != CONNECTING or self.data:
            return False
        factory = self.factory
        if factory.externalPort or factory.headers or self.maxConnections or 13 not in self.versions:
            return False
        try:
            text = b"\r\n".join(lines).decode("ascii")
        except UnicodeDecodeError:
            return False
        raw = text.split("\r\n")
        request_line = raw[0]
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1" or not _PLAIN_TARGET.fullmatch(parts[1]):
            return False
        uri = parts[1]
        path, _, query = uri.partition("?")
        if not path.startswith("/") or ";" in path:
            return False  # not the plain path urlparse would give back as it is
        headers: dict[str, str] = {}
        for line in raw[1:]:
            match = _PLAIN_HEADER.fullmatch(line)
            if match is None:
                return False
            name = match.group(1).lower()
            if name in headers:
                return False
            headers[name] = match.group(2)
        if headers.get("sec-websocket-version") != "13":
            return False
        if self.trustXForwardedFor and "x-forwarded-for" in headers:
            return False
        host = headers.get("host")
        if host is None:
            return False
        if ":" in host and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                int(port.strip())
            except ValueError:
                return False
        if not _has_token(headers.get("upgrade"), "websocket") or not _has_token(headers.get("connection"), "upgrade"):
            return False
        protocols: list[str] = []
        if "sec-websocket-protocol" in headers:
            protocols = [p.strip() for p in headers["sec-websocket-protocol"].split(",")]
            if len(set(protocols)) != len(protocols):
                return False
        origin = headers.get("origin")
        if origin is not None:
            try:
                origin_tuple = _url_to_origin(origin)
            except ValueError:
                return False
            if not (origin_tuple == "null" and factory.allowNullOrigin) and not _is_same_origin(
                origin_tuple,
                "https" if factory.isSecure else "http",
                factory.externalPort or factory.port,
                self.allowedOriginsPatterns,
            ):
                return False
        key = headers.get("sec-websocket-key")
        if key is None or len(key) != 24 or key[-2:] != "==" or not _KEY_ALPHABET.issuperset(key[:-2]):
            return False
        extensions: list[Any] = []
        if "sec-websocket-extensions" in headers:
            try:
                extensions = self._parseExtensionsHeader(headers["sec-websocket-extensions"])
                offers = [
                    cast(Any, PERMESSAGE_COMPRESSION_EXTENSION[name]["Offer"]).parse(params)
                    for name, params in extensions
                    if name in PERMESSAGE_COMPRESSION_EXTENSION
                ]
            except Exception:
                return False  # Autobahn refuses it, in its own words
            if offers and self.perMessageCompressionAccept(offers) is not None:
                return False  # compression accepted: Autobahn sets it up
        # The request is one Autobahn would accept and pass to onConnect:
        # from here on this path answers.
        # Blank values kept (a door refuses `channel=`); Autobahn's params leave them out.
        self.query_params = parse_qs(query, keep_blank_values=True)
        params = {name: kept for name, values in self.query_params.items() if (kept := [v for v in values if v])}
        self.http_status_line = request_line
        self.http_headers = headers
        self.http_request_uri = uri
        self.http_request_path = path
        self.http_request_params = params
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = protocols
        self.websocket_origin = origin if origin is not None else ""
        self.websocket_extensions = extensions
        self.data = rest
        self._wskey = key
        request = ConnectionRequest(
            self.peer, headers, host, path, params, 13, self.websocket_origin, protocols, extensions
        )
        try:
            answer = self.onConnect(request)
        except ConnectionDeny as e:
            self.failHandshake(e.reason, e.code)
            return True
        except Exception as e:
            self.log.failure("Unexpected exception in onConnect", Failure())
            self.failHandshake(f"Internal server error: {e}", ConnectionDeny.INTERNAL_SERVER_ERROR)
            return True
        if answer is not None:
            self.succeedHandshake(answer)  # a subprotocol, or headers: Autobahn's own answer
            return True
        self._open(key)
        return True

    def _open(self, key: str) -> None:
        """Send the 101 and open, as Autobahn's succeedHandshake does for C{onConnect} returning None."""
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_MAGIC).digest())
        server = self.factory.server
        head = (
            b"HTTP/1.1 101 Switching Protocols\r\nServer: %s\r\n" % server.encode("utf-8")
            if server
            else (b"HTTP/1.1 101 Switching Protocols\r\n")
        )
        self.websocket_extensions_in_use = []
        self.factory.hub.flush()  # as sendData would
        # The 101 and what onOpen sends (welcome, subscribed) leave in one
        # send, straight to the socket, once onOpen is done (see _uncork).
        self._corked = [
            head + b"Upgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
        ]
        self.state = OPEN
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        self.inside_message = False
        self.current_frame = None  # type: ignore[assignment]  # Autobahn's own "no frame"
        if self.autoPingInterval:
            self.autoPingPendingCall = self.factory._batched_timer.call_later(self.autoPingInterval, self._sendAutoPing)
        if self.trackedTimings:
            self.trackedTimings.track("onOpen")
        try:
            self._onOpen()
        except Exception:
            # As under Autobahn, whose succeedHandshake runs as a callback: logged, the connection stays.
            self.log.failure("onOpen failed", Failure())
        finally:
            self._uncork()
        cast(Any, txaio).resolve(self.is_open, None)
        if self.data:
            self.consumeData()

    def _uncork(self) -> None:
        """Write what was held back while opening (see L{_open}) in one piece."""
        held = self.__dict__.pop("_corked", None)
        if held and self.transport is not None:
            write_now(self.transport, b"".join(held))

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
            self.write_frames(frame)
        else:
            self.sendData(frame)

    def write_frames(self, frames: bytes) -> None:
        """Write ready frames (one or several) on the fast path; see L{fast_path_open}."""
        if self._corked is not None:
            self._corked.append(frames)
            return
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
        corked = self._corked
        if corked is not None:
            if not (sync or chopsize):
                corked.append(data)
                return
            self._uncork()
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
        self.__dict__.pop("_corked", None)  # dropped anyway
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
        if self._corked is not None:
            self._uncork()
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
        # Autobahn fires is_closed with the protocol itself, a reference
        # cycle (protocol -> Deferred -> protocol) that only the garbage
        # collector frees, with the transport and everything else this
        # connection held: with many short connections that was ~10 % of a
        # handshake's CPU in collections (bench/PROFILES.md).  A weak proxy
        # is the same protocol for whoever still holds it.
        closed = self.is_closed
        if closed.called and closed.result is self:
            closed.result = weakref.proxy(self)

    def closed(self) -> None:
        """Common bookkeeping once the connection is closed (call from onClose)."""
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None  # it holds a method of this protocol: a reference cycle
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


def _has_token(value: str | None, token: str) -> bool:
    """Whether a comma-separated header value holds C{token} (case-insensitive), as Autobahn checks it."""
    return value is not None and any(part.strip().lower() == token for part in value.split(","))


# Autobahn builds the arguments of its debug lines whether or not debug is
# logged: on every connection made and lost, every frame sent outside the
# fan-out path (answers, pings) and every handshake, hltype()/hlval() colour
# names with click.style when click happens to be importable (a development
# dependency pulls it in).  That was ~5 % of a handshake's CPU in py-spy
# (bench/PROFILES.md).  Plain text does for a log nobody reads in colour.
if getattr(autobahn.util, "_HAS_CLICK", False):
    autobahn.util._HAS_CLICK = False


class _LazyText:
    """A debug line's argument, rendered only if the line is written."""

    __slots__ = ("_render", "_args", "_kwargs")

    def __init__(self, render: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._render, self._args, self._kwargs = render, args, kwargs

    def __str__(self) -> str:
        return str(self._render(*self._args, **self._kwargs))

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _lazy(render: Any) -> Any:
    def lazy(*args: Any, **kwargs: Any) -> _LazyText:
        return _LazyText(render, args, kwargs)

    return lazy


def _pformat(value: Any, *args: Any, **kwargs: Any) -> str:
    # pprint.pformat of an empty container is its repr; Autobahn pretty-prints
    # the (empty, see configure_factory) list of per-connection options for a
    # debug line on every connection.
    if not value and type(value) in (list, tuple, dict):
        return repr(value)
    return pprint.pformat(value, *args, **kwargs)


# The rest of that cost: hltype() and hlval() still build the qualified names
# and texts of ~10 debug lines per connection (only ever passed as a debug
# line's keyword arguments in these two modules); pformat() an empty list.
for _module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
    for _name in ("hltype", "hlval"):
        if getattr(_module, _name, None) is getattr(autobahn.util, _name):
            setattr(_module, _name, _lazy(getattr(autobahn.util, _name)))
if getattr(autobahn.websocket.protocol, "pformat", None) is pprint.pformat:
    setattr(autobahn.websocket.protocol, "pformat", _pformat)  # noqa: B010  # typeshed's signature


class _FirstUse:
    """A per-connection attribute made when first read (a non-data descriptor: the instance's value wins after)."""

    def __init__(self, make: Any) -> None:
        self._make = make

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._make()
        return value


_validator = _FirstUse(Utf8Validator)
_validator.__set_name__(DoorProtocol, "utf8validator")
DoorProtocol.utf8validator = _validator  # type: ignore[assignment]  # Autobahn's attribute, made on first use
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
