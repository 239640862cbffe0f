# -*- test-case-name: tests.test_shards -*-
"""
Several independent Redis servers as one engine: each channel lives on one
of them (its I{shard}), so that no single Redis carries every channel.

A L{ShardedEngine} holds one L{RedisEngine} per server and sends everything
about a channel (publishing, history and recovery, presence, idempotency keys,
its pub/sub) to that channel's shard; each shard engine works exactly as it
does alone, with its own connections, node heartbeat and resync, and reports
to the same listener (the Hub).  Only what spans channels spans shards:
L{ShardedEngine.append} of a request naming channels of several shards,
L{ShardedEngine.occupied} and L{ShardedEngine.channel_counts} (the union
over every shard, or L{EngineUnavailable}: never a partial list),
L{ShardedEngine.healthy} (every shard) and L{ShardedEngine.cluster} (the
figures of every shard).  Webhook transitions need nothing across shards:
each shard counts and decides its own channels' (every daemon beats on every
shard; each shard has its own stream and consumer group under its prefix),
and the shards share the daemon's sink through a L{_SinkShare} each.

Routing (L{shard_index}) is rendezvous hashing: a channel goes to the shard
whose identity (C{host:port/db} as written in the setting) scores highest
with the channel's name, the score being the first 8 bytes, big-endian, of
BLAKE2b-64 over C{<identity> LF <channel>} (UTF-8).  It depends on the set of
shards, not on their order, and it is part of the stored format: changing it
moves channels as changing the shard list does.

Every key and pub/sub name of a sharded engine carries a fingerprint of the
shard set (L{ring_fingerprint}): C{pushie:<db>:shards-<fingerprint>:<kind>:<channel>}.
So a daemon started with another shard list (a shard added, removed or
renamed) reads none of the keys written under the old one: every channel
starts over on its shard in a new epoch, with no history, and clients that
resubscribe with a position learn C{recovered: false}.  Without it, a channel
that moved away and back (a shard added, then removed) would find its old
offsets and history and continue them as if nothing had been published in
between.  Daemons with different shard lists therefore share nothing: change
the list on every daemon at once.  A single URL is not sharded at all (the
plain L{RedisEngine}, keys without a fingerprint).

A request whose channels live on several shards is published as one atomic
script run per shard (each shard's part all or none, as L{RedisEngine.append}
promises), the parts at the same time.  Before sending anything, every shard
involved must be connected, or the whole request fails with
L{EngineUnavailable} and nothing is published; a part that fails after that
(the connection drops, Redis refuses the script) is reported as it is, per
publication (L{PartiallyPublished}), never hidden.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pushie.engines import ClusterFigures, EngineListener, IEngine, TransitionSink
from pushie.engines.redis import READ_BATCH, RedisEngine, parse_redis_url
from pushie.errors import EngineUnavailable, OutcomeUnknown, PartiallyPublished, PushieError
from pushie.records import ChannelState, History, Member, Publication, PublishRequest, Transition

log = Logger()

MAX_SHARDS = 64
"""Shards one engine may have: routing scores every shard per channel (cached)."""

_ROUTE_CACHE = 100_000
"""Channels whose shard is remembered; past it the cache starts again (routing is pure)."""


def shard_identity(url: str) -> str:
    """What names a shard for routing and fingerprints: C{host:port/db}, as written (no scheme, no password)."""
    config = parse_redis_url(url)
    return f"{config['host']}:{config['port']}/{config['db']}"


def split_shard_urls(value: str) -> list[str]:
    """
    The URLs of a comma-separated C{engine} setting with more than one.

    @raise ValueError: naming the fault (an empty item, a URL that is not
        C{redis://} or C{rediss://}, a shard given twice, too many).
    """
    urls = [part.strip() for part in value.split(",")]
    seen: dict[str, str] = {}
    for url in urls:
        if not url:
            raise ValueError("a list of Redis shards has an empty item: separate redis:// URLs with single commas")
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"every Redis shard is a redis:// or rediss:// URL; {url!r} is not")
        identity = shard_identity(url)
        if identity in seen:
            raise ValueError(f"the Redis shard {identity} is listed twice ({seen[identity]!r} and {url!r})")
        seen[identity] = url
    if len(urls) > MAX_SHARDS:
        raise ValueError(f"at most {MAX_SHARDS} Redis shards, not {len(urls)}")
    return urls


def ring_fingerprint(identities: Sequence[str]) -> str:
    """
    8 hex digits naming a set of shards (order does not matter): BLAKE2b-32
    of the sorted identities joined by LF.
    """
    return hashlib.blake2b("\n".join(sorted(identities)).encode(), digest_size=4).hexdigest()


def _score(identity: str, channel: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{identity}\n{channel}".encode(), digest_size=8).digest(), "big")


def shard_index(identities: Sequence[str], channel: str) -> int:
    """The index in C{identities} of C{channel}'s shard (rendezvous hashing; ties go to the greater identity)."""
    return max(range(len(identities)), key=lambda i: (_score(identities[i], channel), identities[i]))


def _result(publication: Publication) -> dict[str, Any]:
    return {"channel": publication.channel, "offset": publication.offset, "epoch": publication.epoch}


@implementer(IEngine)
class ShardedEngine:
    """An L{IEngine} over several Redis servers, each channel on one of them (see the module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        reactor: Any,
        history_size: int = 100,
        history_ttl: float = 300.0,
        timeout: float = 2.0,
        wait_replicas: int = 0,
    ) -> None:
        if len(urls) < 2:
            raise ValueError("a sharded engine needs at least two Redis URLs")
        self.identities = [shard_identity(url) for url in urls]
        self.fingerprint = ring_fingerprint(self.identities)
        self.shards = [
            RedisEngine(
                url,
                reactor,
                history_size=history_size,
                history_ttl=history_ttl,
                timeout=timeout,
                wait_replicas=wait_replicas,
            )
            for url in urls
        ]
        for shard in self.shards:
            # Composition, not a change to RedisEngine: every key and pub/sub
            # name it makes starts with its prefix.
            shard.prefix = f"pushie:{shard.config['db']}:shards-{self.fingerprint}:"
        self.name = ",".join(shard.name for shard in self.shards)
        self._routes: dict[str, RedisEngine] = {}

    def shard_of(self, channel: str) -> RedisEngine:
        """The engine of C{channel}'s shard."""
        shard = self._routes.get(channel)
        if shard is None:
            if len(self._routes) >= _ROUTE_CACHE:
                self._routes.clear()
            shard = self._routes[channel] = self.shards[shard_index(self.identities, channel)]
        return shard

    def shards_health(self) -> dict[str, bool]:
        """Per shard (by name), whether it takes publications now."""
        return {shard.name: shard.healthy() for shard in self.shards}

    # -- lifecycle ---------------------------------------------------------

    def start(self, listener: EngineListener) -> Deferred[None]:
        return defer.gatherResults([shard.start(listener) for shard in self.shards], consumeErrors=True).addCallback(
            lambda _: None
        )

    def stop(self) -> Deferred[None]:
        return defer.DeferredList([shard.stop() for shard in self.shards], consumeErrors=True).addCallback(
            lambda _: None
        )

    def healthy(self) -> bool:
        return all(shard.healthy() for shard in self.shards)

    # -- publishing --------------------------------------------------------

    def append(self, requests: Sequence[PublishRequest]) -> Deferred[list[Publication]]:
        """
        Publish C{requests}: one atomic run of the publish script per shard.

        A request of one shard is that shard's C{append}, all or none.  One
        spanning shards fails with L{EngineUnavailable}, publishing nothing,
        when a shard involved is not connected; otherwise its parts run at
        the same time and the answer is the publications when all succeed,
        else (L{_settle}) an error saying what happened to each publication.
        """
        parts: dict[RedisEngine, list[int]] = {}
        for index, request in enumerate(requests):
            parts.setdefault(self.shard_of(request.channel), []).append(index)
        if len(parts) == 1:
            return next(iter(parts)).append(requests)
        down = [shard.name for shard in parts if not shard.healthy()]
        if down:
            return defer.fail(
                EngineUnavailable(
                    f"the Redis shard {', '.join(down)} of some of these channels is unavailable; "
                    "nothing was published, retry later"
                )
            )
        shards = list(parts)
        runs = [shard.append([requests[i] for i in parts[shard]]) for shard in shards]
        d = defer.DeferredList(runs, consumeErrors=True)
        return d.addCallback(lambda outcomes: self._settle(requests, [parts[s] for s in shards], outcomes))

    def _settle(
        self,
        requests: Sequence[PublishRequest],
        indices: list[list[int]],
        outcomes: list[tuple[bool, Any]],
    ) -> list[Publication]:
        """
        The publications in request order, when every part succeeded.  Else:
        C{engine_unavailable} when every part certainly published nothing;
        C{outcome_unknown} (with per-publication C{results}) when none was
        published for sure and some may have been; C{partially_published}
        (with C{results}) when some were published and others were not.
        """
        published: list[Publication | None] = [None] * len(requests)
        errors: dict[int, str] = {}
        for part, (ok, value) in zip(indices, outcomes, strict=True):
            if ok:
                for index, publication in zip(part, value, strict=True):
                    published[index] = publication
                continue
            code = value.value.code if isinstance(value.value, PushieError) else None
            if code not in ("engine_unavailable", "outcome_unknown"):
                if not isinstance(value.value, PushieError):
                    log.failure("A shard's publish failed", value)
                code = "outcome_unknown"  # not an answer that says nothing was published
            for index in part:
                errors[index] = code
        if not errors:
            return published  # type: ignore[return-value]  # every slot filled
        results = [
            _result(p) if p is not None else {"channel": requests[i].channel, "error": errors[i]}
            for i, p in enumerate(published)
        ]
        if any(p is not None for p in published):
            raise PartiallyPublished(results)
        if "outcome_unknown" in errors.values():
            error = OutcomeUnknown(
                "some of these publications may or may not have been published (a Redis shard's answer was lost); "
                "see results, and retry with the same idempotency_key to publish each exactly once"
            )
            error.results = results
            raise error
        raise EngineUnavailable()

    # -- one channel: its shard ---------------------------------------------

    def state(self, channel: str) -> Deferred[ChannelState]:
        return self.shard_of(channel).state(channel)

    def history(self, channel: str, since: int, limit: int | None) -> Deferred[History]:
        return self.shard_of(channel).history(channel, since, limit)

    def watch(self, channel: str) -> Deferred[None]:
        return self.shard_of(channel).watch(channel)

    def unwatch(self, channel: str) -> None:
        self.shard_of(channel).unwatch(channel)

    def presence_add(self, channel: str, member: Member, origin: str) -> Deferred[None]:
        return self.shard_of(channel).presence_add(channel, member, origin)

    def presence_remove(self, channel: str, member: Member, origin: str) -> Deferred[None]:
        return self.shard_of(channel).presence_remove(channel, member, origin)

    def presence(self, channel: str) -> Deferred[list[Member]]:
        return self.shard_of(channel).presence(channel)

    # -- every shard ----------------------------------------------------------

    def occupied(self, prefix: str) -> Deferred[list[str]]:
        """The union over every shard; L{EngineUnavailable} when a shard does not answer (never a partial list)."""

        def union(lists: list[list[str]]) -> list[str]:
            return sorted({name for names in lists for name in names})

        def failed(failure: Failure) -> NoReturn:
            raise EngineUnavailable("a Redis shard did not answer; retry later")

        d = defer.gatherResults([shard.occupied(prefix) for shard in self.shards], consumeErrors=True)
        return d.addCallbacks(union, failed)

    # -- counts and cluster-wide transitions --------------------------------

    def local_count(self, channel: str, count: int) -> None:
        self.shard_of(channel).local_count(channel, count)

    def counts(self, channels: Sequence[str]) -> Deferred[dict[str, int]]:
        """Each channel's count from its shard; L{EngineUnavailable} when one of those shards does not answer."""
        by_shard: dict[int, list[str]] = {}
        for channel in channels:
            by_shard.setdefault(self.shards.index(self.shard_of(channel)), []).append(channel)

        def merge(parts: list[dict[str, int]]) -> dict[str, int]:
            return {name: count for part in parts for name, count in part.items()}

        def failed(failure: Failure) -> NoReturn:
            raise EngineUnavailable("a Redis shard did not answer; retry later")

        d = defer.gatherResults([self.shards[i].counts(names) for i, names in by_shard.items()], consumeErrors=True)
        return d.addCallbacks(merge, failed)

    def channel_counts(self, prefix: str) -> Deferred[dict[str, int]]:
        """The union over every shard (a channel lives on one); never a partial answer."""

        def merge(parts: list[dict[str, int]]) -> dict[str, int]:
            return {name: count for part in parts for name, count in part.items()}

        def failed(failure: Failure) -> NoReturn:
            raise EngineUnavailable("a Redis shard did not answer; retry later")

        d = defer.gatherResults([shard.channel_counts(prefix) for shard in self.shards], consumeErrors=True)
        return d.addCallbacks(merge, failed)

    def send_transitions(self, sink: TransitionSink | None, debounce: float, backlog: int) -> bool:
        """
        Every shard decides the transitions of its own channels (its own
        stream, consumer group and held zset, under its prefix) and sends them
        to the same sink, through a L{_SinkShare} each: the shards' reads run
        at the same time, and together read no more than the sink's room.
        """
        shares: list[_SinkShare] = []
        decided = [
            shard.send_transitions(None if sink is None else _SinkShare(sink, shard, shares), debounce, backlog)
            for shard in self.shards
        ]
        return all(decided)

    @property
    def cluster(self) -> ClusterFigures | None:
        """
        The cluster's figures over every shard: every node beats on every
        shard (nodes and connections: the most any shard saw), each channel
        lives on one (subscriptions and channels: the sum).  C{None} until
        every shard has had a heartbeat, and while a shard is unavailable
        (never a figure that silently leaves a shard out: the gauges are
        absent then, and C{pushie_redis_shard_up} says which shard is down).
        """
        figures = [shard.cluster for shard in self.shards]
        if any(f is None for f in figures) or not self.healthy():
            return None
        known = [f for f in figures if f is not None]
        return ClusterFigures(
            nodes=max(f.nodes for f in known),
            connections=max(f.connections for f in known),
            subscriptions=sum(f.subscriptions for f in known),
            channels=sum(f.channels for f in known),
        )


class _SinkShare:
    """
    One shard's view of the transition sink the shards share.

    A shard asks the sink's room before each blocking read (up to
    L{READ_BATCH} entries, answered up to a second later); were every shard
    told the whole room, a burst on several shards would hand the sink
    several times its room at once, and the sink drops what is past its
    bound, settling it: decided transitions lost, which would have waited
    in Redis.  So each share reserves what it was told until its shard asks
    again (the reader asks again right after handing over a read) or hands
    it over (L{take}), and a shard is told no more than the sink's room less
    the other shards' reservations, nor more than its fair part
    (C{room // shards}, at least 1), nor anything while its reader is not
    connected (a shard that is down holds no room).  Reads therefore never
    overshoot the sink's bound.  What may: a heartbeat's claim of a dead
    node's transitions made while that shard's read is under way replaces
    the read's reservation (by at most one read's share).
    """

    def __init__(self, sink: TransitionSink, shard: RedisEngine, shares: list[_SinkShare]) -> None:
        self.sink = sink
        self.shard = shard
        self.shares = shares
        self.reserved = 0
        shares.append(self)

    def room(self) -> int:
        self.reserved = 0
        if self.shard._reader_connection() is None:
            return 0
        room = self.sink.room()
        free = room - sum(share.reserved for share in self.shares)
        self.reserved = max(0, min(READ_BATCH, free, max(1, room // len(self.shares))))
        return self.reserved

    def take(self, transitions: Sequence[Transition], settle: Callable[[Sequence[Transition]], None]) -> None:
        self.reserved = max(0, self.reserved - len(transitions))
        self.sink.take(transitions, settle)
