# -*- test-case-name: tests.test_publish -*-
"""
The hand-written HTTP channel: request parsing and answers for the short
paths (C{POST /publish}, WebSocket opening handshakes) and the site that
uses it.  The resource tree is built in L{pushie.doors.tree}.

Private internals used (checked against Twisted 26.10.0, the version the test
suite runs on; pyproject.toml allows Twisted>=24.7,<27):
  - C{twisted.web.http._GenericHTTPChannelProtocol} (the site's protocol
    factory wraps L{PushieHTTPChannel} in it, as twisted.web's own does);
  - C{twisted.web.http_headers._nameEncoder} (header name canonicalisation);
  - C{HTTPChannel} state: C{_buffer} (LineReceiver), C{_dataBuffer},
    C{_handlingRequest}, C{_waitingForTransport}, C{_networkProducer},
    C{_savedTimeOut}, C{_abortingCall}, the name-mangled
    C{_HTTPChannel__first_line}, and the hooks C{_maybeChooseTransferDecoder},
    C{_failChooseTransferDecoder}, C{_respondToBadRequestAndDisconnect};
  - C{Request._disconnected} (mirrored by L{FastPublishRequest});
  - C{twisted.protocols.haproxy._wrapper.HAProxyProtocolWrapper} and its
    C{_proxyInfo} (None until the PROXY header is parsed), to learn when a
    C{haproxy:} endpoint's connection knows its client's address.
tests/test_publish_path.py compares the short paths byte for byte with
twisted.web's own answers; tests/test_hostile_input.py sends them bad input.

L{PushieRequest} enforces the body size limit while the body arrives:
twisted.web would otherwise buffer any body whole before a resource runs.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, _GenericHTTPChannelProtocol, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from pushie._fastwrite import write_now
from pushie.doors._wsbase import SERVER_NAME
from pushie.doors.api import write_error
from pushie.errors import PushieError
from pushie.limits import AWAITING_PROXY_HEADER, ConnectionLimits, address_of
from pushie.logs import Throttle
from pushie.metrics import Metrics

SERVER_HEADER = SERVER_NAME.encode("ascii")
"""Every HTTP answer's C{Server}: not twisted.web's C{TwistedWeb/<version>} (a version only helps an attacker)."""

log = Logger()

LINGER = 2.0
"""Seconds a closed HTTP connection keeps reading (and discarding) what the client still sends."""


class PushieRequest(Request):
    """
    A request that refuses bodies over the site's C{max_body_size} with a JSON
    413, counting bytes as they arrive and keeping none past the limit.
    """

    body_too_large = False
    _body_size = 0
    channel: PushieHTTPChannel
    # Twisted declares `content = None` on Request but documents and uses a binary file.
    content: io.BytesIO  # type: ignore[assignment]

    def _limit(self) -> int:
        return self.channel.site.max_body_size

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

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # twisted.web's process() sets its own Server header first thing.
        if name == b"Server":
            value = SERVER_HEADER
        super().setHeader(name, value)

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

# A header line the short publish path takes as it is: a token name, a value
# with no control characters twisted.web refuses (anything else: twisted.web).
_SIMPLE_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n]*?)[ \t]*\Z")
# Headers whose meaning the short path does not implement: twisted.web's way.
_PUBLISH_NEEDS_TWISTED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_PUBLISH_LINE = b"POST /publish HTTP/1.1"

KNOWN_HEADER_BLOCKS = 256
"""Header blocks of C{POST /publish} requests whose reading a site keeps (all forgotten when it is full)."""

# A Content-Length of more digits is refused (400) before anything reads it as
# a number: no body that large is accepted anyway.
MAX_CONTENT_LENGTH_DIGITS = 18
REQUEST_TIMEOUT = PushieError(
    408, "request_timeout", "the request (line, headers and body) did not arrive whole in time (handshake_timeout)"
)
BAD_HTTP_REQUEST = PushieError(
    400, "bad_request", "the request is not valid HTTP/1.1 (request line, header or length); see RFC 9112"
)

_date_second = -1
_date_value = b""


def _http_date() -> bytes:
    """C{datetimeToString()}, formatted once per second."""
    global _date_second, _date_value
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date_value = datetimeToString(second)
        _date_second = second
    return _date_value


_header_names: dict[bytes, bytes] = {}


def _header_name(name: bytes) -> bytes:
    """
    C{name} in Header-Case, exactly as Twisted's own Request writes it. Asked of the public L{Headers} API
    (Twisted's encoder is private and moved between 24.7 and 24.10) and cached: only pushie's code names
    headers, so the cache stays a handful of entries (capped anyway).
    """
    canonical = _header_names.get(name)
    if canonical is None:
        headers = Headers()
        headers.setRawHeaders(name, [b""])
        canonical = next(iter(headers.getAllRawHeaders()))[0]
        if len(_header_names) < 256:
            _header_names[name] = canonical
    return canonical


_answer_second = -1
_answer_head = b""


def _json_answer_head() -> bytes:
    """
    The headers of every JSON answer on the short path, after the status
    line and the C{Connection: close} of a closing connection, up to the
    C{Content-Length} value: as L{FastPublishRequest.finish} writes them
    for L{pushie.doors.api.write_json}.  Built once per second (the C{Date}).
    """
    global _answer_second, _answer_head
    date = _http_date()
    if _date_second != _answer_second:
        _answer_head = (
            b"Server: %s\r\nDate: %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: "
            % (SERVER_HEADER, date)
        )
        _answer_second = _date_second
    return _answer_head


class FastPublishRequest:
    """
    The part of L{twisted.web.server.Request} that C{PublishResource.render_POST}
    and L{pushie.doors.api.write_json} use, for a C{POST /publish} taken by
    L{PushieHTTPChannel}'s short path.  The answer is the bytes twisted.web
    would write (status line, C{Server}, C{Date}, then the headers in the order
    they were set), written at once in one piece.
    """

    method = b"POST"
    path = uri = b"/publish"
    clientproto = b"HTTP/1.1"
    finished = False
    _disconnected = False
    code = 200
    _response_headers: dict[bytes, bytes] | None = None

    def __init__(self, channel: PushieHTTPChannel, headers: dict[bytes, bytes], body: bytes) -> None:
        self.channel = channel
        self._request_headers = headers
        self.content = io.BytesIO(body)
        self._close = not channel.persistent
        self._body: list[bytes] = []

    @property
    def responseHeaders(self) -> dict[bytes, bytes]:  # noqa: N802  (twisted.web's name)
        """The answer's headers so far (built on first use: L{answer_json} needs none)."""
        headers = self._response_headers
        if headers is None:
            headers = self._response_headers = {b"Connection": b"close"} if self._close else {}
            headers[b"Server"] = SERVER_HEADER
            headers[b"Date"] = _http_date()
        return headers

    def getHeader(self, name: bytes) -> bytes | None:
        return self._request_headers.get(name.lower())

    def getClientAddress(self) -> Any:
        return self.channel.transport.getPeer()  # type: ignore[union-attr]

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders[_header_name(name)] = value

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def answer_json(self, status: int, body: bytes) -> None:
        """
        C{write_json(self, status, body)} with no extra headers, in one
        formatting: the same bytes as L{setResponseCode}, the three
        L{setHeader} calls, L{write} and L{finish} would write.
        """
        if self._response_headers is not None or self._body:
            # Something was set already: the general way keeps its order.
            self.setResponseCode(status)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"cache-control", b"no-store")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return
        self.code = status
        self.finished = True
        if self._disconnected:
            return
        self.channel._fast_finished(
            self,
            b"HTTP/1.1 %d %s\r\n%s%s%d\r\n\r\n%s"
            % (
                status,
                RESPONSES.get(status, b"Unknown Status"),
                b"Connection: close\r\n" if self._close else b"",
                _json_answer_head(),
                len(body),
                body,
            ),
        )

    def finish(self) -> None:
        self.finished = True
        if self._disconnected:
            return
        headers = self.responseHeaders
        if b"Content-Length" not in headers:
            # write_json always sets it; anything else would need chunking.
            raise RuntimeError("FastPublishRequest answers need a Content-Length")
        out = [b"HTTP/1.1 %d %s\r\n" % (self.code, RESPONSES.get(self.code, b"Unknown Status"))]
        for name, value in headers.items():
            out.append(b"%s: %s\r\n" % (name, value))
        out.append(b"\r\n")
        out.extend(self._body)
        self.channel._fast_finished(self, b"".join(out))


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

    site: PushieSite  # set by Site.buildProtocol, not declared by HTTPChannel
    _upgrade: list[bytes] | None = None
    _upgrade_size = 0
    # The short publish path: header lines so far, then the request being answered.
    fast_publish = True
    _publish: list[bytes] | None = None
    _publish_headers: dict[bytes, bytes] | None = None
    _publish_body: list[bytes] | None = None
    _publish_left = 0
    _fast_request: FastPublishRequest | None = None
    _fast_sync = False
    # The request deadline: armed at accept and after each answer on a kept-alive
    # connection; a whole request (line, headers, body) disarms it.  The short
    # publish path keeps one timer per connection and moves it on (a cheap
    # DelayedCall.reset) instead of a new one per request.
    _deadline: Any = None
    _awaiting = False  # a request is due before the deadline
    _address = "local"
    _pending = False  # counted by the site's limits as pending
    # A lingering close (see loseConnection): the write side is shut, input is discarded.
    _lingering = False
    _linger_call: Any = None
    _got_bytes = False
    _awaiting_proxy_header = False  # a haproxy: endpoint's connection, before its PROXY header

    # -- the request deadline and the pending count ----------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        assert transport is not None
        if isinstance(transport, HAProxyProtocolWrapper) and transport._proxyInfo is None:
            # A haproxy: endpoint: the client's address comes in the PROXY
            # header, with the first bytes; until then getPeer() is the load
            # balancer's.  Counted in the daemon's total only, so that a burst
            # of connections from the proxy is never refused for its address.
            self._awaiting_proxy_header = True
            admitted = self._admit(AWAITING_PROXY_HEADER, check_address=False)
        else:
            admitted = self._admit(address_of(transport.getPeer()))
        if admitted:
            self._arm_deadline()

    def _admit(self, address: str, check_address: bool = True) -> bool:
        """
        Count the connection as pending from C{address}; past the limits,
        answer with the refusal and close.  Whether it was admitted.
        """
        self._address = address
        limits = getattr(self.site, "limits", None)
        if limits is None:
            return True
        try:
            limits.accept(address, check_address=check_address)
        except PushieError as e:
            self.site.refused(e, self.transport.getPeer())  # type: ignore[union-attr]
            self._answer_and_close(e)
            return False
        self._pending = True
        return True

    def loseConnection(self) -> None:
        """
        Close after the answers written so far, lingering (RFC 9112 §9.6): a
        client may still be sending (the rest of a body over the limit,
        pipelined requests after a C{Connection: close} one), and a socket
        closed with unread bytes sends a reset, which can destroy the answer
        in the client's buffers before it reads it: a 413 or 400 would arrive
        as a dropped connection.  So the write side is shut first (the client
        reads the answer, then end of file), what still arrives is discarded,
        and the connection is closed once the client closes, or after
        L{LINGER} seconds at most.  TLS and wrapped transports close at once,
        and so does a connection closed for its deadline or a limit
        (L{timeoutConnection}).
        """
        transport = self.transport
        if self._lingering or not isinstance(transport, FileDescriptor) or transport.disconnecting:
            super().loseConnection()
            return
        self._lingering = True
        # Nothing after the answer is parsed: not the rest of what arrived
        # with it (twisted.web's line loop stops only for a transport that
        # is disconnecting, which a half-closed one is not), nor what comes.
        self.clearLineBuffer()
        self.setTimeout(None)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._awaiting = False
        self._linger_call = self.callLater(LINGER, self._linger_over)
        transport.loseWriteConnection()

    def _linger_over(self) -> None:
        self._linger_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # tcp and unix transports have it

    def dataReceived(self, data: bytes) -> None:
        if self._lingering:
            return  # the answer is written and the write side shut: what comes now is discarded
        if self._awaiting_proxy_header:
            # The wrapper hands on bytes only once the header is parsed: the
            # connection now counts for its client's address (or is refused).
            self._awaiting_proxy_header = False
            if self._pending:
                self._pending = False
                assert self.site.limits is not None
                self.site.limits.settled(self._address)
            if not self._admit(address_of(self.transport.getPeer())):  # type: ignore[union-attr]
                return
        self._got_bytes = True
        super().dataReceived(data)

    def _arm_deadline(self) -> None:
        """A request must now arrive whole within the site's timeout; until then the connection is pending."""
        timeout = self.site.timeOut
        if not timeout or self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # not in ITransport
            return
        self._got_bytes = False
        self._awaiting = True
        deadline = self._deadline
        if deadline is not None and deadline.active():
            deadline.reset(timeout)
        else:
            self._deadline = self.callLater(timeout, self._request_too_slow)
        if not self._pending:
            limits = getattr(self.site, "limits", None)
            if limits is not None:
                limits.pend(self._address)
                self._pending = True

    def _request_complete(self, keep_timer: bool = False) -> None:
        """
        A whole request is here: no deadline, no longer pending (the Hub
        counts what it becomes).  C{keep_timer}: leave the timer to be moved
        on for the next request (it does nothing if it fires meanwhile).
        """
        self._awaiting = False
        if not keep_timer and self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        if self._pending:
            self._pending = False
            assert self.site.limits is not None  # only counted as pending when the site has limits
            self.site.limits.settled(self._address)

    def _request_too_slow(self) -> None:
        """
        The deadline passed before the request was whole (a slow or trickling
        client, a half-sent handshake): a JSON 408 if it had begun, then close.
        """
        self._deadline = None
        if not self._awaiting or self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # not in ITransport
            return
        if self._got_bytes:
            self.site.refused(REQUEST_TIMEOUT, self.transport.getPeer())
            self._answer_and_close(REQUEST_TIMEOUT)
        else:
            self.timeoutConnection()

    def _answer_and_close(self, error: PushieError) -> None:
        """Write a JSON error answer and close, aborting if the client does not read it."""
        assert self.transport is not None
        body = error.to_json()
        head = b"HTTP/1.1 %d %s\r\n" % (error.status, RESPONSES.get(error.status, b"Error"))
        for name, value in error.headers.items():
            head += b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii"))
        self.transport.write(
            head
            + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        # As twisted.web's, without its log line per connection (a slowloris
        # run would write one per socket): close, abort if that does not work.
        self.setTimeout(None)  # the idle timer would only close it again
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        # No lingering for a client that is too slow or refused: close now.
        HTTPChannel.loseConnection(self)

    def forceAbortClient(self) -> None:
        # As twisted.web's, without its log line per connection.
        self._abortingCall = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport's; TLS has it too

    def allContentReceived(self) -> None:
        self._request_complete()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            self._arm_deadline()  # before the buffered next request is read
        super().requestDone(request)

    def lineReceived(self, line: bytes) -> Any:
        if self._publish is not None:
            return self._publish_line(line)
        upgrade = self._upgrade
        if upgrade is None:
            if (
                line == _PUBLISH_LINE
                and not self.requests
                and self.fast_publish
                and self.persistent
                and getattr(self.site, "publish_resource", None) is not None
            ):
                self._publish_start(line)
                return None
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
                if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # not in ITransport
                    break
            return None
        upgrade.append(line)
        return None

    # -- the short publish path ---------------------------------------------
    #
    # A C{POST /publish HTTP/1.1} with a Content-Length within the body limit
    # and plain header lines is answered here, by the same PublishResource
    # code, without twisted.web's Request: the answer is the same bytes.
    # Anything else (folded or odd header lines, chunked bodies, Expect,
    # several Connection headers, oversize bodies, too many or too large headers) is handed to
    # twisted.web as the lines that arrived.  Like twisted.web, data that
    # arrives while an answer is pending is kept until it is written.

    def _publish_start(self, line: bytes) -> None:
        """
        The request line of a C{POST /publish}: when the whole header block
        is already buffered, read it at once; line by line otherwise.
        """
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if 0 < end < self.MAX_LENGTH and len(line) + end <= self.totalHeadersSize:
            block = buffer[:end]
            # A publisher sends the same header block again and again (the same
            # length for same-sized messages): its reading is kept, read-only.
            known = self.site.publish_header_blocks
            parsed = known.get(block)
            if parsed is None:
                lines = block.split(b"\r\n")
                if len(lines) < self.maxHeaders:
                    parsed = self._publish_parse(lines)
                    if parsed is not None:
                        if len(known) >= KNOWN_HEADER_BLOCKS:
                            # Full (bodies of many lengths, or junk): start
                            # afresh rather than keep the first ones for good.
                            known.clear()
                        known[block] = parsed
            if parsed is not None:
                rest = buffer[end + 4 :]
                self._buffer = b""
                self._publish_ready(*parsed, rest)
                return
        self._publish = [line]

    def _publish_line(self, line: bytes) -> None:
        lines = self._publish
        assert lines is not None
        if line:
            lines.append(line)
            if (
                len(lines) > self.maxHeaders
                or sum(map(len, lines)) > self.totalHeadersSize
                or _SIMPLE_HEADER.match(line) is None
            ):
                self._publish_to_twisted()
            return
        parsed = self._publish_parse(lines[1:])
        if parsed is None:
            self._publish_to_twisted(line)
            return
        self._publish = None
        self._publish_ready(*parsed, b"")

    def _publish_parse(self, lines: list[bytes]) -> tuple[dict[bytes, bytes], int, bool] | None:
        """
        The headers (lower-case names, the last value of each), the body
        length and whether the connection stays open; C{None}: twisted.web's way.
        """
        headers: dict[bytes, bytes] = {}
        lengths = []
        connection = []
        for header in lines:
            match = _SIMPLE_HEADER.match(header)
            if match is None:
                return None
            name = match.group(1).lower()
            if name in _PUBLISH_NEEDS_TWISTED:
                return None
            if name == b"content-length":
                lengths.append(match.group(2))
            elif name == b"connection":
                connection.append(match.group(2))
            headers[name] = match.group(2)
        if (
            len(connection) > 1
            or len(lengths) != 1
            or not lengths[0].isdigit()
            or len(lengths[0]) > MAX_CONTENT_LENGTH_DIGITS  # twisted.web's way: refused there, as 400
            or int(lengths[0]) > self.site.max_body_size  # twisted.web's 413 as the body arrives
        ):
            return None
        # As twisted.web's checkPersistence for HTTP/1.1: "close" among the tokens.
        persistent = not (connection and b"close" in [t.lower() for t in connection[0].split(b" ")])
        return headers, int(lengths[0]), persistent

    def _publish_ready(self, headers: dict[bytes, bytes], length: int, persistent: bool, rest: bytes) -> None:
        """The headers are read: read the body (C{rest} is what followed them)."""
        self.persistent = persistent
        if len(rest) >= length:
            self._publish_headers = headers
            self._publish_body = [rest[:length]]
            self._publish_received(rest[length:])
            return
        self._publish_headers = headers
        self._publish_body = [rest] if rest else []
        self._publish_left = length - len(rest)
        self.setRawMode()

    def _publish_to_twisted(self, last: bytes | None = None) -> None:
        lines = self._publish
        assert lines is not None
        self._publish = None
        if last is not None:
            lines.append(last)
        for line in lines:
            super().lineReceived(line)
            if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # not in ITransport
                break

    def rawDataReceived(self, data: bytes) -> None:
        body = self._publish_body
        if body is None:
            super().rawDataReceived(data)
            return
        left = self._publish_left
        if len(data) < left:
            body.append(data)
            self._publish_left = left - len(data)
            return
        body.append(data[:left])
        self._publish_received(data[left:])

    def _publish_received(self, rest: bytes) -> None:
        """The whole body is here: answer, keeping what follows until the answer is written."""
        headers, body = self._publish_headers, self._publish_body
        assert headers is not None and body is not None
        self._publish_headers = self._publish_body = None
        self._publish_left = 0
        self._request_complete(keep_timer=True)
        self._handlingRequest = True
        self.setRawMode()
        if rest:
            self._dataBuffer.append(rest)
        request = self._fast_request = FastPublishRequest(self, headers, b"".join(body))
        self._fast_sync = True
        try:
            self.site.publish_resource.render_POST(request)
        except Exception:
            log.failure("Answering a publish failed", Failure())
            self._fast_request = None
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        finally:
            self._fast_sync = False
        if self._fast_request is None:
            self._fast_done()
        elif self.timeOut:
            # Waiting for the engine: no idle timeout meanwhile (as twisted.web).
            self._savedTimeOut = self.setTimeout(None)

    def _fast_finished(self, request: FastPublishRequest, response: bytes) -> None:
        if request is not self._fast_request:
            return
        self._fast_request = None
        write_now(self.transport, response)
        if not self._fast_sync:
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            self._fast_done()

    def _fast_done(self) -> None:
        """As twisted.web's requestDone for a persistent connection."""
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # not in ITransport
            return
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if not self.persistent:
            self.loseConnection()
            return
        self._handlingRequest = False
        self._HTTPChannel__first_line = 1
        self._arm_deadline()
        data = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self.setLineMode(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request line or header line over C{MAX_LENGTH} (16 KiB): answer
        C{400} and close, as twisted.web does for a header block over
        C{totalHeadersSize}, rather than LineReceiver's silent close, which
        leaves the client guessing.
        """
        self._respondToBadRequestAndDisconnect()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        self._request_complete()
        if self._fast_request is not None:
            self._fast_request._disconnected = True
            self._fast_request = None
        super().connectionLost(reason)

    # -- twisted.web's own parsing, made safe for hostile input ---------------

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # twisted.web (checked on 24.x-26.x) calls int() on any run of digits:
        # past 4300 digits that raises out of dataReceived (a logged
        # traceback, the connection dropped without an answer).
        if header == b"Content-Length" and len(data) > MAX_CONTENT_LENGTH_DIGITS:
            return self._failChooseTransferDecoder()  # type: ignore[no-any-return]
        return super()._maybeChooseTransferDecoder(header, data)  # type: ignore[no-any-return]

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        twisted.web's answer to a request it cannot parse (a bad request
        line or header, an invalid length, too many headers), as a JSON 400
        like every other refusal instead of a bare status line.
        """
        if self.transport is None:
            return
        body = BAD_HTTP_REQUEST.to_json()
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.loseConnection()

    def _hand_over(self) -> None:
        """
        Give the connection to a WebSocket protocol, as WebSocketResource
        does; see L{pushie.doors._wsbase.DoorProtocol.open_handshake}.
        """
        lines = self._upgrade
        assert lines is not None
        rest = self.clearLineBuffer()
        self._upgrade = None
        self.setTimeout(None)
        self._request_complete()
        transport = self.transport
        assert transport is not None
        protocol = self.site.websocket_factory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.loseConnection()
            return
        if isinstance(transport, ProtocolWrapper):  # TLS, or a haproxy: endpoint's wrapper
            transport.wrappedProtocol = protocol
        # tcp.Connection's own `protocol` attribute, which ITransport does not declare.
        elif isinstance(transport.protocol, ProtocolWrapper):  # type: ignore[attr-defined]
            transport.protocol.wrappedProtocol = protocol  # type: ignore[attr-defined]
        else:
            transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        # The door answers a plain handshake from the lines read here;
        # anything else goes to Autobahn as the bytes that arrived.
        open_handshake = getattr(protocol, "open_handshake", None)
        if open_handshake is None or not open_handshake(lines, rest):
            protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + rest)


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
        self.publish_resource: Any = None
        # The short publish path's readings of header blocks (see _publish_start).
        self.publish_header_blocks: dict[bytes, tuple[dict[bytes, bytes], int, bool]] = {}
        # Set by pushie.doors.tree.build_site: connections are counted (pending until their
        # request is whole) and refused at accept past the limits.
        self.limits: ConnectionLimits | None = None
        self.metrics: Metrics | None = None
        self.throttle: Throttle | None = None

    def log(self, request: object) -> None:
        """No per-request access log: a push server sees too many."""

    def refused(self, error: PushieError, peer: Any) -> None:
        """Count and (throttled) log a connection refused before it had a request."""
        if self.metrics is not None:
            self.metrics.reject(error.code)
        if self.throttle is not None:
            self.throttle.warn(
                "connection_" + error.code,
                "Refused a connection from {peer}: {status} {code}",
                peer=peer,
                status=error.status,
                code=error.code,
            )
