# -*- test-case-name: tests.test_webhooks -*-
"""
Webhooks: tell the app's own server, with signed HTTP POSTs, when a channel
becomes occupied or vacated and when a presence member joins or leaves.

With one daemon (the memory engine) the Hub calls L{Webhooks.channel_occupied},
L{Webhooks.channel_vacated}, L{Webhooks.member_added} and
L{Webhooks.member_removed} on the reactor thread, at its local transitions.
With the Redis engine the transitions are the cluster's, decided (and
debounced) in Redis, and the engine hands them over with L{Webhooks.take},
never more than L{Webhooks.room} (back-pressure); each is settled back to the
engine once delivered or given up, so that one this daemon never finished
(it stopped or died first) is delivered by another node.
Those calls only do bookkeeping: they return at once, never raise and never
wait for the network, so a slow or dead receiver cannot slow the delivery of
publications to clients.

What the receiver gets (the same shape as Pusher's webhooks)::

    POST <webhook url>
    Content-Type: application/json
    User-Agent: Pushie/<version>
    X-Pushie-Signature: <hex HMAC-SHA256(secret, raw body)>

    {"time_ms": 1700000000000,
     "events": [{"name": "channel_occupied", "channel": "news"},
                {"name": "member_added", "channel": "presence-room", "user_id": "42"}]}

Promises and limits, for the next engineer:

  - B{Debounce.}  A C{channel_vacated} is held for C{debounce} seconds; if
    the same channel is occupied again meanwhile (a page reload), both events
    are dropped: a reload is no webhook at all.  C{member_removed} followed by
    C{member_added} of the same member on the same channel is treated alike.
  - B{Pairs that cancel.}  An event whose opposite (same channel, same
    member) is still waiting in the queue, not yet sent, cancels it: the
    receiver never hears of a channel occupied and vacated, or of a member
    added and removed, while those events waited.  So a client that opens
    and closes streams naming many new channels, faster than the receiver
    takes events, costs the queue nothing once its streams are closed; while
    they are open it costs at most C{max_subscriptions} events a connection.
  - B{Batching.}  Events that become due in the same reactor turn leave in
    one POST, up to L{MAX_BATCH} of them.  While every delivery slot is busy,
    events wait in a queue and later leave together.
  - B{Delivery.}  A 2xx answer is success.  Connection errors, timeouts
    (C{timeout} seconds for the whole request, answer body included), 5xx and
    429 are retried with exponential backoff (C{backoff} seconds doubling up
    to C{max_backoff}, each wait jittered to between half and all of it; a
    C{Retry-After} in seconds is honoured up to C{max_backoff}) until
    C{retry_for} seconds after the first attempt.  Other answers (3xx, 4xx)
    are not retried: redirects are not followed.  A retry sends the very same
    bytes, so C{time_ms} and the signature do not change and a receiver may
    de-duplicate on the signature.
  - B{Order.}  Up to C{concurrency} POSTs are in flight at once and a retried
    one may land after a later one: receivers should order by C{time_ms}
    rather than by arrival.  For the Hub's events C{time_ms} is when the
    POST was first made; for the engine's (L{take}) it is when the body's
    first transition was decided, and a POST never mixes transitions of two
    L{take} calls (for Redis, two runs of the stream), so that bodies ordered
    by C{time_ms} are ordered as decided, and one resent by another node is
    the same bytes.
  - B{Bounds.}  At most C{max_queue} events wait; at most C{concurrency}
    batches of L{MAX_BATCH} are being delivered.  Past C{max_queue} the
    cheapest event goes: the oldest occupancy event (C{channel_occupied},
    C{channel_vacated}: any client can cause them), and a member event
    (C{member_added}, C{member_removed}: they need a granting token) only
    when no occupancy event waits.  Each drop is counted by event name
    (C{dropped_by_event}, the C{pushie_webhook_events_dropped_total} metric,
    C{on_drop}) and logged.  A failed delivery and a full queue are each logged at
    most once a minute, with a count of the ones not shown, never with a
    traceback.  The webhook URL is logged without credentials or query.
  - B{Time} comes from the injected reactor (C{reactor.seconds()}), so a
    L{twisted.internet.task.Clock} drives the debounce and the backoff in
    tests.
  - B{Stopping.}  L{Webhooks.stop} sends the held (debounced) events at once,
    gives what is queued or in flight up to C{stop_timeout} seconds, drops
    the rest with one log line, and closes the connection pool it owns.

The same machine sends a Pusher app's webhooks
(L{pushie.doors.pusher.hooks}): another C{signature_header}
(C{X-Pusher-Signature}), an extra header (C{X-Pusher-Key}), and, besides the
four paired events, events nothing undoes (L{Webhooks.send}: C{client_event},
C{cache_miss}, C{subscription_count}), which are never held nor cancelled.

L{sign} and L{verify} are pure; C{contrib/verify_webhook.py} shows the
receiver's side with the standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attr
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from pushie import __version__
from pushie.logs import Throttle
from pushie.records import Transition
from pushie.wire import dumps

__all__ = [
    "CHANNEL_OCCUPIED",
    "CHANNEL_VACATED",
    "MAX_BATCH",
    "MEMBER_ADDED",
    "MEMBER_REMOVED",
    "SIGNATURE_HEADER",
    "WebhookEvent",
    "Webhooks",
    "check_url",
    "encode_body",
    "sign",
    "verify",
]

CHANNEL_OCCUPIED = "channel_occupied"
CHANNEL_VACATED = "channel_vacated"
MEMBER_ADDED = "member_added"
MEMBER_REMOVED = "member_removed"

_OPPOSITE = {
    CHANNEL_OCCUPIED: CHANNEL_VACATED,
    CHANNEL_VACATED: CHANNEL_OCCUPIED,
    MEMBER_ADDED: MEMBER_REMOVED,
    MEMBER_REMOVED: MEMBER_ADDED,
}
_MEMBER_EVENTS = frozenset((MEMBER_ADDED, MEMBER_REMOVED))

SIGNATURE_HEADER = "X-Pushie-Signature"
"""The header that carries L{sign}C{(secret, body)}."""

MAX_BATCH = 100
"""The most events one POST carries."""

LOG_INTERVAL = 60.0
"""Seconds between two log lines about failed deliveries (or about a full queue)."""

log = Logger(namespace="pushie.webhooks")


# -- pure parts -------------------------------------------------------------


def sign(secret: bytes, body: bytes) -> str:
    """The signature of a webhook body: hex HMAC-SHA256 of the raw bytes with C{secret}."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str | bytes | None) -> bool:
    """
    Whether C{signature} (an C{X-Pushie-Signature} value) is L{sign}C{(secret, body)}.

    The comparison takes the same time wherever the first difference is.
    Surrounding whitespace and upper-case hex digits are accepted; anything
    else that is not the exact signature (C{None}, non-ASCII text) is C{False},
    never an exception.
    """
    if not signature:
        return False
    if isinstance(signature, str):
        try:
            given = signature.strip().lower().encode("ascii")
        except UnicodeEncodeError:
            return False
    elif isinstance(signature, bytes):
        given = signature.strip().lower()
    else:
        return False
    return hmac.compare_digest(sign(secret, body).encode("ascii"), given)


def check_url(url: str) -> str:
    """
    Check a webhook URL: C{http://} or C{https://} with a host.

    Suitable as a settings parser.

    @return: C{url}, unchanged.
    @raise ValueError: with a message a user can act on.
    """
    if not isinstance(url, str):
        raise ValueError("expected an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"not a valid URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL such as https://app.example.com/pushie/webhooks")
    return url


def _loggable_url(url: str) -> str:
    """C{url} without user, password, query or fragment: safe for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WebhookEvent:
    """
    One event of a webhook body; C{user_id} for member events (and a
    Pusher C{client_event} on a presence channel); C{extra} holds the other
    fields of events sent with L{Webhooks.send} (C{client_event},
    C{subscription_count}), as C{(name, value)} pairs in body order.
    """

    name: str
    channel: str
    user_id: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def opposite(self) -> WebhookEvent:
        """The event that undoes this one (vacated for occupied, removed for added, and back)."""
        return WebhookEvent(_OPPOSITE[self.name], self.channel, self.user_id)

    def to_json(self) -> dict[str, Any]:
        event: dict[str, Any] = {"name": self.name, "channel": self.channel}
        event.update(self.extra)
        if self.user_id is not None:
            event["user_id"] = self.user_id
        return event


def encode_body(time_ms: int, events: Iterable[WebhookEvent]) -> bytes:
    """The exact bytes of a webhook body (compact JSON, UTF-8)."""
    return dumps({"time_ms": time_ms, "events": [event.to_json() for event in events]})


# -- delivery ---------------------------------------------------------------


class _Discard(Protocol):
    """Reads a response body into nothing; fires C{finished} when it ends, however it ends."""

    def __init__(self, finished: Deferred[None]) -> None:
        self.finished = finished

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The status line decided the outcome; a body cut short changes nothing.
        if not self.finished.called:
            self.finished.callback(None)


def _discard_body(response: IResponse) -> Deferred[IResponse]:
    """
    Read and drop C{response}'s body so its connection can serve the next
    request.  Cancelling the returned Deferred closes the connection.
    """
    protocol: _Discard

    def cancel(d: Deferred[None]) -> None:
        if protocol.transport is not None:
            protocol.transport.stopProducing()  # type: ignore[attr-defined]  # tcp's IProducer side

    finished: Deferred[None] = Deferred(cancel)
    protocol = _Discard(finished)
    response.deliverBody(protocol)
    return finished.addCallback(lambda _: response)


def _describe(error: BaseException) -> str:
    """A short, single-line description of a network error (no traceback)."""
    reasons = getattr(error, "reasons", None)  # ResponseFailed and its relatives
    if reasons:
        first = reasons[0]
        error = first.value if isinstance(first, Failure) else first
    text = str(error).strip().replace("\n", " ")
    name = type(error).__name__
    description = f"{name}: {text}" if text else name
    return description if len(description) <= 200 else description[:197] + "..."


def _retry_after(response: IResponse) -> float:
    values = response.headers.getRawHeaders(b"retry-after") or []
    if values and values[0].strip().isdigit():
        return float(values[0].strip())
    return 0.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Outcome:
    """How one POST went: C{problem} is C{None} on success."""

    problem: str | None
    retryable: bool = False
    retry_after: float = 0.0


_DELIVERED = _Outcome(None)


@attr.s(frozen=True, auto_attribs=True)
class WebhookSettings:
    """
    What every L{Webhooks} of a daemon shares (its C{webhook_*} settings,
    the URL and secret apart): the native webhooks' and each Pusher app's.
    """

    debounce: float = 3.0
    retry_for: float = 60.0
    timeout: float = 10.0
    max_queue: int = 10000
    on_failure: Callable[[int], object] | None = None

    def webhooks(self, url: str, secret: bytes, reactor: Any, **more: Any) -> Webhooks:
        """L{Webhooks} to C{url} with these settings; C{more} as L{Webhooks.__init__} takes it."""
        return Webhooks(
            url,
            secret,
            reactor,
            debounce=self.debounce,
            retry_for=self.retry_for,
            timeout=self.timeout,
            max_queue=self.max_queue,
            on_failure=self.on_failure,
            **more,
        )


class Webhooks:
    """
    Signed webhook POSTs to one URL, debounced, batched, retried, bounded.

    See the module docstring for what is promised.  Every public method but
    L{stop} returns C{None} at once and never raises.

    @ivar delivered: events the receiver accepted (2xx).
    @ivar failed: events given up on (not retryable, or C{retry_for} ran out,
        or still undelivered when L{stop} finished).
    @ivar dropped: events dropped from a full queue.
    @ivar dropped_by_event: the same, by event name.
    @ivar cancelled: events never sent because their opposite followed them
        while they waited (counted one per event, so two per pair).
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        reactor: Any,
        http_client: HTTPClient | None = None,
        debounce: float = 3.0,
        retry_for: float = 60.0,
        timeout: float = 10.0,
        max_queue: int = 10000,
        *,
        concurrency: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stop_timeout: float = 2.0,
        on_failure: Callable[[int], object] | None = None,
        on_drop: Callable[[str], object] | None = None,
        signature_header: str = SIGNATURE_HEADER,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """
        @param url: where to POST; see L{check_url}.
        @param secret: the HMAC key shared with the receiver (not empty).
        @param reactor: an C{IReactorTime} (and C{IReactorTCP}, plus
            C{IReactorSSL} for https, when no C{http_client} is given).
        @param http_client: a treq C{HTTPClient}; its owner closes its pool.
            By default one is built on a persistent pool owned, and closed by
            L{stop}, here.
        @param debounce: seconds a C{channel_vacated} or C{member_removed} is
            held before it is sent (0: not held).
        @param retry_for: seconds after the first attempt during which a
            failed POST is retried.
        @param timeout: seconds one POST may take, answer body included.
        @param max_queue: most events waiting for a delivery slot.
        @param concurrency: most POSTs in flight at once.
        @param backoff: seconds before the first retry; doubles each time.
        @param max_backoff: the longest wait between two attempts.
        @param stop_timeout: how long L{stop} lets deliveries finish.
        @param on_failure: called with the number of events each time a
            POST is given up (and once by L{stop} for queued events it never
            sent), e.g. to count failures in a metric.
        @param on_drop: called with the event's name each time an event is
            dropped from a full queue.
        @param signature_header: the header that carries the signature
            (C{X-Pusher-Signature} for an app of the Pusher door).
        @param headers: more headers on every POST (C{X-Pusher-Key}).
        @raise ValueError: on a bad URL, an empty secret or a bad number.
        """
        check_url(url)
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("a webhook secret (non-empty bytes) is needed")
        if max_queue < 1 or concurrency < 1:
            raise ValueError("max_queue and concurrency must be at least 1")
        if min(debounce, retry_for, backoff, max_backoff, stop_timeout) < 0 or timeout <= 0:
            raise ValueError("times must not be negative and timeout must be positive")
        self.url = url
        self.reactor = reactor
        self.debounce = debounce
        self.retry_for = retry_for
        self.timeout = timeout
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.on_failure = on_failure
        self.on_drop = on_drop
        self._secret = secret
        self.signature_header = signature_header
        self.headers: dict[bytes | str, bytes | str] = {name: value for name, value in (headers or {}).items()}
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = concurrency
            self._pool.cachedConnectionTimeout = 60
            self._pool.retryAutomatically = False
            http_client = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))
        self._client = http_client
        self._log_url = _loggable_url(url)
        self._throttle = Throttle(log, reactor, interval=LOG_INTERVAL)
        self._random = random.Random()

        self._held: dict[WebhookEvent, IDelayedCall] = {}
        # The queue, split by what an event costs to lose, each in arrival order under a
        # sequence number; _pump merges them back in that order.  _queued finds a waiting
        # event by value, for its opposite to cancel it.
        self._seq = 0
        self._cheap: OrderedDict[int, WebhookEvent] = OrderedDict()  # occupancy events
        self._dear: OrderedDict[int, WebhookEvent] = OrderedDict()  # member events
        self._queued: dict[WebhookEvent, int] = {}
        # Events decided by the engine (L{take}): seq -> the transition and who to settle it with.
        self._decided: dict[int, tuple[Transition, Callable[[Sequence[Transition]], None]]] = {}
        # seq -> the take() call it came in: a POST never mixes two (see _pump).
        self._take_of: dict[int, int] = {}
        self._takes = 0
        self._pump_call: IDelayedCall | None = None
        self._in_flight: dict[Deferred[None], None] = {}
        self._sleeping: dict[Deferred[None], None] = {}

        self._stopping = False
        self._closed = False
        self._stop_timer: IDelayedCall | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._stopped = False

        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.dropped_by_event: dict[str, int] = {}
        self.cancelled = 0

    # -- what the Hub calls ----------------------------------------------

    def channel_occupied(self, channel: str) -> None:
        """A channel got its first subscriber (sent now, unless it undoes a held vacate)."""
        self._now(WebhookEvent(CHANNEL_OCCUPIED, channel), undoes=WebhookEvent(CHANNEL_VACATED, channel))

    def channel_vacated(self, channel: str) -> None:
        """A channel lost its last subscriber (held for C{debounce} seconds)."""
        self._later(WebhookEvent(CHANNEL_VACATED, channel))

    def member_added(self, channel: str, member_id: str) -> None:
        """A presence member joined (sent now, unless it undoes a held removal)."""
        user_id = str(member_id)
        self._now(WebhookEvent(MEMBER_ADDED, channel, user_id), undoes=WebhookEvent(MEMBER_REMOVED, channel, user_id))

    def member_removed(self, channel: str, member_id: str) -> None:
        """A presence member left (held for C{debounce} seconds)."""
        self._later(WebhookEvent(MEMBER_REMOVED, channel, str(member_id)))

    def send(self, event: WebhookEvent) -> None:
        """
        Queue an event that nothing undoes (a Pusher C{client_event},
        C{cache_miss}, C{subscription_count}): never held, never cancelled,
        batched, retried and bounded like the others (an occupancy-class
        event when the queue is full).
        """
        try:
            if not self._closed:
                self._enqueue(event)
        except Exception:
            log.failure("Webhook bookkeeping failed for {event}", event=event)

    # -- what the engine hands over (the Redis engine: cluster-wide) --------

    def room(self) -> int:
        """How many more events the queue takes now (the engine reads no more than this: back-pressure)."""
        if self._stopping or self._closed:
            return 0
        return max(0, self.max_queue - self.queued)

    def take(self, transitions: Sequence[Transition], settle: Callable[[Sequence[Transition]], None]) -> None:
        """
        Queue transitions already decided cluster-wide (and already
        debounced) by the engine.  Each is settled with C{settle} once it is
        delivered, given up (after C{retry_for}, or refused), dropped from a
        full queue, or cancelled by its opposite; never when this daemon
        stops first, so that another node delivers it.  Never raises.
        """
        self._takes += 1
        for transition in transitions:
            try:
                if self._closed:
                    return
                event = WebhookEvent(transition.name, transition.channel, transition.user_id)
                if self._cancel_queued(event.opposite):
                    self._settle_decided([(transition, settle)])
                    continue
                self._enqueue(event, (transition, settle))
                if self._seq in self._decided:  # not dropped at once from a full queue
                    self._take_of[self._seq] = self._takes
            except Exception:
                log.failure("Webhook bookkeeping failed for {transition}", transition=transition)

    def _settle_decided(self, decided: Iterable[tuple[Transition, Callable[[Sequence[Transition]], None]]]) -> None:
        groups: dict[Callable[[Sequence[Transition]], None], list[Transition]] = {}
        for transition, settle in decided:
            groups.setdefault(settle, []).append(transition)
        for settle, group in groups.items():
            try:
                settle(group)
            except Exception:
                log.failure("Settling webhook transitions failed")

    # -- introspection (metrics, tests) -----------------------------------

    @property
    def held(self) -> int:
        """Events waiting out their debounce."""
        return len(self._held)

    @property
    def queued(self) -> int:
        """Events due and waiting for a delivery slot."""
        return len(self._cheap) + len(self._dear)

    @property
    def in_flight(self) -> int:
        """Batches being delivered (a request under way or waiting to retry)."""
        return len(self._in_flight)

    # -- bookkeeping -----------------------------------------------------

    def _now(self, event: WebhookEvent, undoes: WebhookEvent) -> None:
        try:
            if self._closed:
                return
            call = self._held.pop(undoes, None)
            if call is not None:
                # The opposite event is still held: together they are nothing.
                if call.active():
                    call.cancel()
                return
            self._settle(event)
        except Exception:
            log.failure("Webhook bookkeeping failed for {event}", event=event)

    def _later(self, event: WebhookEvent) -> None:
        try:
            if self._closed or event in self._held:
                return
            if self._cancel_queued(event.opposite):
                return
            if self.debounce <= 0 or self._stopping:
                self._enqueue(event)
                return
            self._held[event] = self.reactor.callLater(self.debounce, self._release, event)
        except Exception:
            log.failure("Webhook bookkeeping failed for {event}", event=event)

    def _release(self, event: WebhookEvent) -> None:
        if self._held.pop(event, None) is not None:
            self._settle(event)

    def _settle(self, event: WebhookEvent) -> None:
        """Queue C{event}, unless its opposite still waits in the queue: then neither is sent."""
        if not self._cancel_queued(event.opposite):
            self._enqueue(event)

    def _cancel_queued(self, event: WebhookEvent) -> bool:
        """Take C{event} out of the queue if it waits there; whether it did."""
        seq = self._queued.pop(event, None)
        if seq is None:
            return False
        queue = self._dear if event.name in _MEMBER_EVENTS else self._cheap
        del queue[seq]
        self.cancelled += 2
        self._take_of.pop(seq, None)
        decided = self._decided.pop(seq, None)
        if decided is not None:
            self._settle_decided([decided])
        return True

    def _enqueue(
        self, event: WebhookEvent, decided: tuple[Transition, Callable[[Sequence[Transition]], None]] | None = None
    ) -> None:
        self._seq += 1
        seq = self._seq
        if decided is not None:
            self._decided[seq] = decided
        (self._dear if event.name in _MEMBER_EVENTS else self._cheap)[seq] = event
        self._queued[event] = seq
        if self.queued > self.max_queue:
            self._drop_one()
        if self._pump_call is None:
            # Everything that becomes due in this reactor turn leaves together.
            self._pump_call = self.reactor.callLater(0, self._pump)

    def _drop_one(self) -> None:
        """Drop the cheapest waiting event: the oldest occupancy event, else the oldest member event."""
        seq, event = (self._cheap or self._dear).popitem(last=False)
        if self._queued.get(event) == seq:
            del self._queued[event]
        self._take_of.pop(seq, None)
        decided = self._decided.pop(seq, None)
        if decided is not None:
            self._settle_decided([decided])  # given up
        self.dropped += 1
        self.dropped_by_event[event.name] = self.dropped_by_event.get(event.name, 0) + 1
        if self.on_drop is not None:
            try:
                self.on_drop(event.name)
            except Exception:
                log.failure("Webhook on_drop callback failed")
        self._throttle.warn(
            "webhook_queue_full",
            "Webhook queue full ({max_queue} events waiting for {url}): dropped {event} of {channel} "
            "({dropped} dropped so far, occupancy events first; see pushie_webhook_events_dropped_total)",
            max_queue=self.max_queue,
            url=self._log_url,
            event=event.name,
            channel=event.channel,
            dropped=self.dropped,
        )

    def _take(self) -> tuple[WebhookEvent, tuple[Transition, Callable[[Sequence[Transition]], None]] | None]:
        """The event that has waited longest, of either kind (and its transition, when the engine decided it)."""
        cheap, dear = self._cheap, self._dear
        if cheap and (not dear or next(iter(cheap)) < next(iter(dear))):
            seq, event = cheap.popitem(last=False)
        else:
            seq, event = dear.popitem(last=False)
        if self._queued.get(event) == seq:
            del self._queued[event]
        self._take_of.pop(seq, None)
        return event, self._decided.pop(seq, None)

    def _next_take(self) -> int | None:
        """The take() call of the event L{_take} would return next (None: the Hub's own event)."""
        heads = [next(iter(queue)) for queue in (self._cheap, self._dear) if queue]
        return self._take_of.get(min(heads)) if heads else None

    def _clear_queue(self) -> None:
        self._cheap.clear()
        self._dear.clear()
        self._queued.clear()
        self._decided.clear()  # not settled: another node delivers them
        self._take_of.clear()

    def _pump(self) -> None:
        self._pump_call = None
        while self.queued and len(self._in_flight) < self.concurrency:
            # Transitions of one take() only (for Redis: one contiguous run of the
            # stream), so that POSTs ordered by their time_ms are ordered as decided.
            first = self._next_take()
            taken = [self._take()]
            while len(taken) < MAX_BATCH and self.queued and self._next_take() == first:
                taken.append(self._take())
            batch = [event for event, _ in taken]
            decided = [t for _, t in taken if t is not None]
            d = Deferred.fromCoroutine(self._deliver(batch, decided))
            self._in_flight[d] = None
            d.addBoth(self._finished, d)

    def _finished(self, result: object, d: Deferred[None]) -> None:
        self._in_flight.pop(d, None)
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("Webhook delivery crashed", result)
        if self.queued and self._pump_call is None and not self._closed:
            self._pump_call = self.reactor.callLater(0, self._pump)
        self._check_stopped()

    # -- delivery --------------------------------------------------------

    async def _deliver(
        self,
        batch: list[WebhookEvent],
        decided: Sequence[tuple[Transition, Callable[[Sequence[Transition]], None]]] = (),
    ) -> None:
        """
        POST one batch until it is accepted, refused, or out of time; then
        settle its decided transitions (not when stopped first: they stay
        the engine's, for another node to deliver).
        """
        started = self.reactor.seconds()
        decided_at = [t.time_ms for t, _ in decided if t.time_ms is not None]
        # The Hub's events: the time of the first POST; the engine's: when the first was decided.
        time_ms = min(decided_at) if decided_at and len(decided_at) == len(batch) else int(started * 1000)
        body = encode_body(time_ms, batch)
        headers: dict[bytes | str, bytes | str] = {
            "Content-Type": "application/json",
            "User-Agent": f"Pushie/{__version__}",
            **self.headers,
            self.signature_header: sign(self._secret, body),
        }
        delay = self.backoff
        attempts = 0
        try:
            while True:
                attempts += 1
                outcome = await self._attempt(body, headers)
                if outcome.problem is None:
                    self.delivered += len(batch)
                    self._settle_decided(decided)
                    return
                if self._stopping:
                    self._failed(len(batch))  # summarised by stop()
                    return
                if not outcome.retryable:
                    self._gave_up(batch, outcome.problem)
                    self._settle_decided(decided)
                    return
                wait = delay * self._random.uniform(0.5, 1.0)
                wait = max(wait, min(outcome.retry_after, self.max_backoff))
                if self.reactor.seconds() + wait > started + self.retry_for:
                    self._gave_up(
                        batch, f"{outcome.problem} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
                    )
                    self._settle_decided(decided)
                    return
                await self._sleep(wait)
                delay = min(delay * 2, self.max_backoff)
        except CancelledError:
            self._failed(len(batch))  # stopped meanwhile; summarised by stop()

    async def _attempt(self, body: bytes, headers: dict[bytes | str, bytes | str]) -> _Outcome:
        """One POST with its timeout; network trouble is an L{_Outcome}, never an exception."""
        timed_out = False
        try:
            d = self._client.post(self.url, data=body, headers=headers, allow_redirects=False, unbuffered=True)
        except Exception as e:
            return _Outcome(_describe(e))
        d.addCallback(_discard_body)

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self.reactor.callLater(self.timeout, expire)
        try:
            response = await d
        except CancelledError:
            if not timed_out:
                raise  # stop() gave up on this delivery
            return _Outcome(f"no answer within {self.timeout:g}s", retryable=True)
        except Exception as e:
            return _Outcome(_describe(e), retryable=True)
        finally:
            if timer.active():
                timer.cancel()
        code = response.code
        if 200 <= code < 300:
            return _DELIVERED
        if code == 429 or code >= 500:
            return _Outcome(f"HTTP {code}", retryable=True, retry_after=_retry_after(response))
        return _Outcome(f"HTTP {code}")

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait C{seconds} on the reactor; cancelling the Deferred cancels the timer."""

        def cancel(d: Deferred[None]) -> None:
            if call.active():
                call.cancel()

        d: Deferred[None] = Deferred(cancel)
        call = self.reactor.callLater(seconds, d.callback, None)
        self._sleeping[d] = None

        def awake(result: object) -> object:
            self._sleeping.pop(d, None)
            return result

        return d.addBoth(awake)

    def _failed(self, count: int) -> None:
        self.failed += count
        if self.on_failure is not None and count:
            try:
                self.on_failure(count)
            except Exception:
                log.failure("Webhook on_failure callback failed")

    def _gave_up(self, batch: list[WebhookEvent], problem: str) -> None:
        self._failed(len(batch))
        self._throttle.warn(
            "webhook_failed",
            "Webhook POST to {url} failed, {count} events dropped: {problem}",
            url=self._log_url,
            count=len(batch),
            problem=problem,
        )

    # -- stopping --------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """
        Stop: send the held events now, give queued and in-flight deliveries
        up to C{stop_timeout} seconds (without further retries), drop the
        rest, close the pool owned here.  Calls that arrive meanwhile are sent
        too (undebounced); calls after the end are ignored.

        @return: a Deferred that fires once no request, timer or owned
            connection is left.  Calling it again is harmless.
        """
        if self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if self._stopping:
            return waiter
        self._stopping = True
        # Armed first: cancelling a sleep below may finish the stop at once,
        # and finishing cancels this timer.
        self._stop_timer = self.reactor.callLater(self.stop_timeout, self._abandon)
        held, self._held = self._held, {}
        for event, call in held.items():
            if call.active():
                call.cancel()
            self._enqueue(event)
        for sleep in list(self._sleeping):
            sleep.cancel()  # a retry that waits would not happen in time anyway
        if self._pump_call is not None:
            self._pump_call.cancel()
        self._pump()
        self._check_stopped()
        return waiter

    def _abandon(self) -> None:
        self._stop_timer = None
        self._failed(self.queued)
        self._clear_queue()
        for d in list(self._in_flight):
            d.cancel()
        self._check_stopped()

    def _check_stopped(self) -> None:
        if not self._stopping or self._closed or self.queued or self._in_flight:
            return
        self._closed = True
        for call in (self._stop_timer, self._pump_call):
            if call is not None and call.active():
                call.cancel()
        self._stop_timer = self._pump_call = None
        if self.failed:
            log.info(
                "Webhooks stopped: {delivered} events delivered, {failed} given up, {dropped} dropped (queue full)",
                delivered=self.delivered,
                failed=self.failed,
                dropped=self.dropped,
            )
        closing = self._pool.closeCachedConnections() if self._pool is not None else succeed(None)
        closing.addErrback(lambda f: None)
        closing.addBoth(self._done_stopping)

    def _done_stopping(self, result: object) -> None:
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
