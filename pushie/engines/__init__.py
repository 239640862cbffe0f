# -*- test-case-name: tests.test_units -*-
"""
Engines decide where a publication stands (offset, epoch) and carry it to every
node that serves the channel.  The Hub talks to an L{IEngine}; it never knows
which one.  C{memory} serves one process; a Redis engine implements the same
interface for many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from pushie.channels import ChannelState, Publication, PublishRequest


class IEngine(Interface):
    """The store and the node-to-node fan-out behind the Hub."""

    name = Attribute("A short name for logs: 'memory', 'redis://host:port/db'.")

    def start(deliver: Callable[[Publication], None]) -> Deferred[None]:
        """
        Begin serving.  From now on C{deliver} is called once for every
        publication that this node watches (see L{watch}), from any node,
        in offset order per channel.
        """

    def stop() -> Deferred[None]:
        """Stop serving and release connections."""

    def append(requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        """
        Give each request the next offset of its channel, store it and send it
        to every node, atomically.  A request whose C{idempotency_key} was
        seen on the same channel in the last 5 minutes is not published again:
        its publication carries the first offset and epoch.  All or nothing: either every request is published (the
        Deferred fires with the publications, in order) or none is (it fails
        with L{pushie.errors.EngineUnavailable}).
        """

    def state(channel: str) -> Deferred[ChannelState]:
        """The channel's current offset and epoch."""

    def watch(channel: str) -> None:
        """This node now has local subscribers for C{channel}: deliver its publications."""

    def unwatch(channel: str) -> None:
        """This node's last local subscriber of C{channel} has gone."""

    def healthy() -> bool:
        """Whether a publish would be accepted now."""


def engine_from_setting(value: str, settings: object, reactor: object) -> IEngine:
    """
    Build the engine named by the C{--engine} setting.

    @raise ValueError: for an engine this build does not provide.
    """
    if value == "memory":
        from pushie.engines.memory import MemoryEngine

        return MemoryEngine(clock=reactor)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {value!r}: use 'memory'")
