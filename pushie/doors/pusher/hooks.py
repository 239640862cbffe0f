# -*- test-case-name: tests.test_pusher_hooks -*-
"""
Pusher-format webhooks per app, and subscription counts pushed to clients.

L{PusherWebhooks} keeps one L{Webhooks} per app that has a C{webhook_url}
(apps file option), signing with the app's secret in C{X-Pusher-Signature}
and naming the app in C{X-Pusher-Key}: the body is Pusher's
C{{"time_ms", "events"}}, so a Pusher SDK's C{validate_webhook} /
C{webhook(...).isValid()} accepts it.  It is a
L{pushie.hub.WebhookRoute}: the Hub hands it the same transitions as the
native webhooks (C{channel_occupied}, C{channel_vacated}, C{member_added},
C{member_removed}; with Redis decided once for the whole cluster, with
memory this daemon's), and it keeps those of the app's own channel space,
under the names the app knows them by.  The door adds C{client_event},
C{cache_miss} and C{subscription_count} (L{Webhooks.send}): those are sent by
the daemon where they happen, so each is sent once too.

L{SubscriptionCounts} sends C{pusher_internal:subscription_count}
C{{"subscription_count": N}} to the subscribers of a channel of an app with
C{subscription_count=true} when the channel's count (cluster-wide: the
Hub's L{subscription_counts}) changes, at most once every C{interval}
seconds per channel: the first change is sent at once, the ones that follow
within the interval together at its end with the count then.  Never on
presence channels (Pusher does not send it there: C{member_added} and
C{member_removed} are their counts).  A change on another daemon is seen
by a read of the counts every C{interval} seconds, for the channels that
have subscribers here.  With a C{webhook_url}, the app's receiver gets a
C{subscription_count} event for each change made on this daemon, under the
same throttle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushie.doors.pusher.apps import App, Apps, is_pusher_channel, is_pusher_presence
from pushie.webhooks import WebhookEvent, Webhooks, WebhookSettings

log = Logger(namespace="pushie.doors.pusher")

SIGNATURE_HEADER = "X-Pusher-Signature"
KEY_HEADER = "X-Pusher-Key"


class PusherWebhooks:
    """The Pusher-format webhooks of every app that has a C{webhook_url} (a L{pushie.hub.WebhookRoute})."""

    def __init__(self, apps: Apps, make: Callable[[str, App], Webhooks]) -> None:
        """
        @param make: builds an app's L{Webhooks} for a URL (the daemon's
            C{webhook_*} settings: debounce, retries, timeout, queue).
        """
        self.apps = apps
        self.make = make
        self._hooks: dict[str, tuple[tuple[str, str, str], Webhooks]] = {}
        self.sync()

    def sync(self) -> Deferred[Any]:
        """Follow the apps (after a reload): new webhooks for a new URL, key or secret; stop the ones gone."""
        wanted = {a.id: a for a in self.apps.all if a.webhook_url}
        stopping = []
        for app_id, (identity, webhooks) in list(self._hooks.items()):
            app = wanted.get(app_id)
            if app is None or identity != (app.webhook_url, app.key, app.secret):
                del self._hooks[app_id]
                stopping.append(webhooks.stop())
        for app_id, app in wanted.items():
            if app_id not in self._hooks:
                assert app.webhook_url is not None
                self._hooks[app_id] = ((app.webhook_url, app.key, app.secret), self.make(app.webhook_url, app))
        return gatherResults(stopping)

    def for_app(self, app: App) -> Webhooks | None:
        entry = self._hooks.get(app.id)
        return entry[1] if entry is not None else None

    def webhooks_for(self, channel: str) -> tuple[Webhooks, str] | None:
        app = self.apps.owner(channel)
        if app is None:
            return None
        webhooks = self.for_app(app)
        if webhooks is None or not app.owns(channel):
            return None
        name = app.channel_name(channel)
        if not is_pusher_channel(name):
            return None  # a user's channel (#server-to-user-...), or a native-only name
        return webhooks, name

    def all_webhooks(self) -> Sequence[Webhooks]:
        return [webhooks for _, webhooks in self._hooks.values()]

    def send(self, app: App, event: WebhookEvent) -> None:
        """Send an event of the door's own (client_event, cache_miss, subscription_count) if the app has webhooks."""
        webhooks = self.for_app(app)
        if webhooks is not None:
            webhooks.send(event)


def pusher_webhooks_for(url: str, app: App, settings: WebhookSettings, reactor: Any) -> Webhooks:
    """An app's L{Webhooks}: signed with its secret, in Pusher's headers."""
    return settings.webhooks(
        url, app.secret.encode("utf-8"), reactor, signature_header=SIGNATURE_HEADER, headers={KEY_HEADER: app.key}
    )


class CountSubscriber(Protocol):
    def send_event(self, event: str, data: Any, channel: str | None = None) -> None: ...


class _Counted:
    """One channel whose subscribers get its count."""

    __slots__ = ("app", "name", "subscribers", "sent", "sent_at", "timer", "local_change")

    def __init__(self, app: App, name: str) -> None:
        self.app = app
        self.name = name  # the app's name for it
        self.subscribers: dict[CountSubscriber, None] = {}
        self.sent: int | None = None
        self.sent_at = float("-inf")
        self.timer: IDelayedCall | None = None
        self.local_change = False


class SubscriptionCounts:
    """C{pusher_internal:subscription_count} events, throttled per channel (see the module docstring)."""

    def __init__(
        self,
        counts: Callable[[Sequence[str]], Deferred[dict[str, int]]],
        clock: Any,
        interval: float,
        webhooks: PusherWebhooks | None = None,
    ) -> None:
        self.counts = counts
        self.clock = clock
        self.interval = interval
        self.webhooks = webhooks
        self._channels: dict[str, _Counted] = {}
        self._poll: LoopingCall | None = None

    @staticmethod
    def wanted(app: App, channel: str) -> bool:
        return app.subscription_count and not is_pusher_presence(channel)

    def subscribed(self, app: App, channel: str, hub_name: str, subscriber: CountSubscriber) -> None:
        """A live subscription of a counted channel (call after L{wanted})."""
        counted = self._channels.get(hub_name)
        if counted is None:
            counted = self._channels[hub_name] = _Counted(app, channel)
        counted.app = app
        counted.subscribers[subscriber] = None
        self._changed(counted)
        if self._poll is None:
            self._poll = LoopingCall(self._read_all)
            self._poll.clock = self.clock
            self._poll.start(self.interval, now=False)

    def unsubscribed(self, hub_name: str, subscriber: CountSubscriber) -> None:
        counted = self._channels.get(hub_name)
        if counted is None or counted.subscribers.pop(subscriber, 0) is not None:
            return
        self._changed(counted)

    def _changed(self, counted: _Counted) -> None:
        counted.local_change = True
        if counted.timer is not None:
            return  # the change goes with the one already due
        wait = max(0.0, counted.sent_at + self.interval - self.clock.seconds())
        counted.timer = self.clock.callLater(wait, self._due, counted)

    def _due(self, counted: _Counted) -> None:
        counted.timer = None
        hub_name = counted.app.hub_name(counted.name)
        self.counts([hub_name]).addCallback(lambda counts: self._send(counted, counts.get(hub_name, 0))).addErrback(
            lambda f: log.failure("Reading a subscription count failed", f)
        )

    def _read_all(self) -> None:
        """Every interval: the counts of the channels with subscribers here, for changes made on other daemons."""
        idle = [name for name, c in self._channels.items() if not c.subscribers and c.timer is None]
        for name in idle:
            del self._channels[name]
        if not self._channels:
            if self._poll is not None and self._poll.running:
                self._poll.stop()
            self._poll = None
            return
        names = [name for name, c in self._channels.items() if c.timer is None]
        if not names:
            return

        def got(counts: dict[str, int]) -> None:
            now = self.clock.seconds()
            for name in names:
                counted = self._channels.get(name)
                if counted is not None and counted.timer is None and now - counted.sent_at >= self.interval:
                    self._send(counted, counts.get(name, 0))

        self.counts(names).addCallback(got).addErrback(lambda f: log.failure("Reading subscription counts failed", f))

    def _send(self, counted: _Counted, count: int) -> None:
        local, counted.local_change = counted.local_change, False
        if count == counted.sent:
            return
        counted.sent = count
        counted.sent_at = self.clock.seconds()
        for subscriber in list(counted.subscribers):
            try:
                subscriber.send_event("pusher_internal:subscription_count", {"subscription_count": count}, counted.name)
            except Exception:
                log.failure("Sending a subscription count failed")
        if local and self.webhooks is not None:
            self.webhooks.send(
                counted.app,
                WebhookEvent("subscription_count", counted.name, extra=(("subscription_count", count),)),
            )

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        for counted in self._channels.values():
            if counted.timer is not None and counted.timer.active():
                counted.timer.cancel()
            counted.timer = None
        self._channels.clear()
