# -*- test-case-name: tests.test_daemon -*-
"""
twistd's entry: L{Options} and L{makeService}, the only place where Pushie's
parts are wired together.

C{makeService(options, reactor)} takes the reactor as a parameter so that
tests can run the whole daemon in-process on port 0.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from pushie import __version__
from pushie.auth import GuardSettings, guard_from_settings
from pushie.config import SETTINGS, ConfigError, Settings, load_settings, pusher_apps
from pushie.doors._http import PushieSite
from pushie.doors.admin import AdminMonitor, AdminSettings
from pushie.doors.context import DoorContext
from pushie.doors.pusher.apps import App, Apps, AppsFile
from pushie.doors.pusher.door import PusherDoor, PusherDoorSettings, PusherFactory
from pushie.doors.pusher.hooks import PusherWebhooks, pusher_webhooks_for
from pushie.doors.sse import SSESettings
from pushie.doors.tree import SiteSettings, build_metrics_site, build_site
from pushie.doors.websocket import PushieServerFactory, WebSocketDoorSettings
from pushie.engines import EngineSettings, engine_from_settings
from pushie.hub import Hub
from pushie.limits import ConnectionLimits, RateLimiter
from pushie.logs import Throttle
from pushie.metrics import Metrics
from pushie.webhooks import Webhooks, WebhookSettings

log = Logger(namespace="pushie")


class Options(usage.Options):
    """C{twistd pushie} options; every setting is also a C{PUSHIE_*} variable and a TOML key."""

    synopsis = "[options]"
    longdesc = (
        "Run the Pushie push server.  Settings come from defaults, then the TOML "
        "file given by --config, then PUSHIE_* environment variables, then these options."
    )
    optParameters = [["config", "c", None, "TOML settings file (environment: PUSHIE_CONFIG)."]] + [
        [s.option, None, None, f"{s.help} [default: {s.default}; environment: {s.env}]"]
        for s in SETTINGS
        if not s.flag and not s.repeatable and s.cli
    ]
    optFlags = [[s.option, None, s.help] for s in SETTINGS if s.flag]

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to serve on; repeat for several [default: tcp:8080:interface=127.0.0.1]."""
        self.repeated.setdefault("listen", []).append(endpoint)

    opt_l = opt_listen

    def opt_allowed_origin(self, origin: str) -> None:
        """Origin a WebSocket page may come from, with its port, e.g. https://app.example.com:443 (repeatable)."""
        self.repeated.setdefault("allowed_origin", []).append(origin)

    def opt_version(self) -> None:
        print(f"pushie {__version__}")
        raise SystemExit(0)

    def command_line_values(self) -> dict[str, Any]:
        """The settings given on the command line, by setting name."""
        values: dict[str, Any] = dict(self.repeated)
        for setting in SETTINGS:
            if setting.repeatable or not setting.cli:
                continue
            value = self.get(setting.option)
            if setting.flag:
                value = True if value else None
            if value is not None:
                values[setting.name] = value
        return values

    def postOptions(self) -> None:
        try:
            self["settings"] = load_settings(self.command_line_values(), os.environ, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "reuseport"})
_HAS_BACKLOG = re.compile(r"(?<!\\):backlog=", re.IGNORECASE)


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{:backlog=<backlog>} added when it is a tcp, tcp6,
    ssl or unix endpoint string that gives no backlog of its own, or one of
    these wrapped by C{haproxy:} (PROXY protocol: Twisted's parser hands its
    arguments, the backlog with them, to the wrapped endpoint).
    """
    inner = description
    if inner[:8].lower() == "haproxy:":
        inner = inner[8:]
    kind = inner.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or _HAS_BACKLOG.search(description) is not None:
        return description
    return f"{description}:backlog={backlog}"


class ListenFailed(Exception):
    """An endpoint could not listen: C{str()} is the one line that says which and why."""

    def __init__(self, description: str, reason: object) -> None:
        super().__init__(f"Pushie could not listen on {description}: {reason}")
        self.description = description


class ListeningService(Service):
    """Listens on one endpoint while running; remembers the port it got."""

    def __init__(
        self, description: str, factory: Any, reactor: Any, backlog: int | None = None, what: str = "Pushie"
    ) -> None:
        self.description = description
        #: What the log line says listens here: the main endpoints serve
        #: everything, the C{--metrics-listen} one only C{/metrics}, and an
        #: operator must be able to tell them apart in the log.
        self.what = what
        self.factory = factory
        self.reactor = reactor
        self.backlog = backlog
        self.port: IListeningPort | None = None

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        """
        Listen.  The Deferred fails with L{ListenFailed} when the endpoint
        cannot (a busy port, a bad address, a wrong endpoint string).
        """
        super().startService()
        description = self.description
        if self.backlog is not None:
            description = with_backlog(description, self.backlog)
        try:
            d = serverFromString(self.reactor, description).listen(self.factory)
        except Exception as e:  # an endpoint string that does not parse raises at once
            d = fail(e)

        def listening(port: IListeningPort) -> None:
            self.port = port
            # self.what is fixed text from the wiring: kept in the format, so
            # that JSON log lines (log_format) say which listener this is.
            log.info(
                self.what + " listening on {endpoint} ({address})",
                endpoint=self.description,
                address=describe(port),
            )

        def failed(failure: Failure) -> Failure:
            return Failure(ListenFailed(self.description, failure.value))

        return d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()  # type: ignore[no-any-return]
        return None


def describe(port: IListeningPort) -> str:
    host: Any = port.getHost()  # any IAddress: the attributes are probed
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


# -- each part's settings ----------------------------------------------------
# The wiring is the only reader of the whole L{Settings}: each part gets a
# small record of what it uses, defined beside the part.


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(
        engine=settings.engine,
        history_size=settings.history_size,
        history_ttl=settings.history_ttl,
        memory_budget=settings.memory_budget,
        idempotency_max_keys=settings.idempotency_max_keys,
        redis_timeout=settings.redis_timeout,
        redis_sentinel_password=settings.redis_sentinel_password,
        redis_wait_replicas=settings.redis_wait_replicas,
    )


def guard_settings(settings: Settings) -> GuardSettings:
    return GuardSettings(
        publisher_keys=settings.publisher_keys,
        publisher_keys_file=settings.publisher_keys_file,
        subscriber_secrets=settings.subscriber_secrets,
        subscriber_secrets_file=settings.subscriber_secrets_file,
        require_token=settings.require_token,
        token_leeway=settings.token_leeway,
        token_audience=settings.token_audience,
    )


def websocket_door_settings(settings: Settings) -> WebSocketDoorSettings:
    return WebSocketDoorSettings(
        max_message_size=settings.max_message_size,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        allowed_origins=tuple(settings.allowed_origin),
        max_subscriptions=settings.max_subscriptions,
        slow_consumer_buffer=settings.slow_consumer_buffer,
        slow_consumer_grace=settings.slow_consumer_grace,
    )


def sse_settings(settings: Settings) -> SSESettings:
    return SSESettings(
        keepalive=settings.sse_keepalive,
        max_subscriptions=settings.max_subscriptions,
        slow_consumer_buffer=settings.slow_consumer_buffer,
        slow_consumer_grace=settings.slow_consumer_grace,
    )


def pusher_door_settings(settings: Settings) -> PusherDoorSettings:
    return PusherDoorSettings(
        activity_timeout=settings.pusher_activity_timeout,
        pong_timeout=settings.pusher_pong_timeout,
        client_event_rate=settings.pusher_client_event_rate,
        max_data_size=settings.pusher_max_data_size,
        subscription_count_interval=settings.pusher_subscription_count_interval,
        max_message_size=settings.max_message_size,
        max_subscriptions=settings.max_subscriptions,
        require_token=settings.require_token,
        slow_consumer_buffer=settings.slow_consumer_buffer,
        slow_consumer_grace=settings.slow_consumer_grace,
    )


def admin_settings(settings: Settings) -> AdminSettings:
    return AdminSettings(
        token=settings.admin_token,
        max_streams=settings.admin_max_streams,
        top_channels=settings.admin_top_channels,
        chart_seconds=settings.admin_chart_seconds,
        slow_consumer_buffer=settings.slow_consumer_buffer,
        slow_consumer_grace=settings.slow_consumer_grace,
    )


def webhook_settings(settings: Settings, metrics: Metrics) -> WebhookSettings:
    """What the native webhooks and every Pusher app's share; each POST given up counts in C{metrics}."""
    return WebhookSettings(
        debounce=settings.webhook_debounce,
        retry_for=settings.webhook_retry_for,
        timeout=settings.webhook_timeout,
        max_queue=settings.webhook_max_queue,
        on_failure=lambda count: metrics.webhooks_failed.inc(),
    )


def site_settings(settings: Settings) -> SiteSettings:
    return SiteSettings(
        max_body_size=settings.max_message_size,
        handshake_timeout=settings.handshake_timeout,
        serve_metrics=settings.metrics_listen is None,
    )


class PushieService(MultiService):
    """
    The whole daemon: the Hub, then one L{ListeningService} per endpoint.

    Stopping it stops listening first (children stop in reverse order), then
    drains the Hub.
    """

    def __init__(
        self, settings: Settings, reactor: Any, exit_on_failure: bool = False, reload_on_sighup: bool = False
    ) -> None:
        """
        @param exit_on_failure: end the process (status 1, one log line) when
            an endpoint cannot listen, as twistd's entries want; in-process
            users (tests) get the failed Deferred of L{startService} instead.
        @param reload_on_sighup: call L{reload} on C{SIGHUP} while running
            (the process's entries: C{twistd pushie}, C{pushie.tac}).
        """
        super().__init__()
        self.settings = settings
        self.exit_on_failure = exit_on_failure
        self.reload_on_sighup = reload_on_sighup
        self._reactor = reactor
        self._previous_sighup: Any = None
        self.engine = engine_from_settings(engine_settings(settings), reactor)
        # Every part gets its clock (the reactor), metrics and limits from here.
        metrics = Metrics()
        limits = ConnectionLimits(settings.max_connections, settings.max_connections_per_ip)
        self.hub = Hub(
            self.engine,
            reactor,
            shutdown_timeout=settings.shutdown_timeout,
            metrics=metrics,
            limits=limits,
            presence_max_members=settings.presence_max_members,
        )
        self.hub.setServiceParent(self)
        hooks = webhook_settings(settings, metrics)
        if settings.webhook_url is not None:
            assert settings.webhook_secret is not None
            self.hub.webhooks = hooks.webhooks(settings.webhook_url, settings.webhook_secret.encode("utf-8"), reactor)
        self.guard = guard_from_settings(guard_settings(settings), reactor)
        context = DoorContext(
            hub=self.hub,
            guard=self.guard,
            clock=reactor,
            metrics=metrics,
            throttle=Throttle(Logger(namespace="pushie.doors.api"), reactor),
        )
        self.websocket_factory = PushieServerFactory(context, websocket_door_settings(settings))
        rate_limiter = RateLimiter(settings.publish_rate, reactor)
        self.pusher_factory: PusherFactory | None = None
        apps_file = None
        if settings.pusher_apps_file:
            # Checked by load_settings already; read again here, and watched from now on.
            try:
                apps_file = AppsFile(settings.pusher_apps_file, settings.pusher_apps)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            apps = Apps(apps_file.apps)
        else:
            apps = Apps(pusher_apps(settings))
        self.hub.webhook_debounce = hooks.debounce
        self.hub.webhook_backlog = hooks.max_queue
        if apps or apps_file is not None:
            pusher_hooks = None
            if apps_file is not None or any(app.webhook_url for app in apps.all):
                # An apps file may give an app a webhook_url later (reload): the route is there from the start.

                def make_hooks(url: str, app: App) -> Webhooks:
                    return pusher_webhooks_for(url, app, hooks, reactor)

                pusher_hooks = PusherWebhooks(apps, make_hooks)
                self.hub.webhook_routes.append(pusher_hooks)
            self.pusher_factory = PusherFactory(
                context,
                apps,
                pusher_door_settings(settings),
                self.websocket_factory.origin_allowed,
                apps_file,
                pusher_hooks,
            )
            PusherDoor(self.pusher_factory).setServiceParent(self)
        # The dashboard's sampler runs only when the dashboard is on.  Children
        # stop in reverse order: it ends its streams after the ports stop listening.
        admin = admin_settings(settings)
        self.admin: AdminMonitor | None = None
        if admin.token is not None:
            self.admin = AdminMonitor(context, admin)
            self.admin.setServiceParent(self)
        self.site: PushieSite = build_site(
            context,
            site_settings(settings),
            sse_settings(settings),
            self.websocket_factory,
            rate_limiter,
            limits,
            self.pusher_factory,
            admin,
            self.admin,
        )
        self.listeners = [ListeningService(d, self.site, reactor, settings.listen_backlog) for d in settings.listen]
        if settings.metrics_listen is not None:
            self.listeners.append(
                ListeningService(
                    settings.metrics_listen,
                    build_metrics_site(metrics, site_settings(settings), reactor),
                    reactor,
                    settings.listen_backlog,
                    what="Metrics endpoint (/metrics only)",
                )
            )
        for listener in self.listeners:
            listener.setServiceParent(self)

    def startService(self) -> Deferred[Any]:  # type: ignore[override]
        log.info(
            "Pushie {version} starting: engine {engine}, endpoints {endpoints}{metrics}",
            version=__version__,
            engine=self.engine.name,
            endpoints=" ".join(self.settings.listen),
            metrics=(
                f", metrics endpoint {self.settings.metrics_listen} (/metrics only)"
                if self.settings.metrics_listen is not None
                else " (/metrics on each)"
            ),
        )
        if self.guard.publishing_open:
            log.warn(
                "Publishing is OPEN: no publisher keys are configured, so anyone who can "
                "reach the port may publish.  Configure keys before exposing this daemon."
            )
        else:
            assert self.guard.publisher_keys is not None  # publishing_open otherwise
            log.info("Publishing needs one of {count} publisher keys", count=len(self.guard.publisher_keys.values()))
        if self.admin is not None:
            log.info("Admin dashboard at /admin (needs the admin token)")
        if self.settings.webhook_url:
            target = urlsplit(self.settings.webhook_url)
            log.info("Webhooks go to {url}", url=f"{target.scheme}://{target.hostname}{target.path}")
        secrets = self.guard.subscriber_secrets.values() if self.guard.subscriber_secrets else []
        log.info(
            "Subscriber tokens: {state}; {channels} need one",
            state=f"{len(secrets)} secrets verify them" if secrets else "no secrets configured, tokens are refused",
            channels="all channels" if self.guard.require_token else "private-* and presence-* channels",
        )
        if self.pusher_factory is not None:
            apps = self.pusher_factory.apps.all
            log.info(
                "Pusher door: {count} apps ({ids}) at /app/<key> and /apps/<id>/; "
                "app {first} shares the native channels",
                count=len(apps),
                ids=", ".join(app.id for app in apps) or f"none yet: add them to {self.settings.pusher_apps_file}",
                first=apps[0].id if apps else "(the first listed)",
            )
            named = [app.id for app in apps if not app.id.isdigit()]
            if named:
                # The daemon takes any id, but the Python SDK (pusher.Pusher)
                # refuses an app_id that is not digits, and Pusher's own ids
                # are numbers: say so now rather than at the first trigger.
                log.warn(
                    "Pusher app ids {ids} are not numeric: the Python pusher SDK accepts only "
                    "numeric app ids (as Pusher issues them); use digits, e.g. 123456",
                    ids=", ".join(named),
                )
        if self.exit_on_failure and self.settings.gc_threshold:
            tune_gc(self.settings.gc_threshold)
        if self.reload_on_sighup and threading.current_thread() is threading.main_thread():
            # The handler only queues the reload: the reactor runs it between two events.
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda signum, frame: self._reactor.callFromThread(self.reload)
            )
        # MultiService.startService ignores its children's Deferreds; gather
        # them so that callers (and tests) learn when every port listens.
        Service.startService(self)
        results = [d for d in (child.startService() for child in self) if isinstance(d, Deferred)]
        gathered = DeferredList(results, fireOnOneErrback=True, consumeErrors=True)

        def failed(failure: Any) -> Any:
            reason = failure.value.subFailure
            if reason.check(ListenFailed):
                log.critical("{reason}", reason=str(reason.value))
            else:
                log.failure("Pushie could not start", reason)
            return reason

        gathered.addErrback(failed)
        if not self.exit_on_failure:
            return gathered
        # Under twistd: a daemon that cannot serve every endpoint must not
        # look alive (systemd's Restart=on-failure needs a non-zero exit).
        outcome: list[Any] = []
        gathered.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # Before the reactor runs (ports listen at once): twistd lets
            # SystemExit through, so the process ends with status 1.
            raise SystemExit(1)
        if not outcome:
            gathered.addErrback(lambda _: self._exit_now())
        return succeed(None)

    def reload(self) -> None:
        """
        Read every watched file again now (C{SIGHUP}): the publisher keys,
        the subscriber secrets and the Pusher apps.  A file that has turned
        bad keeps what it held and says why in the log.
        """
        log.info("Reloading the keys, secrets and apps files")
        self.guard.reload()
        if self.pusher_factory is not None:
            self.pusher_factory.reload_apps(force=True)

    def stopService(self) -> Deferred[Any]:  # type: ignore[override]
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        return super().stopService()  # type: ignore[no-any-return]

    def _exit_now(self) -> None:
        """An endpoint failed after start-up began: end the process with status 1."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def ports(self) -> list[IListeningPort]:
        return [listener.port for listener in self.listeners if listener.port is not None]


def tune_gc(threshold: int) -> None:
    """
    Set the garbage collector for a daemon that holds many long-lived
    objects (connections, kept history): freeze what exists at startup
    (modules, settings: it lives as long as the process) out of every
    collection, and collect the young generation every C{threshold}
    allocations instead of Python's 700.

    Why: CPython collects its oldest generation, every tracked object of
    the process, once the objects promoted since the last full collection
    reach a quarter of it.  With 700, collections run in the middle of a
    reactor turn and promote what is merely in flight (requests, Deferreds,
    frames being built), so with 10,000 connections the full collections
    (about a second each on a loaded 2-core machine) came every few
    seconds of a publishing run; short-lived objects are freed by their
    reference counts anyway.  Measured in bench/PROFILES.md.  Only the
    daemon (twistd) does this: it changes the whole process.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
    log.info(
        "Garbage collector: {frozen} startup objects frozen, young generation every {threshold} allocations",
        frozen=gc.get_freeze_count(),
        threshold=threshold,
    )


def makeService(options: Mapping[str, Any], reactor: Any = None) -> PushieService:
    """Build the daemon from parsed L{Options} (or any mapping with C{settings})."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = options["settings"]
    return PushieService(settings, reactor, exit_on_failure=True, reload_on_sighup=True)
