# -*- test-case-name: tests.test_daemon -*-
"""
L{DoorContext}: what every door gets from the wiring (C{pushie.tap}).

Each door used to take the same run of arguments (hub, guard, clock,
metrics, throttle); one record, built once by the wiring, says what a door
may lean on and keeps the constructors to what is particular to each door.
A door's own limits come in a second record defined beside the door
(L{pushie.doors.websocket.WebSocketDoorSettings} and the like).
"""

from __future__ import annotations

import attr
from twisted.internet.interfaces import IReactorTime

from pushie.auth import Guard
from pushie.hub import Hub
from pushie.logs import Throttle
from pushie.metrics import Metrics


@attr.s(frozen=True, auto_attribs=True)
class DoorContext:
    """
    The shared parts a door works with.

    @ivar hub: the only way to the engine: subscribe, publish, state, history...
    @ivar guard: the daemon's authorisation policy (publisher keys, subscriber tokens).
    @ivar clock: the door's time (the reactor; a L{twisted.internet.task.Clock} in unit tests).
    @ivar metrics: the daemon's counters.
    @ivar throttle: rate-limits the refusal warnings of the HTTP doors (publish,
        SSE, the Pusher HTTP API), in the C{pushie.doors.api} log namespace.  A
        WebSocket door keeps a throttle of its own, in its own namespace.
    """

    hub: Hub
    guard: Guard
    clock: IReactorTime
    metrics: Metrics
    throttle: Throttle


class Door:
    """
    A mixin for a door's resource or factory: L{take} keeps the parts of its
    L{DoorContext} as its own attributes, where requests and protocols read
    them with one lookup (and where they always were).
    """

    context: DoorContext
    hub: Hub
    guard: Guard
    clock: IReactorTime
    metrics: Metrics
    throttle: Throttle

    def take(self, context: DoorContext) -> None:
        self.context = context
        self.hub = context.hub
        self.guard = context.guard
        self.clock = context.clock
        self.metrics = context.metrics
        self.throttle = context.throttle
