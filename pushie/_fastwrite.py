# -*- test-case-name: tests.test_websocket -*-
"""
The fan-out write path: send a frame on the socket at once when the
transport has nothing buffered, and hand only what did not fit to Twisted.

A plain C{transport.write} buffers the bytes and registers the socket for
writability; the reactor then sends them and unregisters it: two
C{epoll_ctl} calls per delivery, which dominate the cost of a fan-out.
Sending first makes the common case one C{send} and nothing else, and keeps
every guarantee of the transport: order (we only send first when nothing is
queued), back-pressure (the rest goes through C{write}, which pauses
producers) and error handling (errors fall back to C{write}, which lets the
reactor notice the broken connection as usual).

Private internals used (checked against Twisted 26.10.0, the version the
test suite runs on; pyproject.toml allows Twisted>=24.7,<27): the attributes
of L{twisted.internet.tcp.Connection} (C{socket}, C{dataBuffer},
C{_tempDataLen}, C{_writeDisconnected}); any other transport (TLS, tests'
string transports) takes the plain path.  The test suite covers both paths.
A C{haproxy:} endpoint's L{HAProxyProtocolWrapper} (private module
C{twisted.protocols.haproxy._wrapper}) only forwards writes to the TCP
connection under it, so that connection is written to directly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper


def write_now(transport: Any, data: bytes) -> None:
    """Write C{data} to C{transport}, trying the socket first when nothing is queued."""
    if type(transport) is HAProxyProtocolWrapper:
        transport = transport.transport  # PROXY protocol: nothing to do on the way out
    if (
        isinstance(transport, Connection)
        and transport.connected
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and not transport.dataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or broken: write() below knows what to do
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
