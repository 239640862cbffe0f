"""
The C{reuseport:} endpoint: listen on a TCP port that other processes share.

One Pushie is one Python process, so one core.  To use every core of a
machine, run one Pushie per core, each listening with

    --listen reuseport:8080:interface=0.0.0.0

and the Redis engine (C{--engine redis://...}) carrying the publications
between them.  Each process opens its own listening socket with
C{SO_REUSEPORT} on the same address; Linux (3.9 and later) spreads incoming
connections over them by a hash of the client's address and port, so each
connection lands on one process and stays there.  Only processes of the same
user can join a port this way.  When a process stops, its socket closes and
new connections go to the others (connections still in its own accept queue
at that moment are reset, and their clients reconnect).

Nothing is shared but the port: no parent process, no file descriptors
passed around, which fits twistd (each worker is a plain C{twistd -n pushie})
and systemd (a template unit, one instance per core: contrib/pushie@.service).

The string takes the C{tcp:} endpoint's port, C{interface} and C{backlog}
options.  The socket is made here (Twisted's C{tcp:} endpoint has no
C{SO_REUSEPORT} option) and handed to the reactor with C{adoptStreamPort}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

PREFIX = "reuseport"


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose listening socket has C{SO_REUSEPORT} set."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: Any) -> IListeningPort:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # The reactor keeps a duplicate of the descriptor; ours is closed below.
            port: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()
        return port


class ReusePortParser:
    """
    Parses C{reuseport:<port>[:interface=<address>][:backlog=<n>]} for
    C{serverFromString} (registered by the dropin in twisted/plugins/).
    """

    prefix = PREFIX

    def parseStreamServer(self, reactor: Any, port: str, interface: str = "", backlog: str = "50") -> ReusePortEndpoint:
        try:
            number = int(port)
            queue = int(backlog)
        except ValueError:
            raise ValueError(f"reuseport: port and backlog must be numbers, got {port!r} and {backlog!r}") from None
        return ReusePortEndpoint(reactor, number, interface, queue)


def shares_port(description: str) -> bool:
    """Whether an endpoint string is a C{reuseport:} one (a port shared with other processes)."""
    return description.split(":", 1)[0].strip().lower() == PREFIX
