# -*- test-case-name: tests.test_units -*-
"""
The records that travel through the Hub: what a publisher asks for
(L{PublishRequest}), what subscribers get (L{Publication}, in L{Burst}s),
where a channel stands (L{ChannelState}, L{History}) and who is present
(L{Member}, L{PresenceEvent}).

A L{Publication} is built once per published message and carries its encoded
forms (the JSON envelope and the WebSocket frame), computed lazily the first
time a subscriber needs them, so fan-out never encodes per subscriber.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attr

from pushie.wire import dumps, message_envelope, text_frame

NO_META: Mapping[str, str] = MappingProxyType({})
"""The metadata of a publication that has none (shared: metadata is never changed)."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PublishRequest:
    """One validated publication, before the engine gives it an offset."""

    channel: str
    data: bytes
    """The published data as compact JSON bytes."""
    event: str = "message"
    idempotency_key: str | None = None
    user_id: str | None = None
    """Who sent it (a presence member's id), told to subscribers in the envelope's C{user_id}."""
    meta: Mapping[str, str] = NO_META
    """
    What the door that published it tells the doors that deliver it, and
    subscribers never see: the engines carry it to every node with the
    publication, unread (not into history).  The Pusher door leaves out the
    socket under C{exclude}.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ChannelState:
    """Where a channel stands: the offset of its last message and its epoch."""

    offset: int
    epoch: str


@attr.s(slots=True, auto_attribs=True, eq=False)
class Publication:
    """
    A message with its place in the channel: offset and epoch.

    The envelope and the WebSocket frame are built on first use and then
    shared by every subscriber.
    """

    channel: str
    offset: int
    epoch: str
    data: bytes
    event: str = "message"
    user_id: str | None = None
    meta: Mapping[str, str] = NO_META
    """The publish request's L{PublishRequest.meta}, for the doors."""
    _envelope: bytes | None = attr.ib(default=None, init=False, repr=False)
    _frame: bytes | None = attr.ib(default=None, init=False, repr=False)
    _sse: bytes | None = attr.ib(default=None, init=False, repr=False)

    @classmethod
    def from_envelope(cls, envelope: bytes, meta: Mapping[str, str] = NO_META) -> Publication:
        """A publication read back from its envelope (another node's, or history); the bytes are reused."""
        fields = json.loads(envelope)
        publication = cls(
            fields["channel"],
            fields["offset"],
            fields["epoch"],
            dumps(fields["data"]),
            fields["event"],
            fields.get("user_id"),
            meta,
        )
        publication._envelope = envelope
        return publication

    @classmethod
    def kept(
        cls,
        channel: str,
        offset: int,
        epoch: str,
        data: bytes,
        event: str,
        user_id: str | None,
        envelope: bytes,
        meta: Mapping[str, str] = NO_META,
    ) -> Publication:
        """A publication read back from an engine's history, around the envelope it was sent with."""
        publication = cls(channel, offset, epoch, data, event, user_id, meta)
        publication._envelope = envelope
        return publication

    @classmethod
    def of(cls, request: PublishRequest, offset: int, epoch: str) -> Publication:
        """The publication of C{request} at C{offset} in C{epoch}."""
        return cls(request.channel, offset, epoch, request.data, request.event, request.user_id, request.meta)

    @property
    def envelope(self) -> bytes:
        """The JSON envelope that subscribers receive, as UTF-8 bytes."""
        if self._envelope is None:
            self._envelope = message_envelope(
                self.channel, self.event, self.offset, self.epoch, self.data, self.user_id
            )
        return self._envelope

    @property
    def sse_data(self) -> bytes:
        """The envelope as an SSE C{data:} line and the blank line ending the event."""
        if self._sse is None:
            self._sse = b"data: " + self.envelope + b"\n\n"
        return self._sse

    @property
    def websocket_frame(self) -> bytes:
        """The envelope as one unmasked WebSocket text frame, ready for a transport."""
        if self._frame is None:
            self._frame = text_frame(self.envelope)
        return self._frame


class Burst:
    """
    The publications of one channel that the Hub dispatched in one reactor
    turn to the same subscribers, in offset order: they leave in one write
    per subscriber (one kernel send instead of one per publication), with
    their frames joined once for all of them.
    """

    __slots__ = ("publications", "_frames")

    def __init__(self, publications: list[Publication]) -> None:
        self.publications = publications
        self._frames: bytes | None = None

    @property
    def websocket_frames(self) -> bytes:
        """The WebSocket frames of every publication, back to back."""
        if self._frames is None:
            self._frames = b"".join([p.websocket_frame for p in self.publications])
        return self._frames


@attr.s(frozen=True, slots=True, auto_attribs=True)
class History:
    """
    What an engine still has of a channel after some offset.

    @ivar state: the channel's current offset and epoch.
    @ivar publications: the kept publications after the asked offset, oldest first.
    @ivar complete: whether nothing between the asked offset and the first
        returned publication (or the current offset) has been forgotten.
    """

    state: ChannelState
    publications: list[Publication]
    complete: bool


def history_after(state: ChannelState, kept: Iterable[Publication], since: int, limit: int | None) -> History:
    """
    The window of an engine's kept publications after offset C{since} (at
    most C{limit} of them): one rule for every engine.  It is complete when
    nothing between C{since} and the first kept publication (or, with none
    kept, the channel's current offset) has been forgotten.
    """
    after = [p for p in kept if p.offset > since]
    first = after[0].offset if after else state.offset + 1
    if limit is not None:
        after = after[:limit]
    return History(state, after, first <= since + 1)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Member:
    """A presence member: a token's C{sub} and its C{info}."""

    id: str
    info: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "info": self.info}


@attr.s(slots=True, auto_attribs=True, eq=False)
class PresenceEvent:
    """
    A member joined (its first connection arrived) or left (its last one went).

    @ivar origin: the client id of the connection that caused it; that
        connection is not told about its own join.
    """

    channel: str
    kind: str
    member: Member
    origin: str | None = None
    _json: bytes | None = attr.ib(default=None, init=False, repr=False)

    @property
    def json(self) -> bytes:
        """The C{join}/C{leave} frame, encoded once for every subscriber."""
        if self._json is None:
            self._json = dumps({"type": self.kind, "channel": self.channel, "member": self.member.to_json()})
        return self._json


TRANSITION_NAMES = frozenset({"channel_occupied", "channel_vacated", "member_added", "member_removed"})
"""The cluster-wide transitions an engine decides (the names webhooks use)."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Transition:
    """
    A transition decided once for the whole cluster by an engine (see
    L{pushie.engines.TransitionSink}): a channel got its first subscriber
    anywhere (C{channel_occupied}) or lost its last one (C{channel_vacated},
    after the debounce), a presence member's first connection anywhere
    (C{member_added}) or its last (C{member_removed}, after the debounce).

    @ivar token: the engine's handle on it (for Redis, the stream entry id),
        handed back to the engine's C{settle} once the sink is done with it.
    @ivar time_ms: when it was decided (for a debounced one: when it fell
        due), in ms since the epoch on the engine's clock; C{None} if unknown.
    """

    name: str
    channel: str
    user_id: str | None = None
    token: Any = attr.ib(default=None, eq=False)
    time_ms: int | None = attr.ib(default=None, eq=False)
