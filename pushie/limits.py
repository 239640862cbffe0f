# -*- test-case-name: tests.test_operations -*-
"""
Limits that protect a daemon from floods: publish rates per publisher key,
connections in all and per client address.  Sizes live with the doors
(L{pushie.doors._http.PushieRequest}, Autobahn's frame limits).

Every limit is a setting; 0 switches it off.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from pushie.errors import PushieError

MAX_TRACKED_KEYS = 10_000

#: The address a connection on a C{haproxy:} endpoint is counted under
#: (pending, in the daemon's total only) until its PROXY header names the
#: client: the load balancer's own address must not be limited as one client.
AWAITING_PROXY_HEADER = "(awaiting PROXY header)"


class RateLimiter:
    """
    A token bucket per key (a publisher key, or a client address when
    publishing is open): C{rate} requests per second, bursts of up to C{rate}.
    At most L{MAX_TRACKED_KEYS} buckets are kept; the least recently used go
    first (a forgotten bucket is a full one, so this only ever forgives).
    """

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.clock = clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def check(self, key: bytes) -> None:
        """
        Take one token for C{key}.

        @raise PushieError: 429 C{rate_limited} with C{Retry-After}.
        """
        if self.rate <= 0:
            return
        now = self.clock.seconds()
        tokens, stamp = self._buckets.pop(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - stamp) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            wait = math.ceil((1 - tokens) / self.rate)
            raise PushieError(
                429,
                "rate_limited",
                f"more than {self.rate:g} publish requests per second with this key; slow down or batch",
                headers={"Retry-After": str(max(1, wait))},
            )
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > MAX_TRACKED_KEYS:
            self._buckets.popitem(last=False)


class ConnectionLimits:
    """
    Counts client connections, in all and per address, and refuses new ones past the limits.

    Two kinds count: open connections (WebSocket and SSE subscribers, from
    L{opened} to L{closed}) and pending ones (L{accept} to L{settled}): HTTP
    connections that are sending a request (or idle between keep-alive
    requests), so that half-sent handshakes cannot pile up uncounted.
    """

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self._per_address: dict[str, int] = {}
        self.pending = 0
        self._pending: dict[str, int] = {}

    def accept(self, address: str, check_address: bool = True) -> None:
        """
        Count a new connection from C{address} as pending, unless pending
        connections alone reach a limit (open ones are left to L{check}, when
        a request is whole, so that each door refuses in its own protocol:
        a 503, a Pusher 4100 close).  Half-sent requests therefore never hold
        more than the limits' worth of sockets.

        @param check_address: C{False} to check the daemon's total only, for
            a connection whose client address is not known yet
            (L{AWAITING_PROXY_HEADER}); it is settled and accepted again
            under its real address when that arrives.
        @raise PushieError: as L{check}; nothing is counted then.
        """
        if self.max_connections and self.pending >= self.max_connections:
            raise _too_many()
        if check_address and self.max_per_address and self._pending.get(address, 0) >= self.max_per_address:
            raise _too_many_from_address()
        self.pend(address)

    def pend(self, address: str) -> None:
        """Count a connection as pending again (a kept-alive one, waiting for its next request), without a check."""
        self.pending += 1
        self._pending[address] = self._pending.get(address, 0) + 1

    def settled(self, address: str) -> None:
        """A pending connection has a whole request, or is gone."""
        self.pending -= 1
        left = self._pending.get(address, 0) - 1
        if left > 0:
            self._pending[address] = left
        else:
            self._pending.pop(address, None)

    def check(self, address: str) -> None:
        """
        @raise PushieError: 503 C{too_many_connections} past the daemon's
            limit, 429 C{too_many_connections_from_address} past the
            per-address one (open and pending connections both count).
        """
        if self.max_connections and self.total + self.pending >= self.max_connections:
            raise _too_many()
        if (
            self.max_per_address
            and self._per_address.get(address, 0) + self._pending.get(address, 0) >= self.max_per_address
        ):
            raise _too_many_from_address()

    def opened(self, address: str) -> None:
        self.total += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1

    def closed(self, address: str) -> None:
        self.total -= 1
        left = self._per_address.get(address, 0) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)


def _too_many() -> PushieError:
    return PushieError(
        503,
        "too_many_connections",
        "this server has reached its connection limit; retry on another node",
        headers={"Retry-After": "5"},
    )


def _too_many_from_address() -> PushieError:
    return PushieError(
        429, "too_many_connections_from_address", "too many connections from your address", headers={"Retry-After": "5"}
    )


def address_of(peer: object) -> str:
    """
    The client address a limit is counted by (the host of a TCP peer; one
    bucket for Unix sockets).  IPv6 addresses are written one way (RFC 5952),
    whoever wrote them: a PROXY v2 header gives C{2001:db8:0:0:0:0:0:9},
    v1 and the kernel C{2001:db8::9}.
    """
    host = str(getattr(peer, "host", None) or "local")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            return host
    return host


@implementer(IPushProducer)
class SlowConsumerWatch:
    """
    Watches one connection's outgoing buffer through Twisted's producer
    protocol: the transport pauses us when its buffer is full and resumes us
    when it drains.  While paused, the bytes written are counted; past
    C{limit} bytes, or after C{grace} seconds paused without a resume, the
    connection is a slow consumer and C{on_slow} is called once.  Memory per
    slow client stays bounded and nobody else waits for it.
    """

    __slots__ = ("clock", "limit", "grace", "on_slow", "paused", "buffered", "_timer", "fired")

    def __init__(self, clock: IReactorTime, limit: int, grace: float, on_slow: Callable[[], None]) -> None:
        self.clock = clock
        self.limit = limit
        self.grace = grace
        self.on_slow = on_slow
        self.paused = False
        self.buffered = 0
        self._timer: Any = None
        self.fired = False

    def wrote(self, size: int) -> None:
        """Count C{size} bytes handed to the transport (only matters while paused)."""
        if self.paused:
            self.buffered += size
            if self.limit and self.buffered > self.limit:
                self._slow()

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        self.buffered = 0
        if self.grace:
            self._timer = self.clock.callLater(self.grace, self._slow)

    def resumeProducing(self) -> None:
        self.paused = False
        self.buffered = 0
        self.cancel()

    def stopProducing(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _slow(self) -> None:
        self.cancel()
        if not self.fired:
            self.fired = True
            self.on_slow()
